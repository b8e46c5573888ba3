/**
 * The Payment HTTP authentication scheme on our routes: challenges beside the Bearer one on
 * every 401 and 402, and credentials verified in the draft's order (common verification,
 * then the method's action) before anything is served.
 */
import type { Context } from 'hono'
import ipaddr from 'ipaddr.js'
import { type GatewayError, RateLimitError, rateLimitHeaders } from '../Errors.ts'
import { Lru } from '../Lru.ts'
import type { Price } from '../metering/Pricing.ts'
import * as AcceptPayment from '../payment/AcceptPayment.ts'
import * as Challenge from '../payment/Challenge.ts'
import * as Credential from '../payment/Credential.ts'
import * as Session from '../payment/evm/Session.ts'
import type * as Method from '../payment/Method.ts'
import * as Problem from '../payment/Problem.ts'
import * as Receipt from '../payment/Receipt.ts'

export type Payments = {
  secret: string
  realm: string
  /** Lifetime of a challenge. */
  expiresMs: number
  /** The payment methods offered, in the server's order of preference. */
  methods: Method.Method[]
  /** How long a paused stream waits for a voucher. */
  voucherTimeoutMs: number
  /** Wakes paused streams of a channel on this instance at once (others hear NOTIFY). */
  wake(channelId: string): void
  /** Voucher and top-up submissions per channel (the draft's 10/s). */
  limiter: VoucherLimiter
  /**
   * Refusals carrying a fresh challenge (401 and 402), and so failed verifications, per client
   * address (the core draft's "Denial of Service"); none when off.
   */
  refusals?: Buckets | undefined
}

/**
 * Token buckets by key: `perSecond` a second, up to `burst` at once. In process memory, per
 * instance (what they guard is the instance's own work), for the 10,000 keys used last (one
 * forgotten starts full again, as a new key does).
 */
export class Buckets {
  private readonly buckets = new Lru<string, { tokens: number; at: number }>(10_000)
  constructor(
    readonly perSecond: number,
    readonly burst: number = perSecond,
  ) {}

  /** How many keys it keeps. */
  get size(): number {
    return this.buckets.count
  }

  /** Gives back one that `take` took. */
  refund(key: string): void {
    const b = this.buckets.get(key)
    if (b) b.tokens = Math.min(this.burst, b.tokens + 1)
  }

  /** Milliseconds until `key` may take one (0: now). */
  waitMs(key: string, now = Date.now()): number {
    const b = this.buckets.get(key)
    if (!b) return 0
    const tokens = b.tokens + ((now - b.at) / 1000) * this.perSecond
    return tokens >= 1 ? 0 : Math.ceil(((1 - tokens) / this.perSecond) * 1000)
  }

  /** Takes one for `key`; false when it has none left. */
  take(key: string, now = Date.now()): boolean {
    let b = this.buckets.get(key)
    if (!b) {
      b = { tokens: this.burst, at: now }
      this.buckets.set(key, b)
    }
    b.tokens = Math.min(this.burst, b.tokens + ((now - b.at) / 1000) * this.perSecond)
    b.at = now
    if (b.tokens < 1) return false
    b.tokens -= 1
    return true
  }
}

/**
 * A token bucket per channel for voucher and top-up submissions: `perSecond` a second, as
 * many at once. Per instance (a client's submissions for a channel go to the instance
 * streaming it, or spread; each instance caps its share). A replay (the voucher every request
 * of a busy channel carries again, `Method.Checked.replay`) costs a cached check, so it is not
 * counted, and a channel can serve more than `perSecond` requests a second.
 */
export class VoucherLimiter {
  private readonly buckets: Buckets
  constructor(perSecond: number = Session.maxVouchersPerSecond) {
    this.buckets = new Buckets(perSecond)
  }

  get perSecondLimit(): number {
    return this.buckets.perSecond
  }

  /** Gives back a submission `take` took (one that proved not to be the channel's). */
  refund(channelId: string, replay = false): void {
    if (!replay) this.buckets.refund(channelId.toLowerCase())
  }

  /** Milliseconds until the channel's next submission is allowed (0: now). */
  waitMs(channelId: string, now = Date.now()): number {
    return this.buckets.waitMs(channelId.toLowerCase(), now)
  }

  /** Takes one submission for the channel (none for a replay); false when over the rate. */
  take(channelId: string, replay = false, now = Date.now()): boolean {
    return replay || this.buckets.take(channelId.toLowerCase(), now)
  }
}

const bearer = 'Bearer realm="tollway"'

/** A fresh challenge of `method` for a price (and the channel the request named, if any). */
export function challenge(
  p: Payments,
  method: Method.Method,
  price: Price,
  channelId?: Method.Hex,
): Challenge.Challenge {
  return Challenge.from({
    secret: p.secret,
    realm: p.realm,
    method: method.method,
    intent: method.intent,
    request: method.request(price, channelId),
    expires: Challenge.expiresIn(p.expiresMs),
  })
}

/**
 * The `WWW-Authenticate` value of a 401 or 402: the Bearer challenge and a Payment
 * challenge per method, ordered by the client's `Accept-Payment` (methods it gives q=0
 * are left out).
 */
export function authenticate(
  p: Payments | undefined,
  price: Price | undefined,
  acceptPayment: string | undefined,
  channelId?: Method.Hex,
): string {
  if (!p || !price) return bearer
  let methods = AcceptPayment.rank(p.methods, acceptPayment)
  if (acceptPayment) {
    try {
      const ranges = AcceptPayment.deserialize(acceptPayment)
      const accepted = methods.filter((m) => AcceptPayment.weight(ranges, m) !== 0)
      // Declining every method leaves the usual set (the draft allows it): a 402 must carry
      // at least one Payment challenge.
      if (accepted.length > 0) methods = accepted
    } catch {}
  }
  return [
    bearer,
    ...methods.map((m) => Challenge.serialize(challenge(p, m, price, channelId))),
  ].join(', ')
}

/**
 * Whether a request came over TLS, as the core draft needs of every Payment challenge and
 * credential ("Transport Security": servers MUST NOT issue Payment challenges over unencrypted
 * HTTP): served over https, or by a proxy that terminated TLS and says so in
 * `X-Forwarded-Proto` (when the gateway is told to trust it), or from this machine itself
 * (loopback never leaves it), unless it says it was forwarded from plain HTTP (a proxy on the
 * same host). A request not served by a socket (in process) counts as this machine's.
 */
export function overTls(c: Context, trustProxy: boolean): boolean {
  if (c.req.url.startsWith('https:')) return true
  const proto = c.req.header('x-forwarded-proto')?.split(',')[0]?.trim()
  if (trustProxy && proto === 'https') return true
  const address = peer(c)
  if (address !== undefined && !loopback(address)) return false
  // A proxy on this machine forwards other machines' requests: its word on the scheme decides.
  return proto === undefined || proto === 'https'
}

/** Whether an IP address is this machine's loopback (127.0.0.0/8, ::1, or ::ffff:127.x). */
export function loopback(address: string): boolean {
  return address === '::1' || address.startsWith('127.') || address.startsWith('::ffff:127.')
}

/**
 * The address a request came from, as far as it tells clients apart: the last hop of
 * `X-Forwarded-For` when the gateway trusts its proxy (the address the proxy saw; the hops
 * before it are the client's say), else the socket's peer. Undefined for this machine's own
 * loopback without a forwarded address (a proxy on the same host whose clients cannot be told
 * apart, or a local agent) and for a request not served by a socket.
 */
function clientAddress(c: Context, trustProxy: boolean): string | undefined {
  if (trustProxy) {
    const hops = c.req.header('x-forwarded-for')
    const last = hops?.slice(hops.lastIndexOf(',') + 1).trim()
    if (last) return network(last)
  }
  const address = peer(c)
  return address === undefined || loopback(address) ? undefined : network(address)
}

/**
 * The client an address stands for: an IPv4 address itself, an IPv6 one by its /64 (a
 * subscriber is given at least that many addresses, and would otherwise have a bucket for
 * each), except where an IPv6 address carries an IPv4 one (IPv4-mapped, `::ffff:0:0/96`, and
 * NAT64's `64:ff9b::/96`): that IPv4 address. Written as a proxy may write it too (`[v6]`,
 * `[v6]:port`, `v4:port`, a zone). Anything else as it is written.
 */
export function network(address: string): string {
  // Parsed once per address seen lately (every paid request asks, see `overRefusals`), kept
  // only if it is address-sized (an IPv6 one with brackets, port and zone is under 64).
  let known = networks.get(address)
  if (known === undefined) {
    known = networkOf(address)
    if (address.length <= 64) networks.set(address, known)
  }
  return known
}
const networks = new Lru<string, string>(4096)

function networkOf(address: string): string {
  let a = address.trim()
  const bracketed = /^\[([^\]]*)\](?::\d+)?$/.exec(a)
  if (bracketed) a = bracketed[1]!
  else if (/^[\d.]+:\d+$/.test(a)) a = a.slice(0, a.lastIndexOf(':'))
  if (ipaddr.IPv4.isValidFourPartDecimal(a)) return ipaddr.IPv4.parse(a).toString()
  if (!ipaddr.IPv6.isValid(a)) return address
  const v6 = ipaddr.IPv6.parse(a)
  const p = v6.parts
  const range = v6.range()
  if (range === 'ipv4Mapped' || range === 'rfc6052')
    return [p[6]! >> 8, p[6]! & 0xff, p[7]! >> 8, p[7]! & 0xff].join('.')
  return `${p
    .slice(0, 4)
    .map((g) => g.toString(16))
    .join(':')}::/64`
}

/** The socket's peer address (undefined for a request not served by a socket). */
function peer(c: Context): string | undefined {
  const server = c.env as { requestIP?: (r: Request) => { address: string } | null } | undefined
  return typeof server?.requestIP === 'function' ? server.requestIP(c.req.raw)?.address : undefined
}

/**
 * A 429 in place of a refusal for a client address over its rate of them (`refusals`, see
 * `clientAddress`): refusals (and the credentials verified before them, which the route
 * checks the bucket for first, `take` false) are what a stranger can make the gateway do for
 * nothing. Undefined when the address may have one (taken, with `take`).
 */
export function overRefusals(
  p: Payments,
  c: Context,
  trustProxy: boolean,
  take: boolean,
): GatewayError | undefined {
  const limit = p.refusals
  const address = limit && clientAddress(c, trustProxy)
  if (!limit || address === undefined) return undefined
  const wait = limit.waitMs(address)
  if (wait === 0 && (!take || limit.take(address))) return undefined
  const ms = Math.max(wait, limit.waitMs(address), 1)
  return new RateLimitError(
    `Too many refused payment or key attempts from this address (at most ${limit.perSecond} a second); retry after ${Math.ceil(ms / 1000)} s.`,
    'refusal_rate_limited',
    // The limit is per second, as the voucher rate's headers say theirs.
    { headers: rateLimitHeaders(ms, limit.perSecond, 0) },
  )
}

/** The payments a request may use: none over plain HTTP from another machine (see `overTls`). */
export function offered(c: Context, p: Payments | undefined, trustProxy: boolean) {
  return p && overTls(c, trustProxy) ? p : undefined
}

/** Whether an error already carries a Payment challenge (set where the price was known). */
export function hasPaymentChallenge(e: GatewayError): boolean {
  return /(^|,)\s*Payment\s/i.test(
    e.headers['WWW-Authenticate'] ?? e.headers['www-authenticate'] ?? '',
  )
}

/**
 * Attaches the challenges to an error bound for the client, if it is a 401 or 402; a 402 is
 * not to be stored by any cache (`Cache-Control: no-store`, as the payment draft requires).
 */
export function withChallenges(e: GatewayError, header: string): GatewayError {
  if (e.status !== 401 && e.status !== 402) return e
  if (e instanceof Problem.PaymentProblem) return e.withChallenge(header)
  delete e.headers['WWW-Authenticate']
  e.headers['www-authenticate'] = header
  if (e.status === 402) e.headers['cache-control'] = 'no-store'
  return e
}

/**
 * Whether an Authorization header uses the Payment scheme: a credential, or the scheme with
 * nothing after it, which is a malformed one (the core draft's `malformed-credential`), not a
 * request without credentials.
 */
export function isPayment(authorization: string | undefined): boolean {
  return authorization !== undefined && /^\s*payment(\s|$)/i.test(authorization)
}

export type Verified = {
  method: Method.Method
  challenge: Challenge.Challenge
  checked: Method.Checked
}

/**
 * Credentials parsed, with the challenges they echo, by their header text. A paying client
 * sends the same credential (its latest voucher) ahead of every request until it signs the
 * next, and parsing is a function of the text alone; what varies with time (the challenge's
 * expiry, the channel's state, replays) is checked on every request all the same. Entries are
 * frozen, so no request can change what the next one gets. Only credentials whose challenge
 * this server issued are kept, and only up to 4 KB of text (a voucher's is about 1.6 KB), so
 * the cache stays under a few tens of MB whatever is sent.
 */
const parsed = new Lru<string, { credential: Credential.Credential; echoed: Challenge.Challenge }>(
  4096,
)
const keptBytes = 4096

/** Common verification (draft), then the method's own typing of the payload. */
export function verify(p: Payments, authorization: string): Verified {
  let entry = parsed.get(authorization)
  const known = entry !== undefined
  if (!entry) {
    const credential = Challenge.deepFreeze(Credential.deserialize(authorization))
    entry = { credential, echoed: Challenge.deepFreeze(Credential.challengeOf(credential)) }
  }
  const { credential, echoed } = entry
  const method = p.methods.find((m) => m.method === echoed.method && m.intent === echoed.intent)
  // The draft's order: the action is recognized before the challenge is looked up.
  method?.recognize?.(credential.payload)
  if (echoed.realm !== p.realm)
    throw Problem.challengeNotFound('The challenge is for another realm; use a fresh challenge.')
  // The draft ("Common Verification"): every echoed field exactly as issued. The HMAC does not
  // cover `description` (the core draft's seven slots), and this server issues none.
  if (echoed.description !== undefined)
    throw Problem.challengeNotFound(
      'The challenge this server issued has no description; echo it unchanged.',
      { challengeId: echoed.id },
    )
  const result = Challenge.verify(echoed, p.secret)
  if (!result.valid)
    throw Problem.challengeNotFound(
      result.reason === 'expired'
        ? 'The challenge expired; retry with the fresh challenge.'
        : 'The challenge is not one this server issued; retry with the fresh challenge.',
      { challengeId: echoed.id },
    )
  if (!known && authorization.length <= keptBytes) parsed.set(authorization, entry)
  if (!method)
    throw Problem.methodUnsupported(
      `This server does not take ${echoed.method}/${echoed.intent} credentials.`,
    )
  return { method, challenge: echoed, checked: method.check(credential, echoed) }
}

/**
 * The channel a Payment credential names, read without verifying anything (undefined when it
 * names none or does not parse): the fresh challenge of a refusal states it, as the draft's
 * `methodDetails.channelId` does for a request that already named a channel.
 */
export function channelNamed(authorization: string | undefined): Method.Hex | undefined {
  if (!isPayment(authorization)) return undefined
  try {
    const id = Credential.deserialize(authorization!).payload.channelId
    // Lowercase, as the draft writes every channelId ("Hexadecimal Values"), whatever was sent.
    return typeof id === 'string' && /^0x[0-9a-fA-F]{64}$/.test(id)
      ? (id.toLowerCase() as Method.Hex)
      : undefined
  } catch {
    return undefined
  }
}

export function receiptHeaders(r: Record<string, unknown>): Record<string, string> {
  return Receipt.headers(r)
}
