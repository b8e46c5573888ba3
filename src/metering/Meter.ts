/**
 * The metered completion: one path for every way of paying. Tokens are paid before they
 * are sent: the reservation is extended a block of tokens at a time (one store write per
 * block, not per token), and when the payer cannot cover the next chunk the stream stops,
 * or, for a payer that can add funds mid-stream (a payment channel), it waits for them.
 * At the end the charge is reconciled to the exact usage and the rest is released.
 */
import {
  ConflictError,
  GatewayError,
  GatewayStoppingError,
  InsufficientCreditsError,
  ReservationLostError,
} from '../Errors.ts'
import {
  type Chunk,
  type Completion,
  generated,
  outputTokens,
  type Received,
  type Usage as Reported,
} from '../upstream/Chat.ts'
import * as Pricing from './Pricing.ts'
import * as Tokenizer from './Tokenizer.ts'

/** What a request has sent so far: the prompt and the completion tokens sent, and their cost. */
export type Delivered = { cost: bigint; promptTokens: number; completionTokens: number }

/** Credits held for one request, by whatever pays for it. Implemented by the stores. */
export interface Reservation {
  readonly id: string
  /** Base units held now. */
  readonly held: bigint
  /**
   * Holds `amount` more; false when the payer cannot cover it. `delivered`, what was sent so
   * far (its cost and tokens), is kept either way: it is charged, and its tokens counted
   * against the plan, if this instance dies mid-request.
   */
  extend(amount: bigint, delivered?: Delivered): Promise<boolean>
  /** Set when the payer gave this request's funds to a newer one (a new stream on a channel). */
  readonly superseded?: boolean
  /** Calls `f` once, when the reservation is superseded (to stop a stream whose upstream is quiet). */
  whenSuperseded?(f: () => void): void
  /**
   * Waits until the payer covers `required` in total (a channel's next voucher); false if
   * it did not in time. Payers that cannot add funds mid-request leave it out.
   */
  waitForFunds?(required: bigint, signal: AbortSignal): Promise<boolean>
  /** Charges `outcome.cost` (capped by what the payer can pay), releases the rest, records usage.
   * `background`: nobody waits for it (see `settleInBackground`). */
  settle(outcome: Outcome, background?: boolean): Promise<{ charged: bigint }>
  /**
   * Set when a request whose cost the reservation covers may be answered without waiting for
   * its settle (the charge is then exactly the cost): the store runs the settle before any
   * later admission of the payer on this instance, and nothing the payer does next on
   * another instance can be refused because the settle is still on its way.
   */
  readonly settleInBackground?: boolean
  /** What the request was settled with: undefined before its settle. */
  readonly settledOutcome?: { status: string } | undefined
}

/**
 * Settles `outcome`; what was charged. A covered cost of a reservation that may settle in the
 * background is known without waiting: the settle goes on after the answer (its failure is
 * logged by the store's caller; the lease sweep then releases the reservation).
 */
async function charge(reservation: Reservation, outcome: Outcome): Promise<bigint> {
  if (reservation.settleInBackground && outcome.cost <= reservation.held) {
    reservation.settle(outcome, true).catch(() => {})
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
  /** The gateway stopped (a restart) and ended the stream. */
  | 'stopped'

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
  /** Chunks to send (usage removed: the gateway reports its own at the end). */
  | { kind: 'chunks'; chunks: Received[] }
  /** The payer must add funds to cover `required` in total; the stream waits. */
  | { kind: 'shortfall'; required: bigint }
  /** The last frame: what was charged, and why the stream ended early if it did. */
  | { kind: 'end'; usage: Usage; finishReason: string | null; error?: GatewayError }

export type StreamOptions = {
  price: Pricing.Price
  promptTokens: number
  /** The upstream's `max_tokens`, if it was given one: no more completion tokens are charged
   * from its usage than that, or than the text it sent counts (see `allowed`). */
  maxTokens?: number | undefined
  /** The model's context: no more prompt tokens are charged from the upstream's usage. */
  maxPromptTokens?: number | undefined
  /** Output tokens per reservation extension, at first (see `GROWTH`). */
  blockTokens: number
  reservation: Reservation
  /** The upstream's chunks, in batches (see `Provider.stream`). */
  chunks: AsyncIterable<Received[]>
  /** Aborted when the client goes away; must also cancel `chunks`. */
  signal: AbortSignal
  startedAt: number
  /**
   * Renews the reservation (an extension by nothing, which also records what was sent)
   * when none happened for this long: with large blocks a slow stream could otherwise
   * outlive its lease and be swept as abandoned.
   */
  renewMs?: number
}

/**
 * How far the extension block grows: it doubles after each extension the payer covered, up
 * to this many times `blockTokens`, and falls back to `blockTokens` when one is refused. A
 * long stream then costs the database a few writes, not one per `blockTokens`; what it
 * holds beyond what it sent stays under what it has sent (and under this cap).
 */
export const GROWTH = 16

/** How far a chunk's bound may pass the reservation, tokens, before the stream holds more
 * ahead of its exact count (see `stream`). */
const AHEAD_GAP = 16

/**
 * Meters a stream: yields the chunks to send, in order, each one paid for before it is yielded.
 *
 * Exact token counting is the costly part of a chunk, so a chunk is checked against the
 * reservation with `Tokenizer.bound` (never below the exact count) and its text kept; the
 * exact count is taken only when the bound would pass what is reserved (before extending,
 * so the reservation, and the `delivered` it records, follow exact counts), when the kept
 * text grows long, and at the end when the upstream gave no usage or the stream was cut.
 * A stream the upstream finishes with its usage, inside its reservation, is never tokenized.
 * Each choice's text is counted as one text (`Tokenizer.Running`), not chunk by chunk: a
 * token split across two chunks is one token.
 */
export async function* stream(o: StreamOptions): AsyncGenerator<Frame, void, undefined> {
  const { price, reservation } = o
  const maxBlock = o.blockTokens * GROWTH
  // The lease was last renewed at admission, which may be long before the first token (an
  // upstream thinking, or sending keep-alive comments): counted from then, a stream whose
  // lease ran out (swept, its credits released) renews before it sends a thing, is refused,
  // and ends, where it sent its whole answer free.
  let renewedAt = o.startedAt
  let block = o.blockTokens
  // Output tokens the reservation pays for; recomputed when it changes, so a chunk costs
  // no money arithmetic.
  const coveredBy = (held: bigint) =>
    Pricing.affordable(price, o.promptTokens, held, Number.MAX_SAFE_INTEGER)
  let covered = coveredBy(reservation.held)
  /** What was sent, `completion` tokens of output: what a dead instance's request is charged. */
  const delivered = (completion: number): Delivered => ({
    cost: Pricing.cost(price, o.promptTokens, completion),
    promptTokens: o.promptTokens,
    completionTokens: completion,
  })
  // What was sent, each choice's text as one (by its index); `upper`, a bound of its tokens
  // (never below the count), kept without counting.
  const sent = new Map<number, Tokenizer.Running>()
  const textOf = (index: number) => {
    let r = sent.get(index)
    if (!r) {
      r = new Tokenizer.Running()
      sent.set(index, r)
    }
    return r
  }
  let upper = 0
  // Set when the payer refused a hold for the bound alone (see `ahead`), until it extends again.
  let tight = false
  /** The exact tokens sent; `upper` becomes the bound of that count's state. */
  const fold = () => {
    let n = 0
    upper = 0
    for (const r of sent.values()) {
      n += r.tokens()
      upper += r.bound()
    }
    return n
  }
  /** The tokens `piece` adds to a text (none if the BPE merges it away). */
  const more = (r: Tokenizer.Running, piece: string) =>
    Math.max(0, r.tokensWith(piece) - r.tokens())
  const nothingSent = () => {
    for (const r of sent.values()) if (!r.empty) return false
    return true
  }
  let ttft: number | null = null
  let reported: Reported | undefined
  let status: Status = 'ok'
  let error: GatewayError | undefined
  let finishReason: string | null = null
  let settled = false

  const settle = async () => {
    settled = true
    // A stream that ran to its end is charged the upstream's own count; one we cut (or the
    // client left) is charged the tokens actually sent. A failure before the first token is free.
    const none = nothingSent()
    const promptTokens = Math.min(
      reported?.prompt_tokens ?? o.promptTokens,
      o.maxPromptTokens ?? Number.MAX_SAFE_INTEGER,
    )
    let completionTokens: number
    if (status === 'ok' && reported)
      completionTokens = allowed(outputTokens(reported), o.maxTokens, fold)
    else completionTokens = fold()
    const free = status === 'upstream_error' && none
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
      // The upstream's own details (cached and reasoning tokens, …), as a whole completion
      // passes them on; the counts and the cost are the gateway's.
      ...(status === 'ok' && reported ? reported : {}),
      prompt_tokens: promptTokens,
      completion_tokens: completionTokens,
      total_tokens: promptTokens + completionTokens,
      cost: charged.toString(),
    }
  }

  // Marks the first token's time; the caller yields `out` right after.
  const sending = (out: Received[]) => {
    if (ttft === null && !nothingSent()) ttft = Math.round(performance.now() - o.startedAt)
    return { kind: 'chunks' as const, chunks: out }
  }

  // Renews while nothing arrives (keep-alive comments) or the client does not read: the
  // loop below renews only when a batch comes through it. A renewal refused (the reservation
  // swept or taken over) ends the stream at its next batch, as the loop's own would; one
  // that failed is left to the loop's own, which will try again.
  let refused = false
  const stopRenewing =
    o.renewMs === undefined
      ? undefined
      : renewing(reservation, o.renewMs, {
          due: () => !settled && performance.now() - renewedAt >= o.renewMs!,
          delivered: () => delivered(fold()),
          renewed: () => {
            renewedAt = performance.now()
          },
          refused: () => {
            refused = true
          },
        })
  /** Whether the client went away (or a newer stream took over) during a wait: then no more
   * text is taken in, and the charge is the text handed on before the wait (each wait for an
   * extension comes after what is already paid for was yielded). */
  const gone = () => {
    if (!o.signal.aborted) return false
    status = endedBy()
    return true
  }
  /** Why the upstream was stopped: a newer stream, the gateway's stop, or the client gone. */
  const endedBy = (): Status =>
    reservation.superseded
      ? 'superseded'
      : o.signal.reason instanceof GatewayStoppingError
        ? 'stopped'
        : 'cancelled'
  try {
    try {
      for await (const batch of o.chunks) {
        // Another stream took the channel over: send nothing more.
        if (reservation.superseded) {
          status = 'superseded'
          break
        }
        // The reservation is gone (a renewal was refused): send nothing more.
        if (refused) {
          status = 'insufficient_funds'
          break
        }
        if (o.renewMs !== undefined && performance.now() - renewedAt >= o.renewMs) {
          renewedAt = performance.now()
          // Refused: the reservation is gone (swept) or taken over; send nothing more.
          if (!(await reservation.extend(0n, delivered(fold())))) {
            status = reservation.superseded ? 'superseded' : 'insufficient_funds'
            break
          }
        }
        // Gone while the upstream was read or the lease renewed: not a token more.
        if (gone()) break
        let out: Received[] = []
        for (const received of batch) {
          // A template read knows its text without building the chunk (see Chat.template).
          let text = received.text
          let texts: string[] | undefined
          // The choice `text` belongs to; with `texts`, each one's.
          let index = 0
          let indexes: number[] | undefined
          const chunk = text === undefined ? received.chunk : undefined
          // A usage that text came after was no final count (an upstream that sends usage
          // early, or with every chunk): the last one with nothing after it counts.
          if (reported && (text ? text.length > 0 : chunk!.choices.some((c) => generated(c.delta))))
            reported = undefined
          if (chunk) {
            if (chunk.usage) reported = chunk.usage
            const choices = chunk.choices
            if (choices.length === 0) continue
            // Each choice's text is a text of its own (one choice is the rule: `n` is 1).
            if (choices.length === 1) {
              text = generated(choices[0]!.delta)
              index = choices[0]!.index
            } else {
              texts = choices.map((c) => generated(c.delta))
              indexes = choices.map((c) => c.index)
            }
            for (const c of choices) if (c.finish_reason) finishReason = c.finish_reason
          }
          let bound = 0
          if (text !== undefined) bound = Tokenizer.bound(text)
          else for (const t of texts!) bound += Tokenizer.bound(t)
          if (upper + bound > covered) {
            // The bound passes the reservation: count exactly, and extend if that does too.
            const exact = fold()
            let total = exact
            if (text !== undefined) total += more(textOf(index), text)
            else {
              // Pieces of one choice in one chunk (never sent, but possible) as one text.
              const byChoice = new Map<number, string>()
              texts!.forEach((t, i) => {
                byChoice.set(indexes![i]!, (byChoice.get(indexes![i]!) ?? '') + t)
              })
              for (const [i, t] of byChoice) total += more(textOf(i), t)
            }
            // The count fits, the bound does not even counted (a text's tail is bounded by its
            // bytes: in a run of CJK or emoji, up to twice its count): each next chunk would be
            // counted exactly, the tail again with it. Hold what the bound needs, and a block,
            // if the payer can; if not, count chunk by chunk to the end of what it holds.
            // (Only where the two differ by more than a few tokens: near the end of what
            // prose holds, counting each chunk costs little, and holding more would extend a
            // stream that may be about to end.)
            const ahead = total <= covered && !tight && upper + bound > covered + AHEAD_GAP
            if ((total > covered || ahead) && out.length > 0) {
              // Send what is paid for first, so `delivered` is what the client has.
              yield sending(out)
              out = []
            }
            if (ahead) {
              const short = Pricing.cost(price, o.promptTokens, upper + bound) - reservation.held
              renewedAt = performance.now()
              const extended = await reservation.extend(
                short + Pricing.cost(price, 0, block),
                delivered(exact),
              )
              // Gone while it was extended: this chunk and the rest are not sent.
              if (gone()) break
              if (extended) {
                covered = coveredBy(reservation.held)
                block = Math.min(block * 2, maxBlock)
              } else tight = true
            } else if (total > covered) {
              // Pay before sending: extend a block at a time, then exactly what this chunk
              // needs, then (channels) wait for the payer.
              // What was sent so far: what a dead instance's request is charged.
              const sent = delivered(exact)
              const required = Pricing.cost(price, o.promptTokens, total)
              while (required > reservation.held) {
                // Each pass follows a wait (an extension, a voucher): gone, nothing more is sent.
                if (gone()) break
                const short = required - reservation.held
                const blockCost = Pricing.cost(price, 0, block)
                renewedAt = performance.now()
                if (await reservation.extend(short > blockCost ? short : blockCost, sent)) {
                  if (short <= blockCost) block = Math.min(block * 2, maxBlock)
                  continue
                }
                block = o.blockTokens
                if (short < blockCost && (await reservation.extend(short, sent))) continue
                if (reservation.superseded) status = 'superseded'
                else if (reservation.waitForFunds) {
                  yield { kind: 'shortfall', required }
                  if (await reservation.waitForFunds(required, o.signal)) continue
                  // Another stream took the channel while this one waited: it ends for that.
                  if (!gone()) status = reservation.superseded ? 'superseded' : 'payment_timeout'
                } else status = 'insufficient_funds'
                break
              }
              covered = coveredBy(reservation.held)
              // Gone while it was extended: this chunk and the rest are not sent.
              if (status === 'ok') gone()
              if (status !== 'ok') break
              tight = false
            }
          }
          if (bound > 0) {
            if (text !== undefined) textOf(index).push(text)
            else
              texts!.forEach((t, i) => {
                textOf(indexes![i]!).push(t)
              })
            upper += bound
          }
          if (chunk?.usage) {
            const { usage: _, ...rest } = chunk
            out.push({ chunk: rest as Chunk })
          } else out.push(received)
        }
        if (out.length > 0) yield sending(out)
        if (status !== 'ok') break
      }
    } catch (e) {
      if (o.signal.aborted) status = endedBy()
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
        'A newer stream on this channel took over, or the channel is closing; this one ends here.',
        'stream_superseded',
      )
    if (status === 'stopped') error = o.signal.reason as GatewayStoppingError
    if (
      status === 'insufficient_funds' ||
      status === 'payment_timeout' ||
      status === 'superseded' ||
      status === 'stopped'
    )
      finishReason = 'length'
    // An upstream that ended its stream ([DONE]) and never said why (GetInference's): it
    // stopped, as OpenAI would say; OpenAI's SDKs fail a choice without a finish_reason
    // ("missing finish_reason for choice 0").
    if (status === 'ok' && finishReason === null) finishReason = 'stop'
    const usage = await settle()
    // Aborted, the client is gone, unless the abort was a newer stream's taking over or the
    // gateway's stop.
    if (!o.signal.aborted || status === 'superseded' || status === 'stopped')
      yield { kind: 'end', usage, finishReason, ...(error ? { error } : {}) }
  } finally {
    stopRenewing?.()
    // The consumer stopped pulling (client gone): charge what was sent.
    if (!settled) {
      status = status === 'ok' ? 'cancelled' : status
      await settle()
    }
  }
}

/**
 * Renews `reservation`'s lease every `ms` (when `due` says so, if given), one renewal at a
 * time, recording `delivered` with it; `refused` is called once a renewal is refused (the
 * reservation swept, or taken over), after which it stops; one that failed (the database) is
 * tried again at the next tick. Returns what stops it.
 */
function renewing(
  reservation: Reservation,
  ms: number,
  o: {
    due?: () => boolean
    delivered?: () => Delivered
    renewed?: () => void
    refused: () => void
  },
): () => void {
  let busy = false
  let stopped = false
  const timer = setInterval(() => {
    if (stopped || busy || (o.due && !o.due())) return
    busy = true
    reservation
      .extend(0n, o.delivered?.())
      .then(
        (ok) => {
          if (ok) o.renewed?.()
          else if (!stopped) {
            stopped = true
            clearInterval(timer)
            o.refused()
          }
        },
        () => {},
      )
      .finally(() => {
        busy = false
      })
  }, ms)
  return () => {
    stopped = true
    clearInterval(timer)
  }
}

export type CompleteOptions = {
  price: Pricing.Price
  promptTokens: number
  reservation: Reservation
  call: () => Promise<Completion>
  signal: AbortSignal
  startedAt: number
  /** The upstream's `max_tokens`: no more completion tokens are charged than that, or than the
   * text it sent counts (see `allowed`). */
  maxTokens: number
  /** The model's context: no more prompt tokens are charged, whatever the upstream says. */
  maxPromptTokens?: number | undefined
  /** Renews the reservation's lease this often while the upstream works (see `stream`). */
  renewMs?: number | undefined
  /** Stops the upstream call: its reservation is gone (a renewal was refused). */
  stop?: (() => void) | undefined
  /** Whether an upstream was asked (read the prompt): a client gone before pays nothing. */
  asked: () => boolean
}

/**
 * The completion tokens an upstream's own count is charged: as it says, up to `maxTokens` (the
 * `max_tokens` it was sent: an upstream that says it wrote more is charged that); beyond it only
 * as far as the text delivered counts (`delivered`, counted only then): an upstream that ignored
 * the limit (or took another parameter for it) sent that much, and it is not given away.
 */
function allowed(reported: number, maxTokens: number | undefined, delivered: () => number) {
  if (maxTokens === undefined || reported <= maxTokens) return reported
  return Math.min(reported, Math.max(maxTokens, delivered()))
}

/**
 * Meters a whole completion. The caller capped the upstream's `max_tokens` at what the
 * reservation pays for, so the charge stays within it unless the upstream wrote more than it
 * was allowed: that is charged as far as the payer can pay (see `allowed`).
 */
export async function complete(
  o: CompleteOptions,
): Promise<{ completion: Completion; usage: Usage }> {
  let completion: Completion
  // A whole completion may take longer than a lease (a slow upstream, failover): renew it, or
  // the sweep takes the request for dead, releases it and its answer goes out free.
  // A renewal refused: the sweep took the request for dead (released its hold, charged what
  // it had recorded: nothing). Its answer is not sent free: the call stops, the request fails.
  let lost = false
  const stopRenewing =
    o.renewMs === undefined
      ? undefined
      : renewing(o.reservation, o.renewMs, {
          refused: () => {
            lost = true
            o.stop?.()
          },
        })
  const gone = () =>
    new ReservationLostError(
      'This request lost its hold on your credits while the model worked (the ledger was out of reach longer than a lease); it was stopped and nothing was charged. Send it again.',
    )
  try {
    completion = await o.call()
  } catch (e) {
    if (lost) throw gone()
    await release(o.reservation, { ...o, cancelled: o.signal.aborted, asked: o.asked() })
    throw e
  } finally {
    stopRenewing?.()
  }
  if (lost) throw gone()
  const promptTokens = Math.min(
    completion.usage?.prompt_tokens ?? o.promptTokens,
    o.maxPromptTokens ?? Number.MAX_SAFE_INTEGER,
  )
  const counted = () =>
    completion.choices.reduce((n, c) => n + Tokenizer.count(generated(c.message)), 0)
  const reported = completion.usage ? outputTokens(completion.usage) : undefined
  const completionTokens =
    reported === undefined ? counted() : allowed(reported, o.maxTokens, counted)
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
 * Ends a request that produced nothing: free after an upstream failure or the gateway's stop
 * (`stopped`); the prompt alone when the client cancelled after an upstream was asked
 * (`asked`: it read the prompt), free when it went before any was.
 */
export async function release(
  reservation: Reservation,
  o: {
    price: Pricing.Price
    promptTokens: number
    startedAt: number
    cancelled: boolean
    asked: boolean
    stopped?: boolean | undefined
  },
): Promise<void> {
  await reservation.settle({
    cost: o.cancelled && o.asked ? Pricing.cost(o.price, o.promptTokens, 0) : 0n,
    promptTokens: o.promptTokens,
    completionTokens: 0,
    status: o.cancelled
      ? 'cancelled'
      : reservation.superseded
        ? 'superseded'
        : o.stopped
          ? 'stopped'
          : 'upstream_error',
    latencyMs: Math.round(performance.now() - o.startedAt),
    ttftMs: null,
  })
}
