/**
 * The metered completion: one path for every way of paying. Tokens are paid before they
 * are sent: the reservation is extended a block of tokens at a time (one store write per
 * block, not per token), and when the payer cannot cover the next chunk the stream stops,
 * or, for a payer that can add funds mid-stream (a payment channel), it waits for them.
 * At the end the charge is reconciled to the exact usage and the rest is released.
 */
import { ConflictError, GatewayError, InsufficientCreditsError } from '../Errors.ts'
import { type Chunk, type Completion, generated } from '../upstream/Chat.ts'
import * as Pricing from './Pricing.ts'
import * as Tokenizer from './Tokenizer.ts'

/** Credits held for one request, by whatever pays for it. Implemented by the stores. */
export interface Reservation {
  readonly id: string
  /** Base units held now. */
  readonly held: bigint
  /**
   * Holds `amount` more; false when the payer cannot cover it. `delivered`, the cost of what
   * was sent so far, is kept either way: it is charged if this instance dies mid-request.
   */
  extend(amount: bigint, delivered?: bigint): Promise<boolean>
  /** Set when the payer gave this request's funds to a newer one (a new stream on a channel). */
  readonly superseded?: boolean
  /**
   * Waits until the payer covers `required` in total (a channel's next voucher); false if
   * it did not in time. Payers that cannot add funds mid-request leave it out.
   */
  waitForFunds?(required: bigint, signal: AbortSignal): Promise<boolean>
  /** Charges `outcome.cost` (capped by what the payer can pay), releases the rest, records usage. */
  settle(outcome: Outcome): Promise<{ charged: bigint }>
  /**
   * Set when a request whose cost the reservation covers may be answered without waiting for
   * its settle (the charge is then exactly the cost): the store runs the settle before any
   * later admission of the payer on this instance, and nothing the payer does next on
   * another instance can be refused because the settle is still on its way.
   */
  readonly settleInBackground?: boolean
}

/**
 * Settles `outcome`; what was charged. A covered cost of a reservation that may settle in the
 * background is known without waiting: the settle goes on after the answer (its failure is
 * logged by the store's caller; the lease sweep then releases the reservation).
 */
async function charge(reservation: Reservation, outcome: Outcome): Promise<bigint> {
  if (reservation.settleInBackground && outcome.cost <= reservation.held) {
    reservation.settle(outcome).catch(() => {})
    return outcome.cost
  }
  return (await reservation.settle(outcome)).charged
}

export type Status =
  | 'ok'
  | 'cancelled'
  | 'upstream_error'
  | 'insufficient_funds'
  | 'payment_timeout'
  | 'superseded'

export type Outcome = {
  cost: bigint
  promptTokens: number
  completionTokens: number
  status: Status
  latencyMs: number
  ttftMs: number | null
}

export type Usage = {
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
  /** Base units charged, as a decimal string. */
  cost: string
}

export type Frame =
  | { kind: 'chunk'; chunk: Chunk }
  /** The payer must add funds to cover `required` in total; the stream waits. */
  | { kind: 'shortfall'; required: bigint }
  /** The last frame: what was charged, and why the stream ended early if it did. */
  | { kind: 'end'; usage: Usage; finishReason: string | null; error?: GatewayError }

export type StreamOptions = {
  price: Pricing.Price
  promptTokens: number
  /** Output tokens per reservation extension. */
  blockTokens: number
  reservation: Reservation
  chunks: AsyncIterable<Chunk>
  /** Aborted when the client goes away; must also cancel `chunks`. */
  signal: AbortSignal
  startedAt: number
}

/** Meters a stream: yields the chunks to send, in order, each one paid for before it is yielded. */
export async function* stream(o: StreamOptions): AsyncGenerator<Frame, void, undefined> {
  const { price, reservation } = o
  const blockCost = Pricing.cost(price, 0, o.blockTokens)
  let sent = 0
  let ttft: number | null = null
  let reported: { prompt_tokens: number; completion_tokens: number } | undefined
  let status: Status = 'ok'
  let error: GatewayError | undefined
  let finishReason: string | null = null
  let settled = false

  const settle = async () => {
    settled = true
    // A stream that ran to its end is charged the upstream's own count; one we cut (or the
    // client left) is charged the tokens actually sent. A failure before the first token is free.
    const promptTokens = reported?.prompt_tokens ?? o.promptTokens
    const completionTokens = status === 'ok' && reported ? reported.completion_tokens : sent
    const free = status === 'upstream_error' && sent === 0
    const cost = free ? 0n : Pricing.cost(price, promptTokens, completionTokens)
    const charged = await charge(reservation, {
      cost,
      promptTokens,
      completionTokens,
      status,
      latencyMs: Math.round(performance.now() - o.startedAt),
      ttftMs: ttft,
    })
    return {
      prompt_tokens: promptTokens,
      completion_tokens: completionTokens,
      total_tokens: promptTokens + completionTokens,
      cost: charged.toString(),
    }
  }

  try {
    try {
      for await (const chunk of o.chunks) {
        if (chunk.usage) reported = chunk.usage
        if (chunk.choices.length === 0) continue
        let n = 0
        for (const c of chunk.choices) {
          n += Tokenizer.count(generated(c.delta))
          if (c.finish_reason) finishReason = c.finish_reason
        }
        const required = Pricing.cost(price, o.promptTokens, sent + n)
        // Pay before sending: extend a block at a time, then exactly what this chunk needs,
        // then (channels) wait for the payer.
        // The cost of what was sent so far: what a dead instance's request is charged.
        const delivered = Pricing.cost(price, o.promptTokens, sent)
        while (required > reservation.held) {
          const short = required - reservation.held
          if (await reservation.extend(short > blockCost ? short : blockCost, delivered)) continue
          if (short < blockCost && (await reservation.extend(short, delivered))) continue
          if (reservation.superseded) status = 'superseded'
          else if (reservation.waitForFunds) {
            yield { kind: 'shortfall', required }
            if (await reservation.waitForFunds(required, o.signal)) continue
            status = 'payment_timeout'
          } else status = 'insufficient_funds'
          break
        }
        if (status !== 'ok') break
        if (chunk.usage) {
          const { usage: _, ...rest } = chunk
          yield { kind: 'chunk', chunk: rest as Chunk }
        } else yield { kind: 'chunk', chunk }
        sent += n
        if (ttft === null && n > 0) ttft = Math.round(performance.now() - o.startedAt)
      }
    } catch (e) {
      if (o.signal.aborted) status = 'cancelled'
      else {
        status = 'upstream_error'
        error = e instanceof GatewayError ? e : undefined
        if (!error) throw e
      }
    }
    if (status === 'insufficient_funds')
      error = new InsufficientCreditsError(
        'Credits ran out mid-stream; the reply was cut where they ended. Add credits to continue.',
        'insufficient_credits',
      )
    if (status === 'superseded')
      error = new ConflictError(
        'A newer stream on this channel took over; this one ends here.',
        'stream_superseded',
      )
    if (status === 'insufficient_funds' || status === 'payment_timeout' || status === 'superseded')
      finishReason = 'length'
    const usage = await settle()
    if (!o.signal.aborted) yield { kind: 'end', usage, finishReason, ...(error ? { error } : {}) }
  } finally {
    // The consumer stopped pulling (client gone): charge what was sent.
    if (!settled) {
      status = status === 'ok' ? 'cancelled' : status
      await settle()
    }
  }
}

export type CompleteOptions = {
  price: Pricing.Price
  promptTokens: number
  reservation: Reservation
  call: () => Promise<Completion>
  signal: AbortSignal
  startedAt: number
}

/**
 * Meters a whole completion. The caller capped the upstream's `max_tokens` at what the
 * reservation pays for, so the exact charge can never exceed it.
 */
export async function complete(
  o: CompleteOptions,
): Promise<{ completion: Completion; usage: Usage }> {
  let completion: Completion
  try {
    completion = await o.call()
  } catch (e) {
    await release(o.reservation, { ...o, cancelled: o.signal.aborted })
    throw e
  }
  const promptTokens = completion.usage?.prompt_tokens ?? o.promptTokens
  const completionTokens =
    completion.usage?.completion_tokens ??
    completion.choices.reduce((n, c) => n + Tokenizer.count(generated(c.message)), 0)
  const latencyMs = Math.round(performance.now() - o.startedAt)
  const charged = await charge(o.reservation, {
    cost: Pricing.cost(o.price, promptTokens, completionTokens),
    promptTokens,
    completionTokens,
    status: 'ok',
    latencyMs,
    ttftMs: latencyMs,
  })
  return {
    completion,
    usage: {
      prompt_tokens: promptTokens,
      completion_tokens: completionTokens,
      total_tokens: promptTokens + completionTokens,
      cost: charged.toString(),
    },
  }
}

/**
 * Ends a request that produced nothing: free after an upstream failure; the prompt alone
 * when the client cancelled (the upstream read it).
 */
export async function release(
  reservation: Reservation,
  o: { price: Pricing.Price; promptTokens: number; startedAt: number; cancelled: boolean },
): Promise<void> {
  await reservation.settle({
    cost: o.cancelled ? Pricing.cost(o.price, o.promptTokens, 0) : 0n,
    promptTokens: o.promptTokens,
    completionTokens: 0,
    status: o.cancelled ? 'cancelled' : 'upstream_error',
    latencyMs: Math.round(performance.now() - o.startedAt),
    ttftMs: null,
  })
}
