/**
 * A request under way renews its reservation's lease however long it takes: a stream that
 * sends nothing for longer than the lease (an upstream sending SSE keep-alive comments while
 * it thinks), a whole completion whose upstream takes longer than the lease. The sweep never
 * takes it for a dead instance's request (releasing its credits, its plan's concurrency and
 * its Idempotency-Key, and charging only what it had recorded: a whole answer nothing).
 */
import { expect, test } from 'bun:test'
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
