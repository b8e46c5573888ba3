/**
 * The two encodings every MPP wire object uses: base64url without padding (RFC 4648 §5) and
 * JSON Canonicalization Scheme (RFC 8785, JCS). `encodeJson` / `decodeJson` compose them the way
 * `request`, `opaque`, credentials and receipts are carried in headers.
 *
 * JCS comes from the `canonicalize` package (the reference implementation by an RFC 8785 author);
 * base64url is hand-rolled because every platform decoder is lenient (accepts padding, `+/`,
 * whitespace, non-zero trailing bits) and the draft's grammar is `1*( ALPHA / DIGIT / "-" / "_" )`.
 */
import jcs from 'canonicalize'
import { PaymentParseError } from './Errors.ts'

const ALPHABET = /^[A-Za-z0-9_-]*$/
const encoder = new TextEncoder()
const decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/** base64url without padding of bytes (a string is encoded as UTF-8 first). */
export function base64urlEncode(input: Uint8Array | string): string {
  const bytes = typeof input === 'string' ? encoder.encode(input) : input
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64url')
}

/**
 * Strict base64url decoding: only `A-Z a-z 0-9 - _`, no padding, no whitespace, a length that is
 * not 1 mod 4, and zero trailing bits, so every byte string has exactly one accepted encoding.
 * The empty string decodes to no bytes (grammars that require `1*` check emptiness themselves).
 */
export function base64urlDecode(text: string): Uint8Array {
  if (!ALPHABET.test(text))
    throw new PaymentParseError('base64url', 'Use base64url without padding (A-Z a-z 0-9 - _).')
  if (text.length % 4 === 1)
    throw new PaymentParseError('base64url', 'The base64url length is impossible (1 mod 4).')
  const bytes = new Uint8Array(Buffer.from(text, 'base64url'))
  // Non-zero trailing bits decode to the same bytes as the canonical text: reject them.
  if (base64urlEncode(bytes) !== text)
    throw new PaymentParseError(
      'base64url',
      'The base64url value is not canonical (trailing bits).',
    )
  return bytes
}

/**
 * The RFC 8785 canonical JSON text of a value. Throws PaymentParseError for what JSON cannot hold
 * (bigint, NaN, Infinity, lone surrogates, cycles) and for values with no JSON form (undefined).
 */
export function canonicalize(value: unknown): string {
  let text: string | undefined
  try {
    text = jcs(value)
  } catch (cause) {
    throw new PaymentParseError('json', 'The value cannot be canonical JSON.', { cause })
  }
  if (text === undefined) throw new PaymentParseError('json', 'The value has no JSON form.')
  return text
}

/** base64url(UTF-8(JCS(value))): how `request`, `opaque`, credentials and receipts travel. */
export function encodeJson(value: unknown): string {
  return base64urlEncode(canonicalize(value))
}

export type DecodeOptions = {
  /** Require the text to be exactly `encodeJson` of its value (the draft's JCS MUST). */
  canonical?: boolean | undefined
}

/**
 * Strict base64url, strict UTF-8, then JSON. With `canonical`, also rejects any encoding other than
 * the JCS one (so re-encoding yields the very same text, which challenge binding relies on).
 */
export function decodeJson(text: string, options: DecodeOptions = {}): unknown {
  const bytes = base64urlDecode(text)
  let json: string
  try {
    json = decoder.decode(bytes)
  } catch (cause) {
    throw new PaymentParseError('json', 'The decoded value is not UTF-8.', { cause })
  }
  let value: unknown
  try {
    value = JSON.parse(json)
  } catch (cause) {
    throw new PaymentParseError('json', 'The decoded value is not JSON.', { cause })
  }
  if (options.canonical && canonicalize(value) !== json)
    throw new PaymentParseError('json', 'The JSON is not in RFC 8785 (JCS) canonical form.')
  return value
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

/**
 * Bigints → decimal strings, recursively, and `undefined` members dropped: money is bigint inside
 * tollway and a decimal string on the wire (both drafts).
 */
export function toWire(value: unknown): unknown {
  if (typeof value === 'bigint') return value.toString()
  if (Array.isArray(value)) return value.map(toWire)
  if (isObject(value))
    return Object.fromEntries(
      Object.entries(value)
        .filter(([, v]) => v !== undefined)
        .map(([k, v]) => [k, toWire(v)]),
    )
  return value
}
