/**
 * A ledger statement that fails once, transiently (a trigger raises on its first try): the
 * charge of a delivered answer is tried again, not left to the sweep (which charges only
 * what the last extension recorded, and holds the credits, the plan's concurrency and the
 * Idempotency-Key until the lease runs out); an extension is tried again, not the end of a
 * stream the payer can pay for.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

const WORDS = ['Hello', ' there', ',', ' friend', '.']
const url = Scripted.serve((body) => {
  const model = body.model as string
  if (body.stream)
    return Scripted.events([
      Scripted.chunk({ role: 'assistant', content: '' }, null, model),
      ...WORDS.map((w) => Scripted.chunk({ content: w }, null, model)),
      Scripted.chunk({}, 'stop', model),
    ])
  return Response.json(Scripted.completion({ content: WORDS.join('') }, undefined, model))
})
const gw = await Scripted.gateway(
  url,
  ['m'],
  {},
  { metering: { blockTokens: 16, leaseSeconds: 1 } },
)
const messages = [{ role: 'user' as const, content: 'say hello' }]
const prompt = Tokenizer.prompt(messages)
const delivered = WORDS.reduce((n, w) => n + Tokenizer.count(w), 0)

/**
 * Makes the next `event` on `table` fail once, transiently, each time the returned `arm` is
 * called (a sequence counts the tries: it is not rolled back with them).
 */
async function failOnce(sql: typeof gw.sql, table: string, event: 'insert' | 'update') {
  const name = `fail_${table}_${event}`
  await sql.unsafe(`
    create sequence ${name};
    select setval('${name}', 1000);
    create function ${name}() returns trigger language plpgsql as $$
    begin
      if nextval('${name}') = 1 then
        raise exception 'injected transient failure' using errcode = '40001';
      end if;
      return null;
    end $$;
    create trigger ${name} before ${event} on ${table} for each statement execute function ${name}();
  `)
  return () => sql.unsafe(`select setval('${name}', 1, false)`)
}

// The next insert into usage (the charge) fails once when armed.
const arm = await failOnce(gw.sql, 'usage', 'insert')

test('behavior: a stream whose charge fails once is charged what it delivered, nothing left held', async () => {
  // Small credits: the settle is waited for (not in the background).
  const credits = 200n
  const { id, key } = await gw.account({ credits })
  await arm()
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', messages, stream: true }),
  })
  expect(res.status).toBe(200)
  const body = await res.text()
  // The client got the whole answer.
  for (const w of WORDS) expect(body).toContain(JSON.stringify(w))
  // The lease runs out; the sweep releases what is left.
  // Its usage and cost reached the client, and no error after them.
  expect(body).toContain('"usage":')
  expect(body).not.toContain('internal_error')
  // Charged at once, not left for the sweep when the lease (1 s here) runs out.
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  expect(l.open_reservations).toBe(0n)
  const [u] = await gw.sql`select status, cost from usage where account_id = ${id}`
  expect(u).toEqual({ status: 'ok', cost: BigInt(prompt + 2 * delivered) })
  expect(credits - l.balance).toBe(BigInt(prompt + 2 * delivered))
})

test('behavior: after a charge that failed once, a free-plan account (one request at a time) is served again at once', async () => {
  const { key } = await gw.account({ plan: 'free', credits: 10_000n })
  await arm()
  const post = () =>
    fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'm', messages, stream: true }),
    })
  const first = await post()
  expect(first.status).toBe(200)
  await first.text()
  await Batch.settled(gw.sql)
  // The next request (max_concurrent 1): refused while the first one's reservation lingers.
  const next = await post()
  const text = await next.text()
  expect(`${next.status} ${text.slice(0, 120)}`).toStartWith('200')
})

test('behavior: an extension that fails once does not end the stream, charged what it sent, nothing held', async () => {
  const long = Array.from({ length: 60 }, (_, i) => ` w${i}`)
  const url2 = Scripted.serve(() =>
    Scripted.events([
      ...long.map((w) => Scripted.chunk({ content: w }, null, 'm')),
      Scripted.chunk({}, 'stop', 'm'),
    ]),
  )
  // A generous upstream timeout: on the embedded database, a loaded run can hold the event
  // loop for seconds (a fresh PGlite per gateway, in this process).
  const gw2 = await Scripted.gateway(
    url2,
    ['m'],
    { timeoutMs: 15_000 },
    { metering: { blockTokens: 16, leaseSeconds: 60 } },
  )
  // The next extension (an update of the reservation) fails once.
  await (await failOnce(gw2.sql, 'reservations', 'update'))()
  const { id, key } = await gw2.account()
  const res = await fetch(`${gw2.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', messages, stream: true }),
  })
  const body = await res.text()
  let got = ''
  for (const b of body.split('\n\n'))
    if (b.startsWith('data: {"id"')) got += JSON.parse(b.slice(6)).choices[0]?.delta?.content ?? ''
  await Batch.settled(gw2.sql)
  const l = await Gateway.ledger(gw2.sql, id)
  expect(l.open_reservations).toBe(0n)
  const sent = long.filter((w) => got.includes(w)).reduce((n, w) => n + Tokenizer.count(w), 0)
  expect(1_000_000n - l.balance).toBe(BigInt(prompt + 2 * sent))
  // Robustness: one transient failure should not cut the stream.
  expect(got).toBe(long.join(''))
})

test('behavior: a client abort whose charge fails once leaves no unhandled rejection and nothing held', async () => {
  const rejections: unknown[] = []
  const onRej = (e: unknown) => rejections.push(e)
  process.on('unhandledRejection', onRej)
  const slow = Array.from({ length: 50 }, (_, i) => ` s${i}`)
  const enc = new TextEncoder()
  const url3 = Scripted.serve(() => {
    const stream = new ReadableStream({
      type: 'direct',
      async pull(controller) {
        try {
          for (const w of slow) {
            controller.write(
              enc.encode(`data: ${JSON.stringify(Scripted.chunk({ content: w }, null, 'm'))}\n\n`),
            )
            controller.flush()
            await Bun.sleep(20)
          }
          controller.close()
        } catch {}
      },
    })
    return new Response(stream, { headers: { 'content-type': 'text/event-stream' } })
  })
  const gw3 = await Scripted.gateway(
    url3,
    ['m'],
    { timeoutMs: 15_000 },
    { metering: { blockTokens: 16, leaseSeconds: 60 } },
  )
  await (await failOnce(gw3.sql, 'usage', 'insert'))()
  const { id, key } = await gw3.account({ plan: 'pro', credits: 10_000n })
  const ctl = new AbortController()
  const res = await fetch(`${gw3.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', messages, stream: true }),
    signal: ctl.signal,
  })
  const reader = res.body!.getReader()
  await reader.read()
  await Bun.sleep(200)
  ctl.abort()
  await Bun.sleep(500)
  await Batch.settled(gw3.sql)
  process.off('unhandledRejection', onRej)
  const l = await Gateway.ledger(gw3.sql, id)
  expect(rejections.length).toBe(0)
  expect(l.open_reservations).toBe(0n)
})

test('behavior: a whole completion whose charge fails once is answered and charged, not a 500', async () => {
  const credits = 5_000n
  const { id, key } = await gw.account({ plan: 'pro', credits })
  await arm()
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', messages }),
  })
  expect(res.status).toBe(200)
  const { usage } = (await res.json()) as { usage: { cost: string } }
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  expect(l.open_reservations).toBe(0n)
  expect(credits - l.balance).toBe(BigInt(usage.cost))
  expect(usage.cost).toBe(String(prompt + 2 * delivered))
})
