/**
 * A scripted OpenAI-compatible upstream: a real HTTP server on a random loopback port whose
 * answers a test writes itself (chunks, completions, refusals), for what the fake upstream of
 * Upstream.ts does not do; and a gateway whose models it serves.
 */
import { afterAll } from 'bun:test'
import * as Gateway from './Gateway.ts'

/** A stream chunk of one choice. */
export function chunk(
  delta: Record<string, unknown>,
  finish: string | null = null,
  model = 'scripted',
) {
  return {
    id: 'c',
    object: 'chat.completion.chunk',
    created: 1,
    model,
    choices: [{ index: 0, delta, finish_reason: finish }],
  }
}

/** A whole completion of one choice. */
export function completion(message: Record<string, unknown>, usage?: object, model = 'scripted') {
  return {
    id: 'c',
    object: 'chat.completion',
    created: 1,
    model,
    choices: [{ index: 0, message: { role: 'assistant', ...message }, finish_reason: 'stop' }],
    ...(usage ? { usage } : {}),
  }
}

/** An SSE answer: each event (a string is sent as it is), then `[DONE]`. */
export function events(list: readonly unknown[]): Response {
  const text = list.map((e) => `data: ${typeof e === 'string' ? e : JSON.stringify(e)}\n\n`)
  return new Response(`${text.join('')}data: [DONE]\n\n`, {
    headers: { 'content-type': 'text/event-stream' },
  })
}

/** Starts an upstream answering every request with `answer(body)`; its base URL. */
export function serve(
  answer: (body: Record<string, unknown>) => Response | Promise<Response>,
): string {
  const server = Bun.serve({
    port: 0,
    hostname: '127.0.0.1',
    async fetch(req) {
      return answer((await req.json()) as Record<string, unknown>)
    },
  })
  afterAll(() => server.stop(true))
  return `http://127.0.0.1:${server.port}/v1`
}

/**
 * A gateway whose models `ids` the upstream at `url` serves (each under its own id, at 1 and 2
 * base units per prompt and completion token), with `upstream` and `overrides` added to its
 * config.
 */
export function gateway(
  url: string,
  ids: readonly string[],
  upstream: Record<string, unknown> = {},
  overrides: Record<string, unknown> = {},
) {
  // A whole completion waits as long as a stream's headers, unless the test says otherwise.
  const timeoutMs = (upstream.timeoutMs as number | undefined) ?? 2_000
  return Gateway.create({
    upstreams: [
      { name: 'scripted', baseUrl: url, timeoutMs, completionTimeoutMs: timeoutMs, ...upstream },
    ],
    models: ids.map((id) => ({
      id,
      upstream: 'scripted',
      upstreamModel: id,
      pricing: { input: '1000000', output: '2000000' },
      contextLength: 4096,
    })),
    ...overrides,
  })
}
