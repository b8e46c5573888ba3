/**
 * Admission and reservations for API-key requests: the SQL functions of
 * migrations/0001_ledger.sql; admissions and finishes are batched under load (Batch.ts).
 */

import type { Hex } from 'viem'
import { DatabaseUnavailableError } from '../Errors.ts'
import * as Alone from './Alone.ts'
import * as Batch from './Batch.ts'
import { inOrder } from './Batch.ts'
import * as Channels from './Channels.ts'
import { CHANNEL_BATCHES } from './Channels.ts'
import type { Sql } from './Db.ts'
import * as Db from './Db.ts'
import type { Waker } from './Waker.ts'

export type AdmitInput = {
  keyHash: Uint8Array
  model: string
  stream: boolean
  minTier: number
  promptTokens: number
  /** Credits wanted for the request (prompt + output estimate). */
  want: bigint
  /** Least credits that admit it; as much of `want` as is free is held. */
  need: bigint
  idempotencyKey: string | null
  /** SHA-256 of the request body; only needed with an idempotency key. */
  fingerprint: Uint8Array | null
  requestId: string
  leaseSeconds: number
}

/** A request's Idempotency-Key, with the SHA-256 of its body. */
export type Idempotency = { key: string; fingerprint: Uint8Array }

export type Admitted = {
  status: 'ok'
  accountId: string
  keyId: string
  held: bigint
  /** What the account has free after this request's hold. */
  available: bigint
  /** How many more requests at once the plan allows besides this one (null: no limit). */
  concurrencyRoom: number | null
  /** Tokens the plan's monthly quota has left after this request's prompt (null: no quota). */
  quotaRoom: number | null
  rateLimit: number | null
  rateRemaining: number | null
}

export type Refused =
  | { status: 'unauthorized' }
  | { status: 'tier'; accountId: string }
  /** The prompt alone is more than the plan's whole monthly token quota: it can never fit. */
  | { status: 'prompt_over_quota'; tokensPerMonth: number }
  | {
      status: 'idempotency_mismatch' | 'idempotency_in_progress' | 'idempotency_completed'
      otherRequest: string
    }
  | {
      status: 'concurrency' | 'rate' | 'quota' | 'wallet'
      retryAfterMs: number
      rateLimit: number | null
      rateRemaining: number | null
      /** The plan's monthly token quota (null: none): a prompt over it whole is refused
       * first, as `prompt_over_quota` (see routes/Chat.ts, limitedUntil). */
      tokensPerMonth: number | null
    }
  | {
      status: 'insufficient'
      available: bigint
      rateLimit: number | null
      rateRemaining: number | null
    }

/**
 * Authenticates, checks the plan and reserves credits, atomically. An admission its request
 * never learnt the outcome of (the database answered after the request gave up on it, see
 * Db.answered, or the answer was lost with the connection) is released, charged nothing.
 */
export function admit(sql: Sql, i: AdmitInput): Promise<Admitted | Refused> {
  return unlessUnanswered(
    sql,
    (gone) => ledger(sql).run({ op: 'admit', ...i }, gone) as Promise<Admitted | Refused>,
    () => unanswered(sql, i.requestId, i.leaseSeconds),
  )
}

/** Holds a channel's balance for a request (Channels.admit); released as `admit`'s are. */
export function admitOnChannel(sql: Sql, i: Channels.AdmitInput): Promise<Channels.Admission> {
  return unlessUnanswered(
    sql,
    (gone) => Channels.admit(sql, i, gone),
    () => unanswered(sql, i.requestId, i.leaseSeconds, i.channelId),
  )
}

/** `admission` within the database deadline; `release` when its outcome is not known. */
function unlessUnanswered<T extends { status: string }>(
  sql: Sql,
  admission: (gone: () => boolean) => Promise<T>,
  release: () => unknown,
): Promise<T> {
  return Db.answered(
    sql,
    admission,
    (r) => (r.status === 'ok' ? release() : undefined),
    // Out of reach mid-statement: it may have committed. (One past its deadline is released
    // when, and if, its answer comes.)
    (e) => (outOfReach(e) ? release() : undefined),
  )
}

/** Releases the hold of an admission its request never learnt of: nothing charged. */
function unanswered(sql: Sql, id: string, leaseSeconds: number, channelId?: string) {
  const f = {
    id,
    cost: 0n,
    promptTokens: 0,
    completionTokens: 0,
    status: 'database_unavailable',
    latencyMs: null,
    ttftMs: null,
  }
  const release = () => finish(sql, f, { channelId, idempotent: true, waited: false })
  // Tried until the database answers again, as a charge is (the lease sweep is the last resort).
  // A stop does not wait for it: it charges nothing, and once this instance's heartbeat
  // stops, another's sweep releases it within the threshold (Instances.ts).
  return release()
    .catch((e: unknown) => (outOfReach(e) ? persist(release, leaseSeconds, false) : undefined))
    .catch(() => {})
}

function finished(row: Record<string, unknown>): Finished {
  const base = { charged: row.charged as bigint }
  return row.accepted_cumulative == null
    ? base
    : {
        ...base,
        channel: {
          acceptedCumulative: row.accepted_cumulative as bigint,
          spent: row.spent as bigint,
        },
      }
}

/**
 * An entry of tollway_ledger_batch's answer (functions/tollway_ledger_batch.sql): the status,
 * then its fields by position; money as a string of digits, so JSON.parse loses nothing.
 */
type Answer =
  | [
      'ok',
      string,
      string,
      string,
      string,
      number | null,
      number | null,
      number | null,
      number | null,
    ]
  | ['finished', string, string]
  | ['unauthorized']
  | ['tier', string, string]
  // A prompt over the plan's whole monthly quota: a plan refusal to earlier releases (see the
  // function's notes on rolling deploys), marked by its trailing status.
  | ['tier', string, string, number, 'prompt_over_quota']
  | [
      'idempotency_mismatch' | 'idempotency_in_progress' | 'idempotency_completed',
      string,
      string,
      string,
    ]
  | [
      'concurrency' | 'rate' | 'quota' | 'wallet',
      string,
      string,
      number,
      number | null,
      number | null,
      number | null,
    ]
  | ['insufficient', string, string, string, number | null, number | null]

/** An item's answer from its entry in tollway_ledger_batch's answer. */
function answer(x: Answer): Admitted | Refused | Finished {
  switch (x[0]) {
    case 'ok':
      return {
        status: 'ok',
        accountId: x[1],
        keyId: x[2],
        held: BigInt(x[3]),
        available: BigInt(x[4]),
        concurrencyRoom: x[5],
        quotaRoom: x[6],
        rateLimit: x[7],
        rateRemaining: x[8],
      }
    case 'finished':
      return { charged: BigInt(x[1]) }
    case 'unauthorized':
      return { status: 'unauthorized' }
    case 'tier':
      if (x.length === 5 && x[4] === 'prompt_over_quota')
        return { status: 'prompt_over_quota', tokensPerMonth: x[3] }
      return { status: 'tier', accountId: x[1] }
    case 'insufficient':
      return {
        status: 'insufficient',
        available: BigInt(x[3]),
        rateLimit: x[4],
        rateRemaining: x[5],
      }
    case 'concurrency':
    case 'rate':
    case 'quota':
    case 'wallet':
      return {
        status: x[0],
        retryAfterMs: x[3],
        rateLimit: x[4],
        rateRemaining: x[5],
        tokensPerMonth: x[6],
      }
    default:
      return { status: x[0], otherRequest: x[3] }
  }
}

/**
 * Adds `amount` to a reservation and renews its lease; the new total, undefined if the
 * payer cannot cover it, or 'superseded' for a channel stream another stream replaced.
 * `delivered`, the cost of what the request has sent so far, is recorded either way: it is
 * what the sweep charges should the instance die.
 */
export async function extend(
  sql: Sql,
  input: {
    id: string
    amount: bigint
    leaseSeconds: number
    delivered?: bigint | undefined
    /** The tokens `delivered` is the cost of, counted against the plan if the sweep takes it. */
    tokens?: { prompt: number; completion: number } | undefined
    /** The hold the caller knows: an extension is applied to it only (a retry of one that went
     * through finds the hold moved and answers it as it is). */
    from: bigint
  },
): Promise<bigint | undefined | 'superseded'> {
  const delivered = input.delivered === undefined ? null : sql.typed.numeric(input.delivered)
  const [row] = await Db.answered(
    sql,
    sql`
    select tollway_extend(${input.id}, ${sql.typed.numeric(input.amount)}, ${input.leaseSeconds},
      ${delivered}, ${sql.typed.numeric(input.from)}, ${input.tokens?.prompt ?? null}::int,
      ${input.tokens?.completion ?? null}::int) as held`,
  )
  const held = row?.held ?? undefined
  return held === -1n ? 'superseded' : held
}

export type Finish = {
  id: string
  cost: bigint
  promptTokens: number
  completionTokens: number
  status: string
  /** Null for a request nobody finished (swept). */
  latencyMs: number | null
  ttftMs: number | null
}

/**
 * Charges the request (never beyond what the account can pay), releases the rest of its
 * reservation and writes the usage row. Undefined if the reservation was already finished.
 */
export function finish(
  sql: Sql,
  f: Finish,
  o: {
    /** The channel that pays (a channel's request); none: an account. */
    channelId?: string | undefined
    /**
     * The request has an Idempotency-Key: its finish marks the key completed (a lone finish
     * without one leaves the key table untouched, for PostgreSQL a tenth less work).
     */
    idempotent?: boolean | undefined
    /**
     * Someone waits for it (a stream's end, a whole completion's answer): it gives up after
     * the database deadline (Db.answered), to be tried again. A charge nobody waits for runs
     * until the database answers (a stop waits for it no longer than the deadline).
     */
    waited?: boolean | undefined
  } = {},
): Promise<Finished | undefined> {
  // At once, whether or not anyone waits: on an idle ledger as a lone statement (Alone.ts),
  // done before the payer's next request comes, rather than riding in that request's
  // admission (which cost that admission a batch call: 0.2-0.3 ms at p50, one connection).
  const run = (
    o.channelId !== undefined
      ? channelFinishes(sql).run(f)
      : ledger(sql).run({ op: 'finish', ...f, idempotent: o.idempotent ?? false })
  ) as Promise<Finished | undefined>
  return o.waited === false ? run : Db.answered(sql, run)
}

type Finished = {
  charged: bigint
  /** A channel's state after the charge (for the request's receipt); accounts have none. */
  channel?: { acceptedCumulative: bigint; spent: bigint }
}

type Op = ({ op: 'admit' } & AdmitInput) | ({ op: 'finish'; idempotent?: boolean } & Finish)
type OpResult = Admitted | Refused | Finished | undefined

/** Runs ledger items in one statement (tollway_ledger_batch); results in the items' order. */
async function many(sql: Sql, items: Op[]): Promise<OpResult[]> {
  // Fields by position (functions/tollway_ledger_batch.sql): objects' keys were most of what
  // PostgreSQL parsed.
  const json = items.map((o) =>
    o.op === 'admit'
      ? [
          'admit',
          Buffer.from(o.keyHash).toString('hex'),
          o.model,
          o.stream,
          o.minTier,
          o.promptTokens,
          o.want.toString(),
          o.need.toString(),
          o.idempotencyKey,
          o.fingerprint ? Buffer.from(o.fingerprint).toString('hex') : null,
          o.requestId,
          o.leaseSeconds,
        ]
      : [
          'finish',
          o.id,
          o.cost.toString(),
          o.promptTokens,
          o.completionTokens,
          o.status,
          o.latencyMs,
          o.ttftMs,
        ],
  )
  // One text for the whole batch (a JSON array, an entry per item): postgres.js decoding a row
  // of 14 columns per item cost more than the rest of the batch's work here.
  const [row] = await sql`select tollway_ledger_batch(${sql.json(json)}) as answers`
  const answers = JSON.parse(row!.answers as string) as (Answer | null)[]
  if (answers.length !== items.length)
    throw new Error(`tollway_ledger_batch answered ${answers.length} of ${items.length} items`)
  return answers.map((x, i) => {
    if (x !== null) return answer(x)
    if (items[i]!.op === 'finish') return undefined // already finished
    throw new Error(`admission ${i} returned no answer`)
  })
}

/**
 * The instance's API-key ledger: admissions and finishes in one ordered stream, batched under
 * load. A finish queued before an admission runs before it, so a request finished in the
 * background is never counted against the payer's next one (credits, concurrency, quota).
 * The stream's statements go down one connection (Db.ordered), where PostgreSQL runs them in
 * the order sent, so a call need not wait for the answer of a lone one before it: it goes at
 * once, behind it (at one connection, the next admission no longer waits for the previous
 * finish's answer to come back). Behind a batch of more, calls wait for it, to go together.
 * When a lone call falls back to the batch statement (Alone.ts declined it), a call sent
 * behind its first statement runs before that fallback. So a lone finish declines only what
 * is rare (a cost the account cannot pay in full, a race with an extension or a change of
 * plan), and such a finish is done just after the call sent behind it: a request answered in
 * the background (its plan with room to spare, see Chat.ts) then counts a moment longer, as it
 * does for another instance. A finish with an Idempotency-Key is not declined: the retry sent
 * the moment its request was answered finds it completed.
 */
function ledger(sql: Sql) {
  return Batch.of<Op, OpResult>(sql, 'ledger', () => ({
    // The client of each call: one that stopped answering is replaced (Db.onOrdered).
    many: (items) => Db.onOrdered(sql, (one) => many(one, items)),
    one: (item) =>
      Db.onOrdered(sql, async (one) => (await alone(one, item)) ?? (await many(one, [item]))[0]),
    inFlight: 2,
    behindAtMost: 1,
    // A batch whose connection failed may have committed (its answer lost): an admission run
    // again would fail on its own request id, its first hold left until its lease ran out.
    // It fails with the connection's error (a 503), and its hold, if any, is released
    // (`admit`). A finish is safe to run again (it takes its reservation with it).
    again: (item, e) => item.op === 'finish' || !outOfReach(e),
  }))
}

/**
 * An item alone, as one plain statement (Alone.ts); undefined when declined. An admission
 * Alone.ts would decline, known beforehand, is declined without a statement.
 */
async function alone(sql: Sql, item: Op): Promise<OpResult> {
  if (item.op === 'finish') return Alone.finish(sql, item, item.idempotent)
  if (item.idempotencyKey !== null) return undefined
  const row = await Alone.admit(sql, item)
  return (
    row && {
      status: 'ok',
      accountId: row.account_id,
      keyId: row.key_id,
      held: row.held,
      available: row.available,
      concurrencyRoom: row.concurrency_room ?? null,
      quotaRoom: row.quota_room == null ? null : Number(row.quota_room),
      rateLimit: row.rate_limit,
      rateRemaining: row.rate_remaining,
    }
  )
}

/**
 * Resolves once the API-key ledger calls queued so far on this instance have run: a read of
 * an account (its balance, transactions, usage) waits for it to see the instance's own
 * writes, and only for it: channel batches, stuck or slow, hold up no account.
 */
export function accountsSettled(sql: Sql): Promise<void> {
  return Batch.settled(sql, 'ledger')
}

/** Charges channel requests in one statement (tollway_channel_finish_many). */
async function chargeChannels(sql: Sql, items: Finish[]): Promise<(Finished | undefined)[]> {
  const json = items.map((f) => ({ ...f, cost: f.cost.toString() }))
  const rows = await sql`select * from tollway_channel_finish_many(${sql.json(json)})`
  return inOrder<Finished | undefined>(rows, items.length, finished, () => undefined)
}

/**
 * Channel charges, batched apart from the API-key stream and several batches at once: a
 * channel request's answer waits for its charge (a durable commit), and no order between
 * channels matters. One statement charges a batch (tollway_channel_finish_many, which locks
 * its channels in id order, as channel admissions and vouchers do, so batches under way
 * together cannot deadlock).
 */
function channelFinishes(sql: Sql) {
  return Batch.of<Finish, Finished | undefined>(sql, 'channelFinish', () => ({
    many: (items) => chargeChannels(sql, items),
    inFlight: CHANNEL_BATCHES,
  }))
}

/**
 * Releases every reservation at once, as `sweep` releases expired ones (each charged what it
 * had delivered). Only for a database one gateway alone uses (the embedded one, whose data
 * dir is locked), at its start: every request it finds under way is of a process that died,
 * and holding its credits (or keeping a channel's close waiting) for a lease is pointless.
 */
export async function releaseAll(sql: Sql): Promise<number> {
  await sql`update reservations set expires_at = clock_timestamp() - interval '1 second'`
  let released = 0
  for (let n = await sweep(sql); n > 0; n = await sweep(sql)) released += n
  return released
}

/**
 * Releases reservations whose lease ran out, or whose instance is dead (`dead`, names from
 * Instances.dead), charging what each had delivered by its last extend (the block in
 * flight is lost, nothing more) and counting the tokens that was (its prompt and the output
 * sent) against the plan; a usage row records them as `abandoned`; only those of
 * `channelId` when given. Returns how many were released (at most 100 a call).
 *
 * A reservation is released only if it is still expired (or its instance's) once locked: its
 * instance may be renewing its lease meanwhile (the request is alive, tollway_extend), or have
 * just done so. Released then, the live request would lose its hold (its charge, capped at
 * what its payer has free by then, could fall short; a channel's stream would go on sending
 * without `spent` covering it) and be charged what it had recorded before the renewal.
 */
export async function sweep(
  sql: Sql,
  channelId?: Uint8Array,
  dead: readonly string[] = [],
): Promise<number> {
  // Read first without locks (a sweep mostly finds none, in one statement).
  const found = await sql`
    select id, channel_id is not null as channel from reservations
    where ${gone(sql, dead)} ${channelId ? sql`and channel_id = ${channelId}` : sql``}
    limit 100`
  const ids = (channel: boolean) => found.filter((r) => r.channel === channel).map((r) => r.id)
  const released = await Promise.all([
    release(sql, ids(false), dead, (tx, fs) =>
      many(
        tx,
        fs.map((f) => ({ op: 'finish', ...f })),
      ),
    ),
    release(sql, ids(true), dead, chargeChannels),
  ])
  return released[0] + released[1]
}

/** A reservation's lease ran out, or its instance is one of `dead` (a condition of `sweep`). */
const gone = (sql: Sql, dead: readonly string[]) =>
  sql`(expires_at < clock_timestamp()
    ${dead.length > 0 ? sql`or instance = any(${dead as string[]})` : sql``})`

/**
 * Finishes as abandoned those of reservations `ids` still `gone` once locked, in one
 * transaction (see `sweep`), through `charge` (the batch function of their payers); how many.
 * A reservation its instance is extending (locked) is skipped, as is one it renewed since the
 * sweep read it (PostgreSQL checks the condition again on the row as it is once locked). The
 * reservations are locked before their payers, as every batch and extension locks them (no
 * deadlock), and a batch finishing one of them waits for the sweep, then finds it gone. Accounts'
 * reservations and channels' go in transactions apart: an account charge does not wait for a
 * durable commit (tollway_ledger_batch turns synchronous_commit off for its transaction), a
 * channel's does.
 */
async function release(
  sql: Sql,
  ids: string[],
  dead: readonly string[],
  charge: (tx: Sql, items: Finish[]) => Promise<(Finished | Admitted | Refused | undefined)[]>,
): Promise<number> {
  if (ids.length === 0) return 0
  return await sql.begin(async (t) => {
    const tx = t as unknown as Sql
    const locked = await tx`
      select id, delivered, delivered_prompt_tokens, delivered_completion_tokens
      from reservations where id = any(${ids}::uuid[]) and ${gone(tx, dead)}
      for update skip locked`
    if (locked.length === 0) return 0
    const done = await charge(
      tx,
      locked.map((r) => ({
        id: r.id,
        cost: r.delivered,
        // The tokens that cost is of: counted against an account's plan (its month, its token
        // wallet) as a finish counts them, or a request whose instance died would use up neither.
        promptTokens: r.delivered_prompt_tokens,
        completionTokens: r.delivered_completion_tokens,
        status: 'abandoned',
        latencyMs: null,
        ttftMs: null,
      })),
    )
    return done.filter((r) => r !== undefined).length
  })
}

/**
 * Whether PostgreSQL vacuums on its own: an autovacuum launcher runs. None does on a server
 * with `autovacuum = off`, nor in the embedded PGlite (one process, no background workers),
 * whatever its `autovacuum` setting says.
 */
export async function autovacuumRuns(sql: Sql): Promise<boolean> {
  const [row] = await sql`
    select exists (select 1 from pg_stat_activity where backend_type = 'autovacuum launcher') as runs`
  return row!.runs as boolean
}

/**
 * Vacuums `reservations` and `channels` when nothing else will (see `autovacuumRuns`); whether
 * it did. Every request writes a reservation and deletes it: unvacuumed, the table grows by its
 * rows' size a request without end (about 160 bytes; 20 MB after 100,000 requests with none
 * under way), and the lease sweep reads all of it each time (it has no index on the lease's
 * end: 0014). Every channel request's charge moves its channel's `spent`, a column of the
 * `channels_unsettled` index's predicate, so no such update is HOT: each leaves a dead row
 * version that only a vacuum frees (about 27 bytes a request, without end). Vacuumed, their
 * pages are used again. Another instance vacuuming one meanwhile is left to it (SKIP_LOCKED),
 * and a role that does not own a table is skipped with a notice, not an error.
 */
export async function vacuum(sql: Sql): Promise<boolean> {
  if (await autovacuumRuns(sql)) return false
  await sql`vacuum (skip_locked) reservations, channels`
  return true
}

/**
 * Runs `f`, and again after each delay while it fails: a charge written after its answer
 * must not be lost to one transient error (a dropped connection, a deadlock). A finish runs
 * at most once (its reservation goes with it), so a retry never charges twice.
 */
async function retrying<T>(f: () => Promise<T>, delaysMs = [100, 1_000, 5_000]): Promise<T> {
  for (const ms of delaysMs) {
    try {
      return await f()
    } catch (e) {
      // Past the database deadline: a retry would queue behind the call still waiting there,
      // and hold its caller a deadline more each time.
      if (e instanceof Db.DatabaseTimeoutError) throw e
      await Bun.sleep(ms)
    }
  }
  return f()
}

/**
 * Charges still being tried after their first tries failed (the database out of reach for
 * longer than those took): the instance's stop waits for them (`drained`).
 */
const persisting = new Set<Promise<unknown>>()

/**
 * Keeps trying `f` in the background, each wait longer (up to 10 s), while the reservation's
 * lease has time left: a charge of a delivered answer that fails for longer than its first
 * tries (a database restarting, a failover) is written when the database is back, not left to
 * the sweep, which charges only what the last extension recorded. Stops a fifth of the lease
 * short of its end, leaving the rest to the sweep. A retry never charges twice (the charge
 * takes the reservation with it).
 */
function persist<T>(f: () => Promise<T>, leaseSeconds: number, awaitedAtStop = true): Promise<T> {
  const until = Date.now() + leaseSeconds * 800
  const run = (async () => {
    for (let wait = 500; ; wait = Math.min(wait * 2, 10_000)) {
      await Bun.sleep(Math.min(wait, Math.max(0, until - Date.now())))
      try {
        return await f()
      } catch (e) {
        if (Date.now() >= until || !outOfReach(e)) throw e
      }
    }
  })()
  if (!awaitedAtStop) return run
  persisting.add(run)
  run.then(
    () => persisting.delete(run),
    () => persisting.delete(run),
  )
  return run
}

/**
 * Whether a charge failed for the database being out of reach, and may go through later: not
 * an error of the charge itself, nor this instance's own connections closed (it is stopping).
 */
const outOfReach = (e: unknown) =>
  (e as { code?: unknown } | null)?.code !== 'CONNECTION_ENDED' && Db.isUnreachable(e)

/** Waits (at most `ms`) for the charges still being tried (see `persist`). */
export async function drained(ms: number): Promise<void> {
  if (persisting.size === 0) return
  await Promise.race([Promise.allSettled([...persisting]), Bun.sleep(ms)])
}

/**
 * The rest of a request's charge when a sweep released its reservation before the request's
 * own charge came: its instance was taken for dead (its heartbeat stopped, Instances.ts) or
 * its lease ran out while the database was out of its reach, and the sweep charged what the
 * reservation had recorded as delivered (a usage row `abandoned`, with the tokens it counted).
 * The difference up to `o.cost` is charged as far as the payer has it free (an account: its
 * balance over what it holds; a channel: its authorized balance over what it spent and holds),
 * an account's plan counts the request's tokens as a finish does (its month's quota, its token
 * wallet) less those the sweep counted,
 * and the usage row becomes the request's own. Any other row (the request already charged) is
 * left as it is.
 */
async function chargeRest(
  sql: Sql,
  id: string,
  o: Omit<Finish, 'id'>,
  key?: Idempotency | null,
): Promise<void> {
  await sql.begin(async (tx) => {
    const [u] = await tx`
      select account_id, channel_id, cost, status, prompt_tokens, completion_tokens
      from usage where id = ${id} for update`
    if (u?.status !== 'abandoned') return
    let more = o.cost > (u.cost as bigint) ? o.cost - (u.cost as bigint) : 0n
    // As far as the payer has it free (an account: its balance over what it holds; a channel:
    // its authorized balance over what it spent and holds). Its row is locked before its keys
    // are touched, in the order every batch takes them (no deadlock with an admission).
    const [payer] = u.account_id
      ? await tx`select balance - reserved as free from accounts where id = ${u.account_id} for update`
      : await tx`
          select accepted_cumulative - spent - reserved as free from channels
          where channel_id = ${u.channel_id} for update`
    const free = payer!.free as bigint
    if (free < more) more = free > 0n ? free : 0n
    // Its Idempotency-Key, which the release freed if it charged nothing, is taken back as a
    // charge in time marks it (completed: something charged, or delivered whole), unless a
    // retry has it now: that retry is the request the payer pays for, and this one charges
    // nothing more (nothing is charged twice for one request; the gateway, which took this
    // one's instance for dead, bears its cost). Its usage row stays abandoned.
    if (key && (o.status === 'ok' || (u.cost as bigint) + more > 0n)) {
      // An account's keys, or a channel's: the same shape.
      const [table, owner] = u.account_id
        ? ['idempotency_keys', 'account_id']
        : ['channel_idempotency_keys', 'channel_id']
      const taken = await tx`
        insert into ${tx(table)} as k (${tx(owner)}, key, fingerprint, request_id, state)
        values (${u.account_id ?? u.channel_id}, ${key.key}, ${key.fingerprint}, ${id}, 'completed')
        on conflict (${tx(owner)}, key) do update set state = 'completed'
          where k.request_id = excluded.request_id
        returning 1`
      if (taken.length === 0) return
    }
    if (u.account_id) {
      if (more > 0n)
        await tx`
          insert into credit_transactions (account_id, amount, kind, note, request_id)
          values (${u.account_id}, ${tx.typed.numeric(-more)}, 'usage',
                  'the rest of a request charged after its hold was released', ${id})`
      // The sweep counted those it charged for (its usage row's): the rest, not all again.
      const tokens = Math.max(
        0,
        Alone.countedTokens(o) -
          Alone.countedTokens({
            cost: u.cost as bigint,
            status: u.status as string,
            promptTokens: u.prompt_tokens as number,
            completionTokens: u.completion_tokens as number,
          }),
      )
      await tx`
        update accounts ac set balance = ac.balance - ${tx.typed.numeric(more)},
          month_tokens = case when ac.month_start < m.this_month then 0 else ac.month_tokens end
            + ${tokens},
          month_start = m.this_month,
          wallet_tokens = case when pl.wallet_floor is null then null else greatest(0,
            least(pl.wallet_cap::double precision, coalesce(ac.wallet_tokens, pl.wallet_cap)
              + coalesce(extract(epoch from m.ts - ac.wallet_at), 0) / 86400.0
                * pl.wallet_refill_per_day) - ${tokens}) end,
          wallet_at = case when pl.wallet_floor is null then null else m.ts end
        from plans pl, (select clock_timestamp() as ts,
            date_trunc('month', clock_timestamp() at time zone 'UTC')::date as this_month) m
        where ac.id = ${u.account_id} and pl.name = ac.plan`
    } else if (more > 0n)
      await tx`
        update channels set spent = spent + ${tx.typed.numeric(more)}, updated_at = now()
        where channel_id = ${u.channel_id}`
    await tx`
      update usage set cost = cost + ${tx.typed.numeric(more)}, status = ${o.status},
        prompt_tokens = ${o.promptTokens}, completion_tokens = ${o.completionTokens},
        latency_ms = ${o.latencyMs}, ttft_ms = ${o.ttftMs}
      where id = ${id}`
  })
}

/** What a finished request was charged, from its usage row, and its channel as it is now. */
async function charged(sql: Sql, id: string, channelId?: string): Promise<Finished | undefined> {
  const [u] = await sql`select cost from usage where id = ${id}`
  if (!u) return undefined
  const c = channelId === undefined ? undefined : await Channels.get(sql, channelId as Hex)
  return {
    charged: u.cost as bigint,
    ...(c ? { channel: { acceptedCumulative: c.acceptedCumulative, spent: c.spent } } : {}),
  }
}

/**
 * A live reservation of credits (the metering layer's `Reservation`): extends and settles
 * through the functions above. `settle` runs at most once.
 */
export function reservation(
  sql: Sql,
  input: {
    id: string
    held: bigint
    leaseSeconds: number
    settleInBackground?: boolean
    /** The request's Idempotency-Key, if it has one. */
    idempotency?: Idempotency | null
    /**
     * The channel that pays, for a channel's reservation: its charge goes through the channel
     * batches. (Without it, the API-key ledger refuses the charge: it charges accounts only.)
     */
    channelId?: string
  },
) {
  let held = input.held
  let superseded = false
  let settled: Promise<{ charged: bigint }> | undefined
  let after: Finished['channel']
  let outcome: Omit<Finish, 'id'> | undefined
  return {
    id: input.id,
    get held() {
      return held
    },
    /** A channel's state as its settle left it (undefined before, and for accounts). */
    get settledChannel() {
      return after
    },
    /** What the request was settled with (its token counts): undefined before. */
    get settledOutcome() {
      return outcome
    },
    /** Finishes go through the instance's ordered ledger stream (see `ledger`), before any
     * later admission on this instance: the caller says when not waiting for them is safe. */
    settleInBackground: input.settleInBackground ?? false,
    /** A newer stream on the same channel took over: this one must end. */
    get superseded() {
      return superseded
    },
    /** Marks it superseded (the newer stream was announced), before any extension shows it. */
    supersede() {
      superseded = true
    },
    /** `delivered`: what the request sent so far, its cost and its tokens (the sweep's). */
    async extend(
      amount: bigint,
      delivered?: { cost: bigint; promptTokens: number; completionTokens: number },
    ): Promise<boolean> {
      // One transient error must not end a stream the payer can pay for. Tried again, one
      // that had gone through (its answer lost) is found applied, not applied twice.
      const from = held
      const total = await retrying(
        () =>
          extend(sql, {
            id: input.id,
            amount,
            leaseSeconds: input.leaseSeconds,
            delivered: delivered?.cost,
            tokens: delivered && {
              prompt: delivered.promptTokens,
              completion: delivered.completionTokens,
            },
            from,
          }),
        [50, 250],
      ).catch((e: unknown) => {
        // The stream ends with an error event that says why (not "the gateway failed").
        throw Db.isUnreachable(e) ? new DatabaseUnavailableError({ cause: e }) : e
      })
      if (total === 'superseded') superseded = true
      if (total === undefined || total === 'superseded') return false
      held = total
      return true
    },
    settle(o: Omit<Finish, 'id'>, background = false): Promise<{ charged: bigint }> {
      outcome ??= o
      const once = () =>
        finish(
          sql,
          { id: input.id, ...o },
          {
            channelId: input.channelId,
            idempotent: input.idempotency != null,
            waited: !background,
          },
        ).then(async (r) => {
          if (r !== undefined) return r
          // The reservation is gone. Tried again after a failure: the failed attempt went
          // through (its answer lost). Or a sweep released it first (see `chargeRest`), which
          // charges the rest. What was charged is in its usage row.
          await chargeRest(sql, input.id, o, input.idempotency)
          return charged(sql, input.id, input.channelId)
        })
      // A charge lost to one transient error would leave a delivered request to the sweep,
      // which charges only what its last extend recorded (and holds its credits, its plan's
      // concurrency and its Idempotency-Key until its lease runs out): tried again, waited for
      // or not (sooner when someone waits). A retry never charges twice: the charge takes the
      // reservation with it.
      if (settled) return settled
      // Still failing after its first tries: the caller hears of it (the client is not kept
      // waiting), and the charge goes on being tried in the background (see `persist`).
      const first = retrying(once, background ? undefined : [50, 250, 1_000])
      first
        .catch((e: unknown) => (outOfReach(e) ? persist(once, input.leaseSeconds) : undefined))
        .catch(() => {})
      settled = first.then((r) => {
        after = r?.channel
        return { charged: r?.charged ?? 0n }
      })
      return settled
    },
  }
}

/**
 * A reservation paid from a payment channel: like `reservation`, and when the channel's
 * authorized balance runs short it waits (up to `timeoutMs`) for a voucher that covers
 * `required`, accepted on this instance or another.
 */
export function channelReservation(
  sql: Sql,
  input: {
    id: string
    held: bigint
    leaseSeconds: number
    channelId: string
    /** The request's Idempotency-Key, if it has one. */
    idempotency?: Idempotency | null
    waker: Waker
    timeoutMs: number
    /** A stream: another stream on the channel ends it. */
    stream?: boolean
  },
) {
  const r = reservation(sql, input)
  const superseded: (() => void)[] = []
  if (input.stream) {
    // Superseded: tell whoever asked (the route aborts the stream's upstream, which also ends
    // a wait for a voucher), so it ends now.
    const over = input.waker.streamStarted(input.channelId, input.id, () => {
      r.supersede()
      for (const f of superseded) f()
    })
    const settle = r.settle
    r.settle = (o, background) => {
      over()
      return settle(o, background)
    }
  }
  return Object.assign(r, {
    // A channel's receipt reports `spent` after the settle: it must wait for it.
    settleInBackground: false,
    whenSuperseded(f: () => void) {
      if (r.superseded) f()
      else superseded.push(f)
    },
    async waitForFunds(required: bigint, signal: AbortSignal): Promise<boolean> {
      if (r.superseded) return false
      const timeout = AbortSignal.timeout(input.timeoutMs)
      while (true) {
        const looked = new AbortController()
        const any = AbortSignal.any([signal, timeout, looked.signal])
        if (any.aborted) return false
        // Listen before looking: a voucher accepted between the stream's last look and
        // this wait (its wake-up gone by) must not leave the stream asleep until the poll.
        const woken = input.waker.next(input.channelId, any)
        // Renews the lease too, so a long wait is not mistaken for a dead instance.
        const covered = await r.extend(required > r.held ? required - r.held : 0n)
        if (covered || r.superseded) {
          looked.abort()
          return covered
        }
        if (!(await woken)) return false
      }
    },
  })
}
