/**
 * The Payment HTTP authentication scheme on our routes: challenges beside the Bearer one on
 * every 401 and 402, and credentials verified in the draft's order (common verification,
 * then the method's action) before anything is served.
 */
import type { GatewayError } from '../Errors.ts'
import type { Price } from '../metering/Pricing.ts'
import * as AcceptPayment from '../payment/AcceptPayment.ts'
import * as Challenge from '../payment/Challenge.ts'
import * as Credential from '../payment/Credential.ts'
import type * as Server from '../payment/evm/Server.ts'
import * as Session from '../payment/evm/Session.ts'
import * as Problem from '../payment/Problem.ts'
import * as Receipt from '../payment/Receipt.ts'

export type Payments = {
  secret: string
  realm: string
  /** Lifetime of a challenge. */
  expiresMs: number
  chainId: number
  method: Server.Method
  /** How long a paused stream waits for a voucher. */
  voucherTimeoutMs: number
  /** Wakes paused streams of a channel on this instance at once (others hear NOTIFY). */
  wake(channelId: string): void
  /** Voucher and top-up submissions per channel (the draft's 10/s). */
  limiter: VoucherLimiter
}

/**
 * A token bucket per channel for voucher and top-up submissions: `perSecond` a second, as
 * many at once. Per instance (a client's submissions for a channel go to the instance
 * streaming it, or spread; each instance caps its share).
 */
export class VoucherLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>()
  constructor(private readonly perSecond: number = Session.maxVouchersPerSecond) {}

  get perSecondLimit(): number {
    return this.perSecond
  }

  /** Takes one submission for the channel; false when over the rate. */
  take(channelId: string, now = Date.now()): boolean {
    if (this.buckets.size > 10_000)
      for (const [k, b] of this.buckets) if (now - b.at > 10_000) this.buckets.delete(k)
    const key = channelId.toLowerCase()
    const b = this.buckets.get(key) ?? { tokens: this.perSecond, at: now }
    b.tokens = Math.min(this.perSecond, b.tokens + ((now - b.at) / 1000) * this.perSecond)
    b.at = now
    this.buckets.set(key, b)
    if (b.tokens < 1) return false
    b.tokens -= 1
    return true
  }
}

const bearer = 'Bearer realm="tollway"'

/** A fresh challenge for a price (and the channel the request named, if any). */
export function challenge(p: Payments, price: Price, channelId?: Session.Hex): Challenge.Challenge {
  return Challenge.from({
    secret: p.secret,
    realm: p.realm,
    method: p.method.method,
    intent: p.method.intent,
    request: p.method.request(price, channelId),
    expires: Challenge.timestamp(new Date(Date.now() + p.expiresMs)),
  })
}

/**
 * The `WWW-Authenticate` value of a 401 or 402: the Bearer challenge and, unless the
 * client's `Accept-Payment` rules it out, a Payment challenge.
 */
export function authenticate(
  p: Payments | undefined,
  price: Price | undefined,
  acceptPayment: string | undefined,
  channelId?: Session.Hex,
): string {
  if (!p || !price) return bearer
  if (acceptPayment) {
    // Offers the client gives q=0 are left out; an unreadable header is no preference.
    const offer = { method: p.method.method, intent: p.method.intent }
    try {
      if (AcceptPayment.weight(AcceptPayment.deserialize(acceptPayment), offer) === 0) return bearer
    } catch {}
  }
  return `${bearer}, ${Challenge.serialize(challenge(p, price, channelId))}`
}

/** Whether an error already carries a Payment challenge (set where the price was known). */
export function hasPaymentChallenge(e: GatewayError): boolean {
  return /(^|,)\s*Payment\s/i.test(
    e.headers['WWW-Authenticate'] ?? e.headers['www-authenticate'] ?? '',
  )
}

/** Attaches the challenges to an error bound for the client, if it is a 401 or 402. */
export function withChallenges(e: GatewayError, header: string): GatewayError {
  if (e.status !== 401 && e.status !== 402) return e
  if (e instanceof Problem.PaymentProblem) return e.withChallenge(header)
  delete e.headers['WWW-Authenticate']
  e.headers['www-authenticate'] = header
  return e
}

/** Whether an Authorization header carries a Payment credential. */
export function isPayment(authorization: string | undefined): boolean {
  return authorization !== undefined && /^\s*payment\s/i.test(authorization)
}

export type Verified = {
  parsed: Session.Parsed
  challenge: Challenge.Challenge
  request: Session.Request
}

/** Common verification (draft): decode, check the echoed challenge's binding and expiry. */
export function verify(p: Payments, authorization: string): Verified {
  const credential = Credential.deserialize(authorization)
  const echoed = Credential.challengeOf(credential)
  if (echoed.realm !== p.realm)
    throw Problem.challengeNotFound('The challenge is for another realm; use a fresh challenge.')
  const result = Challenge.verify(echoed, p.secret)
  if (!result.valid)
    throw Problem.challengeNotFound(
      result.reason === 'expired'
        ? 'The challenge expired; retry with the fresh challenge.'
        : 'The challenge is not one this server issued; retry with the fresh challenge.',
      { challengeId: echoed.id },
    )
  const parsed = Session.fromCredential(credential)
  const request = Session.requestOf(echoed)
  Session.check(parsed, request)
  return { parsed, challenge: echoed, request }
}

/** The receipt of a channel's state, for the `Payment-Receipt` header and the SSE event. */
export function receipt(
  p: Payments,
  challengeId: string,
  channel: Server.State,
  extra: { units?: number; txHash?: Session.Hex } = {},
): Session.Receipt {
  return Session.receipt({
    challengeId,
    channelId: channel.channelId,
    acceptedCumulative: channel.acceptedCumulative,
    spent: channel.spent,
    chainId: p.chainId,
    ...extra,
  })
}

export function receiptHeaders(r: Session.Receipt): Record<string, string> {
  return Receipt.headers(r)
}
