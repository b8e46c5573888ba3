/**
 * Request body binding (draft-httpauth-payment-00, "Request Body Digest Binding"): a challenge's
 * `digest` is an RFC 9530 `Content-Digest` value of the body the credential must come with, e.g.
 * `sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:`.
 *
 * Decisions: we emit `sha-256` only; `verify` accepts a dictionary of `sha-256` / `sha-512`
 * members and requires every supported member to match (unknown algorithms are ignored, at least
 * one supported member is required). Byte sequences use standard base64 with padding (RFC 8941).
 */
import { sha256, sha512 } from '@noble/hashes/sha2.js'

const algorithms = { 'sha-256': sha256, 'sha-512': sha512 } as const

/** The `digest` parameter for a body: `sha-256=:<base64>:`. */
export function from(body: Uint8Array | string): string {
  const bytes = typeof body === 'string' ? new TextEncoder().encode(body) : body
  return `sha-256=:${Buffer.from(sha256(bytes)).toString('base64')}:`
}

/** Whether `body` matches a challenge's `digest` (false for a malformed digest). */
export function verify(digest: string, body: Uint8Array | string): boolean {
  const bytes = typeof body === 'string' ? new TextEncoder().encode(body) : body
  let checked = 0
  for (const member of digest.split(',')) {
    const match = /^\s*([a-z0-9-]+)=:([A-Za-z0-9+/]*={0,2}):\s*$/.exec(member)
    if (!match) return false
    const algorithm = algorithms[match[1] as keyof typeof algorithms]
    if (!algorithm) continue
    const expected = Buffer.from(algorithm(bytes)).toString('base64')
    if (expected !== match[2]) return false
    checked++
  }
  return checked > 0
}
