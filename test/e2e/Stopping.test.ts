/**
 * A stream still under way when a stop's grace runs out ends as a stream the gateway ended
 * does: an error event (`gateway_stopping`), the usage of what was sent, `[DONE]`, and a charge
 * of exactly that usage (status `stopped`); a TCP reset was all its client got.
 */
import { expect, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'
import * as Sse from '../helpers/Sse.ts'

test('behavior: a stop ends a stream under way with an error event, its usage and [DONE], charged what it sent', async () => {
  const gw = await Gateway.create()
  const { id, key } = await gw.account()
  const words = Array.from({ length: 200 }, (_, i) => `w${i}`).join(' ')
  const res = await gw.complete(key, {
    model: 'fake-slow',
    stream: true,
    stream_options: { include_usage: true },
    messages: [{ role: 'user', content: words }],
  })
  expect(res.status).toBe(200)
  const reader = res.body!.getReader()
  let raw = ''
  while (!Sse.text(Sse.events(raw)).includes('w3'))
    raw += new TextDecoder().decode((await reader.read()).value)
  const stopped = gw.stop()
  for (let r = await reader.read(); !r.done; r = await reader.read())
    raw += new TextDecoder().decode(r.value)
  await stopped
  const events = Sse.json(raw)
  const error = events.find((e) => (e as { error?: unknown }).error) as {
    error: { code: string; type: string }
  }
  expect(error.error.code).toBe('gateway_stopping')
  expect(error.error.type).toBe('service_unavailable')
  const usage = events.findLast((e) => (e as { usage?: unknown }).usage) as {
    usage: { completion_tokens: number; cost: string }
  }
  expect(usage.usage.completion_tokens).toBeGreaterThan(0)
  expect(usage.usage.completion_tokens).toBeLessThan(200)
  expect(raw.trimEnd().endsWith('data: [DONE]')).toBe(true)
  // Charged exactly the usage the client was told.
  const [row] = await gw.db.sql`select status, cost from usage where account_id = ${id}`
  expect(row?.status).toBe('stopped')
  expect(String(row?.cost)).toBe(usage.usage.cost)
}, 30_000)

test('behavior: a stop answers a stream whose upstream has not begun 503 gateway_stopping, recorded stopped and charged nothing', async () => {
  const gw = await Gateway.create()
  const { id, key } = await gw.account()
  const answer = gw.complete(key, {
    model: 'fake-hang',
    stream: true,
    messages: [{ role: 'user', content: 'a long think' }],
  })
  while ((await gw.db.sql`select 1 from reservations`).length === 0) await Bun.sleep(20)
  await Bun.sleep(50)
  const stopped = gw.stop()
  const res = await answer
  await stopped
  expect(res.status).toBe(503)
  expect(((await res.json()) as { error: { code: string } }).error.code).toBe('gateway_stopping')
  // The gateway's stop, not an upstream's failure (the metric's status is the usage row's).
  const [row] = await gw.db.sql`select status, cost from usage where account_id = ${id}`
  expect(row?.status).toBe('stopped')
  expect(String(row?.cost)).toBe('0')
}, 30_000)
