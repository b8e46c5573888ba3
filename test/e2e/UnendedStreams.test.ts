/**
 * Upstream streams that do not end as OpenAI's do. One that sends its whole answer, its
 * finish_reason and its usage, then neither `[DONE]` nor the end of its body (a proxy in front
 * of it that keeps the connection): the answer ends there, at once, charged by its usage (it
 * waited out the upstream's `timeoutMs` and ended with an upstream_timeout error). One whose
 * body ends mid-answer, with neither a finish_reason nor `[DONE]` (a balancer closing the
 * connection): an error, not a complete answer (the gateway wrote the `[DONE]` itself).
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'
import * as Sse from '../helpers/Sse.ts'

const C = Scripted.chunk
const usage = { prompt_tokens: 8, completion_tokens: 40 }
/** Written at once, and the body never ended. */
const unended = (events: unknown[]) => {
  const bytes = new TextEncoder().encode(
    events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join(''),
  )
  return new Response(new ReadableStream({ start: (c) => c.enqueue(bytes) }), {
    headers: { 'content-type': 'text/event-stream' },
  })
}
const url = Scripted.serve((body) => {
  const model = body.model as string
  const words = Array.from({ length: 20 }, (_, i) => C({ content: ` w${i}` }, null, model))
  if (model === 'cut')
    return new Response(words.map((e) => `data: ${JSON.stringify(e)}\n\n`).join(''), {
      headers: { 'content-type': 'text/event-stream' },
    })
  return unended([...words, C({}, 'stop', model), { ...C({}, null, model), choices: [], usage }])
})
// The upstream's timeoutMs is 2 s (Scripted.gateway).
const gw = await Scripted.gateway(url, ['one', 'cut'])

async function run(model: string) {
  const { id, key } = await gw.account({ credits: 1_000_000n })
  const t = performance.now()
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model,
      messages: [{ role: 'user', content: 'hi' }],
      stream: true,
      stream_options: { include_usage: true },
    }),
  })
  const text = await res.text()
  const took = performance.now() - t
  await Batch.settled(gw.sql)
  const [row] =
    await gw.sql`select status, completion_tokens, cost from usage where account_id = ${id}`
  return { id, text, took, row: row as { status: string; completion_tokens: number; cost: bigint } }
}

test('behavior: a finished answer whose upstream does not end its body ends at once, charged by its usage', async () => {
  const { id, text, took, row } = await run('one')
  expect(took).toBeLessThan(1_500)
  expect(text).not.toContain('error')
  expect(text.trimEnd().endsWith('data: [DONE]')).toBe(true)
  expect(Sse.text(Sse.events(text))).toBe(Array.from({ length: 20 }, (_, i) => ` w${i}`).join(''))
  expect(row).toEqual({ status: 'ok', completion_tokens: 40, cost: BigInt(8 + 2 * 40) })
  expect((await Gateway.ledger(gw.sql, id)).reserved).toBe(0n)
})

test('error: a stream whose upstream body ends before its finish ends with an error, charged what was sent', async () => {
  const { id, text, row } = await run('cut')
  expect(Sse.text(Sse.events(text))).toBe(Array.from({ length: 20 }, (_, i) => ` w${i}`).join(''))
  expect(text).toContain('upstream_stream_cut')
  expect(row.status).toBe('upstream_error')
  // Each word's tokens, counted as it was sent.
  const sent = Array.from({ length: 20 }, (_, i) => Tokenizer.count(` w${i}`))
  expect(row.completion_tokens).toBe(sent.reduce((a, b) => a + b, 0))
  expect((await Gateway.ledger(gw.sql, id)).reserved).toBe(0n)
})
