import { describe, expect, test } from 'bun:test'
import { Hono } from 'hono'
import * as Sse from '../../src/http/Sse.ts'
import type { Frame } from '../../src/metering/Meter.ts'
import { asChunk, type Received } from '../../src/upstream/Chat.ts'

/** Renders `frames` as the chat route does; the `data:` payloads the client gets. */
async function render(frames: Frame[], o: { model: string; includeUsage: boolean }) {
  const app = new Hono()
  app.get('/', (c) =>
    Sse.response(c, {
      frames: (async function* () {
        yield* frames
      })(),
      ...o,
      abort: () => {},
      done: () => {},
    }),
  )
  const text = await (await app.request('/')).text()
  return text
    .split('\n\n')
    .filter((e) => e.startsWith('data: '))
    .map((e) => {
      // Every event is one line: nothing forwarded may break the framing.
      expect(e.includes('\n')).toBe(false)
      const payload = e.slice(6)
      return payload === '[DONE]' ? payload : JSON.parse(payload)
    })
}

const received = (json: string): Received => ({ chunk: asChunk(JSON.parse(json))!, json })
const end: Frame = {
  kind: 'end',
  usage: { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3, cost: '5' },
  finishReason: 'stop',
}

describe('response', () => {
  test('behavior: upstream JSON is forwarded with the model the client asked for, whatever the upstream calls it', async () => {
    const plain = '{"id":"x","model":"up/m","choices":[{"index":0,"delta":{"content":"a"}}]}'
    // Named twice (here nested): not swapped in place, re-serialized instead.
    const twice =
      '{"id":"x","model":"up/m","choices":[{"index":0,"delta":{"content":"b"}}],"x":{"model":"up/m"}}'
    const same = '{"id":"x","model":"ours","choices":[{"index":0,"delta":{"content":"c"}}]}'
    const out = await render(
      [{ kind: 'chunks', chunks: [received(plain), received(twice), received(same)] }, end],
      { model: 'ours', includeUsage: true },
    )
    expect(out.slice(0, 3)).toEqual([
      { ...JSON.parse(plain), model: 'ours' },
      { ...JSON.parse(twice), model: 'ours' },
      JSON.parse(same),
    ])
    expect(out[3]).toMatchObject({ id: 'x', model: 'ours', choices: [], usage: end.usage })
    expect(out[4]).toBe('[DONE]')
  })

  test('behavior: without include_usage the finishing chunk is held back and carries the usage', async () => {
    const a = '{"id":"x","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}'
    const stop = '{"id":"x","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    const out = await render([{ kind: 'chunks', chunks: [received(a), received(stop)] }, end], {
      model: 'm',
      includeUsage: false,
    })
    expect(out).toEqual([JSON.parse(a), { ...JSON.parse(stop), usage: end.usage }, '[DONE]'])
  })
})
