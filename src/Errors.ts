/**
 * Typed errors. Each knows its HTTP status and its wire form; handlers throw them and the
 * one `onError` in `http/App.ts` renders them. Messages are short and say what to do.
 */

export type ErrorOptions = {
  /** Extra facts for logs and the error body (never prompt or completion text). */
  details?: Record<string, unknown>
  cause?: unknown
  /** Response headers the error requires (`Retry-After`, rate-limit headers, …). */
  headers?: Record<string, string>
  /** The request field at fault, as OpenAI's `error.param`. */
  param?: string
}

/**
 * The header that tells OpenAI's SDKs not to send a request again by themselves: they retry
 * every 409 and 429, which for these errors only repeats the refusal (a used key, a quota
 * spent until next month).
 */
export const noRetry = { 'x-should-retry': 'false' } as const

/** Base of every error tollway reports to a client. */
export class GatewayError extends Error {
  override name = 'GatewayError'
  /** HTTP status. */
  readonly status: number = 500
  /** OpenAI envelope `error.type`. */
  readonly type: string = 'server_error'
  /** Machine-readable `error.code`. */
  readonly code: string
  readonly details: Record<string, unknown> | undefined
  readonly headers: Record<string, string>
  readonly param: string | undefined

  constructor(message: string, code: string, options: ErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.code = code
    this.details = options.details
    this.headers = options.headers ?? {}
    this.param = options.param
  }

  /** The OpenAI error envelope. */
  toJSON() {
    return {
      error: {
        type: this.type,
        message: this.message,
        code: this.code,
        param: this.param ?? null,
        ...(this.details ? { details: this.details } : {}),
      },
    }
  }
}

/** 401: no credentials, or an unknown or revoked key. */
export class AuthError extends GatewayError {
  override name = 'AuthError'
  override readonly status = 401
  override readonly type = 'auth_error'
}

/** 400: the request is malformed; `param` names the field. */
export class InvalidRequestError extends GatewayError {
  override name = 'InvalidRequestError'
  override readonly status: number = 400
  override readonly type = 'invalid_request_error'
}

/** 404: the named thing does not exist. */
export class NotFoundError extends InvalidRequestError {
  override name = 'NotFoundError'
  override readonly status = 404
}

/** 413: the body is over the configured limit. */
export class PayloadTooLargeError extends InvalidRequestError {
  override name = 'PayloadTooLargeError'
  override readonly status = 413
}

/** 405: the path takes other methods (named by `Allow`). */
export class MethodNotAllowedError extends InvalidRequestError {
  override name = 'MethodNotAllowedError'
  override readonly status = 405
  constructor(message: string, allow: string) {
    super(message, 'method_not_allowed', { headers: { allow } })
  }
}

/** 409: the request conflicts with current state (key limit, idempotency key in use). */
export class ConflictError extends GatewayError {
  override name = 'ConflictError'
  override readonly status = 409
  override readonly type = 'conflict_error'
}

/** 402: the account's credits do not cover the request. */
export class InsufficientCreditsError extends GatewayError {
  override name = 'InsufficientCreditsError'
  override readonly status = 402
  override readonly type = 'insufficient_credits'
}

/**
 * 403 in place of a 402 that could carry no Payment challenge (the core draft: no 402
 * without one), as a gateway that takes payments answers over plain HTTP from another
 * machine: the same type, code, message and details.
 */
export class WithoutPaymentError extends GatewayError {
  override name = 'WithoutPaymentError'
  override readonly status = 403
  override readonly type: string

  constructor(e: GatewayError) {
    super(e.message, e.code, {
      ...(e.details ? { details: e.details } : {}),
      headers: e.headers,
      ...(e.param !== undefined ? { param: e.param } : {}),
      cause: e,
    })
    this.type = e.type
  }
}

/** 402: no credentials on a paid endpoint; the message says both ways in. */
export class PaymentRequiredError extends GatewayError {
  override name = 'PaymentRequiredError'
  override readonly status = 402
  override readonly type = 'payment_required'
}

/** 403: the account's plan may not use the model. */
export class TierNotAvailableError extends GatewayError {
  override name = 'TierNotAvailableError'
  override readonly status = 403
  override readonly type = 'tier_not_available'
}

/** 429: a request, concurrency or token limit of the plan is reached. */
export class RateLimitError extends GatewayError {
  override name = 'RateLimitError'
  override readonly status = 429
  override readonly type: string = 'rate_limit_exceeded'
}

/** 429: the token wallet is below the floor a turn needs. */
export class WalletEmptyError extends RateLimitError {
  override name = 'WalletEmptyError'
  override readonly type = 'wallet_empty'
}

/** 502: the upstream failed or timed out. */
export class UpstreamError extends GatewayError {
  override name = 'UpstreamError'
  override readonly status = 502
  override readonly type = 'upstream_error'
}

/** 503 with `Retry-After`: the same request, sent again shortly, may go through. */
export class RetryLaterError extends GatewayError {
  override readonly status = 503
  constructor(message: string, code: string, options: ErrorOptions = {}) {
    super(message, code, { ...options, headers: { 'retry-after': '5', ...options.headers } })
  }
}

/**
 * 503: the chain's RPC did not answer, or a transaction the gateway sent was not mined in
 * time: the same credential may be sent again (a transaction the gateway sent before the chain
 * stopped answering may still be mined; the channel's state, GET /v1/channels/{id}, says).
 */
export class ChainUnavailableError extends RetryLaterError {
  override name = 'ChainUnavailableError'
  override readonly type = 'chain_unavailable'
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, 'chain_unavailable', options)
  }
}

/**
 * 503: the database did not answer (down, refusing connections, out of disk): nothing of the
 * request was written; sent again once it is back, it goes through.
 */
export class DatabaseUnavailableError extends RetryLaterError {
  override name = 'DatabaseUnavailableError'
  override readonly type = 'service_unavailable'
  constructor(options: ErrorOptions = {}) {
    super(
      'The gateway cannot reach its database right now; nothing was charged. Retry after the Retry-After seconds.',
      'database_unavailable',
      options,
    )
  }
}

/** 503: a channel's requests under way kept its close waiting; sent again, it goes on. */
export class ChannelBusyError extends RetryLaterError {
  override name = 'ChannelBusyError'
  override readonly type = 'channel_busy'
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, 'channel_busy', options)
  }
}

/**
 * 503: the request's hold on its credits (or channel) was lost while its upstream worked: the
 * ledger was out of reach for longer than a lease and another instance's sweep took the
 * request for dead. It was stopped and nothing was charged; sent again, it goes through.
 */
export class ReservationLostError extends RetryLaterError {
  override name = 'ReservationLostError'
  override readonly type = 'reservation_lost'
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, 'reservation_lost', options)
  }
}

/**
 * 503: the gateway is stopping (a restart, a deploy) and ended this request: a stream ends with
 * it as an error event, charged what it sent; sent again, it goes to an instance that serves.
 */
export class GatewayStoppingError extends RetryLaterError {
  override name = 'GatewayStoppingError'
  override readonly type = 'service_unavailable'
  constructor(message: string, options: ErrorOptions = {}) {
    super(message, 'gateway_stopping', { ...options, headers: { 'retry-after': '1' } })
  }
}

/**
 * The headers of a wait of `ms`: Retry-After in whole seconds (at least one) and retry-after-ms,
 * the exact wait, which the OpenAI SDKs prefer.
 */
export function retryAfter(ms: number): Record<string, string> {
  const wait = Math.max(0, ms)
  return {
    'retry-after': String(Math.max(1, Math.ceil(wait / 1000))),
    'retry-after-ms': String(wait),
  }
}

/**
 * A 429's headers: Retry-After and retry-after-ms (`retryAfter`), and with a limit on requests,
 * the x-ratelimit-*-requests headers (`resets`: whether the wait is when that limit resets).
 */
export function rateLimitHeaders(
  retryAfterMs: number,
  limit: number | null,
  remaining: number,
  resets = true,
): Record<string, string> {
  const headers = retryAfter(retryAfterMs)
  if (limit !== null) {
    headers['x-ratelimit-limit-requests'] = String(limit)
    headers['x-ratelimit-remaining-requests'] = String(remaining)
    if (resets) headers['x-ratelimit-reset-requests'] = `${Math.max(0, retryAfterMs) / 1000}s`
  }
  return headers
}

/** 503: no healthy upstream serves the model. */
export class NoUpstreamError extends GatewayError {
  override name = 'NoUpstreamError'
  override readonly status = 503
  override readonly type = 'no_upstream_available'
}

/**
 * 503: every upstream of the model is rate limiting the gateway (each answered 429, or is
 * waiting out the wait it asked for). Nothing was charged; `retryAfterMs` is when the first
 * takes requests again, sent as Retry-After and retry-after-ms (the OpenAI SDKs wait that
 * long before they retry). Not a 429: the client exceeded no limit of its own.
 */
export class UpstreamRateLimitedError extends NoUpstreamError {
  override name = 'UpstreamRateLimitedError'
  constructor(
    message: string,
    readonly retryAfterMs: number,
    options: ErrorOptions = {},
  ) {
    super(message, 'upstream_rate_limited', {
      ...options,
      headers: { ...retryAfter(retryAfterMs), ...options.headers },
    })
  }
}

/**
 * Text from outside (an upstream's or an RPC's error message) with its URLs taken out: they may
 * name internal hosts and carry keys in their paths or queries.
 */
export function withoutUrls(text: string): string {
  return text.replace(/\b[a-z][a-z0-9+.-]*:\/\/[^\s"'<>)\]]+/gi, '<url>')
}

/**
 * An upstream's words as a client may read them: its URLs taken out (`withoutUrls`), and
 * anything shaped like a key or token (a run of 24 or more letters, digits, `-` and `_` with a
 * digit in it, or one that starts as keys do, `sk-`). What the upstream says of the request
 * itself (a field, a value, a limit) stays.
 */
export function redacted(text: string): string {
  return withoutUrls(text)
    .replace(/\b(?:sk|pk|rk|ak)-[A-Za-z0-9_-]{4,}/g, '<redacted>')
    .replace(/[A-Za-z0-9_-]{24,}/g, (run) => (/\d/.test(run) ? '<redacted>' : run))
}
