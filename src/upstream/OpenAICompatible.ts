/**
 * A provider for any OpenAI-compatible HTTP API. Always asks for usage in streams. A slow
 * upstream is cut after `timeoutMs` without a stream's headers, or without a chunk while
 * streaming; a whole completion after `completionTimeoutMs` without its answer.
 */
import { createParser } from 'eventsource-parser'
import {
  InvalidRequestError,
  redacted,
  UpstreamError,
  UpstreamRateLimitedError,
} from '../Errors.ts'
import * as Chat from './Chat.ts'
import { Chunk, Completion, type Received } from './Chat.ts'
import type { Body, Limits, Provider, Timing } from './Provider.ts'

export type Options = {
  name: string
  baseUrl: string
  apiKey?: string | undefined
  timeoutMs: number
  /**
   * The wait for a whole (non-streaming) completion's answer, written only once the
   * generation is done (default: `timeoutMs`).
   */
  completionTimeoutMs?: number | undefined
  /**
   * The parameter a limit of the gateway's own goes in, when the client named none:
   * `max_tokens` (default; what most OpenAI-compatible servers read) or
   * `max_completion_tokens` (OpenAI's reasoning models refuse `max_tokens`).
   */
  maxTokensParam?: MaxTokensParam | undefined
}

export type MaxTokensParam = 'max_tokens' | 'max_completion_tokens'

/** Creates the provider. */
export function create(options: Options): Provider {
  const url = `${options.baseUrl.replace(/\/+$/, '')}/chat/completions`
  const maxTokensParam = options.maxTokensParam ?? 'max_tokens'
  const headers: Record<string, string> = { 'content-type': 'application/json' }
  if (options.apiKey) headers.authorization = `Bearer ${options.apiKey}`

  async function post(body: Body, signal: AbortSignal, watchdog: Watchdog): Promise<Response> {
    let response: Response
    try {
      response = await fetch(url, {
        method: 'POST',
        headers,
        body: JSON.stringify(body),
        signal: watchdog.follow(signal),
        // A redirect is an answer (a 3xx, an upstream error below), not followed: the prompt
        // goes to the configured URL and nowhere else.
        redirect: 'manual',
      })
    } catch (e) {
      // No answer to watch: its timer and its listener on the caller's signal go now, not
      // when the timeout would have fired.
      watchdog.stop()
      throw failure(options.name, e, signal, watchdog)
    }
    if (!response.ok) {
      const detail = await response.text().catch(() => '')
      watchdog.stop()
      throw refusal(options.name, response.status, detail, response.headers)
    }
    return response
  }

  return {
    name: options.name,
    async stream(body, signal, limits, timing) {
      const watchdog = Watchdog.for(options.timeoutMs, timing)
      const response = await post(
        {
          ...capped(body, limits, maxTokensParam),
          stream: true,
          stream_options: { ...(body.stream_options as object | undefined), include_usage: true },
        },
        signal,
        watchdog,
      )
      watchdog.headers()
      return chunks(options.name, response, signal, watchdog)
    },
    async complete(body, signal, limits) {
      const watchdog = new Watchdog(options.completionTimeoutMs ?? options.timeoutMs)
      const response = await post(
        { ...capped(body, limits, maxTokensParam), stream: false },
        signal,
        watchdog,
      )
      let text: string
      try {
        text = await bounded(options.name, response)
      } catch (e) {
        if (e instanceof UpstreamError) throw e
        throw failure(options.name, e, signal, watchdog)
      } finally {
        watchdog.stop()
      }
      let json: unknown
      try {
        json = JSON.parse(text)
      } catch {
        // Reached, and answered: what it answered is what is wrong.
        throw new UpstreamError(
          `Upstream ${options.name} returned a completion that is not JSON.`,
          'bad_upstream_response',
        )
      }
      if (!Chat.shallow(text)) throw nested(options.name, 'a completion')
      // The common shape is checked by hand (see Chat.asCompletion); anything else goes
      // through the schema.
      const fast = Chat.fastPathFor(text) ? Chat.asCompletion(json) : undefined
      if (fast) return fast
      const parsed = Completion.safeParse(json)
      if (!parsed.success)
        throw new UpstreamError(
          `Upstream ${options.name} returned a malformed completion.`,
          'bad_upstream_response',
        )
      return parsed.data
    },
  }
}

/**
 * The body with the gateway's limit as its `max_tokens` or `max_completion_tokens` (whichever
 * the client used; neither: `param`), never above what the client asked.
 */
function capped(body: Body, limits: Limits | undefined, param: MaxTokensParam): Body {
  if (!limits) return body
  const cap = (asked: unknown) =>
    typeof asked === 'number' && asked < limits.maxTokens ? asked : limits.maxTokens
  const out: Body = { ...body }
  // Every limit the client named is capped (one sent with both must not keep the other).
  const named = (['max_tokens', 'max_completion_tokens'] as const).filter(
    (k) => body[k] !== undefined,
  )
  for (const k of named) out[k] = cap(body[k])
  if (named.length === 0) out[param] = limits.maxTokens
  return out
}

/**
 * The most an upstream's answer may hold, bytes: a whole completion's body, and one event of a
 * stream (what arrives without ending an event). Far above any answer (a whole context of
 * output is a few MB, an inline audio answer tens), so that an upstream that never ends its
 * body or its line cannot grow the gateway's memory without bound.
 */
export const MAX_ANSWER_BYTES = 64 * 1024 * 1024
export const MAX_EVENT_BYTES = 16 * 1024 * 1024

/** An answer nested deeper than `Chat.MAX_DEPTH` (see `Chat.shallow`). */
const nested = (name: string, what: string) =>
  new UpstreamError(
    `Upstream ${name} sent ${what} nested over ${Chat.MAX_DEPTH} levels deep.`,
    'bad_upstream_response',
  )

const tooLarge = (name: string, what: string, most: number) =>
  new UpstreamError(
    `Upstream ${name} sent ${what} over ${most / (1024 * 1024)} MiB.`,
    'upstream_answer_too_large',
  )

/** A whole answer's text, refused past MAX_ANSWER_BYTES (its declared length, or as read). */
async function bounded(name: string, response: Response): Promise<string> {
  const declared = response.headers.get('content-length')
  if (declared !== null && /^\d+$/.test(declared)) {
    if (Number(declared) > MAX_ANSWER_BYTES) {
      await response.body?.cancel().catch(() => {})
      throw tooLarge(name, 'a completion', MAX_ANSWER_BYTES)
    }
    return response.text()
  }
  const reader = response.body!.getReader()
  const parts: Uint8Array[] = []
  let size = 0
  for (let r = await reader.read(); !r.done; r = await reader.read()) {
    size += r.value.length
    if (size > MAX_ANSWER_BYTES) {
      await reader.cancel().catch(() => {})
      throw tooLarge(name, 'a completion', MAX_ANSWER_BYTES)
    }
    parts.push(r.value)
  }
  return new TextDecoder().decode(Buffer.concat(parts))
}

/**
 * The upstream's events, parsed, one batch per network read: the SSE parser runs
 * synchronously over what arrived, so many small events cost one await, not one each.
 * The answer ends at `[DONE]` or the end of the body, or at a usage sent with or after its
 * choice's finish (the gateway takes `n` = 1 only): nothing else may follow, and an upstream that sends neither
 * `[DONE]` nor the end of its body (seen behind proxies that keep the connection) would
 * otherwise hold a finished answer until its timeout cut it as a failure.
 */
async function* chunks(
  name: string,
  response: Response,
  signal: AbortSignal,
  watchdog: Watchdog,
): AsyncGenerator<Received[]> {
  // Bun's reader; its `readMany` is missing from the DOM typings.
  const reader = response.body!.getReader() as ReadableStreamDefaultReader<Uint8Array> & {
    readMany(): Promise<Bun.ReadableStreamDefaultReadManyResult<Uint8Array>>
  }
  const decoder = new TextDecoder()
  let events: string[] = []
  /** The places in `events` of events with a name of their own (`event: ping`), rare: chat
   * chunks come unnamed (or named `message`, the same thing). */
  let named: Set<number> | undefined
  const parser = createParser({
    onEvent: (e) => {
      if (e.event !== undefined && e.event !== 'message') {
        named ??= new Set()
        named.add(events.length)
      }
      events.push(e.data)
    },
  })
  const filled = { filled: false }
  const template = Chat.template()
  /** Whether the choice finished (a template's chunk has no finish reason and no usage). */
  let finished = false
  /** The end: a usage with or after the finish (one sent earlier may be sent again). */
  const ended = (chunk: Chat.Chunk) => {
    for (const c of chunk.choices) if (c.finish_reason) finished = true
    return finished && chunk.usage != null
  }
  let done = false
  /** Bytes read since an event last ended (about: the read that ended one counts whole). */
  let unended = 0
  try {
    while (true) {
      // Everything that has arrived, in one read: a busy gateway finds several chunks
      // queued per stream, and meters and writes them as one batch.
      let next: Bun.ReadableStreamDefaultReadManyResult<Uint8Array>
      try {
        // Only a wait for the upstream counts: not the time the gateway did not read (a
        // channel stream waiting for a voucher, a slow client), which is no upstream's pause.
        watchdog.resume()
        next = await reader.readMany()
      } catch (e) {
        throw failure(name, e, signal, watchdog)
      }
      for (const bytes of next.value) {
        unended += bytes.length
        parser.feed(decoder.decode(bytes, { stream: true }))
      }
      // Bytes that end no event pile up in the parser: an endless line is cut.
      if (events.length > 0) unended = 0
      else if (unended > MAX_EVENT_BYTES) throw tooLarge(name, 'an event', MAX_EVENT_BYTES)
      // An event cut off by the end of the body is dropped, as an EventSource does. A body
      // that ends with neither [DONE] nor a finish reason was cut (a proxy or a balancer closing
      // the upstream's connection mid-answer): passed on as whole, it read as a complete answer.
      if (next.done && events.length === 0) {
        if (!finished)
          throw new UpstreamError(
            `Upstream ${name} ended its stream before the answer finished.`,
            'upstream_stream_cut',
          )
        return
      }
      watchdog.reset()
      watchdog.pause()
      if (events.length === 0) continue
      const arrived = events
      const names = named
      events = []
      named = undefined
      const batch: Received[] = []
      for (let i = 0; i < arrived.length; i++) {
        const data = arrived[i]!
        // An event without data (a bare `data:`): a keep-alive some upstreams and proxies
        // send, nothing to parse.
        if (data === '') continue
        if (data === '[DONE]') {
          if (batch.length > 0) yield batch
          return
        }
        const known = template.read(data)
        if (known) {
          batch.push(known)
          continue
        }
        let json: unknown
        try {
          json = JSON.parse(data)
        } catch {
          // An event of a name of its own whose data is no JSON (a keep-alive `event: ping`
          // with `data: ping`) is none of the answer's chunks: skipped. An unnamed one must be.
          if (names?.has(i)) continue
          if (batch.length > 0) yield batch
          throw new UpstreamError(
            `Upstream ${name} sent a chunk that is not JSON.`,
            'bad_upstream_response',
          )
        }
        if (!Chat.shallow(data)) {
          if (batch.length > 0) yield batch
          throw nested(name, 'a chunk')
        }
        if (json && typeof json === 'object' && 'error' in json) {
          if (batch.length > 0) yield batch
          const words = said(json)
          throw new UpstreamError(
            `Upstream ${name} failed mid-stream${words ? `: ${words}` : '.'}`,
            'upstream_stream_error',
          )
        }
        // The common shape is checked by hand (per chunk, zod cost ~13% of a stream's CPU);
        // anything else goes through the schema.
        filled.filled = false
        const fast = Chat.fastPathFor(data) ? Chat.asChunk(json, filled) : undefined
        if (fast) {
          // JSON spread over several `data:` lines arrives with newlines: it is re-serialized,
          // as a raw newline would end the event it is forwarded in.
          if (filled.filled || data.includes('\n')) batch.push({ chunk: fast })
          else {
            template.learn(data, fast)
            batch.push({ chunk: fast, json: data })
          }
          done ||= ended(fast)
          continue
        }
        const chunk = Chunk.safeParse(json)
        if (!chunk.success) {
          if (batch.length > 0) yield batch
          throw new UpstreamError(
            `Upstream ${name} sent a malformed chunk.`,
            'bad_upstream_response',
          )
        }
        batch.push({ chunk: chunk.data })
        done ||= ended(chunk.data)
      }
      if (batch.length > 0) yield batch
      if (done) return
    }
  } finally {
    watchdog.stop()
    reader.cancel().catch(() => {})
  }
}

/** An error raised while talking to the upstream, as the client should see it. */
function failure(name: string, e: unknown, signal: AbortSignal, watchdog: Watchdog): unknown {
  if (signal.aborted) return signal.reason ?? e
  if (watchdog.signal.aborted)
    return new UpstreamError(`Upstream ${name} timed out.`, 'upstream_timeout', { cause: e })
  return new UpstreamError(`Upstream ${name} could not be reached.`, 'upstream_unreachable', {
    cause: e,
  })
}

/**
 * Maps an upstream's non-2xx answer: its 4xx about the request reach the client as 400; a 429
 * (the upstream rate limiting the gateway's key) keeps the wait it asked for.
 */
function refusal(name: string, status: number, body: string, headers: Headers): Error {
  if (status === 429) {
    const ms = retryAfterMs(headers)
    return new UpstreamRateLimitedError(
      `Upstream ${name} is rate limiting the gateway; retry after ${ms / 1000} s.`,
      ms,
      { details: { upstream_status: status } },
    )
  }
  if (status === 400 || status === 404 || status === 422) {
    let words: string | undefined
    try {
      words = said(JSON.parse(body))
    } catch {}
    const message = `Upstream ${name} rejected the request${words ? `: ${words}` : '.'}`
    return new InvalidRequestError(message, 'upstream_rejected', {
      details: { upstream_status: status },
    })
  }
  return new UpstreamError(`Upstream ${name} answered ${status}.`, 'upstream_status', {
    details: { upstream_status: status },
  })
}

/**
 * What an upstream's error body (`{"error":{"message"}}`) says, as a client may read it (its
 * URLs and keys taken out, at most 500 characters); undefined when it says nothing.
 */
function said(body: unknown): string | undefined {
  const m = (body as { error?: { message?: unknown } } | null)?.error?.message
  return typeof m === 'string' ? redacted(m.slice(0, 500)) : undefined
}

/** Without a wait an upstream's 429 named, or past this one, the wait taken. */
const RATE_LIMITED_MS = { unnamed: 1_000, most: 10 * 60_000 }

/**
 * The wait an upstream's 429 asks for, in ms: its `retry-after-ms` (OpenAI's), else its
 * `Retry-After` (seconds, or an HTTP date), else a second; at most ten minutes.
 */
export function retryAfterMs(headers: Headers): number {
  const named = headers.get('retry-after-ms')?.trim()
  const ms = named ? Number(named) : Number.NaN
  const after = headers.get('retry-after')?.trim() ?? ''
  const wait =
    Number.isFinite(ms) && ms >= 0
      ? ms
      : /^\d+(\.\d+)?$/.test(after)
        ? Number(after) * 1000
        : after !== '' && Number.isFinite(Date.parse(after))
          ? Math.max(0, Date.parse(after) - Date.now())
          : RATE_LIMITED_MS.unnamed
  return Math.min(Math.ceil(wait), RATE_LIMITED_MS.most)
}

/** Aborts when `ms` pass before the first reset (or the headers), or `gap` ms between two. */
class Watchdog {
  private readonly controller = new AbortController()
  private timer: ReturnType<typeof setTimeout> | undefined
  private last = performance.now()
  private paused = false
  private unfollow: (() => void) | undefined
  private limit: number
  readonly signal = this.controller.signal
  constructor(
    ms: number,
    private readonly gap: number = ms,
  ) {
    this.limit = ms
    this.arm(ms)
  }
  /** The upstream's timeout; between chunks, shortened to the client's where it asked for less. */
  static for(upstreamMs: number, timing: Timing | undefined): Watchdog {
    if (!timing) return new Watchdog(upstreamMs)
    return new Watchdog(upstreamMs, Math.max(1, Math.min(upstreamMs, timing.gapMs)))
  }
  /**
   * Records activity (per network read of a stream). Cheap: it moves a timestamp; the first
   * time, when the client's gap is shorter than the wait for the first chunk, it re-arms.
   */
  reset() {
    this.last = performance.now()
    if (this.limit !== this.gap) {
      // The first chunk: a shorter gap must not wait for the timer armed for the longer wait.
      this.limit = this.gap
      clearTimeout(this.timer)
      this.arm(this.gap)
    }
  }
  /** A stream's headers arrived: the upstream's own timeout starts again for its first chunk. */
  headers() {
    this.last = performance.now()
  }
  /**
   * Its signal, aborted as well when `signal` is (with `signal`'s reason): what the upstream
   * call takes. One listener, where `AbortSignal.any` cost each request several microseconds.
   */
  follow(signal: AbortSignal): AbortSignal {
    if (signal.aborted) this.controller.abort(signal.reason)
    else {
      const onAbort = () => this.controller.abort(signal.reason)
      signal.addEventListener('abort', onAbort, { once: true })
      this.unfollow = () => signal.removeEventListener('abort', onAbort)
    }
    return this.signal
  }
  stop() {
    clearTimeout(this.timer)
    this.unfollow?.()
  }
  /** The gateway stopped reading (its consumer holds the stream): the upstream is not idle. */
  pause() {
    this.paused = true
  }
  /** Reading again: the upstream's idleness counts from now. */
  resume() {
    if (!this.paused) return
    this.paused = false
    this.last = performance.now()
  }
  // One timer at a time: when it fires early (activity since), it re-arms for the rest.
  private arm(delay: number) {
    this.timer = setTimeout(() => {
      const idle = this.paused ? 0 : performance.now() - this.last
      if (idle >= this.limit) this.controller.abort(new Error('timeout'))
      else this.arm(this.limit - idle)
    }, delay)
  }
}
