/**
 * One id and one `created` a stream, as OpenAI's chunks share theirs (clients keep the first
 * id a stream gives): the first chunk's, or the gateway's when it had none, on every chunk
 * the client gets, whatever the upstream's later chunks carry (an id of their own after a
 * first chunk without one, or another id and time midway), the gateway's closing chunks too.
 */
import { expect, test } from 'bun:test'
import * as Scripted from '../helpers/Scripted.ts'
import * as Sse from '../helpers/Sse.ts'

/** A chunk of the common flat shape (the template reads them), with this id and time. */
const chunk = (id: string, created: number, content: string) =>
  `{"id":"${id}","object":"chat.completion.chunk","created":${created},"model":"m","choices":[{"index":0,"delta":{"content":${JSON.stringify(content)}},"finish_reason":null}]}`
const WORDS = Array.from({ length: 12 }, (_, i) => ` w${i}`)

const url = Scripted.serve((body) => {
  const first =
    body.model === 'late-id'
      ? // No id, object or time on the first chunk; the upstream's own from the second on.
        '{"choices":[{"delta":{"role":"assistant","content":"Once"}}]}'
      : chunk('up-first', 1_700_000_000, 'Once')
  return Scripted.events([
    first,
    ...WORDS.slice(0, 6).map((w) => chunk('up-1', 1_700_000_001, w)),
    // Midway, another id and time.
    ...WORDS.slice(6).map((w) => chunk('up-2', 1_700_000_002, w)),
    `{"id":"up-3","object":"chat.completion.chunk","created":1700000003,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}`,
  ])
})
const gw = await Scripted.gateway(url, ['late-id', 'changing-id'])
const messages = [{ role: 'user' as const, content: 'Write a poem' }]

test('behavior: every chunk of a stream carries the id and created of its first chunk, or the ones the gateway gave a first chunk without them', async () => {
  const { key } = await gw.account()
  for (const model of ['late-id', 'changing-id'])
    for (const include of [false, true]) {
      const res = await gw.complete(key, {
        model,
        stream: true,
        ...(include ? { stream_options: { include_usage: true } } : {}),
        messages,
      })
      expect(res.status).toBe(200)
      const raw = await res.text()
      expect(Sse.text(Sse.events(raw))).toBe(`Once${WORDS.join('')}`)
      const chunks = Sse.json(raw)
      expect(chunks.length).toBeGreaterThan(WORDS.length)
      const ids = new Set(chunks.map((c) => c.id))
      const times = new Set(chunks.map((c) => c.created))
      expect(ids.size).toBe(1)
      expect(times.size).toBe(1)
      if (model === 'changing-id') {
        expect([...ids]).toEqual(['up-first'])
        expect([...times]).toEqual([1_700_000_000])
      } else {
        expect([...ids][0]).toStartWith('chatcmpl-')
        expect(typeof [...times][0]).toBe('number')
      }
    }
})

test('behavior: the openai SDK reads such a stream under one id', async () => {
  const { key } = await gw.account()
  const stream = await gw
    .openai(key)
    .chat.completions.create({ model: 'late-id', messages, stream: true })
  const ids = new Set<string>()
  for await (const c of stream) ids.add(c.id)
  expect(ids.size).toBe(1)
})
