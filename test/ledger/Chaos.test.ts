/**
 * Randomized, concurrent runs of the API-key ledger against DESIGN.md's ledger invariants:
 * clients on three pools (three instances) admit, extend and finish requests (some with
 * Idempotency-Keys, some retried), while admins grant and debit credits, move accounts between
 * plans and revoke keys, and dead instances' reservations are swept. Every round ends with the
 * invariants checked on the rows. Each run is drawn from a seed (printed when a run fails;
 * TOLLWAY_CHAOS_SEED replays one, TOLLWAY_CHAOS_RUNS runs more). Needs DATABASE_URL.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import type * as Config from '../../src/Config.ts'
import { DatabaseUnavailableError } from '../../src/Errors.ts'
import * as Accounts from '../../src/ledger/Accounts.ts'
import * as Alone from '../../src/ledger/Alone.ts'
import * as ApiKeys from '../../src/ledger/ApiKeys.ts'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Credits from '../../src/ledger/Credits.ts'
import * as Db from '../../src/ledger/Db.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const limits = { tier: 0, requestsPerMinute: null, maxConcurrent: null, tokensPerMonth: null }
const plans: Record<string, Config.Plan> = {
  capped: {
    ...limits,
    requestsPerMinute: 6_000,
    maxConcurrent: 3,
    tokensPerMonth: 40_000,
    wallet: null,
  },
  tight: {
    ...limits,
    requestsPerMinute: 6,
    maxConcurrent: 2,
    tokensPerMonth: 12_000,
    wallet: null,
  },
  wallet: {
    ...limits,
    maxConcurrent: 2,
    wallet: { floor: 50, refillPerDay: 1_000, cap: 6_000 },
  },
  unlimited: { ...limits, wallet: null },
}
const PLANS = Object.keys(plans)

const db = await Postgres.fresh(plans)
const { sql } = db
/** A PostgreSQL server (the embedded one takes one connection: no instances beside it). */
const server = Boolean(process.env.DATABASE_URL)
// Three instances: each its own pool, so its own ordered ledger stream and batches.
const instances = server
  ? [0, 1, 2].map(() => Db.connect({ url: db.url, schema: db.schema, max: 4 }))
  : []
afterAll(() => Promise.all(instances.map((p) => p.end())))
const pools = instances

const RUNS = Number(process.env.TOLLWAY_CHAOS_RUNS ?? 10)
/** The runs with one instance's sessions ended now and then (off with TOLLWAY_CHAOS_FAULTS=0). */
const faults = process.env.TOLLWAY_CHAOS_FAULTS !== '0'
const ROUNDS = 3
const CLIENTS = 16
const OPS = 12

/**
 * A seeded PRNG (mulberry32): the same seed draws the same numbers. Amounts of money come in
 * `unit`s: some runs' are far beyond 2^53 (exact only as the ledger's JSON carries them).
 */
function prng(seed: number, unit = 1n) {
  let s = seed >>> 0
  const next = () => {
    s = (s + 0x6d2b79f5) >>> 0
    let t = s
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
  const int = (lo: number, hi: number) => lo + Math.floor(next() * (hi - lo + 1))
  return {
    next,
    int,
    unit,
    /** Between lo and hi units. */
    big: (lo: number, hi: number) => BigInt(int(lo, hi)) * unit,
    /** An amount between two amounts. */
    between: (lo: bigint, hi: bigint) => lo + ((hi - lo) * BigInt(int(0, 1_000_000))) / 1_000_000n,
    pick: <T>(xs: readonly T[]): T => xs[Math.floor(next() * xs.length)]!,
    chance: (p: number) => next() < p,
  }
}
type Rng = ReturnType<typeof prng>

type Key = { id: string; hash: Uint8Array; revokedAt?: number }
type Acct = {
  id: string
  keys: Key[]
  /** Plans it may be on now (two while a move is under way). */
  plans: Set<string>
  /** Admissions under way, with the plans each may have been admitted under. */
  admitting: Set<Set<string>>
  /** Moves to another plan under way, and moves begun so far. */
  moving: number
  moves: number
}
type Live = {
  id: string
  account: Acct
  pool: Db.Sql
  r: ReturnType<typeof Reservations.reservation>
  ikey: string | null
  prompt: number
  delivered: bigint
  completion: number
  /** When its admission was answered, and when its release (finish, or a sweep) began. */
  admittedAt: number
  releasedAt?: number
}

/**
 * Leases run out, one reservation a statement: one statement over several would lock them in
 * its own order, and deadlock with a batch that finishes some of them in the order of its index.
 */
async function expire(ids: string[]) {
  for (const id of ids)
    await sql`update reservations set expires_at = clock_timestamp() - interval '1 second'
      where id = ${id}`
}

/** Admission outcomes over all runs, by status (TOLLWAY_CHAOS_VERBOSE prints them). */
const outcomes = new Map<string, number>()

/**
 * Whether an operation failed for its database connection lost (reset under it): its outcome
 * is not known, and the ledger's own retries and releases see to it.
 */
const lost = (e: unknown) =>
  Db.isUnreachable(e) ||
  e instanceof DatabaseUnavailableError ||
  e instanceof Db.DatabaseTimeoutError ||
  e instanceof Batch.AbandonedError

/** An instance whose sessions the database ends now and then (a restart, a failover). */
type Faulty = { pool: Db.Sql; name: string }

/** A fourth instance, with the gateway's database deadline, and the name its sessions go by. */
async function faultyInstance(): Promise<Faulty> {
  const pool = Db.connect({ url: db.url, schema: db.schema, max: 4 })
  Db.deadline(pool, 10_000)
  afterAll(() => pool.end())
  const [me] = await pool`select current_setting('application_name') as name`
  return { pool, name: me!.name as string }
}

/**
 * One run: accounts, clients, rounds; throws with what broke. With `faulty`, the third
 * instance is `faulty.pool`, whose sessions are ended now and then.
 */
async function run(seed: number, faulty?: Faulty) {
  const pools = faulty ? [instances[0]!, instances[1]!, faulty.pool] : instances
  const rng = prng(seed)
  const unit = rng.chance(0.3) ? 10n ** 30n : 1n
  const began = performance.now()
  let clock = 0
  const tick = () => ++clock
  const accounts: Acct[] = []
  for (const plan of [...PLANS, ...PLANS]) {
    const a = await Ledger.account(sql, rng.big(0, 6_000) * unit, plan)
    const [k] = await sql`select id from api_keys where account_id = ${a.id}`
    accounts.push({
      id: a.id,
      keys: [{ id: k!.id as string, hash: a.keyHash }],
      plans: new Set([plan]),
      admitting: new Set(),
      moving: 0,
      moves: 0,
    })
  }
  const requests: Live[] = []
  const live = new Set<Live>()
  /** What each finished request was settled with (its cost before any cap). */
  const settledCost = new Map<string, bigint>()
  const ikeyOf = new Map<string, string>()
  const problems: string[] = []
  const fail = (m: string) => problems.push(m)

  async function admit(c: Rng, mine: Live[]) {
    const a = c.pick(accounts)
    const key = c.pick(a.keys)
    const pool = c.pick(pools)
    const prompt = c.int(1, 1_500)
    const want = c.big(1, 800)
    const need = c.chance(0.5) ? want : c.between(c.unit, want)
    const ikey = c.chance(0.3) ? `k${c.int(0, 3)}` : null
    const fingerprint = ikey ? new Uint8Array([c.chance(0.9) ? 1 : 2]) : null
    const requestId = crypto.randomUUID()
    const possible = new Set(a.plans)
    a.admitting.add(possible)
    const sent = tick()
    const r = await Reservations.admit(pool, {
      keyHash: key.hash,
      model: 'm',
      stream: true,
      minTier: 0,
      promptTokens: prompt,
      want,
      need,
      idempotencyKey: ikey,
      fingerprint,
      requestId,
      leaseSeconds: 60,
    })
    const done = tick()
    a.admitting.delete(possible)
    outcomes.set(r.status, (outcomes.get(r.status) ?? 0) + 1)
    if (r.status !== 'ok') return
    if (key.revokedAt !== undefined && key.revokedAt < sent)
      fail(`${requestId} admitted by a key revoked before it was sent`)
    if (r.held < need || r.held > want)
      fail(`${requestId} held ${r.held} outside [${need}, ${want}]`)
    // Requests surely under way when it was admitted: answered before it was sent, released
    // after its answer came.
    const surely = requests.filter(
      (q) =>
        q.account === a &&
        q.admittedAt < sent &&
        (q.releasedAt === undefined || q.releasedAt > done),
    )
    const caps = [...possible].map((p) => plans[p]!.maxConcurrent)
    if (!caps.includes(null) && surely.length >= Math.max(...(caps as number[])))
      fail(
        `${requestId} admitted (sent ${sent}, answered ${done}) past max concurrency: ${[...possible]}, under way ${surely.map((q) => `${q.id} (${q.admittedAt}-${q.releasedAt})`)}`,
      )
    if (ikey && surely.some((q) => q.ikey === ikey))
      fail(`${requestId} admitted with key ${ikey} while another request with it is under way`)
    const q: Live = {
      id: requestId,
      account: a,
      pool,
      r: Reservations.reservation(pool, {
        id: requestId,
        held: r.held,
        leaseSeconds: 60,
        idempotency: ikey && fingerprint ? { key: ikey, fingerprint } : null,
      }),
      ikey,
      prompt,
      delivered: 0n,
      completion: 0,
      admittedAt: done,
    }
    if (ikey) ikeyOf.set(requestId, `${a.id}/${ikey}`)
    requests.push(q)
    live.add(q)
    mine.push(q)
  }

  async function extend(c: Rng, q: Live) {
    const before = q.r.held
    const amount = c.big(0, 400)
    // What it sent so far, as a stream records it: never more than it holds.
    const delivered = c.between(q.delivered, before)
    const completion = q.completion + c.int(0, 50)
    // Taken as recorded before the answer (an extension whose answer is lost may be).
    q.delivered = delivered
    q.completion = completion
    const ok = await q.r.extend(amount, {
      cost: delivered,
      promptTokens: q.prompt,
      completionTokens: completion,
    })
    if (ok && q.r.held !== before + amount)
      fail(`${q.id} extended to ${q.r.held}, not ${before + amount}`)
  }

  async function finish(c: Rng, q: Live, mine: Live[]) {
    mine.splice(mine.indexOf(q), 1)
    if (!live.has(q)) outcomes.set('late_finish', (outcomes.get('late_finish') ?? 0) + 1)
    q.releasedAt ??= tick()
    live.delete(q)
    const status = c.pick(['ok', 'ok', 'client_closed', 'upstream_error'])
    const held = q.r.held
    const cost =
      status === 'ok'
        ? // Now and then more than it holds (an estimate short of the answer): charged as far
          // as the account has it free.
          c.between(q.delivered, held + (c.chance(0.1) ? c.big(1_000, 1_000) : 0n))
        : // What it delivered (none, for an upstream failing before its first token): a sweep
          // may have charged that already.
          q.delivered
    const completion = q.completion + (status === 'ok' ? c.int(0, 100) : 0)
    settledCost.set(q.id, cost)
    const { charged } = await q.r.settle(
      {
        cost,
        promptTokens: q.prompt,
        completionTokens: completion,
        status,
        latencyMs: 1,
        ttftMs: 1,
      },
      c.chance(0.3),
    )
    if (charged > cost) fail(`${q.id} charged ${charged}, more than its cost ${cost}`)
  }

  async function admin(c: Rng) {
    const a = c.pick(accounts)
    const pool = c.pick(pools)
    const what = c.int(0, 99)
    if (what < 50) {
      // Some debits go below what is held, or below zero: refused, nothing changed.
      const amount = c.big(-4_000, 4_000) || 1n
      await Credits.grant(pool, { accountId: a.id, amount, note: null })
    } else if (what < 75) {
      const plan = c.pick(PLANS)
      a.plans.add(plan)
      for (const p of a.admitting) p.add(plan)
      a.moving++
      const move = ++a.moves
      await Accounts.update(pool, a.id, { plan })
      // Moves under way together commit in an order their answers need not show: the plan
      // is known again once none is under way (and none began since).
      if (--a.moving > 0) return
      const [row] = await sql`select plan from accounts where id = ${a.id}`
      if (a.moves === move) a.plans = new Set([row!.plan as string])
    } else if (what < 88) {
      const key = c.pick(a.keys)
      // Mostly with another key left, to go on with.
      if (key.revokedAt !== undefined) return
      if (a.keys.filter((k) => k.revokedAt === undefined).length < 2 && c.chance(0.8)) return
      await ApiKeys.revoke(pool, { accountId: a.id, id: key.id })
      key.revokedAt = tick()
    } else {
      const k = await ApiKeys.create(pool, { accountId: a.id, name: 'k', max: 50 })
      if (k) a.keys.push({ id: k.id, hash: ApiKeys.hash(k.key) })
    }
  }

  /** A dead instance: some reservations' leases run out, and an instance sweeps them. */
  async function sweep(c: Rng) {
    const victims = [...live].filter(() => c.chance(0.3))
    for (const q of victims) q.releasedAt ??= tick()
    await expire(victims.map((q) => q.id))
    await Reservations.sweep(c.pick(pools))
    // Their clients go on: a late extension fails, a late finish charges the rest.
    for (const q of victims) live.delete(q)
  }

  const unlessLost = lettingLost(faulty, 'lost')

  async function client(c: Rng, mine: Live[]) {
    for (let i = 0; i < OPS; i++) {
      const what = c.int(0, 99)
      // Its sessions ended under it, statements in flight or not (a database restart, a
      // failover): it connects again.
      if (faulty && c.chance(0.03))
        await sql`select pg_terminate_backend(pid) from pg_stat_activity
          where application_name = ${faulty.name}`
      await unlessLost(() => {
        if (what < 40 || mine.length === 0) return admit(c, mine)
        if (what < 62) return extend(c, c.pick(mine))
        if (what < 85) return finish(c, c.pick(mine), mine)
        if (what < 95) return admin(c)
        return sweep(c)
      })
    }
  }

  const clients = Array.from({ length: CLIENTS }, (_, i) => ({
    rng: prng(seed * 31 + i + 1, unit),
    mine: [] as Live[],
  }))
  for (let round = 0; round <= ROUNDS; round++) {
    if (round < ROUNDS) await Promise.all(clients.map((c) => client(c.rng, c.mine)))
    // The last round finishes what is left.
    else
      await Promise.all(
        clients.map((c) =>
          Promise.all([...c.mine].map((q) => unlessLost(() => finish(c.rng, q, c.mine)))),
        ),
      )
    // Charges and releases still being tried after a lost connection, then this instance's
    // calls queued.
    await Reservations.drained(20_000)
    await Promise.all(pools.map((p) => Reservations.accountsSettled(p)))
    await check(accounts, settledCost, ikeyOf, fail)
    if (problems.length > 0) throw new Error(`round ${round}:\n${problems.join('\n')}`)
  }
  // Nothing left held (an admission whose answer was lost is released in the background).
  for (let i = 0; i < 100; i++) {
    const [o] = await sql`select count(*)::int as n from reservations
      where account_id = any(${accounts.map((a) => a.id)}::uuid[])`
    if (o!.n === 0) break
    await Bun.sleep(100)
  }
  for (const a of accounts) expect((await Ledger.accountState(sql, a.id)).open).toBe(0)
  // The request rate, on an account that stayed on its plan: a minute's requests at once,
  // then one a period.
  const seconds = (performance.now() - began) / 1000
  for (const a of accounts) {
    const [plan] = [...a.plans]
    const rpm = plans[plan!]!.requestsPerMinute
    if (a.moves > 0 || rpm === null) continue
    const admitted = requests.filter((q) => q.account === a).length
    const most = rpm + Math.ceil((seconds * rpm) / 60)
    if (admitted > most)
      throw new Error(`account ${a.id} on ${plan}: ${admitted} admitted in ${seconds} s`)
  }
}

/** The invariants the rows must show between rounds. */
async function check(
  accounts: Acct[],
  settledCost: Map<string, bigint>,
  ikeyOf: Map<string, string>,
  fail: (m: string) => void,
) {
  for (const a of accounts) {
    // balance = sum of its transactions, reserved = sum of holds, one active request per
    // reservation, 0 <= reserved <= balance.
    await Ledger.accountState(sql, a.id)
    const usage = await sql`
      select id, cost, status, prompt_tokens, completion_tokens from usage
      where account_id = ${a.id}
        and created_at >= date_trunc('month', now() at time zone 'UTC') at time zone 'UTC'`
    let counted = 0
    for (const u of usage) {
      // The tokens a finish counts by the cost it was given (before any cap by what the
      // account had free); a sweep's by what it charged.
      const intended = u.status === 'abandoned' ? undefined : settledCost.get(u.id)
      const cost = intended !== undefined && intended > u.cost ? intended : (u.cost as bigint)
      counted += Alone.countedTokens({
        cost,
        status: u.status,
        promptTokens: u.prompt_tokens,
        completionTokens: u.completion_tokens,
      })
    }
    const [ac] = await sql`select month_tokens from accounts where id = ${a.id}`
    if (Number(ac!.month_tokens) !== counted)
      fail(`account ${a.id}: month_tokens ${ac!.month_tokens}, its usage rows count ${counted}`)
  }
  // Nothing charged twice: a request's usage charges sum to its usage row's cost.
  const twice = await sql`
    select t.request_id, sum(-t.amount) as charged, u.cost from credit_transactions t
    left join usage u on u.id = t.request_id
    where t.kind = 'usage' and t.account_id = any(${accounts.map((a) => a.id)}::uuid[])
    group by t.request_id, u.cost having u.cost is null or sum(-t.amount) <> u.cost`
  for (const r of twice)
    fail(`request ${r.request_id} charged ${r.charged}, its usage row ${r.cost}`)
  // An Idempotency-Key pays for at most one request: one charged, or answered.
  const paid = new Map<string, string[]>()
  const rows = await sql`
    select id from usage where account_id = any(${accounts.map((a) => a.id)}::uuid[])
      and (cost > 0 or status = 'ok')`
  for (const r of rows) {
    const k = ikeyOf.get(r.id)
    if (k) paid.set(k, [...(paid.get(k) ?? []), r.id])
  }
  for (const [k, ids] of paid)
    if (ids.length > 1) fail(`key ${k} paid by ${ids.length} requests: ${ids}`)
}

/**
 * Runs of an operation: with `faulty` (an instance whose sessions are ended), one that failed
 * for its connection lost is let go, counted under `counter`.
 */
function lettingLost(faulty: unknown, counter: string) {
  return async (op: () => Promise<unknown>) => {
    try {
      await op()
    } catch (e) {
      if (!faulty || !lost(e)) throw e
      outcomes.set(counter, (outcomes.get(counter) ?? 0) + 1)
    }
  }
}

/**
 * `runs` runs of `fn`, each from a seed of its own (from TOLLWAY_CHAOS_SEED on, or from one
 * drawn), the seed of a failing one printed.
 */
async function seeded(what: string, runs: number, fn: (seed: number) => Promise<void>) {
  const first = Number(process.env.TOLLWAY_CHAOS_SEED ?? Math.floor(Math.random() * 2 ** 31))
  for (let i = 0; i < runs; i++) {
    const seed = first + i
    try {
      await fn(seed)
    } catch (e) {
      console.error(`${what} failed with TOLLWAY_CHAOS_SEED=${seed}`)
      throw e
    }
  }
}

describe.skipIf(!server)('under chaos', () => {
  test(
    'property: concurrent clients on three instances, admins and sweeps keep every account invariant',
    async () => {
      await seeded('ledger chaos', RUNS, (seed) => run(seed))
      if (process.env.TOLLWAY_CHAOS_VERBOSE)
        console.log(
          Object.fromEntries(outcomes),
          pools.map((p) => Batch.stats(p)),
        )
    },
    Math.max(60_000, RUNS * 30_000),
  )

  // On unless TOLLWAY_CHAOS_FAULTS=0. It needs the fetchArrayTypes hunk of
  // patches/postgres+3.4.9.patch (see test/ledger/TypesFetch.test.ts): without it, a session
  // ended while postgres.js fetches its array types left an unhandled rejection ("error: write
  // CONNECTION_CLOSED", or the socket's ECONNRESET), which bun test counts as a failure of
  // whichever test runs then.
  test.if(faults)(
    'property: with one instance whose sessions the database ends now and then, every account invariant holds',
    async () => {
      const faulty = await faultyInstance()
      await seeded('ledger chaos (sessions ended)', Math.ceil(RUNS / 2), (seed) =>
        run(seed, faulty),
      )
      if (process.env.TOLLWAY_CHAOS_VERBOSE) console.log(Object.fromEntries(outcomes))
    },
    Math.max(60_000, RUNS * 30_000),
  )
})

type Chan = {
  id: Channels.Hex
  bytes: Buffer
  /** The highest voucher signed for it so far (the payer's side). */
  signed: bigint
  deposit: bigint
}
type ChanLive = {
  id: string
  chan: Chan
  r: ReturnType<typeof Reservations.reservation>
  ikey: string | null
  delivered: bigint
}
type ChanState = {
  settled: bigint
  spent: bigint
  reserved: bigint
  acceptedCumulative: bigint
  deposit: bigint
}

/** One run on channels: vouchers, admissions, extensions, finishes, settlements, sweeps. */
async function channelRun(seed: number, faulty?: Faulty) {
  const pools = faulty ? [instances[0]!, instances[1]!, faulty.pool] : instances
  const unit = prng(seed).chance(0.3) ? 10n ** 30n : 1n
  const rng = prng(seed, unit)
  const chans: Chan[] = []
  for (let i = 0; i < 3; i++) {
    const deposit = rng.big(500, 20_000)
    const c = await Ledger.channel(sql, deposit)
    chans.push({
      id: c.channelId,
      bytes: Buffer.from(c.channelId.slice(2), 'hex'),
      signed: 0n,
      deposit,
    })
  }
  const live = new Set<ChanLive>()
  const ikeyOf = new Map<string, string>()
  const problems: string[] = []
  const fail = (m: string) => problems.push(m)

  /** Every channel as one statement sees it, the invariants checked. */
  const read = async (pool: Db.Sql) => {
    const rows = await pool`
      select channel_id, settled, spent, reserved, accepted_cumulative, deposit from channels
      where channel_id in ${pool(chans.map((c) => c.bytes))}`
    const out = new Map<string, ChanState>()
    for (const r of rows) {
      const id = Buffer.from(r.channel_id as Uint8Array).toString('hex')
      const c: ChanState = {
        settled: r.settled,
        spent: r.spent,
        reserved: r.reserved,
        acceptedCumulative: r.accepted_cumulative,
        deposit: r.deposit,
      }
      if (
        !(
          c.settled <= c.spent &&
          c.spent + c.reserved <= c.acceptedCumulative &&
          c.acceptedCumulative <= c.deposit
        )
      )
        fail(`channel ${id}: ${JSON.stringify(c, (_, v) => (typeof v === 'bigint' ? `${v}` : v))}`)
      out.set(id, c)
    }
    return out
  }
  /** Reads one after another, each after the last answered: every amount only grows. */
  let last = await read(sql)
  let sampling = true
  const sampler = (async () => {
    while (sampling) {
      const now = await read(rng.pick(instances))
      for (const [id, c] of now) {
        const was = last.get(id)!
        for (const k of ['settled', 'spent', 'acceptedCumulative', 'deposit'] as const)
          if (c[k] < was[k]) fail(`channel ${id}: ${k} went from ${was[k]} down to ${c[k]}`)
      }
      last = now
      await Bun.sleep(1)
    }
  })()

  async function voucher(c: Rng) {
    const ch = c.pick(chans)
    // Mostly above what was signed; some replays, some past the deposit.
    const amount = c.chance(0.15) ? ch.signed : ch.signed + c.big(1, 3_000)
    if (amount > ch.signed && amount <= ch.deposit) ch.signed = amount
    const r = await Channels.acceptVoucher(c.pick(pools), {
      channelId: ch.id,
      cumulativeAmount: amount,
      signature: Ledger.signature(amount),
      minDelta: 1n,
    })
    if (r.status === 'accepted' && amount > ch.deposit)
      fail(`voucher ${amount} over the deposit accepted`)
  }

  async function admit(c: Rng, mine: ChanLive[]) {
    const ch = c.pick(chans)
    const pool = c.pick(pools)
    const want = c.big(1, 2_000)
    const need = c.chance(0.5) ? want : c.between(c.unit, want)
    const ikey = c.chance(0.3) ? `k${c.int(0, 3)}` : null
    const fingerprint = ikey ? new Uint8Array([c.chance(0.9) ? 1 : 2]) : null
    const requestId = crypto.randomUUID()
    const r = await Reservations.admitOnChannel(pool, {
      channelId: ch.id,
      model: 'm',
      // A stream supersedes the channel's stream before it (whose extensions then fail).
      stream: c.chance(0.3),
      want,
      need,
      requestId,
      leaseSeconds: 60,
      idempotencyKey: ikey,
      fingerprint,
    })
    outcomes.set(`channel_${r.status}`, (outcomes.get(`channel_${r.status}`) ?? 0) + 1)
    if (r.status !== 'ok') return
    if (r.held < need || r.held > want)
      fail(`${requestId} held ${r.held} outside [${need}, ${want}]`)
    if (ikey) ikeyOf.set(requestId, `${ch.id}/${ikey}`)
    const q: ChanLive = {
      id: requestId,
      chan: ch,
      r: Reservations.reservation(pool, {
        id: requestId,
        held: r.held,
        leaseSeconds: 60,
        channelId: ch.id,
        idempotency: ikey && fingerprint ? { key: ikey, fingerprint } : null,
      }),
      ikey,
      delivered: 0n,
    }
    live.add(q)
    mine.push(q)
  }

  async function extend(c: Rng, q: ChanLive) {
    const before = q.r.held
    const amount = c.big(0, 1_000)
    const delivered = c.between(q.delivered, before)
    // Taken as recorded before the answer (an extension whose answer is lost may be).
    q.delivered = delivered
    const ok = await q.r.extend(amount, { cost: delivered, promptTokens: 1, completionTokens: 1 })
    if (ok && q.r.held !== before + amount)
      fail(`${q.id} extended to ${q.r.held}, not ${before + amount}`)
  }

  async function finish(c: Rng, q: ChanLive, mine: ChanLive[]) {
    mine.splice(mine.indexOf(q), 1)
    live.delete(q)
    const ok = c.chance(0.7)
    const cost = ok ? c.between(q.delivered, q.r.held) : q.delivered
    const { charged } = await q.r.settle({
      cost,
      promptTokens: 1,
      completionTokens: 1,
      status: ok ? 'ok' : 'client_closed',
      latencyMs: 1,
      ttftMs: 1,
    })
    if (charged > cost) fail(`${q.id} charged ${charged}, more than its cost ${cost}`)
  }

  async function chain(c: Rng) {
    const ch = c.pick(chans)
    const pool = c.pick(pools)
    if (c.chance(0.6)) {
      // A settlement on chain of a voucher the payer signed.
      await Channels.settled(pool, { channelId: ch.id, settled: c.between(0n, ch.signed) })
    } else {
      // A top-up.
      ch.deposit += c.big(1, 5_000)
      await Channels.observe(pool, {
        channelId: ch.id,
        chainId: 31337,
        escrow: `0x${'1'.padStart(40, '0')}`,
        payer: `0x${'2'.padStart(40, '0')}`,
        payee: `0x${'3'.padStart(40, '0')}`,
        token: `0x${'4'.padStart(40, '0')}`,
        signer: `0x${'2'.padStart(40, '0')}`,
        deposit: ch.deposit,
        settled: 0n,
        finalized: false,
        closeRequested: false,
      })
    }
  }

  async function sweep(c: Rng) {
    const victims = [...live].filter(() => c.chance(0.3))
    await expire(victims.map((q) => q.id))
    for (const q of victims) live.delete(q)
    await Reservations.sweep(c.pick(pools), c.pick(chans).bytes)
  }

  const unlessLost = lettingLost(faulty, 'channel_lost')

  async function client(c: Rng, mine: ChanLive[]) {
    for (let i = 0; i < OPS; i++) {
      const what = c.int(0, 99)
      if (faulty && c.chance(0.03))
        await sql`select pg_terminate_backend(pid) from pg_stat_activity
          where application_name = ${faulty.name}`
      await unlessLost(() => {
        if (what < 20) return voucher(c)
        if (what < 50 || mine.length === 0) return admit(c, mine)
        if (what < 68) return extend(c, c.pick(mine))
        if (what < 88) return finish(c, c.pick(mine), mine)
        if (what < 96) return chain(c)
        return sweep(c)
      })
    }
  }

  const clients = Array.from({ length: CLIENTS }, (_, i) => ({
    rng: prng(seed * 31 + i + 1, unit),
    mine: [] as ChanLive[],
  }))
  try {
    for (let round = 0; round <= ROUNDS; round++) {
      if (round < ROUNDS) await Promise.all(clients.map((c) => client(c.rng, c.mine)))
      else
        await Promise.all(
          clients.map((c) =>
            Promise.all([...c.mine].map((q) => unlessLost(() => finish(c.rng, q, c.mine)))),
          ),
        )
      // Charges and releases still being tried after a lost connection; then those expired on
      // channels the sweeps did not take.
      await Reservations.drained(20_000)
      for (const ch of chans) while ((await Reservations.sweep(sql, ch.bytes)) > 0);
      await channelCheck(chans, ikeyOf, fail)
      if (problems.length > 0) throw new Error(`round ${round}:\n${problems.join('\n')}`)
    }
  } finally {
    sampling = false
    await sampler
  }
  if (problems.length > 0) throw new Error(problems.join('\n'))
  // Nothing left held (an admission whose answer was lost is released in the background).
  for (let i = 0; i < 100; i++) {
    const [o] = await sql`select count(*)::int as n from reservations
      where channel_id in ${sql(chans.map((c) => c.bytes))}`
    if (o!.n === 0) break
    await Bun.sleep(100)
  }
  for (const ch of chans) expect((await Ledger.channelState(sql, ch.id)).reserved).toBe(0n)
}

async function channelCheck(chans: Chan[], ikeyOf: Map<string, string>, fail: (m: string) => void) {
  for (const ch of chans) {
    // settled <= spent, spent + reserved <= acceptedCumulative <= deposit, reserved = holds.
    const c = await Ledger.channelState(sql, ch.id)
    // What its usage rows were charged was spent (a settlement may have spent more).
    const [u] =
      await sql`select coalesce(sum(cost), 0) as cost from usage where channel_id = ${ch.bytes}`
    if ((u!.cost as bigint) > c.spent)
      fail(`channel ${ch.id}: usage charged ${u!.cost}, spent ${c.spent}`)
  }
  const paid = new Map<string, string[]>()
  const rows = await sql`
    select id from usage where channel_id in ${sql(chans.map((c) => c.bytes))}
      and (cost > 0 or status = 'ok')`
  for (const r of rows) {
    const k = ikeyOf.get(r.id)
    if (k) paid.set(k, [...(paid.get(k) ?? []), r.id])
  }
  for (const [k, ids] of paid)
    if (ids.length > 1) fail(`key ${k} paid by ${ids.length} requests: ${ids}`)
}

describe.skipIf(!server)('channels under chaos', () => {
  test(
    'property: concurrent vouchers, admissions, extensions, finishes, settlements and sweeps keep every channel invariant',
    async () => {
      await seeded('channel chaos', RUNS, (seed) => channelRun(seed))
      if (process.env.TOLLWAY_CHAOS_VERBOSE) console.log(Object.fromEntries(outcomes))
    },
    Math.max(60_000, RUNS * 30_000),
  )

  // As the API-key ledger's run with sessions ended (see there).
  test.if(faults)(
    'property: with one instance whose sessions the database ends now and then, every channel invariant holds',
    async () => {
      const faulty = await faultyInstance()
      await seeded('channel chaos (sessions ended)', Math.ceil(RUNS / 2), (seed) =>
        channelRun(seed, faulty),
      )
      if (process.env.TOLLWAY_CHAOS_VERBOSE) console.log(Object.fromEntries(outcomes))
    },
    Math.max(60_000, RUNS * 30_000),
  )
})
