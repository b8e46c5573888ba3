import { describe, expect, test } from 'bun:test'
import { createParser, type EventSourceMessage } from 'eventsource-parser'
import fc from 'fast-check'
import { Hono } from 'hono'
import { ConflictError } from '../../src/Errors.ts'
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

describe('data and event', () => {
  /** The events an SSE reader gets from `bytes`. */
  const read = (bytes: Uint8Array) => {
    const got: EventSourceMessage[] = []
    const parser = createParser({ onEvent: (e) => got.push(e) })
    parser.feed(new TextDecoder().decode(bytes))
    return got
  }
  // Strings an upstream or a client may send: line breaks of every kind SSE knows and of
  // those it does not (U+2028, U+0085), NUL, lone surrogates.
  const text = fc.oneof(
    fc.string({ unit: 'binary', maxLength: 20 }),
    fc.constantFrom(
      '\n',
      '\r',
      '\r\n',
      '\u2028',
      '\u2029',
      '\u0085',
      '\u0000',
      '\ud800',
      'data: x\n\n',
    ),
  )
  const value = fc.letrec((tie) => ({
    v: fc.oneof(
      { depthSize: 'small' },
      text,
      fc.double({ noNaN: true, noDefaultInfinity: true }),
      fc.boolean(),
      fc.constant(null),
      fc.array(tie('v'), { maxLength: 3 }),
      fc.dictionary(text, tie('v'), { maxKeys: 3 }),
    ),
  })).v

  test('property: any JSON value is one event whose data reads back as the value, named or not', () => {
    fc.assert(
      fc.property(value, fc.constantFrom('payment-need-voucher', 'payment-receipt'), (v, name) => {
        const plain = read(Sse.data(v))
        expect(plain).toHaveLength(1)
        expect(plain[0]!.event).toBeUndefined()
        expect(JSON.parse(plain[0]!.data)).toEqual(JSON.parse(JSON.stringify(v)))
        const named = read(Sse.event(name, v))
        expect(named).toHaveLength(1)
        expect(named[0]!.event).toBe(name)
        expect(JSON.parse(named[0]!.data)).toEqual(JSON.parse(JSON.stringify(v)))
      }),
      { numRuns: 2000, seed: 20261125 },
    )
  })
})

describe('response', () => {
  test('behavior: upstream JSON is forwarded with the model the client asked for, whatever the upstream calls it', async () => {
    const plain =
      '{"id":"x","object":"chat.completion.chunk","created":1,"model":"up/m","choices":[{"index":0,"delta":{"role":"assistant","content":"a"}}]}'
    // Named twice (here nested): not swapped in place, re-serialized instead.
    // The nested one first: swapping the first occurrence would swap the wrong field.
    const twice =
      '{"id":"x","object":"chat.completion.chunk","created":1,"x":{"model":"up/m"},"model":"up/m","choices":[{"index":0,"delta":{"content":"b"}}]}'
    const same =
      '{"id":"x","object":"chat.completion.chunk","created":1,"model":"ours","choices":[{"index":0,"delta":{"content":"c"}}]}'
    const out = await render(
      [{ kind: 'chunks', chunks: [received(plain), received(twice), received(same)] }, end],
      { model: 'ours', includeUsage: true },
    )
    expect(out.slice(0, 3)).toEqual([
      { ...JSON.parse(plain), model: 'ours' },
      { ...JSON.parse(twice), model: 'ours' },
      JSON.parse(same),
    ])
    // No upstream chunk finished the choice: the gateway does, before the usage chunk.
    expect(out[3]).toMatchObject({
      id: 'x',
      model: 'ours',
      choices: [{ index: 0, delta: {}, finish_reason: 'stop' }],
    })
    expect(out[4]).toMatchObject({ id: 'x', model: 'ours', choices: [], usage: end.usage })
    expect(out[5]).toBe('[DONE]')
  })

  test('behavior: with include_usage, a finish_reason goes out exactly once: from the upstream, or from the gateway for a stream cut short', async () => {
    const text =
      '{"id":"x","object":"chat.completion.chunk","created":1,"model":"ours","choices":[{"index":0,"delta":{"content":"a"}}]}'
    const stop =
      '{"id":"x","object":"chat.completion.chunk","created":1,"model":"ours","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    const finishes = (out: unknown[]) =>
      out.flatMap((e) =>
        typeof e === 'object' && e && 'choices' in e
          ? (e as { choices: { finish_reason?: string | null }[] }).choices
              .map((c) => c.finish_reason)
              .filter(Boolean)
          : [],
      )
    const whole = await render(
      [{ kind: 'chunks', chunks: [received(text), received(stop)] }, end],
      { model: 'ours', includeUsage: true },
    )
    expect(finishes(whole)).toEqual(['stop'])
    const cut = await render(
      [
        { kind: 'chunks', chunks: [received(text)] },
        { ...end, finishReason: 'length' },
      ],
      { model: 'ours', includeUsage: true },
    )
    expect(finishes(cut)).toEqual(['length'])
    expect(cut.at(-2)).toMatchObject({ choices: [], usage: end.usage })
  })

  test('behavior: without include_usage the finishing chunk is held back and carries the usage', async () => {
    const a =
      '{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"a"}}]}'
    const stop =
      '{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    const out = await render([{ kind: 'chunks', chunks: [received(a), received(stop)] }, end], {
      model: 'm',
      includeUsage: false,
    })
    expect(out).toEqual([JSON.parse(a), { ...JSON.parse(stop), usage: end.usage }, '[DONE]'])
  })

  // Azure sends a chunk after the finishing one: no text, `finish_reason: null`, the
  // choice's content_filter_results.
  const a =
    '{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"a"}}]}'
  const stop =
    '{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
  const trailer =
    '{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":null,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}'
  const upstream: Frame[] = [
    { kind: 'chunks', chunks: [received(a), received(stop)] },
    { kind: 'chunks', chunks: [received(trailer)] },
  ]

  test('behavior: without include_usage a chunk after the finishing chunk goes out ahead of it, and the finishing chunk alone carries a finish_reason and the usage, last', async () => {
    const out = await render([...upstream, end], { model: 'm', includeUsage: false })
    expect(out).toEqual([
      JSON.parse(a),
      JSON.parse(trailer),
      { ...JSON.parse(stop), usage: end.usage },
      '[DONE]',
    ])
  })

  test('behavior: without include_usage a stream ended by an error after its finishing chunk ends as one without a trailing chunk: the finishing chunk with the usage, then the error', async () => {
    const error = new ConflictError('A newer stream took over.', 'stream_superseded')
    const out = await render([...upstream, { ...end, finishReason: 'length', error }], {
      model: 'm',
      includeUsage: false,
    })
    expect(out).toEqual([
      JSON.parse(a),
      JSON.parse(trailer),
      { ...JSON.parse(stop), usage: end.usage },
      error.toJSON(),
      '[DONE]',
    ])
  })

  test('behavior: with include_usage the chunks after the finishing chunk go out as they came, then the usage chunk', async () => {
    const out = await render([...upstream, end], { model: 'm', includeUsage: true })
    expect(out).toEqual([
      JSON.parse(a),
      JSON.parse(stop),
      JSON.parse(trailer),
      expect.objectContaining({ id: 'x', choices: [], usage: end.usage }),
      '[DONE]',
    ])
  })
})

/** Serves `frames` over a real socket, as the chat route does; the server and its URL. */
function served(frames: AsyncGenerator<Frame, void, undefined>, abort: () => void) {
  const app = new Hono()
  app.get('/', (c) =>
    Sse.response(c, { frames, model: 'm', includeUsage: true, abort, done: () => {} }),
  )
  const server = Bun.serve({ port: 0, hostname: '127.0.0.1', fetch: app.fetch })
  return { server, url: `http://127.0.0.1:${server.port}/` }
}

describe('backpressure', () => {
  test('behavior: a client that stops reading stops the frames being pulled; every event arrives once it reads again', async () => {
    const big = `{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"${'w'.repeat(64 * 1024)}"}}]}`
    const total = 2000 // 128 MB in all: far more than the sockets between can hold
    let pulled = 0
    let stopped = false
    const { server, url } = served(
      (async function* () {
        for (; pulled < total; ) {
          pulled++
          yield { kind: 'chunks', chunks: [received(big)] } satisfies Frame
        }
        yield end
      })(),
      () => {
        stopped = true
      },
    )
    try {
      const res = await fetch(url)
      const reader = res.body!.getReader()
      const first = (await reader.read()).value!
      await Bun.sleep(500)
      // Socket buffers hold a few MB; the rest waits upstream.
      expect(pulled).toBeLessThan(total / 4)
      // Every event arrives, whole and in order: count them by their ends.
      let events = 0
      let tail = ''
      const decoder = new TextDecoder()
      for (let value: Uint8Array | undefined = first; value; value = (await reader.read()).value) {
        const text = tail + decoder.decode(value, { stream: true })
        const parts = text.split('\n\n')
        tail = parts.pop()!
        events += parts.length
      }
      expect(pulled).toBe(total)
      // The chunks, the finishing chunk (none came from upstream), the usage chunk and [DONE].
      expect(events).toBe(total + 3)
      expect(stopped).toBe(false)
    } finally {
      server.stop(true)
    }
  }, 30_000)

  test('behavior: a client that goes away mid-stream aborts the upstream and ends the frames', async () => {
    let finished = false
    let aborted = false
    const word =
      '{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"w"}}]}'
    const { server, url } = served(
      (async function* () {
        try {
          while (true) {
            await Bun.sleep(5)
            yield { kind: 'chunks', chunks: [received(word)] } satisfies Frame
          }
        } finally {
          finished = true
        }
      })(),
      () => {
        aborted = true
      },
    )
    try {
      const controller = new AbortController()
      const res = await fetch(url, { signal: controller.signal })
      const reader = res.body!.getReader()
      await reader.read()
      controller.abort()
      for (let i = 0; i < 100 && !(aborted && finished); i++) await Bun.sleep(20)
      expect(aborted).toBe(true)
      expect(finished).toBe(true)
    } finally {
      server.stop(true)
    }
  })
})

describe('a client gone before the stream started', () => {
  test('behavior: the frames run to their end all the same (metering settles there), with the upstream aborted first', async () => {
    let aborted = false
    let settled = false
    let doneCalls = 0
    const frames = (async function* (): AsyncGenerator<Frame, void, undefined> {
      try {
        // Metering ends a stream whose upstream was aborted: no chunk, straight to the end.
        if (!aborted) yield { kind: 'chunks', chunks: [] }
        yield end
      } finally {
        settled = true
      }
    })()
    const app = new Hono()
    app.get('/', (c) =>
      Sse.response(c, {
        frames,
        model: 'm',
        includeUsage: false,
        abort: () => {
          aborted = true
        },
        done: () => {
          doneCalls++
        },
      }),
    )
    const res = await app.request('/')
    // Gone before a byte was read.
    await res.body!.cancel()
    for (let i = 0; i < 50 && !settled; i++) await Bun.sleep(5)
    expect(aborted).toBe(true)
    expect(settled).toBe(true)
    expect(doneCalls).toBe(1)
  })
})
