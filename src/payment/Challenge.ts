/**
 * The Payment challenge (draft-httpauth-payment-00, "Challenge (WWW-Authenticate)"): what a 402
 * carries in `WWW-Authenticate`, bound to its parameters by an HMAC-SHA256 `id` ("Challenge
 * Binding") so the server can verify an echoed challenge without storing it.
 *
 * Decisions where the draft leaves room:
 * - `request` and `opaque` travel as base64url(JCS(json)). `deserialize` and `fromEcho` reject any
 *   other encoding of the same JSON (the draft says the JSON MUST be JCS), so the wire text is
 *   always `Encoding.encodeJson(decoded)` and the HMAC can be recomputed from the decoded object.
 * - No `expires` means the challenge does not expire by time (the draft makes it optional, servers
 *   SHOULD set it): pass `expires: Challenge.expiresIn(ttlMs)` to `from`.
 * - Parameter values a header cannot carry (controls, characters beyond U+00FF) are rejected by
 *   `serialize`; a localized `description` must stay within Latin-1.
 * - `description` is not in the HMAC (the draft's seven slots omit it), so an echoed description
 *   may differ from the one sent; it is display-only and never used for verification.
 * - `serialize` refuses challenges over 8 KiB ("Size Considerations": servers SHOULD keep them
 *   under 8KB); `deserialize` accepts `WWW-Authenticate` values up to 64 KiB by default.
 */
import { createHmac, timingSafeEqual } from 'node:crypto'
import { z } from 'zod'
import { Lru } from '../Lru.ts'
import * as AuthHeader from './AuthHeader.ts'
import * as Encoding from './Encoding.ts'
import { PaymentParseError } from './Errors.ts'
import * as Problem from './Problem.ts'

/** The scheme name (matched case-insensitively on input). */
export const scheme = 'Payment'

/** Largest challenge `serialize` emits (the draft: servers SHOULD keep challenges under 8KB). */
export const maxChallengeBytes = 8192

/** Largest `WWW-Authenticate` value `deserialize` reads by default. */
export const maxHeaderBytes = 65536

const RFC3339 =
  /^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt]([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,9})?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$/

/** An RFC 3339 date-time (no leap seconds: `Date` cannot represent them). */
export const DateTime = z
  .string()
  .regex(RFC3339, 'expires must be an RFC 3339 date-time')
  .refine(realDate, 'expires must be a real date-time')

/** Date.parse rolls 2030-02-30 over to March; a real date has the day it names. */
function realDate(text: string): boolean {
  const [y, m, d] = text.slice(0, 10).split('-').map(Number) as [number, number, number]
  return Number.isFinite(Date.parse(text)) && new Date(Date.UTC(y, m - 1, d)).getUTCDate() === d
}

/** An RFC 3339 UTC timestamp to the second (`2025-01-15T12:05:00Z`), for `expires` and receipts. */
export function timestamp(date: Date): string {
  return date.toISOString().replace(/\.\d{3}Z$/, 'Z')
}

/**
 * The `expires` of a challenge that lives `ms` from `now`: to the second, rounded up, so it
 * lives at least `ms` (rounded down, a challenge of one second lived anywhere from 0 to 1 s).
 */
export function expiresIn(ms: number, now = Date.now()): string {
  return timestamp(new Date(Math.ceil((now + ms) / 1000) * 1000))
}

/** payment-method-id = 1*LOWERALPHA */
export const Method = z.string().regex(/^[a-z]+$/, 'method must be lowercase ASCII letters')
/** intent = 1*( ALPHA / DIGIT / "-" ) */
export const Intent = z.string().regex(/^[A-Za-z0-9-]+$/, 'intent must be letters, digits or -')
/** base64url-nopad = 1*( ALPHA / DIGIT / "-" / "_" ) */
export const Base64url = z.string().regex(/^[A-Za-z0-9_-]+$/, 'must be base64url without padding')
function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

// z.custom rather than z.record: the object is kept as decoded. z.record rebuilds it by assignment,
// which silently drops a `__proto__` member and so would change the JSON (and the HMAC input).
/** The decoded `request`: a JSON object whose shape the method's intent defines. */
export const Request = z.custom<Record<string, unknown>>(isObject, 'request must be a JSON object')
/** The decoded `opaque`: a flat string-to-string map. */
export const Opaque = z.custom<Record<string, string>>(
  (v) => isObject(v) && Object.values(v).every((x) => typeof x === 'string'),
  'opaque must be a JSON object of strings',
)

/** A challenge with `request` and `opaque` decoded. */
export const Schema = z.object({
  id: z.string().min(1, 'id must not be empty'),
  realm: z.string(),
  method: Method,
  intent: Intent,
  request: Request,
  expires: DateTime.optional(),
  digest: z.string().optional(),
  description: z.string().optional(),
  opaque: Opaque.optional(),
})
export type Challenge = z.output<typeof Schema>

/**
 * The challenge as echoed in a credential (draft, "Credentials"): the wire strings, with
 * `request` and `opaque` still base64url. Unknown fields are dropped (MUST be ignored).
 */
export const Echo = z.object({
  id: z.string().min(1, 'id must not be empty'),
  realm: z.string(),
  method: Method,
  intent: Intent,
  request: Base64url,
  description: z.string().optional(),
  opaque: Base64url.optional(),
  digest: z.string().optional(),
  expires: DateTime.optional(),
})
export type Echo = z.output<typeof Echo>

/** The HMAC key; a list verifies against any (rotation: keep the previous secret until expiry). */
export type Secret = string | Uint8Array

export type FromParameters = Omit<Challenge, 'id'> & {
  secret: Secret
}

/** Zod issues → a PaymentParseError naming the first failing field. */
function invalid(element: 'challenge', error: z.ZodError): PaymentParseError {
  const issue = error.issues[0]
  const where = issue?.path.length ? `${issue.path.join('.')}: ` : ''
  return new PaymentParseError(element, `Invalid Payment challenge: ${where}${issue?.message}`, {
    details: {
      issues: error.issues.map((i) => ({ path: i.path.map(String), message: i.message })),
    },
  })
}

/**
 * The HMAC input of "Challenge Binding": seven slots joined by `|` — realm, method, intent,
 * base64url(JCS(request)), expires or "", digest or "", base64url(JCS(opaque)) or "".
 */
export function bindingInput(challenge: Omit<Challenge, 'id'>): string {
  return [
    challenge.realm,
    challenge.method,
    challenge.intent,
    Encoding.encodeJson(challenge.request),
    challenge.expires ?? '',
    challenge.digest ?? '',
    challenge.opaque === undefined ? '' : Encoding.encodeJson(challenge.opaque),
  ].join('|')
}

/** The id of a challenge: base64url(HMAC-SHA256(secret, bindingInput)). */
export function computeId(secret: Secret, challenge: Omit<Challenge, 'id'>): string {
  // node:crypto's native HMAC: ~10x faster than a JS one, and the id is checked per voucher.
  return createHmac('sha256', secret).update(bindingInput(challenge), 'utf8').digest('base64url')
}

/** A new challenge bound to its parameters by an HMAC id; throws PaymentParseError if invalid. */
export function from(parameters: FromParameters): Challenge {
  const { secret, ...rest } = parameters
  const parsed = Schema.omit({ id: true }).safeParse(rest)
  if (!parsed.success) throw invalid('challenge', parsed.error)
  const challenge = stripUndefined(parsed.data)
  return { id: computeId(secret, challenge), ...challenge }
}

function stripUndefined<T extends Record<string, unknown>>(object: T): T {
  return Object.fromEntries(Object.entries(object).filter(([, v]) => v !== undefined)) as T
}

export type VerifyResult =
  | { valid: true }
  | { valid: false; reason: 'forged' }
  | { valid: false; reason: 'expired' }

/**
 * Checks that `id` is the HMAC of the other parameters under `secret` (constant-time) and that
 * `expires` has not passed at `now`. A forged id is reported before expiry.
 */
export function verify(
  challenge: Challenge,
  secret: Secret | readonly Secret[],
  now: Date = new Date(),
): VerifyResult {
  const secrets = Array.isArray(secret) ? secret : [secret as Secret]
  // The same object again (a parsed credential the route kept, frozen): no key to build.
  const seen = byObject.get(challenge)
  let match: Secret | false
  if (seen !== undefined && secrets.includes(seen)) match = seen
  else {
    const key = echoKey(challenge)
    const known = verified.get(key)
    match = known !== undefined && secrets.includes(known) ? known : bound(challenge, secrets)
    if (match === false) return { valid: false, reason: 'forged' }
    if (match !== known) {
      verified.set(key, match)
      // Ours: its request (frozen when `fromEcho` decoded it) is kept for its next echo. Its
      // wire text is its JCS form, which `fromEcho` required.
      if (Object.isFrozen(challenge.request))
        requests.set(Encoding.encodeJson(challenge.request), challenge.request)
    }
    if (Object.isFrozen(challenge)) byObject.set(challenge, match)
  }
  if (challenge.expires !== undefined && Date.parse(challenge.expires) <= now.getTime())
    return { valid: false, reason: 'expired' }
  return { valid: true }
}

/**
 * Challenges whose id was checked, by their exact parameters, with the secret that matched:
 * one challenge serves every voucher of a session, so its HMAC (and the JCS under it) is
 * computed once, not per voucher. Parameters that differ in any way, even only in key order,
 * are another entry and are checked in full.
 */
const verified = new Lru<string, Secret>(10_000)
/** The same, by frozen challenge object: what `verify` looks at first. */
const byObject = new WeakMap<Challenge, Secret>()

const echoKey = (c: Challenge) =>
  [
    c.id,
    c.realm,
    c.method,
    c.intent,
    c.expires ?? '',
    c.digest ?? '',
    JSON.stringify(c.request),
    c.opaque === undefined ? '' : JSON.stringify(c.opaque),
  ].join('\n')

/** The secret under which `id` is the HMAC of the other parameters, or false. */
function bound(challenge: Challenge, secrets: readonly Secret[]): Secret | false {
  const expected = Buffer.from(challenge.id, 'utf8')
  let match: Secret | false = false
  for (const s of secrets) {
    let id: string
    try {
      id = computeId(s, challenge)
    } catch {
      // A request that cannot be canonical JSON was never issued by us.
      return false
    }
    // Evaluate every secret so timing does not reveal which one matched. Lengths are not secret
    // (ids are 43 characters), and timingSafeEqual needs equal lengths.
    const actual = Buffer.from(id, 'utf8')
    if (actual.length === expected.length && timingSafeEqual(actual, expected)) match = s
  }
  return match
}

/** `verify`, throwing the `invalid-challenge` problem (402) unless valid. */
export function assert(
  challenge: Challenge,
  secret: Secret | readonly Secret[],
  now: Date = new Date(),
): void {
  const result = verify(challenge, secret, now)
  if (result.valid) return
  throw Problem.invalidChallenge(
    result.reason === 'expired'
      ? 'The challenge expired; retry with the fresh challenge.'
      : 'The challenge id does not match its parameters; retry with the fresh challenge.',
    { challengeId: challenge.id },
  )
}

/** The `WWW-Authenticate` value of one challenge: `Payment id="…", realm="…", …`. */
export function serialize(challenge: Challenge): string {
  const echo = toEcho(challenge)
  const params: [string, string | undefined][] = [
    ['id', echo.id],
    ['realm', echo.realm],
    ['method', echo.method],
    ['intent', echo.intent],
    ['request', echo.request],
    ['expires', echo.expires],
    ['digest', echo.digest],
    ['description', echo.description],
    ['opaque', echo.opaque],
  ]
  const value = `${scheme} ${params
    .filter((p): p is [string, string] => p[1] !== undefined)
    .map(([name, v]) => `${name}=${AuthHeader.quote(v)}`)
    .join(', ')}`
  if (value.length > maxChallengeBytes)
    throw new PaymentParseError('challenge', `The challenge is over ${maxChallengeBytes} bytes.`)
  return value
}

/** Several challenges in one `WWW-Authenticate` value (a comma-separated list). */
export function serializeAll(challenges: readonly Challenge[]): string {
  return challenges.map(serialize).join(', ')
}

export type DeserializeOptions = { maxBytes?: number | undefined }

/**
 * Every Payment challenge in a `WWW-Authenticate` value, which may also hold other schemes
 * (`Bearer realm="x", Payment id="…", …`). Throws PaymentParseError when the value is not valid
 * RFC 9110 syntax or a Payment challenge lacks or misformats a parameter; other schemes' content
 * is not validated. Unknown Payment parameters are ignored.
 */
export function deserialize(value: string, options: DeserializeOptions = {}): Challenge[] {
  const max = options.maxBytes ?? maxHeaderBytes
  if (value.length > max)
    throw new PaymentParseError('challenge', `The WWW-Authenticate value is over ${max} bytes.`)
  const out: Challenge[] = []
  for (const parsed of AuthHeader.parse(value)) {
    if (parsed.scheme.toLowerCase() !== 'payment') continue
    if (parsed.token68 !== undefined)
      throw new PaymentParseError('challenge', 'A Payment challenge must use auth-params.')
    out.push(fromEcho(Object.fromEntries(parsed.params)))
  }
  return out
}

/** The echo a credential carries: the challenge's wire strings. */
export function toEcho(challenge: Challenge): Echo {
  return stripUndefined({
    id: challenge.id,
    realm: challenge.realm,
    method: challenge.method,
    intent: challenge.intent,
    request: Encoding.encodeJson(challenge.request),
    description: challenge.description,
    opaque: challenge.opaque === undefined ? undefined : Encoding.encodeJson(challenge.opaque),
    digest: challenge.digest,
    expires: challenge.expires,
  })
}

/**
 * A challenge from its wire parameters (a parsed header, or a credential's echo): validates them and
 * decodes `request` and `opaque`, which must be canonical (JCS) base64url JSON.
 */
export function fromEcho(echo: unknown): Challenge {
  const parsed = Echo.safeParse(echo)
  if (!parsed.success) throw invalid('challenge', parsed.error)
  const wire = parsed.data
  let request = requests.get(wire.request)
  if (!request) {
    const r = Request.safeParse(decodeParam('request', wire.request))
    if (!r.success) throw invalid('challenge', r.error)
    request = deepFreeze(r.data)
  }
  let opaque: Record<string, string> | undefined
  if (wire.opaque !== undefined) {
    const o = Opaque.safeParse(decodeParam('opaque', wire.opaque))
    if (!o.success) throw invalid('challenge', o.error)
    opaque = o.data
  }
  return stripUndefined({ ...wire, request, opaque })
}

/**
 * Echoed `request` parameters, decoded and checked: one challenge comes back with every
 * voucher and request of a session, and its canonical-JSON check is the costly part. The
 * decoding is a function of the text alone; the values are frozen, so no caller can change
 * what the next one gets. Only the requests of challenges `verify` found ours are kept: a
 * forged echo may carry one of up to a credential's size, and 10,000 of those, kept as they
 * were decoded, held about 900 MB.
 */
const requests = new Lru<string, Challenge['request']>(10_000)

/** Freezes `value` and everything in it. */
export function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    for (const v of Object.values(value)) deepFreeze(v)
    Object.freeze(value)
  }
  return value
}

function decodeParam(name: string, text: string): unknown {
  try {
    return Encoding.decodeJson(text, { canonical: true })
  } catch (cause) {
    throw new PaymentParseError(
      'challenge',
      `The ${name} parameter must be base64url of canonical (JCS) JSON.`,
      { cause },
    )
  }
}
