/**
 * An upstream that sends a chunk after its finishing chunk, as Azure OpenAI does (no text,
 * `finish_reason: null`, the choice's content_filter_results), then its usage: the client
 * still gets one finish_reason and the usage once, wherever it asked for it.
 */
import { expect, test } from 'bun:test'
import * as Scripted from '../helpers/Scripted.ts'
import * as Sse from '../helpers/Sse.ts'

const usage = { prompt_tokens: 5, completion_tokens: 1, total_tokens: 6 }
const filtered = { hate: { filtered: false, severity: 'safe' } }
const url = Scripted.serve((body) => {
  const model = body.model as string
  const choice = (delta: object, finish: string | null) => ({
    ...Scripted.chunk({}, null, model),
    choices: [{ index: 0, delta, finish_reason: finish, content_filter_results: filtered }],
  })
  return Scripted.events([
    { ...Scripted.chunk({}, null, model), choices: [], prompt_filter_results: [] },
    choice({ role: 'assistant', content: 'hello' }, null),
    choice({}, 'stop'),
    choice({}, null),
    { ...Scripted.chunk({}, null, model), choices: [], usage },
  ])
})
const gw = await Scripted.gateway(url, ['azure'])
const messages = [{ role: 'user' as const, content: 'hi' }]

type Choice = { finish_reason?: string | null; content_filter_results?: unknown }
/** The finish reasons of a stream's chunks, in order. */
const finishes = (chunks: Record<string, unknown>[]) =>
  chunks.flatMap((c) =>
    ((c.choices ?? []) as Choice[]).map((ch) => ch.finish_reason).filter((f) => f != null),
  )

/** The stream's events, as a client reads them (`include` for `stream_options.include_usage`). */
async function stream(include: boolean) {
  const { key } = await gw.account()
  const res = await gw.complete(key, {
    model: 'azure',
    stream: true,
    ...(include ? { stream_options: { include_usage: true } } : {}),
    messages,
  })
  expect(res.status).toBe(200)
  const raw = await res.text()
  return { events: Sse.events(raw), chunks: Sse.json(raw) }
}

test('behavior: without include_usage a chunk after the finishing chunk leaves one finish_reason, on the last chunk, with the usage and its cost once', async () => {
  const { events, chunks } = await stream(false)
  expect(Sse.text(events)).toBe('hello')
  expect(finishes(chunks)).toEqual(['stop'])
  const metered = chunks.filter((c) => c.usage)
  expect(metered).toHaveLength(1)
  expect(metered[0]).toBe(chunks.at(-1)!)
  expect(metered[0]!.usage).toMatchObject({ ...usage, cost: '7' })
  expect((metered[0]!.choices as Choice[])[0]!.finish_reason).toBe('stop')
  // The trailing chunk is not lost (the text, it, the finish), and no chunk has empty
  // `choices`, which a client that did not ask for include_usage does not expect.
  const results = chunks.map((c) => (c.choices as Choice[]).map((ch) => ch.content_filter_results))
  expect(results).toEqual([[filtered], [filtered], [filtered]])
  expect(events.at(-1)!.data).toBe('[DONE]')
})

test('behavior: with include_usage a chunk after the finishing chunk goes out as it came, then the usage chunk, as before', async () => {
  const { events, chunks } = await stream(true)
  expect(finishes(chunks)).toEqual(['stop'])
  const choices = chunks.map((c) => (c.choices as Choice[]).map((ch) => ch.finish_reason ?? null))
  expect(choices).toEqual([[null], ['stop'], [null], []])
  expect(chunks.filter((c) => c.usage)).toEqual([chunks.at(-1)!])
  expect(chunks.at(-1)!.usage).toMatchObject({ ...usage, cost: '7' })
  expect(events.at(-1)!.data).toBe('[DONE]')
})

test('behavior: the openai SDK final completion of such a stream has its finish_reason and the usage', async () => {
  const { key } = await gw.account()
  const final = await gw
    .openai(key)
    .chat.completions.stream({ model: 'azure', messages })
    .finalChatCompletion()
  expect(final.choices[0]!.message.content).toBe('hello')
  expect(final.choices[0]!.finish_reason).toBe('stop')
  expect(final.usage).toMatchObject({ ...usage, cost: '7' })
})
