/**
 * A request under way renews its reservation's lease however long it takes: a stream that
 * sends nothing for longer than the lease (an upstream sending SSE keep-alive comments while
 * it thinks), a whole completion whose upstream takes longer than the lease. The sweep never
 * takes it for a dead instance's request (releasing its credits, its plan's concurrency and
 * its Idempotency-Key, and charging only what it had recorded: a whole answer nothing).
 */
import { afterAll, expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

const enc = new TextEncoder()
const ev = (o: unknown) => `data: ${JSON.stringify(o)}\n\n`

/** An upstream that streams `first`, then only keep-alive comments (`quiet` of them, 250 ms
 * apart: thinking), then `later`. */
function quietUpstream(first: string[], quiet: number, later: string[]) {
  return Scripted.serve(() => {
    const stream = new ReadableStream({
      type: 'direct',
      async pull(controller) {
        const w = (s: string) => {
          controller.write(enc.encode(s))
          controller.flush()
        }
        for (const t of first) w(ev(Scripted.chunk({ content: t })))
        for (let i = 0; i < quiet; i++) {
          await Bun.sleep(250)
          w(': keep-alive\n\n')
        }
        for (const t of later) w(ev(Scripted.chunk({ content: t })))
        w(ev(Scripted.chunk({}, 'stop')))
        w('data: [DONE]\n\n')
        controller.close()
      },
    })
    return new Response(stream, { headers: { 'content-type': 'text/event-stream' } })
  })
}

const FIRST = [' one', ' two', ' three', ' four']
const LATER = [' five', ' six']
// Quiet for 3 s, each keep-alive well inside the upstream timeout.
const url = quietUpstream(FIRST, 12, LATER)
const gw = await Scripted.gateway(
  url,
  ['m'],
  { timeoutMs: 1_000 },
  { metering: { blockTokens: 16, leaseSeconds: 2 } },
)
const messages = [{ role: 'user' as const, content: 'think hard' }]
const prompt = Tokenizer.prompt(messages)
const all = [...FIRST, ...LATER].reduce((n, t) => n + Tokenizer.count(t), 0)

test('behavior: a stream alive but quiet (keep-alive comments) past its lease is neither swept nor cut', async () => {
  const { id, key } = await gw.account()
  const sweeper = setInterval(() => void Reservations.sweep(gw.sql), 200)
  try {
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'm', messages, stream: true, max_tokens: 200 }),
    })
    expect(res.status).toBe(200)
    const body = await res.text()
    await Batch.settled(gw.sql)
    const l = await Gateway.ledger(gw.sql, id)
    const [u] = await gw.sql`select status, cost from usage where account_id = ${id}`
    expect(u).toEqual({ status: 'ok', cost: BigInt(prompt + 2 * all) })
    expect(body).not.toContain('insufficient_credits')
    expect(1_000_000n - l.balance).toBe(BigInt(prompt + 2 * all))
  } finally {
    clearInterval(sweeper)
  }
})

// A whole completion whose upstream answers after 2.5 s, with a lease of 1 s.
const slow = Scripted.serve(async () => {
  await Bun.sleep(2_500)
  return Response.json(
    Scripted.completion(
      { content: 'one two three four' },
      { prompt_tokens: 10, completion_tokens: 4, total_tokens: 14 },
    ),
  )
})
const whole = await Scripted.gateway(
  slow,
  ['slow'],
  { timeoutMs: 10_000 },
  { metering: { blockTokens: 16, leaseSeconds: 1 } },
)

test('behavior: a whole completion that outlives its lease is charged, not swept, and holds its plan slot while it runs', async () => {
  const { key, id } = await whole.account({ plan: 'free', credits: 1_000n })
  const ask = () =>
    fetch(`${whole.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'slow', max_tokens: 10, messages }),
    })
  const pending = ask()
  await Bun.sleep(1_600)
  // The sweep every instance runs (now, rather than in 30 s): nothing of this request's.
  expect(await Reservations.sweep(whole.sql)).toBe(0)
  // The free plan takes one request at a time: the first still holds it.
  expect((await ask()).status).toBe(429)
  const res = await pending
  expect(res.status).toBe(200)
  const { usage } = (await res.json()) as { usage: { cost: string } }
  // 10 prompt and 4 completion tokens, at 1 and 2 a token.
  expect(usage.cost).toBe('18')
  await Batch.settled(whole.sql)
  const l = await Gateway.ledger(whole.sql, id)
  expect(l.balance).toBe(1_000n - 18n)
  const rows = await whole.sql`select status from usage where account_id = ${id}`
  expect(rows.map((r) => r.status)).toEqual(['ok'])
}, 15_000)

const SWEPT_FIRST = [' one', ' two', ' three', ' four']
const SWEPT_LATER = [' five', ' six', ' seven', ' eight']
const quietThenMore = quietUpstream(SWEPT_FIRST, 6, SWEPT_LATER)
// Another gateway, a lease of 3 s (renewals every second).
const sweptGw = await Scripted.gateway(
  quietThenMore,
  ['m'],
  { timeoutMs: 2_000 },
  { metering: { blockTokens: 16, leaseSeconds: 3 } },
)

test('behavior: a stream swept while its upstream is quiet sends nothing more once its renewal is refused', async () => {
  const { id, key } = await sweptGw.account()
  const res = await fetch(`${sweptGw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', messages, stream: true, max_tokens: 200 }),
  })
  expect(res.status).toBe(200)
  const reader = res.body!.getReader()
  let body = new TextDecoder().decode((await reader.read()).value)
  // Quiet upstream: the lease runs out (forced here) and a sweep releases the reservation.
  await Bun.sleep(200)
  await sweptGw.sql`update reservations set expires_at = clock_timestamp() - interval '1 second'`
  expect(await Reservations.sweep(sweptGw.sql)).toBe(1)
  for (let r = await reader.read(); !r.done; r = await reader.read())
    body += new TextDecoder().decode(r.value)
  let got = ''
  for (const b of body.split('\n\n'))
    if (b.startsWith('data: {"id"')) got += JSON.parse(b.slice(6)).choices[0]?.delta?.content ?? ''
  await Batch.settled(sweptGw.sql)
  const l = await Gateway.ledger(sweptGw.sql, id)
  const received = [...SWEPT_FIRST, ...SWEPT_LATER]
    .filter((w) => got.includes(w))
    .reduce((n, w) => n + Tokenizer.count(w), 0)
  // What the sweep charged is all that is ever charged: nothing may be sent after it (the
  // loop's own renewal ends the stream there: "the reservation is gone (swept)").
  for (const w of SWEPT_LATER) expect(got).not.toContain(w)
  expect(1_000_000n - l.balance).toBeLessThanOrEqual(BigInt(prompt + 2 * received))
  expect(body).toContain('insufficient_credits')
}, 15_000)

// A whole completion whose upstream answers after 3 s, noting whether the gateway gave up on
// it; a lease of 1 s (renewals every third of a second).
let upstreamStopped = false
const slowest = Bun.serve({
  port: 0,
  hostname: '127.0.0.1',
  async fetch(req) {
    await req.json()
    req.signal.addEventListener('abort', () => {
      upstreamStopped = true
    })
    await Bun.sleep(3_000)
    return Response.json(
      Scripted.completion(
        { content: 'one two three four' },
        { prompt_tokens: 10, completion_tokens: 4, total_tokens: 14 },
      ),
    )
  },
})
afterAll(() => slowest.stop(true))
const lostGw = await Scripted.gateway(
  `http://127.0.0.1:${slowest.port}/v1`,
  ['slow'],
  { timeoutMs: 10_000 },
  { metering: { blockTokens: 16, leaseSeconds: 1 } },
)

test('error: a whole completion swept while its upstream works (its renewal refused) → 503 reservation_lost, the upstream call stopped, nothing charged, no answer sent free', async () => {
  const { key, id } = await lostGw.account({ credits: 1_000n })
  const started = performance.now()
  const pending = fetch(`${lostGw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'slow', max_tokens: 10, messages }),
  })
  await Bun.sleep(300)
  // The ledger out of reach past the lease (forced here): another instance's sweep takes it.
  await lostGw.sql`update reservations set expires_at = clock_timestamp() - interval '1 second'`
  expect(await Reservations.sweep(lostGw.sql)).toBe(1)
  const res = await pending
  expect(res.status).toBe(503)
  expect(res.headers.get('retry-after')).toBe('5')
  const body = (await res.json()) as { error: { type: string; code: string; message: string } }
  expect(body.error).toMatchObject({ type: 'reservation_lost', code: 'reservation_lost' })
  expect(body.error.message).toContain('nothing was charged')
  expect(JSON.stringify(body)).not.toContain('one two three')
  // Stopped at the refused renewal, not after the upstream's 3 s.
  expect(performance.now() - started).toBeLessThan(2_500)
  await Bun.sleep(50)
  expect(upstreamStopped).toBe(true)
  const l = await Gateway.ledger(lostGw.sql, id)
  expect(l.balance).toBe(1_000n)
  expect(l.open_reservations).toBe(0n)
  const rows = await lostGw.sql`select status, cost from usage where account_id = ${id}`
  expect([...rows]).toEqual([{ status: 'abandoned', cost: 0n }])
}, 15_000)
