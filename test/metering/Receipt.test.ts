/**
 * Receipt.verify as a parser of outside input: a receipt a client was given, and a public key
 * it fetched. Only the one encoding of each verifies.
 */
import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Receipt from '../../src/metering/Receipt.ts'

const signer = new Receipt.Signer(new Uint8Array(32).fill(7))

const facts: fc.Arbitrary<Receipt.Facts> = fc.record({
  request_id: fc.string(),
  model: fc.string(),
  payer: fc.constantFrom('key' as const, 'channel' as const),
  prompt_tokens: fc.nat(),
  completion_tokens: fc.nat(),
  cost: fc.bigInt({ min: 0n, max: 2n ** 128n }).map(String),
  status: fc.string(),
  result_sha256: fc.stringMatching(/^[0-9a-f]{64}$/),
})

/** Another spelling of the same bytes: padded, in the other base64 alphabet, or with the spare
 * bits of the last character set (86 characters of a 64-byte signature, 43 of a 32-byte key,
 * leave some unused). */
function respelled(text: string, how: number): string {
  switch (how) {
    case 0:
      return `${text}=`
    case 1:
      return `${text}==`
    case 2:
      return ` ${text}`
    case 3:
      return `${text}.`
    default: {
      const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
      const last = alphabet.indexOf(text.at(-1)!)
      return text.slice(0, -1) + alphabet[last ^ 1]
    }
  }
}

describe('verify', () => {
  test('behavior: a receipt verifies with its key; any field changed, added or left out does not', () => {
    fc.assert(
      fc.property(facts, fc.nat(), fc.string(), (f, pick, value) => {
        const r = signer.sign(f)
        expect(Receipt.verify(r, signer.publicKey)).toBe(true)
        expect(Receipt.verify(JSON.parse(JSON.stringify(r)), signer.publicKey)).toBe(true)
        const names = Object.keys(r).filter((k) => k !== 'signature')
        const name = names[pick % names.length]!
        const { [name]: _, ...without } = r as Record<string, unknown>
        expect(Receipt.verify(without, signer.publicKey)).toBe(false)
        if (value !== String((r as Record<string, unknown>)[name]))
          expect(Receipt.verify({ ...r, [name]: value }, signer.publicKey)).toBe(false)
        expect(Receipt.verify({ ...r, [`x${name}`]: value }, signer.publicKey)).toBe(false)
      }),
      { numRuns: 2_000 },
    )
  })

  test('error: a signature or a key spelled otherwise than as base64url without padding does not verify', () => {
    fc.assert(
      fc.property(facts, fc.integer({ min: 0, max: 4 }), (f, how) => {
        const r = signer.sign(f)
        expect(
          Receipt.verify({ ...r, signature: respelled(r.signature, how) }, signer.publicKey),
        ).toBe(false)
        expect(Receipt.verify(r, respelled(signer.publicKey, how))).toBe(false)
        const std = r.signature.replaceAll('-', '+').replaceAll('_', '/')
        if (std !== r.signature)
          expect(Receipt.verify({ ...r, signature: std }, signer.publicKey)).toBe(false)
      }),
      { numRuns: 2_000 },
    )
  })

  test('property: anything, receipt-shaped or not, with any key, is false and never throws', () => {
    const r = signer.sign({
      request_id: 'r',
      model: 'm',
      payer: 'key',
      prompt_tokens: 1,
      completion_tokens: 2,
      cost: '3',
      status: 'ok',
      result_sha256: '0'.repeat(64),
    })
    fc.assert(
      fc.property(
        fc.oneof(
          fc.anything(),
          fc.dictionary(fc.constantFrom(...Object.keys(r)), fc.anything()),
          fc.record({ ...Object.fromEntries(Object.keys(r).map((k) => [k, fc.anything()])) }),
        ),
        fc.oneof(fc.string(), fc.constant(signer.publicKey)),
        (value, key) => {
          expect(Receipt.verify(value, key)).toBe(false)
        },
      ),
      { numRuns: 3_000 },
    )
  })
})
