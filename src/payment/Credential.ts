/**
 * The Payment credential (draft-httpauth-payment-00, "Credentials (Authorization)"):
 * `Authorization: Payment <base64url-nopad JSON>` holding the echoed challenge, an optional payer
 * `source` and the method's `payload`. The payload's shape belongs to the method and intent
 * (evm/Session.ts for evm/session); here it is any JSON object.
 *
 * `deserialize` is the server's parser: whatever it is given, it returns a credential or throws the
 * `malformed-credential` problem (402, core draft), never anything else.
 *
 * Decisions where the draft leaves room:
 * - The scheme name is matched case-insensitively (RFC 9110 §11.1); one or more spaces follow it.
 * - Credential JSON need not be JCS (the draft only requires JCS for `request` and `opaque`);
 *   `serialize` emits JCS anyway.
 * - Size: servers MUST handle at least 4KB; we accept `Authorization` values up to 16 KiB by default
 *   (a voucher-with-deposit credential is ~2.5 KB) and refuse larger ones before decoding.
 */
import { z } from 'zod'
import * as Challenge from './Challenge.ts'
import * as Encoding from './Encoding.ts'
import { PaymentParseError } from './Errors.ts'
import * as Problem from './Problem.ts'

/** Largest `Authorization` value `deserialize` reads by default. */
export const maxCredentialBytes = 16384

const HEADER = /^[ \t]*payment +([A-Za-z0-9_-]+)[ \t]*$/i

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

/** The decoded credential object. Unknown members are dropped (MUST be ignored). */
export const Schema = z.object({
  challenge: Challenge.Echo,
  source: z.string().optional(),
  payload: z.custom<Record<string, unknown>>(isObject, 'payload must be a JSON object'),
})
export type Credential = z.output<typeof Schema>

/** A credential answering `challenge` (echoed unchanged, as the draft requires). */
export function from<payload extends Record<string, unknown>>(parameters: {
  challenge: Challenge.Challenge
  payload: payload
  source?: string | undefined
}): Credential & { payload: payload } {
  return {
    challenge: Challenge.toEcho(parameters.challenge),
    ...(parameters.source === undefined ? {} : { source: parameters.source }),
    payload: parameters.payload,
  }
}

/**
 * The `Authorization` value: `Payment <base64url(JCS(credential))>`. Bigints in the payload are
 * written as decimal strings (the draft's encoding of amounts). Throws PaymentParseError when the
 * credential cannot be JSON.
 */
export function serialize(credential: Credential): string {
  return `${Challenge.scheme} ${Encoding.encodeJson(Encoding.toWire(credential))}`
}

/** Bigints → decimal strings, recursively (see `Encoding.toWire`). */
export const toWire = Encoding.toWire

/**
 * Whether an `Authorization` value uses the Payment scheme (so the route parses it as a credential
 * rather than, say, a `Bearer` API key). Says nothing about validity.
 */
export function isPayment(authorization: string | null | undefined): boolean {
  return authorization != null && /^[ \t]*payment(?:[ \t]|$)/i.test(authorization)
}

export type DeserializeOptions = { maxBytes?: number | undefined }

/** Parses an `Authorization` value; throws the `malformed-credential` problem (402) if invalid. */
export function deserialize(value: string, options: DeserializeOptions = {}): Credential {
  const max = options.maxBytes ?? maxCredentialBytes
  if (value.length > max) throw malformed(`The credential is over ${max} bytes.`)
  const match = HEADER.exec(value)
  if (!match) {
    // Two Authorization headers arrive joined by a comma; the draft says to answer 400.
    if (/^[ \t]*payment +[A-Za-z0-9_-]+[ \t]*,[ \t]*payment /i.test(value))
      throw Problem.malformedCredential('Send exactly one Payment credential.', {}, { status: 400 })
    throw malformed('Send `Authorization: Payment <base64url JSON>`.')
  }
  let json: unknown
  try {
    json = Encoding.decodeJson(match[1]!)
  } catch (cause) {
    throw malformed('The credential is not base64url-encoded JSON.', cause)
  }
  const parsed = Schema.safeParse(json)
  if (!parsed.success) {
    const issue = parsed.error.issues[0]
    throw malformed(`Invalid credential: ${issue?.path.join('.')}: ${issue?.message}`)
  }
  return parsed.data
}

/** The challenge a credential echoes, decoded; throws `malformed-credential` if it is not valid. */
export function challengeOf(credential: Credential): Challenge.Challenge {
  try {
    return Challenge.fromEcho(credential.challenge)
  } catch (cause) {
    throw malformed(
      cause instanceof PaymentParseError ? cause.message : 'The echoed challenge is invalid.',
      cause,
    )
  }
}

function malformed(detail: string, cause?: unknown): Problem.PaymentProblem {
  return Problem.malformedCredential(detail, {}, cause === undefined ? {} : { cause })
}
