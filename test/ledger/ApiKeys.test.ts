/** API keys' hashes: what the database stores and looks a key up by. */
import { expect, test } from 'bun:test'
import { createHash } from 'node:crypto'
import fc from 'fast-check'
import * as Accounts from '../../src/ledger/Accounts.ts'
import * as ApiKeys from '../../src/ledger/ApiKeys.ts'
import * as Postgres from '../helpers/Postgres.ts'

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

test.skipIf(!process.env.DATABASE_URL)(
  'behavior: a listing shows the active keys and the latest revoked ones only (REVOKED_LISTED), newest first: keys made and revoked in a loop do not grow it without end',
  async () => {
    const { sql } = await Postgres.fresh()
    const accountId = await Accounts.create(sql, { name: 'loop', plan: 'free' })
    const make = async () => (await ApiKeys.create(sql, { accountId, name: 'k', max: 10 }))!.id
    const kept = await make()
    const revoked: string[] = []
    for (let i = 0; i < ApiKeys.REVOKED_LISTED + 5; i++) {
      const id = await make()
      expect(await ApiKeys.revoke(sql, { accountId, id })).toBe(true)
      revoked.push(id)
    }
    const active = await make()
    const listed = await ApiKeys.list(sql, accountId)
    expect(listed).toHaveLength(2 + ApiKeys.REVOKED_LISTED)
    expect(
      listed
        .filter((k) => !k.revokedAt)
        .map((k) => k.id)
        .sort(),
    ).toEqual([kept, active].sort())
    // The latest revoked, the first five gone from the list.
    expect(new Set(listed.filter((k) => k.revokedAt).map((k) => k.id))).toEqual(
      new Set(revoked.slice(5)),
    )
    const times = listed.map((k) => k.createdAt.getTime())
    expect(times).toEqual([...times].sort((a, b) => b - a))
  },
  30_000,
)
