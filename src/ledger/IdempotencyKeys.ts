/**
 * The Idempotency-Key window: a completed key (`idempotency_keys` of an account, migration
 * 0001; `channel_idempotency_keys` of a channel, 0002) is remembered for `windowSeconds` from
 * its first request's admission, then forgotten, and a request sent with it afterwards is a new
 * request (admitted, run and charged as any). Every request sent with a key wrote a row, and
 * nothing deleted one: the tables grew without end. Stripe keeps its keys 24 hours.
 *
 * A key `in_progress` is never forgotten (its request runs: a retry must still be told so), nor
 * a completed one whose request still holds a reservation or ended within the window (the
 * window runs from the request's end, for a request that ran longer than it). Nothing refers to these rows: the
 * usage row and the charge (credit_transactions, a channel's `spent`) of the request stay.
 *
 * Forgotten a chunk at a time, each its own short transaction, oldest first along the
 * `created_at` index (migration 0022): a long backlog (the first prune of a database that kept
 * every key) never becomes one huge delete holding its rows' locks and WAL at once. One
 * instance at a time prunes: a chunk's transaction first takes an advisory lock without
 * waiting, and an instance that finds it taken leaves the work to the one that has it.
 */
import type { Sql } from './Db.ts'

/** Rows a chunk deletes at most, of each table. */
export const CHUNK = 1_000

/** The tables of keys: an account's, a channel's. */
const TABLES = ['idempotency_keys', 'channel_idempotency_keys'] as const

/**
 * One chunk: deletes up to `limit` completed keys of each table older than `windowSeconds`
 * whose request holds no reservation, oldest first; how many of each, or undefined when another
 * session prunes (holds the lock), having deleted nothing. Rows another transaction has locked
 * (a late charge taking its key back) are skipped, not waited for.
 */
export async function pruneChunk(
  sql: Sql,
  windowSeconds: number,
  limit = CHUNK,
): Promise<{ accounts: number; channels: number } | undefined> {
  return (await sql.begin(async (tx) => {
    const [lock] = await tx`
      select pg_try_advisory_xact_lock(hashtext(current_schema() || '.tollway_idempotency_prune'))
        as locked`
    if (!lock!.locked) return undefined
    const counts: number[] = []
    for (const table of TABLES) {
      // By the rows' physical addresses (locked by the FOR UPDATE, so they stay put until the
      // commit): by their keys, PostgreSQL joined the chunk to a scan of the whole table.
      const gone = await tx`
        delete from ${tx(table)}
        where ctid = any(array(
          select o.ctid from ${tx(table)} o
          where o.state = 'completed'
            and o.created_at < now() - make_interval(secs => ${windowSeconds})
            and not exists (select 1 from reservations r where r.id = o.request_id)
            -- Nor one whose request ended within the window (its usage row is written as it
            -- ends): a request that ran longer than a short window would have its key forgotten
            -- as it answered, and its client's retry charged again.
            and not exists (select 1 from usage u where u.id = o.request_id
              and u.created_at >= now() - make_interval(secs => ${windowSeconds}))
          order by o.created_at
          limit ${limit}
          for update of o skip locked))`
      counts.push(gone.count)
    }
    return { accounts: counts[0]!, channels: counts[1]! }
  })) as { accounts: number; channels: number } | undefined
}

/**
 * Forgets the completed keys older than `windowSeconds`, a chunk (`pruneChunk`) at a time, each
 * through `call` (the sweep's database deadline), until a chunk finds fewer than `limit` in
 * both tables, another session prunes, or `stopped()`; how many it deleted.
 */
export async function prune(
  sql: Sql,
  windowSeconds: number,
  o: {
    limit?: number
    call?: <T>(chunk: Promise<T>) => Promise<T>
    stopped?: () => boolean
  } = {},
): Promise<number> {
  const limit = o.limit ?? CHUNK
  const call = o.call ?? (<T>(chunk: Promise<T>) => chunk)
  let pruned = 0
  for (;;) {
    const n = await call(pruneChunk(sql, windowSeconds, limit))
    if (n === undefined) return pruned
    pruned += n.accounts + n.channels
    if ((n.accounts < limit && n.channels < limit) || o.stopped?.()) return pruned
  }
}
