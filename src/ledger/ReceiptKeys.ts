/**
 * The public keys completion receipts were signed with, by key id (migration 0020): each
 * instance publishes its own as it starts, so that any instance can give the key of a receipt
 * another one signed, or one signed before a key was rotated.
 */

import type { Sql } from './Db.ts'
import * as Db from './Db.ts'

/** Records `key` (a key id names one key: its public key's hash). */
export async function publish(sql: Sql, key: { keyId: string; publicKey: string }): Promise<void> {
  await sql`
    insert into receipt_keys (key_id, public_key) values (${key.keyId}, ${key.publicKey})
    on conflict (key_id) do nothing`
}

/**
 * The public key (base64url) of `keyId`, if an instance published it. Within the database
 * deadline (Db.answered): anyone may ask, and a database that takes connections but does not
 * answer would otherwise hold each asker (and a connection) until TCP gives up.
 */
export async function find(sql: Sql, keyId: string): Promise<string | undefined> {
  const [row] = await Db.answered(
    sql,
    sql`select public_key from receipt_keys where key_id = ${keyId}`,
  )
  return row?.public_key as string | undefined
}
