/**
 * Empty `data:` events, which some OpenAI-compatible upstreams and the proxies in front of them
 * send as keep-alives (an SSE parser dispatches `data:` with nothing after it as an event whose
 * data is empty): not a chunk that is not JSON, but nothing, before the first token and
 * mid-stream alike.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'
import * as Sse from '../helpers/Sse.ts'

const usage = { prompt_tokens: 7, completion_tokens: 3, total_tokens: 10 }
const url = Scripted.serve((body) => {
  const model = body.model as string
  if (model === 'named') {
    // Events of names of their own whose data is no JSON (keep-alives), among the chunks.
    const data = (c: unknown) => `data: ${JSON.stringify(c)}\n\n`
    return new Response(
      [
        'event: ping\ndata: ping\n\n',
        data(Scripted.chunk({ role: 'assistant', content: '' }, null, model)),
        data(Scripted.chunk({ content: 'Hello' }, null, model)),
        'event: keepalive\ndata: \u2026\n\n',
        data(Scripted.chunk({ content: ' there' }, null, model)),
        data(Scripted.chunk({}, 'stop', model)),
        'event: ping\ndata: ping\n\n',
        data({ ...Scripted.chunk({}, null, model), choices: [], usage }),
        'data: [DONE]\n\n',
      ].join(''),
      { headers: { 'content-type': 'text/event-stream' } },
    )
  }
  return Scripted.events([
    // `…-mid`: the first only once the answer has begun.
    ...(model.endsWith('-mid') ? [] : ['']),
    Scripted.chunk({ role: 'assistant', content: '' }, null, model),
    '',
    Scripted.chunk({ content: 'Hello' }, null, model),
    '',
    '',
    Scripted.chunk({ content: ' there' }, null, model),
    Scripted.chunk({}, 'stop', model),
    '',
    { ...Scripted.chunk({}, null, model), choices: [], usage },
  ])
})
const gw = await Scripted.gateway(url, ['keepalive', 'keepalive-mid', 'named'])
const messages = [{ role: 'user' as const, content: 'hi' }]

for (const model of ['keepalive', 'keepalive-mid', 'named'])
  test(`behavior: empty data events are skipped, and the answer served and charged its usage (${model})`, async () => {
    const { id, key } = await gw.account()
    const res = await gw.complete(key, { model, stream: true, messages })
    expect(res.status).toBe(200)
    const raw = await res.text()
    const events = Sse.events(raw)
    expect(Sse.text(events)).toBe('Hello there')
    // No error event, no empty event passed on.
    const chunks = Sse.json(raw)
    expect(chunks.some((c) => c.error)).toBe(false)
    expect(events.filter((e) => e.data === '')).toEqual([])
    expect(chunks.at(-1)!.usage).toMatchObject({ ...usage, cost: String(7 + 2 * 3) })
    expect(events.at(-1)!.data).toBe('[DONE]')
    await Batch.settled(gw.sql)
    const l = await Gateway.ledger(gw.sql, id)
    expect(l.balance).toBe(1_000_000n - 13n)
  })
