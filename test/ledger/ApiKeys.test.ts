/** API keys' hashes: what the database stores and looks a key up by. */
import { expect, test } from 'bun:test'
import { createHash } from 'node:crypto'
import fc from 'fast-check'
import * as ApiKeys from '../../src/ledger/ApiKeys.ts'

test('behavior: a key is stored and looked up by the SHA-256 of its raw text (what every release stored), as a Buffer', () => {
  const h = ApiKeys.hash('tw_example')
  expect(Buffer.isBuffer(h)).toBe(true)
  // `printf tw_example | sha256sum`
  expect(h.toString('hex')).toBe('33c93cc83e93343771cc40a2d5ecb03bd3bbd03557219cdad520763d12518c6b')
  // The gateway's memo of good keys is keyed by the hash in base64.
  expect(h.toString('base64')).toBe('M8k8yD6TNDdxzECi1eywO9O70DVXIZza1SB2PRJRjGs=')
})

test('property: any text hashes as node:crypto SHA-256 does (UTF-8)', () => {
  fc.assert(
    fc.property(fc.string({ unit: 'grapheme', maxLength: 80 }), (raw) => {
      expect(ApiKeys.hash(raw).equals(createHash('sha256').update(raw).digest())).toBe(true)
    }),
    { numRuns: 2_000 },
  )
})
