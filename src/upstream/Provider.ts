/** What an upstream model provider does: a streamed or a whole chat completion. */
import type { Completion, Received } from './Chat.ts'

/** The body sent upstream: the client's request with the upstream's model name. */
export type Body = Record<string, unknown> & { model: string; messages: unknown[] }

/**
 * What the gateway lets a request produce, apart from what the client asked for (its own
 * `max_tokens` in the body): `maxTokens`, the most completion tokens the reservation and the
 * context allow. An upstream is told it as its `max_tokens` (never above what the client
 * asked); the echo model stops there, and cycles only when the client asked for more.
 */
export type Limits = { maxTokens: number }

/**
 * What the client lets a stream pause between two chunks (its `timeout_ms`); it only shortens
 * the upstream's own timeout. (The wait for the answer to begin is bounded by the caller,
 * which aborts the call's signal.)
 */
export type Timing = { gapMs: number }

export interface Provider {
  readonly name: string
  /**
   * Starts a streamed completion. Resolves once the upstream accepted the request (so a
   * refusal is an error before any byte reaches the client); the iterable then yields the
   * chunks, the usage chunk included, in batches: the chunks that arrived together (one
   * network read), so a fast upstream costs one pass through the metering per batch, not
   * per chunk. Aborting `signal` cancels the upstream request.
   */
  stream(
    body: Body,
    signal: AbortSignal,
    limits?: Limits,
    timing?: Timing,
  ): Promise<AsyncIterable<Received[]>>
  /** A whole completion (the client's timeout_ms aborts `signal`). */
  complete(body: Body, signal: AbortSignal, limits?: Limits): Promise<Completion>
}
