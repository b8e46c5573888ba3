/**
 * The settlement worker's SQL (migrations/0003_settlement.sql): which channels are due, the
 * voucher each may settle with, the record of every transaction the gateway submits, and
 * the settlement lock. Implements the store the worker in chain/Settlement.ts declares.
 *
 * What may be settled: the highest accepted voucher whose amount is at most `spent`, so
 * `settled <= spent <= acceptedCumulative <= deposit` holds on-chain as in the database. A
 * channel that closes (its payer's forced close, late in its grace period; its cooperative or
 * idle close) is settled last with the lowest voucher that covers `spent` (`cover`), and its
 * `spent` is raised to that voucher once settled (Channels.settled): a payer signs ahead of
 * what it spends, and one that signed only far ahead would otherwise take back, with its
 * deposit, all it spent since the last voucher at or below `spent`.
 */
import type * as Settlement from '../chain/Settlement.ts'
import * as Channels from './Channels.ts'
import type { Sql } from './Db.ts'
import * as Db from './Db.ts'
import * as Reservations from './Reservations.ts'

type Hex = Channels.Hex
const bytes = (hex: string) => Buffer.from(hex.slice(2), 'hex')
const hex = (b: Uint8Array): Hex => `0x${Buffer.from(b).toString('hex')}` as Hex

/** A channel's settlement state and the voucher settlement may submit for it (undefined: none). */
export async function settleable(
  sql: Sql,
  channelId: Hex,
): Promise<Settlement.Settleable | undefined> {
  const [r] = await sql`
    select c.escrow, c.spent, c.settled, c.finalized, c.close_requested_at, v.cumulative_amount,
      v.signature, w.cumulative_amount as cover_amount, w.signature as cover_signature
    from channels c
    left join lateral (
      select cumulative_amount, signature from vouchers
      where channel_id = c.channel_id and cumulative_amount <= c.spent
      order by cumulative_amount desc limit 1) v on true
    left join lateral (
      select cumulative_amount, signature from vouchers
      where channel_id = c.channel_id and cumulative_amount >= c.spent
        and cumulative_amount > c.settled
      order by cumulative_amount limit 1) w on true
    where c.channel_id = ${bytes(channelId)}`
  if (!r) return undefined
  return {
    channelId,
    escrow: hex(r.escrow),
    spent: r.spent,
    settled: r.settled,
    finalized: r.finalized,
    closeRequested: r.close_requested_at !== null,
    voucher: r.signature
      ? { cumulativeAmount: r.cumulative_amount, signature: hex(r.signature) }
      : undefined,
    cover: r.cover_signature
      ? { cumulativeAmount: r.cover_amount, signature: hex(r.cover_signature) }
      : undefined,
  }
}

/**
 * Open channels of this escrow and payee whose settleable voucher is above `settled` and
 * that are due: the unsettled amount reaches the threshold, or the channel has been idle
 * for `idleMs`, or its payer asked to close. The voucher is the highest at or below `spent`;
 * for a channel its payer forced to close with nothing held on it and no request of it swept
 * for lost within `sweptWithinMs` (whose own charge may still come), the lowest that covers
 * `spent` and did not revert, `cover` (the worker settles it only once the forced close is old
 * enough on chain; before, and when every cover reverted, the highest at or below `spent`). A
 * cooperative close's is the highest at or below `spent`: once that is settled, the channel is
 * not due, whether its close comes or not. Skips channels with a transaction in flight or
 * backing off, and amounts that already reverted (a revert is definitive). Close requests
 * first, then the largest amounts; last, the forced closes with only their cover to settle
 * that are younger than `coverAfterMs` by the database's clock (nothing to do for them yet,
 * unless the chain's clock is ahead).
 */
export async function due(sql: Sql, i: Settlement.DueQuery): Promise<Settlement.Due[]> {
  const rows = await sql`
    select c.channel_id, c.spent, c.settled, c.close_requested_at, v.cumulative_amount, v.signature,
      v.cover
    from channels c
    cross join lateral (
      -- A payer's forced close only: a cooperative close (the payer's, or an idle one) is
      -- closed by its own call with its cover, and the passes settle no more than spent
      -- meanwhile. With its cover as the voucher, a cooperative close that failed and was left
      -- to its payer stayed due every pass for good (the cover above settled), a chain read
      -- each, taking a place of the pass's batch before any later forced close.
      select c.close_requested_at is not null and not c.cooperative_close and c.reserved = 0
        and not exists (
          select 1 from usage u
          where u.channel_id = c.channel_id and u.status = 'abandoned'
            and u.created_at > now() - make_interval(secs => ${i.sweptWithinMs / 1000}))
        as cover) k
    cross join lateral (
      -- Of the vouchers that cover spent, the lowest whose settle did not revert (a revert is
      -- definitive: with the reverted one, the channel was left out of every pass after, what
      -- is at or below spent never settled when the cover was its first try); with none, the
      -- highest at or below spent.
      select * from (
        (select w.cumulative_amount, w.signature, true as cover from vouchers w
          where k.cover and w.channel_id = c.channel_id and w.cumulative_amount >= c.spent
            and not exists (
              select 1 from chain_transactions t
              where t.channel_id = c.channel_id and t.kind in ('settle', 'close')
                and t.status = 'reverted' and t.cumulative_amount = w.cumulative_amount)
          order by w.cumulative_amount limit 1)
        union all
        (select cumulative_amount, signature, false from vouchers
          where channel_id = c.channel_id and cumulative_amount <= c.spent
          order by cumulative_amount desc limit 1)) o
      order by o.cover desc limit 1) v
    cross join lateral (
      -- A forced close whose cover is all it has left to settle, requested less than half the
      -- grace period ago by the database's clock (which marked it once the gateway learned of
      -- it, after the chain's request): the pass can do nothing for it until the chain shows
      -- it old enough. Such channels come last: oldest first, they took the places of a pass's
      -- batch every pass until then, and any other channel due (a threshold, a later forced
      -- close) waited half the grace period. Last, not left out: the chain's clock decides and
      -- may run ahead of the database's.
      select v.cover and c.close_requested_at > now() - make_interval(secs => ${i.coverAfterMs / 1000})
        and coalesce((select max(cumulative_amount) from vouchers
          where channel_id = c.channel_id and cumulative_amount <= c.spent), 0) <= c.settled
        as waiting) q
    where c.chain_id = ${i.chainId} and c.escrow = ${bytes(i.escrow)} and c.payee = ${bytes(i.payee)}
      and not c.finalized and c.spent > c.settled
      and v.cumulative_amount > c.settled
      and (v.cumulative_amount - c.settled >= ${sql.typed.numeric(i.thresholdAmount)}
        or c.close_requested_at is not null
        or c.updated_at <= now() - make_interval(secs => ${i.idleMs / 1000}))
      and not exists (
        select 1 from chain_transactions t
        where t.channel_id = c.channel_id and t.kind in ('settle', 'close')
          and ((t.status in ('pending', 'failed') and t.next_attempt_at > now())
            or (t.status = 'reverted' and t.cumulative_amount = v.cumulative_amount)))
    order by q.waiting, c.close_requested_at nulls last, v.cumulative_amount - c.settled desc
    limit ${i.limit}`
  return rows.map((r) => ({
    channelId: hex(r.channel_id),
    cumulativeAmount: r.cumulative_amount,
    signature: hex(r.signature),
    spent: r.spent,
    settled: r.settled,
    closeRequested: r.close_requested_at !== null,
    cover: r.cover as boolean,
  }))
}

/**
 * Records the start of an attempt: a new row for a new intent, or the next attempt of one
 * that failed or reverted before. Pending until `leaseMs` from now. Undefined when that
 * intent already confirmed.
 */
export async function begin(
  sql: Sql,
  i: {
    channelId: Hex
    kind: Settlement.Kind
    cumulativeAmount: bigint
    leaseMs: number
    /** The voucher's (sent again as is should a reorganization drop the transaction). */
    signature?: Hex | undefined
  },
): Promise<{ id: bigint; attempts: number; previousHash: Hex | undefined } | undefined> {
  // The hash of the previous attempt stays until a new one is submitted: it may still be mined.
  const signature = i.signature === undefined ? null : bytes(i.signature)
  const [r] = await sql`
    insert into chain_transactions (channel_id, kind, cumulative_amount, status, next_attempt_at,
      signature)
    values (${bytes(i.channelId)}, ${i.kind}, ${sql.typed.numeric(i.cumulativeAmount)}, 'pending',
      now() + make_interval(secs => ${i.leaseMs / 1000}), ${signature})
    on conflict (channel_id, kind, cumulative_amount) do update set
      status = 'pending', attempts = chain_transactions.attempts + 1, mined = false,
      signature = coalesce(excluded.signature, chain_transactions.signature),
      error_name = null, error_message = null, next_attempt_at = excluded.next_attempt_at,
      updated_at = now()
    where chain_transactions.status <> 'confirmed'
    returning id, attempts, tx_hash`
  return r
    ? {
        id: BigInt(r.id),
        attempts: r.attempts,
        previousHash: r.tx_hash ? hex(r.tx_hash) : undefined,
      }
    : undefined
}

/**
 * Records a transaction the gateway sent for a payer and paid the gas of (an EIP-3009 open or
 * top-up), mined and successful: one row per channel, kind and resulting deposit, so a
 * retried credential records it once.
 */
export async function sentForPayer(
  sql: Sql,
  t: { channelId: Hex; kind: 'open' | 'topUp'; deposit: bigint; hash: Hex },
): Promise<void> {
  await sql`
    insert into chain_transactions (channel_id, kind, cumulative_amount, tx_hash, status, mined)
    values (${bytes(t.channelId)}, ${t.kind}, ${sql.typed.numeric(t.deposit)}, ${bytes(t.hash)},
      'confirmed', true)
    on conflict (channel_id, kind, cumulative_amount) do nothing`
}

/** Records the hash of a submitted transaction before its receipt. */
export async function submitted(sql: Sql, id: bigint, hash: Hex): Promise<void> {
  await sql`update chain_transactions set tx_hash = ${bytes(hash)}, updated_at = now() where id = ${id}`
}

/** Records the outcome of an attempt begun with `begin`. */
export async function finish(sql: Sql, id: bigint, o: Settlement.Outcome): Promise<void> {
  const error = o.status === 'confirmed' ? null : o.error
  await sql`
    update chain_transactions set status = ${o.status},
      tx_hash = coalesce(${o.hash ? bytes(o.hash) : null}, tx_hash),
      error_name = ${error?.name ?? null}, error_message = ${error?.message ?? null},
      mined = ${o.status === 'confirmed' || (o.status === 'reverted' && o.mined === true)},
      block = ${o.status === 'confirmed' && o.block !== undefined ? sql.typed.numeric(o.block) : null},
      reorganized = reorganized and ${o.status !== 'confirmed'},
      next_attempt_at = ${o.status === 'failed' ? o.retryAt : sql`now()`}, updated_at = now()
    where id = ${id}`
}

/**
 * Marks that the channel is closing because its payer asked on chain (a forced close): no new
 * vouchers or requests, settle at once. Its stream ends: clearing `active_stream` announces it
 * to the instance serving it (migration 0008), and its next extension ends it too (0010).
 *
 * `read`: what the chain showed and the database's time (`Channels.clock`) before it was read.
 * The mark takes that time, so a top-up observed after the read clears it (`Channels.observe`
 * clears marks older than the top-up), and none is made when a top-up was observed since the
 * read (the deposit grew past what the chain showed): the close that top-up cancelled would
 * otherwise stay marked, the channel open on chain and refused here. Without `read` (the
 * chain could not be read) the mark takes the present time. A mark already there stays as it
 * is. Undefined when the channel is unknown or finalized, or a top-up came since; `fresh`
 * when it was not closing before.
 */
export async function markCloseRequested(
  sql: Sql,
  channelId: Hex,
  read?: { deposit: bigint; readAt: string },
): Promise<{ fresh: boolean } | undefined> {
  const [row] = await sql`
    with before as (
      select close_requested_at is null as fresh from channels
      where channel_id = ${bytes(channelId)} for update
    )
    update channels set
      close_requested_at = coalesce(close_requested_at,
        ${read ? read.readAt : null}::text::timestamptz, now()),
      -- The payer's own close now, whatever the gateway's was: a cooperative close refused
      -- later does not take the mark back (reopen).
      cooperative_close = false, idle_close = false,
      active_stream = null
    from before
    where channel_id = ${bytes(channelId)} and not finalized
      ${read ? sql`and deposit <= ${sql.typed.numeric(read.deposit)}` : sql``}
    returning before.fresh`
  return row ? { fresh: row.fresh as boolean } : undefined
}

/**
 * Takes back a payer's forced close that the chain, read after `read.readAt` (the database's
 * time, `Channels.clock`), shows cancelled: no close requested, the channel open, its deposit
 * above this row's (a top-up the gateway did not hear of, which cleared the request on chain;
 * one it heard of was observed with its time, `Channels.observe`). Only a mark made before the
 * read, and never a cooperative close's. The deposit is raised to the chain's. Whether it did.
 */
export async function closeCancelled(
  sql: Sql,
  channelId: Hex,
  read: { deposit: bigint; readAt: string },
): Promise<boolean> {
  const rows = await sql`
    update channels set close_requested_at = null,
      deposit = ${sql.typed.numeric(read.deposit)}
    where channel_id = ${bytes(channelId)} and not finalized and not cooperative_close
      and close_requested_at < ${read.readAt}::text::timestamptz
      and deposit < ${sql.typed.numeric(read.deposit)}
    returning 1`
  return rows.length > 0
}

/** The last block whose escrow events a settlement pass read (undefined: none yet). */
export async function cursor(
  sql: Sql,
  at: { chainId: number; escrow: Hex },
): Promise<bigint | undefined> {
  const [r] = await sql`
    select block from chain_cursors where chain_id = ${at.chainId} and escrow = ${bytes(at.escrow)}`
  return r ? BigInt(r.block) : undefined
}

/** Records `block` as the last one read (moving back too: a chain reset below it). */
export async function advance(
  sql: Sql,
  at: { chainId: number; escrow: Hex; block: bigint },
): Promise<void> {
  await sql`
    insert into chain_cursors (chain_id, escrow, block)
    values (${at.chainId}, ${bytes(at.escrow)}, ${sql.typed.numeric(at.block)})
    on conflict (chain_id, escrow) do update set block = excluded.block, updated_at = now()`
}

/** The channels of this escrow and payee the database has open (not finalized). */
export async function unfinalized(
  sql: Sql,
  of: { chainId: number; escrow: Hex; payee: Hex },
): Promise<Hex[]> {
  const rows = await sql`
    select channel_id from channels
    where chain_id = ${of.chainId} and escrow = ${bytes(of.escrow)} and payee = ${bytes(of.payee)}
      and not finalized
    order by channel_id`
  return rows.map((r) => hex(r.channel_id))
}

/**
 * Marks a cooperative close under way (as `markCloseRequested`); the mark's time, as text,
 * when the channel was not closing before (undefined when it was, or is unknown). A payer's
 * forced close marked already stays one: its cover is the passes' to settle should this close
 * not go through.
 */
export async function markClosing(sql: Sql, channelId: Hex): Promise<string | undefined> {
  const [row] = await sql`
    with before as (
      select close_requested_at is null as open from channels
      where channel_id = ${bytes(channelId)} for update
    )
    update channels set
      close_requested_at = coalesce(close_requested_at, clock_timestamp()),
      -- Not over a forced close: a cooperative close refused (a voucher below spent, requests
      -- under way past drainMs, the lock busy) or failed left the forced close marked
      -- cooperative, due with no more than spent (the cover is a forced close's alone), and,
      -- its CloseRequested event behind the blocks the passes read again, nothing marked it
      -- forced again: the payer withdrew all it had signed ahead of what it spent.
      cooperative_close = close_requested_at is null or cooperative_close,
      active_stream = null
    from before
    where channel_id = ${bytes(channelId)}
    returning before.open, close_requested_at::text as mark`
  return row?.open ? (row.mark as string) : undefined
}

/** Takes back a mark `markClosing` made, unless the channel was marked since (or closed). */
export async function reopen(sql: Sql, channelId: Hex, mark: string): Promise<void> {
  await sql`
    update channels set close_requested_at = null, cooperative_close = false, idle_close = false
    where channel_id = ${bytes(channelId)} and not finalized and cooperative_close
      and close_requested_at = ${mark}::text::timestamptz`
}

/**
 * Channels to close (Settlement.Store's `idle`): open (no close marked) and not updated for
 * `idleMs` (every voucher, top-up, admission, charge and settle updates the row), with no
 * request under way; and, as `retry`, those whose idle close (`markIdle`) sent a transaction
 * that failed, or that was left pending by a worker that died, and is due again. The longest
 * idle first.
 */
export async function idle(
  sql: Sql,
  q: Settlement.IdleQuery,
): Promise<{ channelId: Hex; retry: boolean }[]> {
  const rows = await sql`
    select c.channel_id, c.idle_close as retry from channels c
    where c.chain_id = ${q.chainId} and c.escrow = ${bytes(q.escrow)} and c.payee = ${bytes(q.payee)}
      and not c.finalized
      and ((c.close_requested_at is null
            and c.updated_at <= now() - make_interval(secs => ${q.idleMs / 1000})
            and not exists (select 1 from reservations r where r.channel_id = c.channel_id))
        or (c.idle_close and (
          select t.status in ('failed', 'pending') and t.next_attempt_at <= now()
          from chain_transactions t
          where t.channel_id = c.channel_id and t.kind = 'close'
          order by t.updated_at desc limit 1)))
    order by c.updated_at
    limit ${q.limit}`
  return rows.map((r) => ({ channelId: hex(r.channel_id), retry: r.retry as boolean }))
}

/**
 * Marks an idle channel closing for the gateway's own close (as `markClosing`, and
 * `idle_close`), if it is still idle as `idle` found it: no close marked, not updated for
 * `idleMs`, no request under way. A request that came since updated the row (its hold), and
 * the row's check is made again on the row as it is once locked, so a channel that came back
 * to life is left alone. The mark (for `reopen`), or undefined when it is not idle any more.
 */
export async function markIdle(
  sql: Sql,
  channelId: Hex,
  idleMs: number,
): Promise<string | undefined> {
  const [row] = await sql`
    update channels c set close_requested_at = clock_timestamp(), cooperative_close = true,
      idle_close = true, active_stream = null
    where c.channel_id = ${bytes(channelId)} and not c.finalized
      and c.close_requested_at is null
      and c.updated_at <= now() - make_interval(secs => ${idleMs / 1000})
      and not exists (select 1 from reservations r where r.channel_id = c.channel_id)
    returning close_requested_at::text as mark`
  return row?.mark as string | undefined
}

/**
 * How many requests on the channel are under way. Reservations whose lease ran out (their
 * instance died) are swept first, charged what they had delivered: a close does not wait for
 * the periodic sweep, and does not close before their charge.
 */
export async function inFlight(sql: Sql, channelId: Hex): Promise<number> {
  const [expired] = await sql`
    select 1 from reservations
    where channel_id = ${bytes(channelId)} and expires_at < clock_timestamp() limit 1`
  if (expired) await Reservations.sweep(sql, bytes(channelId))
  const [r] = await sql`
    select count(*)::int as n from reservations where channel_id = ${bytes(channelId)}`
  return r!.n as number
}

/**
 * The channel's settles and closes that were sent (they have a hash) and whose receipt was not
 * read: pending, failed, or reverted in a simulation, they may have been mined since (see
 * `Settlement.follow`).
 */
export async function unconfirmed(sql: Sql, channelId: Hex): Promise<Settlement.Unconfirmed[]> {
  const rows = await sql`
    select id, kind, cumulative_amount, tx_hash, status from chain_transactions
    where channel_id = ${bytes(channelId)} and kind in ('settle', 'close')
      and not mined and tx_hash is not null
    order by id`
  return rows.map((r) => ({
    id: BigInt(r.id),
    kind: r.kind,
    cumulativeAmount: r.cumulative_amount,
    hash: hex(r.tx_hash),
    status: r.status,
  }))
}

/** What a `chain_transactions` row says was sent: its id, channel, kind, amount and hash. */
const sent = (r: Record<string, unknown>) => ({
  id: BigInt(r.id as string),
  channelId: hex(r.channel_id as Uint8Array),
  kind: r.kind as Settlement.Recorded['kind'],
  cumulativeAmount: r.cumulative_amount as bigint,
  hash: r.tx_hash ? hex(r.tx_hash as Uint8Array) : undefined,
})

/**
 * This escrow's and payee's settles and closes to look up again on chain (Settlement.ts,
 * `recheck`): those confirmed in a block above `above`, and those a reorganization dropped
 * (`dropped`) that are due again. Only rows that carry the voucher they were sent with.
 */
export async function recent(
  sql: Sql,
  i: { chainId: number; escrow: Hex; payee: Hex; above: bigint },
): Promise<Settlement.Rechecked[]> {
  const rows = await sql`
    select t.id, t.channel_id, t.kind, t.cumulative_amount, t.tx_hash, t.signature, t.block,
      t.status
    from chain_transactions t join channels c on c.channel_id = t.channel_id
    where t.kind in ('settle', 'close') and t.signature is not null
      and ((t.status = 'confirmed' and t.block > ${sql.typed.numeric(i.above)})
        or (t.reorganized and t.status in ('failed', 'pending')
          and t.next_attempt_at <= now()))
      and c.chain_id = ${i.chainId} and c.escrow = ${bytes(i.escrow)} and c.payee = ${bytes(i.payee)}
    order by t.id`
  return rows.map((r) => ({
    ...sent(r),
    kind: r.kind,
    signature: hex(r.signature),
    block: r.block === null ? undefined : BigInt(r.block),
    dropped: r.status !== 'confirmed',
  }))
}

/**
 * Records that a confirmed settle or close is no longer on chain (a reorganization dropped
 * it): failed, to be sent again now (`recent` lists it until it is confirmed again).
 */
export async function dropped(sql: Sql, id: bigint): Promise<void> {
  await sql`
    update chain_transactions set status = 'failed', mined = false, block = null,
      reorganized = true, error_name = 'TransactionDroppedError',
      error_message = 'its block was reorganized out of the chain', next_attempt_at = now(),
      updated_at = now()
    where id = ${id} and status = 'confirmed'`
}

/** The confirmed cooperative close of a channel, if any. */
export async function confirmedClose(
  sql: Sql,
  channelId: Hex,
): Promise<{ hash: Hex; cumulativeAmount: bigint } | undefined> {
  const [r] = await sql`
    select tx_hash, cumulative_amount from chain_transactions
    where channel_id = ${bytes(channelId)} and kind = 'close' and status = 'confirmed'`
  return r ? { hash: hex(r.tx_hash), cumulativeAmount: r.cumulative_amount } : undefined
}

/** Transactions recorded for a channel, oldest first. */
export async function transactions(sql: Sql, channelId: Hex): Promise<Settlement.Recorded[]> {
  const rows = await sql`
    select * from chain_transactions where channel_id = ${bytes(channelId)} order by id`
  return rows.map((r) => ({
    ...sent(r),
    status: r.status,
    errorName: r.error_name ?? undefined,
    errorMessage: r.error_message ?? undefined,
    attempts: r.attempts,
    nextAttemptAt: r.next_attempt_at,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
  }))
}

/**
 * Runs `fn` holding the settlement advisory lock, or returns `{ locked: false }` at once
 * when another session holds it. The lock is session-level (it spans chain calls and
 * several statements), so it is taken on a reserved connection, and `fn` gets a store bound
 * to that same connection. Not for a one-connection pool (the embedded PGlite): every other
 * query would wait out the pass, chain calls and receipts included (see `alone`).
 */
export async function withLock<T>(
  sql: Sql,
  fn: (store: Settlement.LockedStore) => Promise<T>,
): Promise<{ locked: true; value: T } | { locked: false }> {
  const reserved = (await sql.reserve()) as unknown as Sql & { release(): void }
  // Each statement within the pool's deadline (Db.answered): one the connection never answers
  // (lost without a reset) is cut, and the connection closed (its session, and the lock, are
  // gone with it), so the pass ends; it waited until TCP gave up, a quarter of an hour, and no
  // pass of this process ran meanwhile.
  const within = <T>(call: PromiseLike<T>) => Db.answered(sql, call)
  const unlock = () =>
    within(reserved`select pg_advisory_unlock(hashtext(current_schema() || '.tollway_settlement'))`)
  const lock = reserved`
    select pg_try_advisory_lock(hashtext(current_schema() || '.tollway_settlement')) as locked`
  let taken: boolean
  try {
    const [r] = await within(lock)
    taken = r!.locked
  } catch (e) {
    // Cut at the deadline, the statement may still take the lock, its answer late (a database
    // slow to answer, not gone): the connection goes back to the pool once that answer is
    // known, the lock let go if it was taken. Released at once, a pooled connection held the
    // lock for good (a session's lock), and no other instance settled again.
    void lock
      .then(([l]) => (l?.locked ? unlock() : undefined))
      .catch(() => {})
      .finally(() => reserved.release())
    throw e
  }
  try {
    if (!taken) return { locked: false }
    try {
      return { locked: true, value: await fn(bounded(locked(reserved), within)) }
    } finally {
      await unlock()
    }
  } finally {
    reserved.release()
  }
}

/** `store` with each call's answer awaited through `within`. */
function bounded(
  store: Settlement.LockedStore,
  within: <T>(call: PromiseLike<T>) => Promise<T>,
): Settlement.LockedStore {
  const calls = store as unknown as Record<string, (...a: unknown[]) => PromiseLike<unknown>>
  return Object.fromEntries(
    Object.entries(calls).map(([name, call]) => [name, (...a: unknown[]) => within(call(...a))]),
  ) as unknown as Settlement.LockedStore
}

function locked(sql: Sql): Settlement.LockedStore {
  return {
    due: (i) => due(sql, i),
    settleable: (channelId) => settleable(sql, channelId),
    begin: (i) => begin(sql, i),
    submitted: (id, hash) => submitted(sql, id, hash),
    finish: (id, o) => finish(sql, id, o),
    settled: (i) => Channels.settled(sql, i),
    confirmedClose: (channelId) => confirmedClose(sql, channelId),
    recent: (i) => recent(sql, i),
    dropped: (id) => dropped(sql, id),
    unconfirmed: (channelId) => unconfirmed(sql, channelId),
    markCloseRequested: (channelId, read) => markCloseRequested(sql, channelId, read),
    closeCancelled: (channelId, read) => closeCancelled(sql, channelId, read),
    clock: () => Channels.clock(sql),
    cursor: (at) => cursor(sql, at),
    advance: (at) => advance(sql, at),
    unfinalized: (of) => unfinalized(sql, of),
  }
}

/** Passes under way, by the handle of a database one process alone uses (see `alone`). */
const passes = new WeakSet<object>()

/**
 * Runs `fn` as `withLock` does, on a database this process alone uses (the embedded PGlite,
 * whose data dir is locked): no other process can settle, so the lock is a flag in memory
 * (one per handle, which the instances of this process sharing the handle share), and `fn`
 * works through the handle itself. Through a reserved connection, its one connection would
 * be held for the whole pass: every request would wait for the chain's answers (a settle's
 * receipt takes a block or more on a real chain).
 */
export async function alone<T>(
  sql: Sql,
  fn: (store: Settlement.LockedStore) => Promise<T>,
): Promise<{ locked: true; value: T } | { locked: false }> {
  if (passes.has(sql)) return { locked: false }
  passes.add(sql)
  try {
    return { locked: true, value: await fn(locked(sql)) }
  } finally {
    passes.delete(sql)
  }
}

/**
 * The store the settlement worker runs on; `alone` when this process alone uses the database
 * (see `alone`).
 */
export function store(sql: Sql, options: { alone?: boolean } = {}): Settlement.Store {
  return {
    withLock: (fn) => (options.alone ? alone(sql, fn) : withLock(sql, fn)),
    markCloseRequested: (channelId, read) => markCloseRequested(sql, channelId, read),
    clock: () => Channels.clock(sql),
    markClosing: (channelId) => markClosing(sql, channelId),
    reopen: (channelId, mark) => reopen(sql, channelId, mark),
    inFlight: (channelId) => inFlight(sql, channelId),
    idle: (q) => idle(sql, q),
    markIdle: (channelId, idleMs) => markIdle(sql, channelId, idleMs),
  }
}
