/** Ledger rows for tests of src/ledger: accounts with a key, channels, and the invariants. */
import { expect } from 'bun:test'
import * as Accounts from '../../src/ledger/Accounts.ts'
import * as ApiKeys from '../../src/ledger/ApiKeys.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Credits from '../../src/ledger/Credits.ts'
import * as Db from '../../src/ledger/Db.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import { forwarder } from './Forwarder.ts'

/**
 * Admits a request of one prompt token by the key `keyHash`, wanting `want` and needing
 * `need` (default `want`); the result with its request id.
 */
export async function admit(
  sql: Db.Sql,
  keyHash: Uint8Array,
  want: bigint,
  o: {
    need?: bigint
    stream?: boolean
    requestId?: string
    idempotency?: Reservations.Idempotency
  } = {},
) {
  const requestId = o.requestId ?? crypto.randomUUID()
  const r = await Reservations.admit(sql, {
    keyHash,
    model: 'm',
    stream: o.stream ?? true,
    minTier: 0,
    promptTokens: 1,
    want,
    need: o.need ?? want,
    idempotencyKey: o.idempotency?.key ?? null,
    fingerprint: o.idempotency?.fingerprint ?? null,
    requestId,
    leaseSeconds: 60,
  })
  return { ...r, requestId }
}

/**
 * Runs ledger items, written as the objects tollway_ledger_many took, through
 * tollway_ledger_batch itself, not through the batcher (which tries Alone.ts first): sent as its
 * items (arrays, see functions/tollway_ledger_batch.sql), its answer (one JSON array) read back
 * as the rows tollway_ledger_many returned, one per item that has an answer, in the items' order, with every column (null
 * where its status has none).
 */
export async function many(sql: Db.Sql, items: Record<string, unknown>[]) {
  const positional = items.map((o) =>
    (o.op === 'admit'
      ? [
          o.op,
          o.keyHash,
          o.model,
          o.stream,
          o.minTier,
          o.promptTokens,
          o.want,
          o.need,
          o.idempotencyKey,
          o.fingerprint,
          o.requestId,
          o.leaseSeconds,
        ]
      : [o.op, o.id, o.cost, o.promptTokens, o.completionTokens, o.status, o.latencyMs, o.ttftMs]
    ).map((x) => x ?? null),
  )
  const [r] = await sql`select tollway_ledger_batch(${sql.json(positional as never)}) as answers`
  const answers = JSON.parse(r!.answers as string) as (unknown[] | null)[]
  expect(answers).toHaveLength(items.length)
  return answers.flatMap((x, idx) => (x === null ? [] : [row(idx, x)]))
}

/** An admission item of the ledger's input (JSON, as objects), by the key `keyHash`. */
/** A finished request's counts (a token each way, answered ok), for charges of any cost. */
export const outcome = {
  promptTokens: 1,
  completionTokens: 1,
  status: 'ok',
  latencyMs: 1,
  ttftMs: 1,
} as const

export const item = (keyHash: Uint8Array) => ({
  op: 'admit',
  keyHash: Buffer.from(keyHash).toString('hex'),
  model: 'm',
  stream: false,
  minTier: 0,
  promptTokens: 1,
  want: '1',
  need: '1',
  idempotencyKey: null,
  fingerprint: null,
  requestId: crypto.randomUUID(),
  leaseSeconds: 60,
})

const big = (x: unknown) => (x === null ? null : BigInt(x as string | number))

/** An entry of tollway_ledger_batch's answer as tollway_ledger_many's row. */
function row(idx: number, x: unknown[]): Record<string, unknown> {
  const r: Record<string, unknown> = {
    idx,
    status: x[0],
    account_id: null,
    key_id: null,
    held: null,
    available: null,
    retry_after_ms: null,
    rate_limit: null,
    rate_remaining: null,
    other_request: null,
    concurrency_room: null,
    charged: null,
    balance: null,
    quota_room: null,
  }
  const keyed = { account_id: x[1], key_id: x[2] }
  switch (x[0]) {
    case 'ok':
      return {
        ...r,
        ...keyed,
        held: big(x[3]),
        available: big(x[4]),
        concurrency_room: x[5],
        quota_room: big(x[6]),
        rate_limit: x[7],
        rate_remaining: x[8],
      }
    case 'finished':
      return { ...r, charged: big(x[1]), balance: big(x[2]) }
    case 'unauthorized':
      return r
    case 'tier':
      return { ...r, ...keyed }
    case 'idempotency_mismatch':
    case 'idempotency_in_progress':
    case 'idempotency_completed':
      return { ...r, ...keyed, other_request: x[3] }
    case 'insufficient':
      return { ...r, ...keyed, available: big(x[3]), rate_limit: x[4], rate_remaining: x[5] }
    default:
      return {
        ...r,
        ...keyed,
        retry_after_ms: big(x[3]),
        rate_limit: x[4],
        rate_remaining: x[5],
      }
  }
}

/** An account on `plan` with `credits` and one key; its id and the key's hash. */
export async function account(sql: Db.Sql, credits: bigint, plan = 'unlimited') {
  const id = await Accounts.create(sql, { name: 'a', plan })
  if (credits > 0n) await Credits.grant(sql, { accountId: id, amount: credits, note: null })
  const key = (await ApiKeys.create(sql, { accountId: id, name: 'k', max: 10 }))!.key
  return { id, keyHash: ApiKeys.hash(key) }
}

let channels = 0
const prefix = crypto.randomUUID().replaceAll('-', '')
const address = (i: number) => `0x${i.toString(16).padStart(40, '0')}` as Channels.Hex

/** A channel the ledger has seen open on chain, with `deposit`. */
export async function channel(sql: Db.Sql, deposit: bigint) {
  const channelId = `0x${prefix}${(++channels).toString(16).padStart(32, '0')}` as Channels.Hex
  return Channels.observe(sql, {
    channelId,
    chainId: 31337,
    escrow: address(1),
    payer: address(2),
    payee: address(3),
    token: address(4),
    signer: address(2),
    deposit,
    settled: 0n,
    finalized: false,
    closeRequested: false,
  })
}

/** A test signature, unique per amount (the ledger stores signatures, it does not check them). */
export const signature = (amount: bigint) =>
  `0x${amount.toString(16).padStart(130, '0')}` as Channels.Hex

/** Accepts a voucher for `amount` on a channel. */
export function voucher(sql: Db.Sql, channelId: Channels.Hex, amount: bigint, minDelta = 1n) {
  return Channels.acceptVoucher(sql, {
    channelId,
    cumulativeAmount: amount,
    signature: signature(amount),
    minDelta,
  })
}

/** Holds between `need` and `want` of a channel for a request (model `m`, a 60 s lease). */
export function hold(
  sql: Db.Sql,
  channelId: Channels.Hex,
  o: {
    want: bigint
    need: bigint
    stream?: boolean
    requestId?: string
    idempotency?: Reservations.Idempotency
  },
) {
  return Channels.admit(sql, {
    channelId,
    model: 'm',
    stream: o.stream ?? false,
    want: o.want,
    need: o.need,
    requestId: o.requestId ?? crypto.randomUUID(),
    leaseSeconds: 60,
    idempotencyKey: o.idempotency?.key ?? null,
    fingerprint: o.idempotency?.fingerprint ?? null,
  })
}

/**
 * A channel's balances, after checking the invariants of DESIGN.md a row can show:
 * settled ≤ spent, spent + reserved ≤ acceptedCumulative ≤ deposit, reserved = the sum of
 * its reservations. Read in one statement, from one snapshot.
 */
export async function channelState(sql: Db.Sql, channelId: Channels.Hex) {
  const id = Buffer.from(channelId.slice(2), 'hex')
  const [h] = await sql`
    select c.settled, c.spent, c.reserved, c.accepted_cumulative, c.deposit,
      (select coalesce(sum(held), 0) from reservations where channel_id = ${id}) as held
    from channels c where channel_id = ${id}`
  const c = {
    settled: h!.settled as bigint,
    spent: h!.spent as bigint,
    reserved: h!.reserved as bigint,
    acceptedCumulative: h!.accepted_cumulative as bigint,
    deposit: h!.deposit as bigint,
  }
  expect(c.settled <= c.spent).toBe(true)
  expect(c.spent + c.reserved <= c.acceptedCumulative).toBe(true)
  expect(c.acceptedCumulative <= c.deposit).toBe(true)
  expect(c.reserved).toBe(h!.held)
  return c
}

/**
 * An account's row, after checking every ledger invariant of DESIGN.md that a row can show:
 * balance = sum of its transactions, reserved = sum of its reservations, one active request
 * per reservation, 0 ≤ reserved ≤ balance. `usage` counts its usage rows, `usage_cost` sums
 * their costs.
 */
export async function accountState(sql: Db.Sql, accountId: string) {
  const [r] = await sql`
    select a.balance, a.reserved, a.active_requests, a.month_tokens,
      coalesce((select sum(prompt_tokens + completion_tokens) from usage
                where account_id = a.id), 0)::bigint as usage_tokens,
      coalesce((select sum(amount) from credit_transactions where account_id = a.id), 0) as sum,
      coalesce((select sum(held) from reservations where account_id = a.id), 0) as held,
      (select count(*)::int from reservations where account_id = a.id) as open,
      (select count(*)::int from usage where account_id = a.id) as usage,
      coalesce((select sum(cost) from usage where account_id = a.id), 0) as usage_cost
    from accounts a where id = ${accountId}`
  expect(r!.balance).toBe(r!.sum)
  expect(r!.reserved).toBe(r!.held)
  expect(r!.active_requests).toBe(r!.open)
  expect(r!.reserved >= 0n).toBe(true)
  expect(r!.balance >= r!.reserved).toBe(true)
  return r as {
    balance: bigint
    reserved: bigint
    active_requests: number
    sum: bigint
    held: bigint
    open: number
    usage: number
    usage_cost: bigint
    /** The plan's count of the month's tokens, and the tokens of the account's usage rows. */
    month_tokens: bigint
    usage_tokens: bigint
  }
}

/**
 * A pool of `max` connections on the test's schema, reached through a forwarder the test
 * stalls and cuts (test/helpers/Forwarder.ts), with the gateway's database deadline (so that
 * an admission failing out of reach is released, as Db.answered does). Needs DATABASE_URL.
 */
export async function linked(schema: string, max: number) {
  const link = await forwarder(new URL(process.env.DATABASE_URL!))
  const pool = Db.connect({ url: link.url, schema, max })
  Db.deadline(pool, 10_000)
  return { link, pool }
}

/**
 * Rows held locked, each by a transaction of its own (`lock` runs in it, the i-th), until
 * `free(i)` commits it; `end` rolls back what is still held and gives the connections back.
 */
export async function locked(sql: Db.Sql, locks: ((tx: Db.Sql) => Promise<unknown>)[]) {
  const held = await Promise.all(locks.map(() => sql.reserve()))
  for (const [i, tx] of held.entries()) {
    await tx`begin`
    await locks[i]!(tx as unknown as Db.Sql)
  }
  return {
    free: (i: number) => held[i]!`commit`,
    async end() {
      for (const tx of held) {
        await tx`rollback`.catch(() => {})
        tx.release()
      }
    },
  }
}

/**
 * Resolves once a session of this database waits on a lock in a statement whose text has
 * `text` (any statement without it); about 5 s at most, then it resolves all the same (the
 * test's own checks tell).
 */
export async function waitingOnLock(sql: Db.Sql, text = '') {
  for (let i = 0; i < 500; i++) {
    const [w] = await sql`
      select count(*)::int as n from pg_stat_activity
      where datname = current_database() and wait_event_type = 'Lock'
        and query like ${`%${text}%`} and pid <> pg_backend_pid()`
    if (w!.n > 0) return
    await Bun.sleep(10)
  }
}

/**
 * Runs `sweep` while `renewal` (a lease renewal `locked` holds uncommitted) is under way: once
 * the sweep is done or waits on a lock (in a statement with `text`), the renewal commits. The
 * number the sweep released; the renewal ended either way.
 */
export async function sweepDuring(
  sql: Db.Sql,
  renewal: Awaited<ReturnType<typeof locked>>,
  sweep: () => Promise<number>,
  text?: string,
) {
  try {
    const swept = sweep()
    await Promise.race([swept, waitingOnLock(sql, text)])
    await renewal.free(0)
    return await swept
  } finally {
    await renewal.end()
  }
}

/** Reservation `id`'s lease: what it recorded delivered, and whether it is live. */
export async function lease(sql: Db.Sql, id: string) {
  const [r] = await sql`
    select delivered, expires_at > now() as live from reservations where id = ${id}`
  return r
}

/**
 * Cuts the link under a batch of admissions whose answer it holds (committed, answer lost) and
 * mends it; each must fail out of reach, not run again into its own request id.
 */
export async function loseAnswer(
  link: Awaited<ReturnType<typeof forwarder>>,
  batch: Promise<unknown>[],
) {
  await link.cut()
  await link.mend()
  const failed = await Promise.all(batch)
  expect(failed.every((e) => Db.isUnreachable(e))).toBe(true)
}
