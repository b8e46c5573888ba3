import { afterAll, describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import {
  GatewayError,
  InvalidRequestError,
  redacted,
  UpstreamError,
  UpstreamRateLimitedError,
} from '../../src/Errors.ts'
import * as Chat from '../../src/upstream/Chat.ts'
import * as OpenAICompatible from '../../src/upstream/OpenAICompatible.ts'

// A real server whose next answer the test sets.
let next: { status: number; body: Uint8Array | string; type?: string } = { status: 200, body: '' }
let lastBody: Record<string, unknown> = {}
let lastAuth: string | null = null
const server = Bun.serve({
  port: 0,
  hostname: '127.0.0.1',
  async fetch(req) {
    lastBody = (await req.json()) as Record<string, unknown>
    lastAuth = req.headers.get('authorization')
    return new Response(next.body, {
      status: next.status,
      headers: { 'content-type': next.type ?? 'text/event-stream' },
    })
  },
})
afterAll(() => server.stop(true))

const provider = OpenAICompatible.create({
  name: 'up',
  baseUrl: `http://127.0.0.1:${server.port}/v1/`,
  apiKey: 'sk-up',
  timeoutMs: 1000,
})
const body = { model: 'm', messages: [{ role: 'user', content: 'hi' }] }
const signal = new AbortController().signal

async function drain() {
  const out = []
  for await (const batch of await provider.stream(body, signal))
    for (const r of batch) out.push(r.chunk)
  return out
}

describe('stream', () => {
  test('behavior: asks for usage, sends the key, parses chunks until [DONE]', async () => {
    next = {
      status: 200,
      body:
        'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n' +
        ': comment\n\n' +
        'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\ndata: [DONE]\n\n',
    }
    const chunks = await drain()
    expect(chunks).toHaveLength(2)
    expect(chunks[1]!.usage).toEqual({ prompt_tokens: 1, completion_tokens: 1 })
    expect(lastBody.stream).toBe(true)
    expect(lastBody.stream_options).toEqual({ include_usage: true })
    expect(lastAuth).toBe('Bearer sk-up')
  })

  test('behavior: a delta role of null (Cloudflare) and a null delta on the finish (Azure) are taken as absent', async () => {
    next = {
      status: 200,
      body:
        'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n' +
        'data: {"choices":[{"index":0,"delta":{"role":null,"content":"hi"}}]}\n\n' +
        'data: {"choices":[{"index":0,"delta":{"role":null,"content":" there","tool_calls":null}}]}\n\n' +
        'data: {"choices":[{"index":0,"delta":null,"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
    }
    const chunks = await drain()
    expect(chunks.map((c) => Chat.generated(c.choices[0]!.delta)).join('')).toBe('hi there')
    expect(chunks.at(-1)!.choices[0]).toEqual({ index: 0, delta: {}, finish_reason: 'stop' })
  })

  test("behavior: the gateway's limit is sent as max_tokens (or max_completion_tokens), never above what the client asked", async () => {
    next = { status: 200, body: 'data: [DONE]\n\n' }
    const sent = async (extra: Record<string, unknown>, maxTokens?: number) => {
      const stream = await provider.stream(
        { ...body, ...extra },
        signal,
        maxTokens === undefined ? undefined : { maxTokens },
      )
      for await (const _ of stream);
      return lastBody
    }
    expect((await sent({}, 50)).max_tokens).toBe(50)
    expect((await sent({ max_tokens: 20 }, 50)).max_tokens).toBe(20)
    expect((await sent({ max_tokens: 90 }, 50)).max_tokens).toBe(50)
    const completion = await sent({ max_completion_tokens: 90 }, 50)
    expect(completion.max_completion_tokens).toBe(50)
    expect(completion).not.toHaveProperty('max_tokens')
    expect(await sent({})).not.toHaveProperty('max_tokens')
    // Both named: both are capped (an upstream that reads the other must not go past it).
    const both = await sent({ max_tokens: 100, max_completion_tokens: 90 }, 3)
    expect([both.max_tokens, both.max_completion_tokens]).toEqual([3, 3])
  })

  test('behavior: chunks carry their JSON text to forward, read by template after the first; never one with a newline', async () => {
    const chunk = (content: string) =>
      `{"id":"x","choices":[{"index":0,"delta":{"content":${JSON.stringify(content)}},"finish_reason":null}]}`
    next = {
      status: 200,
      body: `data: ${chunk('a')}\n\ndata: ${chunk('b"\n')}\n\ndata: {"id":"x",\ndata: "choices":[]}\n\ndata: [DONE]\n\n`,
    }
    const received = []
    for await (const batch of await provider.stream(body, signal)) received.push(...batch)
    expect(received.map((r) => r.json)).toEqual([chunk('a'), chunk('b"\n'), undefined])
    expect(received.map((r) => r.chunk)).toEqual([
      JSON.parse(chunk('a')),
      JSON.parse(chunk('b"\n')),
      { id: 'x', choices: [] },
    ])
  })

  test('error: 5xx → UpstreamError (502); 400 → InvalidRequestError with the reason', async () => {
    next = { status: 503, body: 'busy' }
    await expect(provider.stream(body, signal)).rejects.toBeInstanceOf(UpstreamError)
    next = { status: 400, body: '{"error":{"message":"bad temperature"}}' }
    const e = await provider.stream(body, signal).catch((e) => e)
    expect(e).toBeInstanceOf(InvalidRequestError)
    expect(e.message).toContain('bad temperature')
  })

  test('error: a rejection reaches the client without the URLs and keys of the upstream side', async () => {
    next = {
      status: 400,
      body: JSON.stringify({
        error: {
          message:
            "Invalid value for 'temperature' (key sk-UPSTREAM-SECRET-123, see https://internal.corp:8443/v1?token=abc; trace 9f8e7d6c5b4a39281706f5e4d3c2b1a0)",
        },
      }),
    }
    const e = await provider.stream(body, signal).catch((e) => e)
    expect(e).toBeInstanceOf(InvalidRequestError)
    expect(e.message).toContain("Invalid value for 'temperature'")
    for (const secret of [
      'sk-UPSTREAM',
      'SECRET-123',
      'internal.corp',
      'token=abc',
      '9f8e7d6c5b4a',
    ])
      expect(e.message).not.toContain(secret)
  })

  test('error: a redirect is not followed: the prompt goes nowhere else, and it is an UpstreamError', async () => {
    let elsewhere = 0
    const other = Bun.serve({
      port: 0,
      hostname: '127.0.0.1',
      fetch: () => {
        elsewhere++
        return new Response('data: [DONE]\n\n', {
          headers: { 'content-type': 'text/event-stream' },
        })
      },
    })
    try {
      const redirecting = Bun.serve({
        port: 0,
        hostname: '127.0.0.1',
        fetch: () =>
          new Response(null, {
            status: 307,
            headers: { location: `http://127.0.0.1:${other.port}/v1/chat/completions` },
          }),
      })
      const p = OpenAICompatible.create({
        name: 'moved',
        baseUrl: `http://127.0.0.1:${redirecting.port}/v1/`,
        timeoutMs: 1000,
      })
      for (const call of [() => p.stream(body, signal), () => p.complete(body, signal)])
        expect(await call().catch((e) => e)).toBeInstanceOf(UpstreamError)
      redirecting.stop(true)
      expect(elsewhere).toBe(0)
    } finally {
      other.stop(true)
    }
  })

  test('property: redacted leaves plain words and keeps no URL', () => {
    fc.assert(
      fc.property(fc.array(fc.stringMatching(/^[a-z]{1,12}$/)), fc.webUrl(), (words, url) => {
        const text = words.join(' ')
        expect(redacted(text)).toBe(text)
        expect(redacted(`${text} ${url} ${text}`)).not.toContain(url)
      }),
    )
  })

  test('error: an error object mid-stream → UpstreamError with what the upstream said, its URLs taken out', async () => {
    next = {
      status: 200,
      body: 'data: {"error":{"message":"overloaded, see https://status.internal/x"}}\n\n',
    }
    const e = await drain().catch((e) => e)
    expect(e).toBeInstanceOf(UpstreamError)
    expect(e.message).toContain('overloaded')
    expect(e.message).not.toContain('status.internal')
  })

  test('property: any bytes from the upstream give chunks or an UpstreamError, never anything else', async () => {
    const sse = fc.array(
      fc.oneof(
        fc.jsonValue().map((v) => `data: ${JSON.stringify(v)}\n\n`),
        fc.string().map((s) => `data: ${s}\n\n`),
        fc.string(),
        fc.constant('data: [DONE]\n\n'),
        fc
          .record({
            choices: fc.array(
              fc.record({ index: fc.nat(), delta: fc.record({ content: fc.string() }) }),
            ),
          })
          .map((v) => `data: ${JSON.stringify(v)}\n\n`),
      ),
      { maxLength: 6 },
    )
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          sse.map((a) => a.join('')),
          fc.uint8Array({ maxLength: 200 }),
        ),
        async (payload) => {
          next = { status: 200, body: payload }
          try {
            await drain()
          } catch (e) {
            expect(e).toBeInstanceOf(GatewayError)
          }
        },
      ),
      { numRuns: 1000 },
    )
  }, 60_000)
})

describe('answers past the bounds', () => {
  const code = (e: unknown) => (e as GatewayError).code
  test('error: a stream event that never ends (an endless line) is cut past MAX_EVENT_BYTES, not held in memory', async () => {
    next = {
      status: 200,
      body: `data: {"choices":[{"index":0,"delta":{"content":"${'x'.repeat(OpenAICompatible.MAX_EVENT_BYTES + 1024)}`,
    }
    const e = await drain().catch((e) => e)
    expect(e).toBeInstanceOf(UpstreamError)
    expect(code(e)).toBe('upstream_answer_too_large')
  })

  test('error: a whole completion past MAX_ANSWER_BYTES is refused, by its length or as it is read', async () => {
    next = {
      status: 200,
      type: 'application/json',
      body: ' '.repeat(OpenAICompatible.MAX_ANSWER_BYTES + 1),
    }
    const declared = await provider.complete(body, signal).catch((e) => e)
    expect(code(declared)).toBe('upstream_answer_too_large')
    const piece = new Uint8Array(1024 * 1024).fill(0x20)
    const chunked = Bun.serve({
      port: 0,
      hostname: '127.0.0.1',
      fetch: () =>
        new Response(
          new ReadableStream({
            pull(c) {
              c.enqueue(piece)
            },
          }),
          { headers: { 'content-type': 'application/json' } },
        ),
    })
    try {
      const endless = OpenAICompatible.create({
        name: 'endless',
        baseUrl: `http://127.0.0.1:${chunked.port}/v1/`,
        timeoutMs: 5000,
      })
      expect(code(await endless.complete(body, signal).catch((e) => e))).toBe(
        'upstream_answer_too_large',
      )
    } finally {
      chunked.stop(true)
    }
  })
})

describe('started', () => {
  const start = () => provider.stream(body, signal).then(Chat.started)
  test('error: a stream that ends before it answers is an UpstreamError (a 502 before the first token): an empty body, a role chunk alone, [DONE] alone', async () => {
    for (const sse of [
      '',
      'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
      'data: [DONE]\n\n',
    ]) {
      next = { status: 200, body: sse }
      await expect(start()).rejects.toBeInstanceOf(UpstreamError)
    }
  })

  test('behavior: an empty answer that says it is finished has begun', async () => {
    next = {
      status: 200,
      body: 'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
    }
    const batches = []
    for await (const b of await start()) batches.push(...b)
    expect(batches.map((r) => r.chunk.choices[0]?.finish_reason)).toEqual(['stop'])
  })
})

describe('complete', () => {
  test('error: a malformed completion → UpstreamError', async () => {
    next = { status: 200, body: '{"choices": 5}', type: 'application/json' }
    await expect(provider.complete(body, signal)).rejects.toBeInstanceOf(UpstreamError)
    next = { status: 200, body: 'nope', type: 'application/json' }
    // Reached, and answered: what it answered is what is wrong.
    await expect(provider.complete(body, signal)).rejects.toMatchObject({
      code: 'bad_upstream_response',
    })
  })

  test('error: a usage count past what the ledger holds is malformed, whole or streamed', async () => {
    const usage = { prompt_tokens: 10, completion_tokens: 3_000_000_000 }
    next = {
      status: 200,
      type: 'application/json',
      body: JSON.stringify({
        choices: [
          { index: 0, message: { role: 'assistant', content: 'hi' }, finish_reason: 'stop' },
        ],
        usage,
      }),
    }
    await expect(provider.complete(body, signal)).rejects.toBeInstanceOf(UpstreamError)
    next = {
      status: 200,
      body: `data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: {"choices":[],"usage":${JSON.stringify(usage)}}\n\ndata: [DONE]\n\n`,
    }
    await expect(drain()).rejects.toBeInstanceOf(UpstreamError)
    // At the bound itself it is still a count.
    next = {
      status: 200,
      body: `data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2147483647}}\n\ndata: [DONE]\n\n`,
    }
    expect((await drain()).at(-1)!.usage!.completion_tokens).toBe(2_147_483_647)
  })
})

describe('retryAfterMs', () => {
  const wait = (headers: Record<string, string>) =>
    OpenAICompatible.retryAfterMs(new Headers(headers))

  test('behavior: retry-after-ms first, then Retry-After in seconds or as a date, else a second; at most ten minutes', () => {
    expect(wait({ 'retry-after-ms': '250', 'retry-after': '7' })).toBe(250)
    expect(wait({ 'retry-after': '7' })).toBe(7_000)
    expect(wait({ 'retry-after': '0.5' })).toBe(500)
    const date = new Date(Date.now() + 30_000).toUTCString()
    const ms = wait({ 'retry-after': date })
    expect(ms).toBeGreaterThan(28_000)
    expect(ms).toBeLessThanOrEqual(30_000)
    expect(wait({ 'retry-after': new Date(Date.now() - 5_000).toUTCString() })).toBe(0)
    expect(wait({})).toBe(1_000)
    expect(wait({ 'retry-after': 'soon', 'retry-after-ms': '' })).toBe(1_000)
    expect(wait({ 'retry-after-ms': '-5' })).toBe(1_000)
    expect(wait({ 'retry-after': '86400' })).toBe(600_000)
  })

  test('property: any header values give a whole number of ms from 0 to ten minutes, never a throw', () => {
    const value = fc.oneof(
      fc.string(),
      fc.double().map(String),
      fc.integer().map(String),
      fc.date({ noInvalidDate: true }).map((d) => d.toUTCString()),
    )
    fc.assert(
      fc.property(fc.option(value), fc.option(value), (ms, after) => {
        const headers: Record<string, string> = {}
        // Headers refuse values with line breaks or NUL, as HTTP does: such cannot arrive.
        const clean = (v: string) => v.replace(/[\r\n\0]/g, '')
        if (ms !== null) headers['retry-after-ms'] = clean(ms)
        if (after !== null) headers['retry-after'] = clean(after)
        const w = wait(headers)
        expect(Number.isInteger(w)).toBe(true)
        expect(w).toBeGreaterThanOrEqual(0)
        expect(w).toBeLessThanOrEqual(600_000)
      }),
      { numRuns: 500 },
    )
  })

  test('error: an upstream 429 is an UpstreamRateLimitedError (503) carrying the wait it asked for', async () => {
    next = { status: 429, body: '{"error":{"message":"slow down"}}', type: 'application/json' }
    const e = await provider
      .complete({ model: 'm', messages: [] }, new AbortController().signal)
      .catch((x: unknown) => x)
    expect(e).toBeInstanceOf(UpstreamRateLimitedError)
    expect((e as UpstreamRateLimitedError).status).toBe(503)
    expect((e as UpstreamRateLimitedError).retryAfterMs).toBe(1_000)
    expect((e as UpstreamRateLimitedError).headers['retry-after']).toBe('1')
  })
})
