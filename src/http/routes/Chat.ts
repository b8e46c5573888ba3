/**
 * POST /v1/chat/completions for API-key holders: admit (one round trip: key, plan limits,
 * credits reserved), call the upstream, meter, settle (one round trip).
 */
import { createHash } from 'node:crypto'
import { type Context, Hono } from 'hono'
import {
  ConflictError,
  GatewayError,
  GatewayStoppingError,
  InsufficientCreditsError,
  InvalidRequestError,
  MethodNotAllowedError,
  NoUpstreamError,
  noRetry,
  PayloadTooLargeError,
  PaymentRequiredError,
  RateLimitError,
  rateLimitHeaders,
  TierNotAvailableError,
  UpstreamError,
  UpstreamRateLimitedError,
  WalletEmptyError,
} from '../../Errors.ts'
import { Lru } from '../../Lru.ts'
import * as ApiKeys from '../../ledger/ApiKeys.ts'
import * as Channels from '../../ledger/Channels.ts'
import * as Reservations from '../../ledger/Reservations.ts'
import * as Meter from '../../metering/Meter.ts'
import * as Pricing from '../../metering/Pricing.ts'
import * as Receipt from '../../metering/Receipt.ts'
import * as Tokenizer from '../../metering/Tokenizer.ts'
import * as Encoding from '../../payment/Encoding.ts'
import * as Events from '../../payment/Events.ts'
import type * as Method from '../../payment/Method.ts'
import * as Problem from '../../payment/Problem.ts'
import * as Chat from '../../upstream/Chat.ts'
import type { Body, Timing } from '../../upstream/Provider.ts'
import { externalAllowed, type Model, type Route } from '../../upstream/Router.ts'
import type { Deps } from '../Deps.ts'
import * as Auth from '../middleware/Auth.ts'
import * as Parse from '../Parse.ts'
import * as Payments from '../Payments.ts'
import * as Sse from '../Sse.ts'

const IDEMPOTENCY_KEY = /^[\x21-\x7e]{1,255}$/

/** Refusals of a voucher its channel's signer did not sign. */
const unsigned = new Set<Problem.Kind>(['session/invalid-signature', 'session/signer-mismatch'])

/** A parsed, priced completion request: what admission and metering need. */
type Plan = {
  req: Chat.Request
  text: string
  model: Model
  /** Whether it may go to the model's external routes (see `Requested`). */
  external: boolean
  /** The upstreams to try, in order (see Router.routes). */
  routes: readonly Route[]
  promptTokens: number
  /** Output tokens the request may produce (max_tokens, capped by the context; once admitted,
   * by the plan's monthly quota too). */
  limit: number
  /** The most output one answer may have: what the context leaves, at most the model's
   * `maxOutputTokens`. */
  room: number
  /** What the context leaves for output (`room` unless the model's own limit is lower): a
   * limit below it goes upstream as `max_tokens`, else the upstream's own bounds the answer. */
  left: number
  asked: number | undefined
  want: bigint
  need: bigint
  /** Signs the request's receipt (see `receiptSigner`). */
  signer: Receipt.Signer | undefined
}

/**
 * A completion request, parsed, the model it names, and whether it may go to the model's
 * external routes (as it says, `allow_external`, else unless its strategy is `cheapest`).
 */
type Requested = { req: Chat.Request; model: Model; external: boolean }

/**
 * Parses a completion request and finds its model, and refuses what needs no count to refuse
 * (a price above the request's ceilings, no upstream it allows): nothing is counted yet.
 */
function requested(deps: Deps, text: string): Requested {
  const json = Parse.json(text)
  // The common shape is checked by hand (see Chat.asRequest); anything else, and anything
  // wrong, goes through the schema, which names what is wrong.
  const req =
    (Chat.fastPathFor(text) ? Chat.asRequest(json) : undefined) ?? Parse.parse(Chat.Request, json)
  // What no wait would change (a price above the ceilings, no route allowed) is refused before
  // a 503 of a model whose circuits are open, which the client would retry into the same 400.
  const model = deps.router.model(req.model)
  ceilings(req, model)
  // Refused whether allow_external is false as asked or by default (under cheapest): no route
  // would ever be left, and a 503 would have the client retry for nothing.
  const external = externalAllowed(req.routing_strategy ?? model.routing, req.allow_external)
  if (!external && model.routes.every((r) => r.external))
    throw new InvalidRequestError(
      req.allow_external === false
        ? `Every upstream of ${model.id} is external, and allow_external is false; nothing was charged.`
        : `Every upstream of ${model.id} is external, and routing_strategy cheapest leaves external upstreams out unless allow_external is true; send allow_external: true. Nothing was charged.`,
      'no_route_allowed',
      { param: 'allow_external' },
    )
  // Every route it may use has its circuit open: a 503 with the wait until the first of those
  // probes (not an external one it leaves out), before its prompt is counted.
  deps.router.available(model, external)
  return { req, model, external }
}

/** The 400 of a prompt of `tokens` (or more than the context, when `over`) for `model`. */
function tooLong(model: Model, tokens: number, over: boolean): InvalidRequestError {
  return new InvalidRequestError(
    `The prompt has ${over ? `more than ${model.contextLength}` : tokens} tokens; ${model.id} takes at most ${model.contextLength}.`,
    'context_length_exceeded',
    { param: 'messages' },
  )
}

/**
 * The least a request can cost, whatever its prompt's count: its prompt at a token per
 * Tokenizer.LONGEST_TOKEN characters (and its media parts), no output. Counting costs real
 * time; this costs none. A prompt over the context even so is refused here (the 400 it gets
 * once counted).
 */
function leastCost(deps: Deps, { req, model }: Requested): bigint {
  const texts = Chat.promptTexts(req).map((content) => ({ content }))
  const tokens =
    Tokenizer.leastPrompt(texts) + Chat.mediaParts(req) * deps.config.metering.mediaPartTokens
  if (tokens > model.contextLength) throw tooLong(model, tokens, true)
  return Pricing.cost(model.pricing, tokens, 0)
}

/**
 * Parses and prices a completion request; `signer` signs its receipt, if it asked for one.
 * `payer`: what only the payer holds (its API key, its channel), the scope in which the counts
 * of its long messages are remembered for its next requests (Tokenizer.count); undefined for a
 * credential not known to be good, whose counts are not remembered.
 */
function plan(
  deps: Deps,
  text: string,
  payer: string | undefined,
  signer?: Receipt.Signer,
  { req, model, external }: Requested = requested(deps, text),
): Plan {
  const { blockTokens } = deps.config.metering
  const media = Chat.mediaParts(req) * deps.config.metering.mediaPartTokens
  // Counted no further than the context holds (a huge prompt is refused, not counted whole).
  const most = model.contextLength - media
  const promptTokens =
    Tokenizer.prompt(
      Chat.promptTexts(req).map((content) => ({ content })),
      most,
      payer,
    ) + media
  const left = model.contextLength - promptTokens
  if (left <= 0) throw tooLong(model, promptTokens, promptTokens - media > most)
  // The most output one answer may have: what the context leaves, and at most the model's own.
  const room = Math.min(left, model.maxOutputTokens ?? left)
  const asked = req.max_tokens ?? req.max_completion_tokens
  const limit = Math.min(asked ?? room, room)
  const price = model.pricing
  // Streams need the prompt and one block, then extend. One that names its max_tokens holds
  // all of it when the payer has it (up to the largest block the metering grows to), as a
  // whole completion does: a short stream then costs no extension round trip on the
  // payer's row. Whole completions hold their whole output: all of max_tokens, or without
  // it as much as the payer can cover.
  const first = Math.min(blockTokens, limit)
  const want = Pricing.cost(
    price,
    promptTokens,
    req.stream
      ? asked === undefined
        ? first
        : Math.max(first, Math.min(limit, blockTokens * Meter.GROWTH))
      : limit,
  )
  const need = asked !== undefined && !req.stream ? want : Pricing.cost(price, promptTokens, first)
  const routes = deps.router.routes(
    model,
    req.routing_strategy,
    { prompt: promptTokens, output: limit, stream: req.stream },
    external,
  )
  // No route the request may use takes requests now (each waits out its upstream's 429, or its
  // circuit is open): refused before anything is held or counted, with the wait of those routes
  // (not of external ones the request leaves out, which kept the model's health up).
  if (routes.length === 0) {
    const allowed = deps.router.allowed(model, external)
    const wait = deps.router.rateLimitedFor(model, allowed)
    if (wait > 0) throw rateLimited(model, wait)
    throw deps.router.unavailable(model, allowed)
  }
  return {
    req,
    text,
    model,
    external,
    routes,
    promptTokens,
    limit,
    room,
    left,
    asked,
    want,
    need,
    signer,
  }
}

/** The 503 of a model whose upstreams rate limit the gateway, for `ms` more. */
function rateLimited(model: Model, ms: number): UpstreamRateLimitedError {
  return new UpstreamRateLimitedError(
    `The upstreams of ${model.id} are rate limiting the gateway; retry after ${Math.ceil(ms / 1000)} s. Nothing was charged.`,
    ms,
  )
}

/** Refuses a model priced above the request's ceilings (`max_*_price_per_million`). */
function ceilings(req: Chat.Request, model: Model): void {
  // Both or neither (the schema says so): most requests name none.
  if (req.max_input_price_per_million === undefined) return
  const limits = [
    ['input', req.max_input_price_per_million],
    ['output', req.max_output_price_per_million],
  ] as const
  for (const [side, most] of limits)
    if (most !== undefined && model.pricing[side] > most)
      throw new InvalidRequestError(
        `${model.id} costs ${model.pricing[side]} base units per 1M ${side} tokens, above max_${side}_price_per_million (${most}); nothing was charged.`,
        'price_above_ceiling',
        { param: `max_${side}_price_per_million` },
      )
}

/** The model a request body names, if it names a known one (to price a challenge). */
function priceOf(deps: Deps, text: string): Pricing.Price | undefined {
  try {
    const model = (JSON.parse(text) as { model?: unknown }).model
    if (typeof model === 'string') return deps.router.model(model).pricing
  } catch {}
  return deps.router.models()[0]?.pricing
}

type Hooks = {
  /** Payment events (`payment-need-voucher`). */
  extra?: Sse.Options['extra']
  /** The `payment-receipt` event. */
  beforeDone?: Sse.Options['beforeDone']
  /** Headers of a whole completion, known once it is settled (`Payment-Receipt`). */
  settledHeaders?: () => Promise<Record<string, string>>
  /** Headers a stream starts with (its `Payment-Receipt`; see `Sse.Options.headers`). */
  headers?: Record<string, string>
}

/**
 * How many more requests at once an account must have room for (and a balance to hold) for a
 * completion to be answered before its charge is written (see `settleInBackground`).
 */
const BACKGROUND_MARGIN = 8

/** Runs a completion metered against `reservation`, streamed or whole. */
async function serve(
  c: Context,
  deps: Deps,
  p: Plan,
  reservation: Meter.Reservation,
  startedAt: number,
  payer: Receipt.Facts['payer'],
  hooks: Hooks = {},
): Promise<Response> {
  const { req, model, promptTokens, signer } = p
  /** The request's signed receipt, once it is settled (undefined when not asked for). */
  const receipt = (usage: Meter.Usage, result: () => string) =>
    signer?.sign({
      request_id: reservation.id,
      model: model.id,
      payer,
      prompt_tokens: usage.prompt_tokens,
      completion_tokens: usage.completion_tokens,
      cost: usage.cost,
      status: reservation.settledOutcome?.status ?? 'ok',
      result_sha256: result(),
    })
  const price = model.pricing
  const signal = c.req.raw.signal
  /** Whether `routed` asked an upstream: a client gone before that (during admission) pays
   * nothing. */
  const upstream = { asked: false }
  /** The answer of the route that served it; the client is told which upstream that was. */
  const served = <T>(route: Route, answer: T): T => {
    c.header('x-tollway-upstream', route.provider.name)
    return answer
  }
  // The client's timeout_ms bounds the time to its answer (its start, for a stream) over
  // every upstream tried.
  const deadline = req.timeout_ms === undefined ? undefined : startedAt + req.timeout_ms

  if (!req.stream) {
    // Cap the upstream at what the reservation pays for, so the charge stays within it unless
    // the upstream ignores the cap (see Meter.allowed; no cap needed when the reservation
    // covers the whole context).
    const max = Pricing.affordable(price, promptTokens, reservation.held, p.limit)
    const limits = p.asked !== undefined || max < p.left ? { maxTokens: max } : undefined
    // Aborted when the client goes, or when the request loses its reservation (Meter.complete).
    const call = new AbortController()
    const onAbort = () => call.abort(signal.reason)
    // Gone already (during admission): no 'abort' event will come.
    if (signal.aborted) onAbort()
    else signal.addEventListener('abort', onAbort, { once: true })
    const { completion, usage } = await Meter.complete({
      price,
      promptTokens,
      reservation,
      signal,
      startedAt,
      maxTokens: max,
      maxPromptTokens: model.contextLength,
      renewMs: (deps.config.metering.leaseSeconds * 1000) / 3,
      stop: () => call.abort(),
      asked: () => upstream.asked,
      call: () =>
        routed(
          deps,
          p,
          reservation.id,
          call.signal,
          deadline,
          upstream,
          async (route, body, bounded) =>
            served(route, await route.provider.complete(body, bounded, limits)),
        ),
    }).finally(() => signal.removeEventListener('abort', onAbort))
    for (const [k, v] of Object.entries((await hooks.settledHeaders?.()) ?? {})) c.header(k, v)
    const signed = receipt(usage, () =>
      Receipt.resultDigest(completion.choices.map((c) => c.message)),
    )
    return c.json({
      ...completion,
      // What OpenAI's SDKs read and some upstreams leave out (see Sse.ts).
      id: completion.id ?? `chatcmpl-${crypto.randomUUID()}`,
      object: completion.object ?? 'chat.completion',
      created: completion.created ?? Math.floor(Date.now() / 1000),
      model: model.id,
      usage: { ...completion.usage, ...usage },
      // Named apart from the MPP `receipt` a voucher sent alone is answered with.
      ...(signed ? { tollway_receipt: signed } : {}),
    })
  }

  const abort = new AbortController()
  const onAbort = () => abort.abort(signal.reason)
  // Gone already (during admission): no 'abort' event will come, and no upstream is called.
  if (signal.aborted) onAbort()
  else signal.addEventListener('abort', onAbort, { once: true })
  // A newer stream took the channel: stop this one's upstream, even if it is quiet.
  reservation.whenSuperseded?.(() => abort.abort(new Error('superseded by a newer stream')))
  // The gateway stops: the stream ends with an error event the client reads (Drain.ts).
  const left = deps.drain?.enter((reason) => abort.abort(reason)) ?? (() => {})
  let chunks: AsyncIterable<Chat.Received[]>
  let limits: { maxTokens: number } | undefined
  try {
    // A stream's max_tokens, when it names one, capped by the context and the plan's monthly
    // quota (it extends its reservation as it goes, so credits do not cap it here).
    limits = p.asked !== undefined || p.limit < p.left ? { maxTokens: p.limit } : undefined
    // Answered once the upstream has begun (a failure before its first token is a 502).
    chunks = await routed(
      deps,
      p,
      reservation.id,
      abort.signal,
      deadline,
      upstream,
      async (route, body, bounded, timing) =>
        served(
          route,
          await route.provider.stream(body, bounded, limits, timing).then(Chat.started),
        ),
    )
  } catch (e) {
    signal.removeEventListener('abort', onAbort)
    // Counted until released: a stop's cut waits for it, or its 503 was never written.
    await Meter.release(reservation, {
      promptTokens,
      startedAt,
      cancelled: signal.aborted,
      asked: upstream.asked,
      price,
      stopped: abort.signal.reason instanceof GatewayStoppingError && !signal.aborted,
    }).finally(left)
    // A newer stream took the channel (or it is closing) before this one's upstream began. Not
    // for OpenAI's SDKs to send again by themselves (they retry every 409): sent again, it would
    // take the channel back and end the newer stream, already under way.
    if (reservation.superseded && !signal.aborted)
      throw new ConflictError(
        'A newer stream on this channel took over, or the channel is closing, before this one began; nothing was charged.',
        'stream_superseded',
        { headers: { ...noRetry } },
      )
    if (abort.signal.reason instanceof GatewayStoppingError && !signal.aborted)
      throw abort.signal.reason
    throw e
  }
  const digest = signer ? new Receipt.Digest() : undefined
  const frames = Meter.stream({
    price,
    promptTokens,
    // The most the upstream may write: its max_tokens, or what the context leaves.
    maxTokens: limits?.maxTokens ?? p.limit,
    maxPromptTokens: model.contextLength,
    blockTokens: deps.config.metering.blockTokens,
    // A third of the lease: two renewals may be slow before the sweep takes it for dead.
    renewMs: (deps.config.metering.leaseSeconds * 1000) / 3,
    reservation,
    chunks,
    signal: abort.signal,
    startedAt,
  })
  return Sse.response(c, {
    frames,
    keepAliveMs: deps.config.metering.keepAliveSeconds * 1000,
    model: model.id,
    includeUsage: req.stream_options?.include_usage === true,
    abort: () => abort.abort(new Error('client disconnected')),
    done: () => {
      signal.removeEventListener('abort', onAbort)
      left()
    },
    onError: (e) => deps.log.error({ err: (e as Error).message }, 'stream failed'),
    ...(digest
      ? { digest, receipt: (usage: Meter.Usage) => receipt(usage, () => digest.hex()) }
      : {}),
    ...(hooks.extra ? { extra: hooks.extra } : {}),
    ...(hooks.beforeDone ? { beforeDone: hooks.beforeDone } : {}),
    ...(hooks.headers ? { headers: hooks.headers } : {}),
  })
}

/**
 * A completion request's body, read when its handler is ready for it. `long`: over the body
 * limit for strangers (`maxBodyBytes`), or sent without a declared length (chunked), so read
 * only once its credential proves good (App.ts holds it to `maxCompletionBodyBytes`).
 * `length`: the declared length (0 when chunked). `text`: what was read ('' before, and for a
 * method without a body).
 */
type Incoming = { long: boolean; length: number; text: string; read(): Promise<string> }

function incoming(c: Context, limit: number): Incoming {
  const post = c.req.method === 'POST'
  const header = c.req.header('content-length')
  const chunked = header === undefined || c.req.header('transfer-encoding') !== undefined
  const length = chunked ? 0 : Parse.declared(header)
  let reading: Promise<string> | undefined
  const body: Incoming = {
    long: post && (chunked || length > limit),
    length,
    text: '',
    // Read once, however often asked.
    read: () =>
      (reading ??= post
        ? c.req.text().then((text) => {
            body.text = text
            return text
          })
        : Promise.resolve('')),
  }
  return body
}

/**
 * Bodies longer than this (characters) are counted only for a key known to be good. Counting
 * costs up to 6 µs a character (CJK text; o200k's BPE), so a stranger's body of 64 KiB held
 * the event loop for a third of a second; one of 512 characters costs at most about 3 ms.
 */
const COUNTED_AFTER_AUTH = 512
/** How many keys a process remembers as good (see `known` in `routes`). */
const KNOWN_KEYS = 16_384

export function routes(deps: Deps) {
  const app = new Hono()
  const { leaseSeconds } = deps.config.metering
  /**
   * Keys this process saw admitted or authenticated lately (by their hash): their long bodies
   * are counted before admission checks them again, and their long messages' counts are
   * remembered (Tokenizer.count). Any other key's long body waits for a lookup of the key, so
   * that a stranger can neither make the gateway count it nor push paying clients' counts out
   * of the memo. A key admission finds revoked is forgotten.
   */
  const known = new Lru<string, true>(KNOWN_KEYS)
  /**
   * Keys this process saw refused by their plan's request rate, monthly quota or token wallet,
   * with the wait the ledger gave (by `performance.now()`): a long body of one is refused
   * again at once, not counted first. Counting a context's worth costs up to a third of a
   * second, and admission (which refuses) comes after it, so a key holder refused every time
   * could still make the gateway count without end. (Short bodies go to the ledger, which
   * decides: a plan changed meanwhile takes effect at once for them.) `until` is how long the
   * refusal is remembered (a minute at most); `waitEnds` is when the ledger's wait ends, which
   * the repeated refusal's Retry-After states: a quota's or a wallet's is hours or days, and
   * a minute would send the client back to be refused again. A prompt over the plan's whole
   * monthly quota is not refused so (see `overQuota`): the ledger refuses it before its rate,
   * quota or wallet, with a 400 no wait changes.
   */
  const limitedUntil = new Lru<string, { until: number; waitEnds: number; refused: Limited }>(
    KNOWN_KEYS,
  )
  /**
   * Whether the long body of a key `limitedUntil` holds may be a prompt over its plan's whole
   * monthly quota (`tokensPerMonth`, null: none), which the ledger answers with the 400
   * prompt_exceeds_monthly_quota rather than the remembered 429. Only where some model's
   * context holds more than the quota (a prompt over the context is refused before the
   * ledger) is the body read: its prompt over the quota whatever its count, or counted no
   * further than the quota (less than the model's context: a refusal repeated so costs at most
   * that), and `payer`'s counts remembered as for its admissions. Such a prompt goes on to be
   * counted and to the ledger, as any key's prompt over the quota does.
   */
  const overQuota = async (
    c: Context,
    body: Incoming,
    tokensPerMonth: number | null,
    payer: string,
  ): Promise<boolean> => {
    // A prompt reaching the ledger leaves at least a token of its model's context.
    const fits = (m: Model) => m.contextLength <= tokensPerMonth! + 1
    if (tokensPerMonth === null || c.req.method !== 'POST' || deps.router.models().every(fits))
      return false
    const { req, model } = requested(deps, await body.read())
    if (fits(model)) return false
    const media = Chat.mediaParts(req) * deps.config.metering.mediaPartTokens
    const texts = Chat.promptTexts(req).map((content) => ({ content }))
    if (Tokenizer.leastPrompt(texts) + media > tokensPerMonth) return true
    return Tokenizer.prompt(texts, tokensPerMonth - media, payer) + media > tokensPerMonth
  }
  /**
   * Payers this process saw refused for want of funds, until one is admitted: keys (by their
   * hash, as `known`) short of credits, and channels (by their id) short of authorized balance.
   * Before a long prompt of one is counted, what it has free is read (a round trip), and a
   * prompt that costs more than that whatever its count (`leastCost`) is refused at once.
   * Admission comes after counting, so a payer out of funds could otherwise make the gateway
   * count a context's worth (up to a third of a second) per request without end. Only where
   * no other refusal the ledger would give first can apply: not with an Idempotency-Key (a
   * retry of a request done or under way is told so, not to add funds), not on a model above
   * the key's tier, nor when the model's upstreams rate limit the gateway.
   */
  const unfunded = new Lru<string, true>(KNOWN_KEYS)
  /** Notes an admission's outcome for `payer`: refused for want of funds, or admitted. */
  const funded = (payer: string, status: string) => {
    if (status === 'insufficient') unfunded.set(payer, true)
    else if (status === 'ok' && unfunded.count > 0) unfunded.delete(payer)
  }
  /**
   * The least request `r` (JSON `text`, from payer `payer`) can cost, when it is to be checked
   * against the payer's funds before it is counted (see `unfunded`); else undefined.
   */
  const checkedFirst = (
    payer: string,
    text: string,
    r: Requested,
    idempotencyKey: string | null,
  ): bigint | undefined => {
    if (text.length <= COUNTED_AFTER_AUTH || unfunded.count === 0 || idempotencyKey !== null)
      return undefined
    if (unfunded.get(payer) === undefined || deps.router.rateLimitedFor(r.model) > 0)
      return undefined
    const least = leastCost(deps, r)
    return least > 0n ? least : undefined
  }
  /** Refuses a request of a key refused lately for want of credits (see `unfunded`) whose
   * prompt costs more than its account has free, whatever its count. */
  const afford = async (keyHash: Buffer, least: bigint, r: Requested) => {
    const funds = await ApiKeys.funds(deps.sql, keyHash)
    if (!funds) throw Auth.badKey()
    if (funds.tier < r.model.minTier || funds.available >= least) return
    throw new InsufficientCreditsError(
      `This request needs at least ${least} base units of credits for its prompt alone, and the account has ${funds.available} available. Add credits.`,
      'insufficient_credits',
      { details: { required: least.toString(), available: funds.available.toString() } },
    )
  }

  /** API-key holders: credits, plans and usage logs. */
  const keyed = async (
    c: Context,
    body: Incoming,
    startedAt: number,
    paying: () => Payments.Payments | undefined,
    requestId: string,
  ) => {
    const raw = Auth.rawKey(c)
    if (!raw) {
      if (!paying()) throw Auth.missingKey()
      throw new PaymentRequiredError(
        'This endpoint needs payment: send an API key ("Authorization: Bearer <key>" or "X-API-Key") or pay per request with a Payment credential (see WWW-Authenticate).',
        'payment_required',
      )
    }
    const keyHash = ApiKeys.hash(raw)
    const knownAs = keyHash.toString('base64')
    let good = known.get(knownAs) !== undefined
    // The key of a body not known to be good is looked up first (a database round trip a key
    // pays once) where the body is long: one over the body limit is read only for a good key,
    // and one over COUNTED_AFTER_AUTH characters costs real time to count.
    const vouch = async () => {
      if (!(await ApiKeys.authenticate(deps.sql, raw))) throw Auth.badKey()
      known.set(knownAs, true)
      good = true
    }
    if (!good && body.long) await vouch()
    const text = await body.read()
    if (!good && text.length > COUNTED_AFTER_AUTH) await vouch()
    let p: Plan
    let idempotencyKey: string | null
    let fingerprint: Uint8Array | null
    try {
      const r = requested(deps, text)
      ;({ idempotencyKey, fingerprint } = idempotency(c, text))
      const least = checkedFirst(knownAs, text, r, idempotencyKey)
      if (least !== undefined) await afford(keyHash, least, r)
      p = plan(deps, text, good ? raw : undefined, receiptSigner(c, deps), r)
    } catch (e) {
      // Admission checks the key with the plan in one round trip; a request refused before it
      // looks the key up here, so an unknown or revoked key is a 401 whatever its body or
      // headers. (`afford` read the key: its refusal is the key's.)
      if (
        e instanceof GatewayError &&
        !(e instanceof InsufficientCreditsError) &&
        !(await ApiKeys.authenticate(deps.sql, raw))
      )
        throw Auth.badKey()
      throw e
    }
    const admitted = await Reservations.admit(deps.sql, {
      keyHash,
      model: p.model.id,
      stream: p.req.stream,
      minTier: p.model.minTier,
      promptTokens: p.promptTokens,
      want: p.want,
      need: p.need,
      idempotencyKey,
      fingerprint,
      requestId,
      leaseSeconds,
    })
    if (admitted.status === 'unauthorized') known.delete(knownAs)
    else if (!good) known.set(knownAs, true)
    // Remembered a minute at most (a plan raised meanwhile holds for long bodies by then);
    // forgotten once the key is admitted.
    if (admitted.status === 'rate' || admitted.status === 'quota' || admitted.status === 'wallet')
      limitedUntil.set(knownAs, {
        until: performance.now() + Math.min(admitted.retryAfterMs, 60_000),
        waitEnds: performance.now() + admitted.retryAfterMs,
        refused: admitted,
      })
    else if (admitted.status === 'ok' && limitedUntil.count > 0) limitedUntil.delete(knownAs)
    funded(knownAs, admitted.status)
    if (admitted.status !== 'ok') throw refusal(admitted, p.model, p.need, p.asked !== undefined)
    // The output stops where the monthly quota does (at least one token: a prompt that fills
    // the quota exactly still gets an answer).
    if (admitted.quotaRoom !== null && admitted.quotaRoom < p.limit)
      p.limit = Math.max(1, admitted.quotaRoom)
    if (admitted.rateLimit !== null) {
      c.header('x-ratelimit-limit-requests', String(admitted.rateLimit))
      c.header('x-ratelimit-remaining-requests', String(admitted.rateRemaining))
    }
    const reservation = logged(
      deps,
      Reservations.reservation(deps.sql, {
        id: requestId,
        held: admitted.held,
        leaseSeconds,
        idempotency: keyOf({ idempotencyKey, fingerprint }),
        // Answer before the charge is written, unless the payer's next request could be
        // refused meanwhile on another instance because this one still counts. Requests
        // admitted after this one use up what was free at its admission, so that must be
        // ample: room for BACKGROUND_MARGIN more requests at once (none on the free and pro
        // plans), and a balance that holds this request that many times again.
        settleInBackground:
          (admitted.concurrencyRoom === null || admitted.concurrencyRoom >= BACKGROUND_MARGIN) &&
          admitted.available >= admitted.held * BigInt(BACKGROUND_MARGIN),
      }),
      { account: admitted.accountId, model: p.model.id, stream: p.req.stream },
    )
    return serve(c, deps, p, reservation, startedAt, 'key')
  }

  /**
   * The `requiredCumulative` to ask a payer for: what the request needs, but never less than
   * a voucher the channel accepts (the draft: "Minimum next voucher amount"), one that raises
   * the accepted amount by `minVoucherDelta`.
   */
  const nextVoucher = (needed: bigint, accepted: bigint): bigint => {
    const least = accepted + deps.config.payments.minVoucherDelta
    return needed > least ? needed : least
  }

  /** Payment-credential holders: a channel, vouchers checked while streaming. */
  const paid = async (
    c: Context,
    payments: Payments.Payments,
    body: Incoming,
    startedAt: number,
    requestId: string,
  ) => {
    const { method, challenge, checked } = Payments.verify(payments, c.req.header('authorization')!)
    const { channelId, action } = checked
    // Taken before anything waits (submissions under way at once each take one), and given
    // back when the signature proves not to be the channel signer's: forged vouchers (channel
    // ids are public) would otherwise use up the payer's rate and starve a paused stream.
    // Deposits (opens, top-ups, vouchers carrying one) have a rate of their own: a stranger's
    // made-up ones, refused only after chain work, never give their token back, and must not
    // starve the payer's vouchers.
    const limited = action === 'voucher' || action === 'topUp' || action === 'open'
    const bucket = checked.funds ? `${channelId}#funds` : channelId
    if (limited && !payments.limiter.take(bucket, checked.replay))
      throw new RateLimitError(
        checked.funds
          ? `At most ${payments.limiter.perSecondLimit} open or top-up submissions per second per channel.`
          : `At most ${payments.limiter.perSecondLimit} voucher submissions per second per channel; sign vouchers further ahead.`,
        'voucher_rate_limited',
        {
          headers: rateLimitHeaders(
            payments.limiter.waitMs(bucket),
            payments.limiter.perSecondLimit,
            0,
          ),
        },
      )
    // Management credentials (close), and vouchers or top-ups sent without a request body
    // (HEAD, or mid-stream), only update the channel. A long body is read once the voucher in
    // the credential is applied (its signature is the channel signer's): until then it is a
    // stranger's.
    let text = body.long ? '' : await body.read()
    let management =
      action === 'close' || c.req.method !== 'POST' || (!body.long && text.trim() === '')
    let applied: Method.Applied
    try {
      applied = await method.apply(checked, { beforeRequest: !management && !body.long })
    } catch (e) {
      if (limited && !checked.funds && e instanceof Problem.PaymentProblem && unsigned.has(e.kind))
        payments.limiter.refund(bucket, checked.replay)
      throw e
    }
    if (!management && body.long) {
      // The payer's own: a voucher above any the gateway put in a transaction (those are
      // public, and anyone can show one; admission refuses them, but only after the body).
      const voucher = checked.voucher
      if (
        voucher === undefined ||
        voucher <= (await Channels.settledPublicly(deps.sql, channelId as Channels.Hex))
      )
        throw new PayloadTooLargeError(
          `A request body over ${deps.config.maxBodyBytes} bytes is read only with a voucher of the payer's own (above any the gateway made public in a transaction); it was not read.`,
          'body_too_large',
        )
      text = await body.read()
      management = text.trim() === ''
    }
    if (action !== 'close' && applied.channel) payments.wake(channelId)
    const receiptOf = (channel: Method.State, txHash?: Method.Hex, units?: number) =>
      method.receipt({
        challengeId: challenge.id,
        channel,
        ...(txHash ? { txHash } : {}),
        ...(units !== undefined ? { units } : {}),
      })
    if (management) {
      // Applied without beforeRequest: the state is always there.
      const receipt = receiptOf(applied.channel!, applied.txHash)
      for (const [k, v] of Object.entries(Payments.receiptHeaders(receipt))) c.header(k, v)
      if (c.req.method === 'HEAD') return c.body(null, 200)
      return c.json({ receipt: Encoding.toWire(receipt) })
    }

    // Its channel, held by a payer whose credential was just verified.
    const r = requested(deps, text)
    const price = r.model.pricing
    if (checked.price.output !== price.output || checked.price.input !== price.input)
      throw Problem.verificationFailed(
        `The challenge prices another model or an old price; use a challenge for ${r.model.id}.`,
      ).withChallenge(Payments.authenticate(payments, price, undefined, channelId))
    /** A 402 asking for a voucher of at least `needed` (or the next the channel takes). */
    const voucherNeeded = (
      message: string,
      needed: bigint,
      channel: { acceptedCumulative: bigint; deposit: bigint },
    ) =>
      Problem.insufficientBalance(message, {
        channelId,
        requiredCumulative: nextVoucher(needed, channel.acceptedCumulative),
        acceptedCumulative: channel.acceptedCumulative,
        deposit: channel.deposit,
      }).withChallenge(Payments.authenticate(payments, price, undefined, channelId))
    const idem = idempotency(c, text)
    // A channel refused lately for want of balance: a long prompt it cannot pay for whatever
    // its count is refused before it is counted (see `unfunded`). Its voucher was recorded
    // (Method.apply) unless it was a replay, at most what was accepted.
    const least =
      checked.voucher === undefined
        ? undefined
        : checkedFirst(channelId, text, r, idem.idempotencyKey)
    if (least !== undefined) {
      const channel = await Channels.funds(deps.sql, channelId as Channels.Hex)
      if (channel?.open && channel.acceptedCumulative - channel.taken < least)
        throw voucherNeeded(
          `The prompt alone costs at least ${least} base units, more than the channel's authorized balance; send a voucher for requiredCumulative.`,
          channel.taken + least,
          channel,
        )
    }
    const p = plan(deps, text, channelId, receiptSigner(c, deps), r)
    // Only a voucher pays for a request. A top-up carries none: by hash it names a transaction
    // anyone can read on chain, so it proves nothing about who sends it (recorded above).
    if (checked.voucher === undefined) {
      const channel = applied.channel!
      throw voucherNeeded(
        'A top-up adds to the deposit and pays for no request (vouchers do): it was recorded; send a voucher for requiredCumulative.',
        channel.spent + p.need,
        channel,
      )
    }
    const admitted = await Reservations.admitOnChannel(deps.sql, {
      channelId,
      model: p.model.id,
      stream: p.req.stream,
      want: p.want,
      need: p.need,
      requestId,
      leaseSeconds,
      ...idem,
      voucher: checked.voucher,
    })
    if (admitted.status === 'public_voucher')
      throw voucherNeeded(
        'This voucher is public (the gateway put it in a settle or close transaction), so anyone can show it: a request needs a higher voucher.',
        admitted.acceptedCumulative + 1n,
        admitted,
      )
    if (admitted.status.startsWith('idempotency_'))
      throw duplicate(admitted as Extract<Channels.Admission, { otherRequest: string }>)
    funded(channelId, admitted.status)
    if (admitted.status === 'insufficient')
      throw voucherNeeded(
        "The channel's authorized balance does not cover the prompt and the first tokens; send a voucher for requiredCumulative.",
        admitted.acceptedCumulative + (p.need - admitted.available),
        admitted,
      )
    if (admitted.status !== 'ok')
      throw admitted.status === 'not_found'
        ? Problem.channelNotFound('No channel with this id; open one first.', { channelId })
        : Problem.channelFinalized('The channel is closed or closing.', { channelId })
    const reservation = logged(
      deps,
      Reservations.channelReservation(deps.sql, {
        id: requestId,
        held: admitted.held,
        leaseSeconds,
        channelId,
        idempotency: keyOf(idem),
        waker: deps.waker!,
        timeoutMs: payments.voucherTimeoutMs,
        stream: p.req.stream,
      }),
      { channel: channelId, model: p.model.id, stream: p.req.stream },
    )
    // The receipt as a stream starts (headers), and as the request ends (event or header).
    const current = async () => (await Channels.get(deps.sql, channelId))!
    // The units the request consumed, for its end receipt: the output tokens, the unit the
    // challenge's amount prices (`unitType`; the prompt is priced by its inputAmount).
    const units = () => reservation.settledOutcome?.completionTokens
    // The channel as this request's charge left it (the settle returns it), else read.
    const settledState = async (): Promise<Method.State> => {
      const after = reservation.settledChannel
      return after ? { channelId, deposit: admitted.deposit, ...after } : current()
    }
    // A stream's receipt as it starts goes with its headers: on the stream's response only,
    // never on an error that ends the request before the stream (an upstream failing first).
    const start = p.req.stream
      ? Payments.receiptHeaders(
          receiptOf({
            channelId,
            acceptedCumulative: admitted.acceptedCumulative,
            spent: admitted.spent,
            deposit: admitted.deposit,
          }),
        )
      : undefined
    return serve(c, deps, p, reservation, startedAt, 'channel', {
      ...(start ? { headers: start } : {}),
      async extra(frame) {
        if (frame.kind !== 'shortfall') return undefined
        const channel = await current()
        const requiredCumulative = nextVoucher(
          channel.spent + channel.reserved + (frame.required - reservation.held),
          channel.acceptedCumulative,
        )
        const e = Events.needVoucher({
          channelId,
          requiredCumulative,
          acceptedCumulative: channel.acceptedCumulative,
          deposit: channel.deposit,
        })
        // The draft: past the deposit the client must top up before the next voucher.
        return Sse.event(e.event, {
          ...e.data,
          topUpRequired: requiredCumulative > channel.deposit,
        })
      },
      async beforeDone() {
        const e = Events.receipt(receiptOf(await settledState(), undefined, units()))
        return Sse.event(e.event, e.data)
      },
      settledHeaders: async () =>
        Payments.receiptHeaders(receiptOf(await settledState(), undefined, units())),
    })
  }

  app.on(['POST', 'GET', 'HEAD', 'PUT', 'PATCH', 'DELETE'], '/', async (c) => {
    const startedAt = performance.now()
    // On every answer, refusals too (as OpenAI's; its SDKs report it with the error): the id
    // of the request's usage row once it is admitted.
    const requestId = newRequestId()
    c.header('x-request-id', requestId)
    const body = incoming(c, deps.config.maxBodyBytes)
    // A key refused by its plan lately sends a long body: refused again before it is read
    // (its length says it is long: its characters are no more than its bytes).
    if (limitedUntil.count > 0 && (body.long || body.length > COUNTED_AFTER_AUTH)) {
      const raw = Auth.rawKey(c)
      const knownAs = raw === undefined ? undefined : ApiKeys.hash(raw).toString('base64')
      const limited = knownAs === undefined ? undefined : limitedUntil.get(knownAs)
      if (limited) {
        const now = performance.now()
        if (limited.until > now) {
          const again = limitRefusal({
            ...limited.refused,
            retryAfterMs: Math.ceil(limited.waitEnds - now),
          })
          if (!(await overQuota(c, body, limited.refused.tokensPerMonth, raw!))) throw again
        } else limitedUntil.delete(knownAs!)
      }
    }
    // A short body is read at once: a refusal before its credential is looked up may price
    // its challenge by the model it names.
    if (!body.long) await body.read()
    const authorization = c.req.header('authorization')
    // Payment challenges and credentials travel over TLS only (see Payments.overTls); checked
    // only where they come in or go out, not on a key holder's way.
    let payments: Payments.Payments | undefined
    const paying = () => (payments ??= Payments.offered(c, deps.payments, deps.config.trustProxy))
    try {
      if (deps.payments && Payments.isPayment(authorization)) {
        if (!paying())
          throw new InvalidRequestError(
            'Payment credentials are taken over HTTPS only: this request came over plain HTTP from another machine. Use the https address (or have the TLS proxy in front send X-Forwarded-Proto, with TRUST_PROXY set).',
            'tls_required',
          )
        // An address over its rate of refusals has its credentials verified no more for now.
        const over = Payments.overRefusals(paying()!, c, deps.config.trustProxy, false)
        if (over) {
          deps.metrics.refusalLimited()
          throw over
        }
        return await paid(c, paying()!, body, startedAt, requestId)
      }
      if (c.req.method !== 'POST') throw postOnly()
      return await keyed(c, body, startedAt, paying, requestId)
    } catch (e) {
      // Every 401 and 402 offers both ways in.
      if (
        e instanceof GatewayError &&
        (e.status === 401 || e.status === 402) &&
        !Payments.hasPaymentChallenge(e)
      )
        Payments.withChallenges(
          e,
          Payments.authenticate(
            paying(),
            priceOf(deps, body.text),
            c.req.header('accept-payment'),
            Payments.channelNamed(authorization),
          ),
        )
      throw e
    }
  })

  return app
}

/**
 * The 405 of the completions path to a request without a Payment credential (the only one
 * another method may carry): `Allow: POST`, whatever the method (OPTIONS too, which no route
 * takes).
 */
export function postOnly(): MethodNotAllowedError {
  return new MethodNotAllowedError(
    'Use POST for completions (other methods only carry Payment credentials).',
    'POST',
  )
}

/**
 * Calls the request's routes in turn until one answers (a stream: begins), and records each
 * upstream's health and latency from the outcome. A route that fails before its first token
 * (unreachable, timed out, a 5xx, a malformed answer, a 404: the upstream does not serve its
 * model, or a 429: it rate limits the gateway, and the route waits out the wait it asked for
 * without a mark against its health) hands the request to the next, with a `route failed`
 * warning in the log;
 * one that rejects the request itself (a 400 or 422: `upstream_rejected`) ends it, as the next
 * would reject it too. A call its caller gave up on (`signal` aborted: the client went away,
 * or a newer stream took the channel) says nothing of the upstream: counted, three clients
 * closing their requests early shut the model off for everyone. Nor does one cut by the
 * client's own `timeout_ms` (`deadline`), which bounds every call until its answer has begun
 * (a stream's first token): what is left of it aborts the call's signal.
 */
async function routed<T>(
  deps: Deps,
  p: Plan,
  /** The request's id (its usage row's, its `x-request-id`), for the log. */
  request: string,
  signal: AbortSignal,
  deadline: number | undefined,
  /** Set once an upstream is asked (its caller charges a client gone after that the prompt). */
  upstream: { asked: boolean },
  call: (route: Route, body: Body, signal: AbortSignal, timing: Timing | undefined) => Promise<T>,
): Promise<T> {
  let failed: GatewayError | undefined
  let late = false
  const tried: string[] = []
  const timing = p.req.timeout_ms === undefined ? undefined : { gapMs: p.req.timeout_ms }
  for (const route of p.routes) {
    const left = deadline === undefined ? undefined : deadline - performance.now()
    if (left !== undefined && left < 1) {
      late = true
      break
    }
    // Gone (the client, or a newer stream took the channel): no upstream is asked.
    if (signal.aborted) throw signal.reason ?? new Error('aborted')
    const at = performance.now()
    tried.push(route.provider.name)
    const clock = left === undefined ? undefined : new AbortController()
    const timer = clock && setTimeout(() => clock.abort(new Error('timeout_ms')), Math.ceil(left!))
    try {
      const bounded = clock ? AbortSignal.any([signal, clock.signal]) : signal
      const body = Chat.upstreamBody(p.req, route.upstreamModel) as Body
      upstream.asked = true
      const r = await call(route, body, bounded, timing)
      deps.router.record(route.provider, true)
      deps.router.recordRoute(route, true)
      deps.router.timed(route, p.req.stream, performance.now() - at)
      return r
    } catch (e) {
      if (signal.aborted) throw e
      // The client's time ran out: no fault of the upstream, and none left for another.
      if (clock?.signal.aborted) {
        late = true
        break
      }
      // A bug or a refusal of the request itself goes no further; a bug still counts against
      // the upstream, as it did before routes. An upstream without the model (404) is the
      // route's fault, not the request's, nor the upstream's as a whole (its other models).
      const missing = e instanceof GatewayError && e.details?.upstream_status === 404
      // An upstream rate limiting the gateway (429) is healthy: the route waits out what it
      // asked for, and the request goes on to the next.
      const limited = e instanceof UpstreamRateLimitedError
      if (!(e instanceof GatewayError)) deps.router.record(route.provider, false)
      if (!(e instanceof GatewayError) || (e.status < 500 && !missing)) throw e
      if (limited) deps.router.rateLimited(route, e.retryAfterMs)
      else if (missing) deps.router.recordRoute(route, false)
      else deps.router.record(route.provider, false)
      deps.log.warn(
        { request, model: p.model.id, upstream: route.provider.name, code: e.code },
        'route failed',
      )
      // A 404 says only that this route lacks the model: it must not hide another's 5xx.
      if (!missing || failed === undefined) failed = e
    } finally {
      clearTimeout(timer)
    }
  }
  if (late)
    // The client's own bound ran out: not for its SDK to send again by itself (OpenAI's SDKs
    // retry a 502 twice), which would give it more than the time it set.
    throw new UpstreamError(
      `No upstream of ${p.model.id} answered within timeout_ms (${p.req.timeout_ms} ms)${tried.length > 0 ? ` (tried: ${tried.join(', ')})` : ''}.`,
      'upstream_timeout',
      { headers: { ...noRetry } },
    )
  // The last route tried, or every route left, waits out its upstream's 429: a 503 until the
  // first of those the request may use takes requests again (an external one it leaves out
  // would serve it no better, however soon).
  if (failed === undefined || failed instanceof UpstreamRateLimitedError) {
    const wait = deps.router.rateLimitedFor(p.model, deps.router.allowed(p.model, p.external))
    if (wait > 0) throw rateLimited(p.model, wait)
  }
  if (failed === undefined)
    throw new NoUpstreamError(
      `No healthy upstream serves "${p.model.id}" right now; retry shortly.`,
      'no_upstream_available',
      { headers: { 'retry-after': '1' } },
    )
  if (tried.length === 1 || failed.status < 500) throw failed
  throw new UpstreamError(
    `Every upstream of ${p.model.id} failed (${tried.join(', ')}); the last: ${failed.message}`,
    failed.code,
    { cause: failed, ...(failed.details ? { details: failed.details } : {}) },
  )
}

/** Logs each settled request: counts, money and timings only. */
function logged<R extends Meter.Reservation>(
  deps: Deps,
  r: R,
  fields: { account?: string; channel?: string; model: string; stream: boolean },
): R {
  const settle = r.settle.bind(r)
  return Object.assign(r, {
    async settle(o: Meter.Outcome, background?: boolean) {
      const result = await settle(o, background).catch((e: unknown) => {
        deps.log.error({ request: r.id, err: (e as Error).message }, 'settle failed')
        throw e
      })
      deps.metrics.completed(
        fields.model,
        fields.channel === undefined ? 'key' : 'channel',
        fields.stream,
        o,
        result.charged,
      )
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

/**
 * A request's id: the key of its reservation and usage row. Time-ordered (UUIDv7), so the
 * usage table's primary key grows at its right edge instead of at random places all over an
 * index that grows with every request.
 */
export function newRequestId(): string {
  return Bun.randomUUIDv7()
}

/**
 * The signer of the request's receipt, if it asked for one (`Tollway-Receipt: true`) and the
 * gateway signs receipts: a receipt costs an Ed25519 signature, wasted on a client that does
 * not keep it.
 */
function receiptSigner(c: Context, deps: Deps): Receipt.Signer | undefined {
  const asked = c.req.header('tollway-receipt')
  if (asked === undefined || asked === 'false' || asked === '0') return undefined
  if (asked !== 'true' && asked !== '1')
    throw new InvalidRequestError(
      `Tollway-Receipt must be true or 1 (a receipt), false or 0 (none); it was ${JSON.stringify(asked.slice(0, 40))}.`,
      'invalid_value',
      {
        param: 'Tollway-Receipt',
      },
    )
  if (!deps.receipts)
    throw new InvalidRequestError(
      'This gateway signs no receipts (receipts are off in its configuration); send the request without Tollway-Receipt.',
      'receipts_off',
      { param: 'Tollway-Receipt' },
    )
  return deps.receipts
}

/** The request's Idempotency-Key, checked, with the SHA-256 of its body. */
function idempotency(c: Context, text: string) {
  const idempotencyKey = c.req.header('idempotency-key') ?? null
  if (idempotencyKey !== null && !IDEMPOTENCY_KEY.test(idempotencyKey))
    throw new InvalidRequestError(
      'Idempotency-Key must be 1 to 255 printable ASCII characters.',
      'invalid_value',
      {
        param: 'Idempotency-Key',
      },
    )
  const fingerprint = idempotencyKey === null ? null : createHash('sha256').update(text).digest()
  return { idempotencyKey, fingerprint }
}

/** The request's Idempotency-Key as its reservation keeps it (for a charge that comes late). */
function keyOf(i: {
  idempotencyKey: string | null
  fingerprint: Uint8Array | null
}): Reservations.Idempotency | null {
  return i.idempotencyKey === null ? null : { key: i.idempotencyKey, fingerprint: i.fingerprint! }
}

/** A request whose Idempotency-Key was seen before: never run or charged twice. */
function duplicate(r: {
  status: 'idempotency_mismatch' | 'idempotency_in_progress' | 'idempotency_completed'
  otherRequest: string
}): GatewayError {
  switch (r.status) {
    case 'idempotency_mismatch':
      return new ConflictError(
        'This Idempotency-Key was used for a different request; use a new key.',
        'idempotency_key_mismatch',
        { headers: { ...noRetry } },
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
        { details: { request_id: r.otherRequest }, headers: { ...noRetry } },
      )
  }
}

/** The typed error for a refused admission (`asked`: the request named its max_tokens). */
function refusal(r: Refused, model: Model, need: bigint, asked: boolean): GatewayError {
  switch (r.status) {
    case 'unauthorized':
      return Auth.badKey()
    case 'tier':
      return new TierNotAvailableError(
        `The model ${model.id} is not available on this account's plan; upgrade the plan to use it.`,
        'tier_not_available',
      )
    case 'prompt_over_quota':
      // Not a wait: no month holds it (a 429 would send the client back every month).
      return new InvalidRequestError(
        `This prompt has more tokens than the plan's whole monthly quota (${r.tokensPerMonth}); it can never be admitted on this plan. Shorten it or move to a plan with a larger quota.`,
        'prompt_exceeds_monthly_quota',
        {
          param: 'messages',
          details: { tokens_per_month: r.tokensPerMonth },
          headers: { ...noRetry },
        },
      )
    case 'idempotency_mismatch':
    case 'idempotency_in_progress':
    case 'idempotency_completed':
      return duplicate(r)
    case 'insufficient':
      return new InsufficientCreditsError(
        `This request needs ${need} base units of credits and the account has ${r.available} available. Add credits${r.available > 0n && asked ? ' or lower max_tokens' : ''}.`,
        'insufficient_credits',
        { details: { required: need.toString(), available: r.available.toString() } },
      )
    default:
      return limitRefusal(r)
  }
}

/** A refusal by the plan's limits: a 429 with the wait and the rate headers. */
function limitRefusal(r: Limited): GatewayError {
  // The per-minute limit's reset is the wait only when that limit (or the concurrency,
  // which stands in for it) refused: a quota's or a wallet's wait is not when requests reset.
  const limited = r.status === 'rate' || r.status === 'concurrency'
  const headers = rateLimitHeaders(r.retryAfterMs, r.rateLimit, r.rateRemaining ?? 0, limited)
  switch (r.status) {
    case 'rate':
      return new RateLimitError(
        `The plan allows ${r.rateLimit} requests per minute; retry after the Retry-After seconds.`,
        'rate_limit_exceeded',
        { headers },
      )
    case 'concurrency':
      return new RateLimitError(
        'The plan allows no more completions in flight at once; retry when one ends.',
        'concurrency_limit_exceeded',
        { headers },
      )
    case 'quota':
      return new RateLimitError(
        "The plan's monthly token quota is used up; it resets at the start of next month (UTC).",
        'monthly_token_quota_exceeded',
        { headers: { ...headers, ...noRetry } },
      )
    case 'wallet':
      return new WalletEmptyError(
        'The token wallet is below the floor a turn needs; it refills over time (see Retry-After).',
        'wallet_empty',
        { headers: { ...headers, ...noRetry } },
      )
  }
}

type Limited = Extract<Refused, { retryAfterMs: number }>
