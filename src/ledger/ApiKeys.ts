/**
 * API keys. A raw key is `tw_` + 32 random bytes (base64url); only its SHA-256 is stored,
 * and the raw key is returned once, at creation. A fast hash is right here: the keys are
 * 256-bit random, so there is nothing to brute-force, and lookup is one index probe.
 */
import { randomBytes } from 'node:crypto'
import type { Sql } from './Db.ts'
import * as Db from './Db.ts'

export type Key = {
  id: string
  name: string
  prefix: string
  createdAt: Date
  revokedAt: Date | null
}

const PREFIX_LENGTH = 11

/**
 * SHA-256 of a raw key: what the database stores and looks up. Bun's one-shot hash, once a
 * request: a node:crypto Hash object costs several times as much.
 */
export function hash(raw: string): Buffer {
  return Bun.CryptoHasher.hash('sha256', raw) as Buffer
}

/**
 * Creates a key unless the account already has `max` active ones (one conditional
 * UPDATE, so concurrent creations cannot pass the limit). Returns undefined at the limit.
 */
export async function create(
  sql: Sql,
  input: { accountId: string; name: string; max: number },
): Promise<{ id: string; key: string; prefix: string } | undefined> {
  const key = `tw_${randomBytes(32).toString('base64url')}`
  const prefix = key.slice(0, PREFIX_LENGTH)
  const [row] = await sql`
    with a as (
      update accounts set active_keys = active_keys + 1
      where id = ${input.accountId} and active_keys < ${input.max}
      returning id)
    insert into api_keys (account_id, name, prefix, hash)
    select a.id, ${input.name}, ${prefix}, ${hash(key)} from a
    returning id`
  return row ? { id: row.id, key, prefix } : undefined
}

/** How many revoked keys a listing shows, the latest revoked. */
export const REVOKED_LISTED = 100

/**
 * Lists an account's keys, newest first (prefixes only): the active ones (10 at most) and the
 * latest revoked (REVOKED_LISTED). All revoked ones were listed: a key holder making and
 * revoking keys in a loop grew its listing, and the admin's view of the account, without end.
 */
export async function list(sql: Sql, accountId: string): Promise<Key[]> {
  const rows = await sql`
    select * from (
      select id, name, prefix, created_at, revoked_at from api_keys
      where account_id = ${accountId} and revoked_at is null
      union all
      (select id, name, prefix, created_at, revoked_at from api_keys
        where account_id = ${accountId} and revoked_at is not null
        order by revoked_at desc, id limit ${REVOKED_LISTED})) k
    order by created_at desc, id`
  return rows.map((r) => ({
    id: r.id,
    name: r.name,
    prefix: r.prefix,
    createdAt: r.created_at,
    revokedAt: r.revoked_at,
  }))
}

/** Revokes a key of the account; false if it has no such active key. Takes effect at once. */
export async function revoke(sql: Sql, input: { accountId: string; id: string }): Promise<boolean> {
  const rows = await sql`
    with k as (
      update api_keys set revoked_at = now()
      where id = ${input.id} and account_id = ${input.accountId} and revoked_at is null
      returning account_id)
    update accounts set active_keys = active_keys - 1 from k where accounts.id = k.account_id
    returning accounts.id`
  return rows.length === 1
}

/** Finds the active key with this raw value. */
export async function authenticate(
  sql: Sql,
  raw: string,
): Promise<{ keyId: string; accountId: string } | undefined> {
  const [row] = await Db.answered(
    sql,
    sql`select id, account_id from api_keys where hash = ${hash(raw)} and revoked_at is null`,
  )
  return row ? { keyId: row.id, accountId: row.account_id } : undefined
}

/**
 * What the account of the active key with this hash has free (its balance less what is held
 * for requests under way), as an admission reads it, and its plan's tier; undefined for an
 * unknown or revoked key.
 */
export async function funds(
  sql: Sql,
  keyHash: Buffer,
): Promise<{ available: bigint; tier: number } | undefined> {
  const [row] = await Db.answered(
    sql,
    sql`select a.balance - a.reserved as available, p.tier from api_keys k
      join accounts a on a.id = k.account_id join plans p on p.name = a.plan
      where k.hash = ${keyHash} and k.revoked_at is null`,
  )
  return row ? { available: row.available as bigint, tier: row.tier as number } : undefined
}
