/** What an upstream model provider does: a streamed or a whole chat completion. */
import type { Completion, Received } from './Chat.ts'

/** The body sent upstream: the client's request with the upstream's model name and limits. */
export type Body = Record<string, unknown> & { model: string; messages: unknown[] }

export interface Provider {
  readonly name: string
  /**
   * Starts a streamed completion. Resolves once the upstream accepted the request (so a
   * refusal is an error before any byte reaches the client); the iterable then yields the
   * chunks, the usage chunk included, in batches: the chunks that arrived together (one
   * network read), so a fast upstream costs one pass through the metering per batch, not
   * per chunk. Aborting `signal` cancels the upstream request.
   */
  stream(body: Body, signal: AbortSignal): Promise<AsyncIterable<Received[]>>
  /** A whole completion. */
  complete(body: Body, signal: AbortSignal): Promise<Completion>
}
