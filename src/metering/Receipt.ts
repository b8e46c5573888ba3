/**
 * Signed completion receipts: what the gateway metered for one request (its tokens, its
 * charge, and a SHA-256 of the text it generated), signed with the gateway's Ed25519 key, so a
 * client can hold the gateway to its bill later. The signature covers the RFC 8785 (JCS)
 * canonical JSON of every other field; `GET /v1/receipts/key` publishes the public key.
 * Nothing of a receipt is stored: the text's digest exists only in the response.
 */
import {
  createHash,
  createPrivateKey,
  createPublicKey,
  type Hash,
  type KeyObject,
  sign,
  verify as verifySignature,
} from 'node:crypto'
import jcs from 'canonicalize'
import { generated } from '../upstream/Chat.ts'

export const VERSION = 'tollway-receipt/1'

/** What a receipt states. */
export type Facts = {
  /** The request's id (its `x-request-id`; `GET /v1/usage/{id}` for key holders). */
  request_id: string
  model: string
  /** Who paid: an API key's account, or a payment channel. */
  payer: 'key' | 'channel'
  prompt_tokens: number
  completion_tokens: number
  /** Base units charged, a decimal string. */
  cost: string
  /** How the request ended (`ok`, `cancelled`, `insufficient_funds`, …). */
  status: string
  /** SHA-256 (hex) of the generated text, as `Digest` builds it. */
  result_sha256: string
}

export type Receipt = Facts & {
  version: typeof VERSION
  /** Which key signed it (see `Signer.keyId`). */
  key_id: string
  /** When it was signed, Unix seconds. */
  created: number
  /** Ed25519 signature (base64url) of the JCS canonical JSON of every other field. */
  signature: string
}

/** DER prefix of a PKCS #8 Ed25519 private key; the 32-byte seed follows. */
const PKCS8_ED25519 = Buffer.from('302e020100300506032b657004220420', 'hex')

/** The bytes a receipt's signature covers. */
function signed(r: Omit<Receipt, 'signature'>): Buffer {
  return Buffer.from(jcs(r)!, 'utf8')
}

/** The gateway's receipt key. */
export class Signer {
  private readonly key: KeyObject
  /** The raw 32-byte public key, base64url. */
  readonly publicKey: string
  /** The first 8 bytes of the public key's SHA-256, hex: names the key in receipts. */
  readonly keyId: string

  /** `seed`: the 32-byte Ed25519 private key. */
  constructor(seed: Uint8Array) {
    if (seed.length !== 32) throw new Error('an Ed25519 receipt key is 32 bytes')
    this.key = createPrivateKey({
      key: Buffer.concat([PKCS8_ED25519, seed]),
      format: 'der',
      type: 'pkcs8',
    })
    const jwk = createPublicKey(this.key).export({ format: 'jwk' }) as { x: string }
    this.publicKey = jwk.x
    this.keyId = createHash('sha256')
      .update(Buffer.from(jwk.x, 'base64url'))
      .digest('hex')
      .slice(0, 16)
  }

  sign(facts: Facts): Receipt {
    const unsigned = {
      version: VERSION,
      key_id: this.keyId,
      created: Math.floor(Date.now() / 1000),
      ...facts,
    } as const
    return {
      ...unsigned,
      signature: sign(null, signed(unsigned), this.key).toString('base64url'),
    }
  }
}

/**
 * `text` decoded, if it is the one base64url spelling (no padding) of `bytes` bytes. Node's
 * decoder takes much else (padding, the `+/` alphabet, characters it skips, the spare bits of
 * the last character set): one signature would verify under many spellings, and a client
 * that tells its receipts apart by signature could be handed the same one again as another.
 */
function base64url(text: unknown, bytes: number): Buffer | undefined {
  if (typeof text !== 'string' || text.length !== Math.ceil((bytes * 4) / 3)) return undefined
  const decoded = Buffer.from(text, 'base64url')
  return decoded.length === bytes && decoded.toString('base64url') === text ? decoded : undefined
}

/**
 * Whether `receipt` was signed by `publicKey` (base64url, as `GET /v1/receipts/key` gives it)
 * and is unchanged. Anything malformed is false, never an exception; so is a signature or a
 * key spelled otherwise than as the signer writes it.
 */
export function verify(receipt: unknown, publicKey: string): boolean {
  try {
    if (typeof receipt !== 'object' || receipt === null) return false
    const { signature, ...rest } = receipt as Record<string, unknown>
    const bytes = base64url(signature, 64)
    if (!bytes || !base64url(publicKey, 32) || rest.version !== VERSION) return false
    const key = createPublicKey({
      key: { kty: 'OKP', crv: 'Ed25519', x: publicKey },
      format: 'jwk',
    })
    return verifySignature(null, signed(rest as Omit<Receipt, 'signature'>), key, bytes)
  } catch {
    return false
  }
}

/**
 * The SHA-256 of a completion's generated text, fed in the order it was sent: of each
 * message or chunk, its content, then its reasoning, then each tool call's name and
 * arguments (the text metered as output; see `Chat.generated`).
 */
export class Digest {
  private readonly hash: Hash = createHash('sha256')
  /**
   * A high surrogate that ended the last text: the low one may open the next (an upstream
   * may cut its text between the two halves of a character), and the digest is of the UTF-8
   * of the whole text, as a client joins it, not of each piece on its own.
   */
  private high = ''
  update(text: string): void {
    if (this.high) {
      text = this.high + text
      this.high = ''
    }
    const last = text.charCodeAt(text.length - 1)
    if (last >= 0xd800 && last <= 0xdbff) {
      this.high = text.slice(-1)
      text = text.slice(0, -1)
    }
    if (text.length > 0) this.hash.update(text, 'utf8')
  }
  hex(): string {
    if (this.high) this.hash.update(this.high, 'utf8')
    this.high = ''
    return this.hash.digest('hex')
  }
}

/**
 * The `result_sha256` a receipt states, from what a client received: the message of each
 * choice of a whole completion, or the delta of each choice of every streamed chunk, in order.
 */
export function resultDigest(parts: Iterable<Parameters<typeof generated>[0] | undefined>): string {
  const digest = new Digest()
  for (const p of parts) if (p) digest.update(generated(p))
  return digest.hex()
}
