/**
 * POST /v1/chat/completions for API-key holders: admit (one round trip: key, plan limits,
 * credits reserved), call the upstream, meter, settle (one round trip).
 */
import { createHash } from 'node:crypto'
import { Hono } from 'hono'
import {
  ConflictError,
  type GatewayError,
  InsufficientCreditsError,
  InvalidRequestError,
  RateLimitError,
  TierNotAvailableError,
  WalletEmptyError,
} from '../../Errors.ts'
import * as ApiKeys from '../../ledger/ApiKeys.ts'
import * as Reservations from '../../ledger/Reservations.ts'
import * as Meter from '../../metering/Meter.ts'
import * as Pricing from '../../metering/Pricing.ts'
import * as Tokenizer from '../../metering/Tokenizer.ts'
import * as Chat from '../../upstream/Chat.ts'
import type { Model } from '../../upstream/Router.ts'
import type { Deps } from '../Deps.ts'
import * as Auth from '../middleware/Auth.ts'
import * as Parse from '../Parse.ts'
import * as Sse from '../Sse.ts'

const IDEMPOTENCY_KEY = /^[\x21-\x7e]{1,255}$/

export function routes(deps: Deps) {
  const app = new Hono()
  const { blockTokens, leaseSeconds } = deps.config.metering

  app.post('/', async (c) => {
    const startedAt = performance.now()
    const text = await c.req.text()
    const req = Parse.parse(Chat.Request, Parse.json(text))
    const model = deps.router.route(req.model)
    const raw = Auth.rawKey(c)
    if (!raw) throw Auth.missingKey()
    const idempotencyKey = c.req.header('idempotency-key') ?? null
    if (idempotencyKey !== null && !IDEMPOTENCY_KEY.test(idempotencyKey))
      throw new InvalidRequestError(
        'Idempotency-Key must be 1 to 255 printable ASCII characters.',
        'invalid_value',
        {
          param: 'Idempotency-Key',
        },
      )

    const promptTokens = Tokenizer.prompt(
      req.messages.map((m) => ({ content: Chat.text(m.content) })),
    )
    const room = model.contextLength - promptTokens
    if (room <= 0)
      throw new InvalidRequestError(
        `The prompt has ${promptTokens} tokens; ${model.id} takes at most ${model.contextLength}.`,
        'context_length_exceeded',
        { param: 'messages' },
      )
    const asked = req.max_tokens ?? req.max_completion_tokens
    const limit = Math.min(asked ?? room, room)
    const price = model.pricing
    // Streams hold the prompt and one block, then extend. Whole completions hold their
    // whole output: all of max_tokens, or without it as much as the credits allow.
    const want = Pricing.cost(
      price,
      promptTokens,
      req.stream ? Math.min(blockTokens, limit) : limit,
    )
    const need =
      req.stream || asked !== undefined
        ? want
        : Pricing.cost(price, promptTokens, Math.min(blockTokens, limit))

    const requestId = crypto.randomUUID()
    const admitted = await Reservations.admit(deps.sql, {
      keyHash: ApiKeys.hash(raw),
      model: model.id,
      stream: req.stream,
      minTier: model.minTier,
      promptTokens,
      want,
      need,
      idempotencyKey,
      fingerprint: idempotencyKey === null ? null : createHash('sha256').update(text).digest(),
      requestId,
      leaseSeconds,
    })
    if (admitted.status !== 'ok') throw refusal(admitted, model, need)

    c.header('x-request-id', requestId)
    if (admitted.rateLimit !== null) {
      c.header('x-ratelimit-limit-requests', String(admitted.rateLimit))
      c.header('x-ratelimit-remaining-requests', String(admitted.rateRemaining))
    }
    const reservation = logged(
      deps,
      Reservations.reservation(deps.sql, { id: requestId, held: admitted.held, leaseSeconds }),
      { account: admitted.accountId, model: model.id, stream: req.stream },
    )
    const body: Record<string, unknown> = { ...req, model: model.upstreamModel }
    delete body.stream_options
    const signal = c.req.raw.signal

    if (!req.stream) {
      // Cap the upstream at what the reservation pays for, so the charge cannot exceed it
      // (no cap needed when the reservation covers the whole context).
      const max = Pricing.affordable(price, promptTokens, reservation.held, limit)
      if (asked !== undefined || max < room)
        body[req.max_completion_tokens !== undefined ? 'max_completion_tokens' : 'max_tokens'] = max
      const { completion, usage } = await Meter.complete({
        price,
        promptTokens,
        reservation,
        signal,
        startedAt,
        call: () => observed(deps, model, model.provider.complete(body as never, signal)),
      })
      return c.json({ ...completion, model: model.id, usage: { ...completion.usage, ...usage } })
    }

    const abort = new AbortController()
    const onAbort = () => abort.abort(signal.reason)
    signal.addEventListener('abort', onAbort, { once: true })
    let chunks: AsyncIterable<Chat.Chunk>
    try {
      chunks = await observed(deps, model, model.provider.stream(body as never, abort.signal))
    } catch (e) {
      signal.removeEventListener('abort', onAbort)
      await Meter.release(reservation, {
        promptTokens,
        startedAt,
        cancelled: signal.aborted,
        price,
      })
      throw e
    }
    const frames = Meter.stream({
      price,
      promptTokens,
      blockTokens,
      reservation,
      chunks,
      signal: abort.signal,
      startedAt,
    })
    return Sse.response(c, {
      frames,
      model: model.id,
      includeUsage: req.stream_options?.include_usage === true,
      abort: () => abort.abort(new Error('client disconnected')),
      done: () => signal.removeEventListener('abort', onAbort),
    })
  })

  return app
}

/** Records the upstream's health from the outcome of a call. */
async function observed<T>(deps: Deps, model: Model, call: Promise<T>): Promise<T> {
  try {
    const r = await call
    deps.router.record(model.provider, true)
    return r
  } catch (e) {
    const status = (e as GatewayError).status
    if (status === undefined || status >= 500) deps.router.record(model.provider, false)
    throw e
  }
}

/** Logs each settled request: counts, money and timings only. */
function logged<R extends Meter.Reservation>(
  deps: Deps,
  r: R,
  fields: { account: string; model: string; stream: boolean },
): R {
  const settle = r.settle.bind(r)
  return Object.assign(r, {
    async settle(o: Meter.Outcome) {
      const result = await settle(o)
      deps.log.info(
        {
          request: r.id,
          ...fields,
          status: o.status,
          prompt_tokens: o.promptTokens,
          completion_tokens: o.completionTokens,
          cost: result.charged.toString(),
          latency_ms: o.latencyMs,
          ttft_ms: o.ttftMs,
        },
        'completion',
      )
      return result
    },
  })
}

type Refused = Exclude<Awaited<ReturnType<typeof Reservations.admit>>, { status: 'ok' }>

/** The typed error for a refused admission. */
function refusal(r: Refused, model: Model, need: bigint): GatewayError {
  switch (r.status) {
    case 'unauthorized':
      return Auth.badKey()
    case 'tier':
      return new TierNotAvailableError(
        `The model ${model.id} is not available on this account's plan; upgrade the plan to use it.`,
        'tier_not_available',
      )
    case 'idempotency_mismatch':
      return new ConflictError(
        'This Idempotency-Key was used for a different request; use a new key.',
        'idempotency_key_mismatch',
      )
    case 'idempotency_in_progress':
      return new ConflictError(
        'A request with this Idempotency-Key is still running; retry when it ends.',
        'idempotency_in_progress',
        {
          headers: { 'retry-after': '1' },
          details: { request_id: r.otherRequest },
        },
      )
    case 'idempotency_completed':
      // Completions are never stored (no prompt or completion text is kept), so the first
      // answer cannot be replayed; what matters is that it is not charged again.
      return new ConflictError(
        'A request with this Idempotency-Key already completed and was charged; it is not run or charged again. Use a new key for a new request.',
        'idempotency_key_reused',
        { details: { request_id: r.otherRequest } },
      )
    case 'insufficient':
      return new InsufficientCreditsError(
        `This request needs ${need} base units of credits and the account has ${r.available} available. Add credits${r.available > 0n ? ' or lower max_tokens' : ''}.`,
        'insufficient_credits',
        { details: { required: need.toString(), available: r.available.toString() } },
      )
    default: {
      const headers: Record<string, string> = {
        'retry-after': String(Math.max(1, Math.ceil(r.retryAfterMs / 1000))),
      }
      if (r.rateLimit !== null) {
        headers['x-ratelimit-limit-requests'] = String(r.rateLimit)
        headers['x-ratelimit-remaining-requests'] = String(r.rateRemaining ?? 0)
        headers['x-ratelimit-reset-requests'] = `${Math.max(0, r.retryAfterMs) / 1000}s`
      }
      const options = { headers }
      switch (r.status) {
        case 'rate':
          return new RateLimitError(
            `The plan allows ${r.rateLimit} requests per minute; retry after the Retry-After seconds.`,
            'rate_limit_exceeded',
            options,
          )
        case 'concurrency':
          return new RateLimitError(
            'The plan allows no more completions in flight at once; retry when one ends.',
            'concurrency_limit_exceeded',
            options,
          )
        case 'quota':
          return new RateLimitError(
            "The plan's monthly token quota is used up; it resets at the start of next month (UTC).",
            'monthly_token_quota_exceeded',
            options,
          )
        case 'wallet':
          return new WalletEmptyError(
            'The token wallet is below the floor a turn needs; it refills over time (see Retry-After).',
            'wallet_empty',
            options,
          )
      }
    }
  }
}
