/**
 * Group commit: the Batcher's scheduling, and the `*_many` SQL functions on a real
 * PostgreSQL, which must mean exactly what their items run one by one mean.
 */
import { describe, expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import { Batcher } from '../../src/ledger/Batch.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Db from '../../src/ledger/Db.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import * as Gateway from '../helpers/Gateway.ts'
import { plans } from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

describe('Batcher', () => {
  /** A batcher over an in-memory "database" that records the statements it saw. */
  function recording(fail?: (x: number) => boolean) {
    const statements: number[][] = []
    const gate = Promise.withResolvers<void>()
    const run = (x: number) => {
      if (fail?.(x)) throw new Error(`bad item ${x}`)
      return x * 10
    }
    const b = new Batcher<number, number>({
      one: async (x) => {
        statements.push([x])
        await gate.promise
        return run(x)
      },
      many: async (xs) => {
        statements.push(xs)
        await gate.promise
        return xs.map(run)
      },
      maxItems: 3,
    })
    return { b, statements, open: () => gate.resolve() }
  }

  test('behavior: a lone call runs at once; calls made meanwhile share the next statements, in order, at most maxItems each', async () => {
    const { b, statements, open } = recording()
    const results = [1, 2, 3, 4, 5].map((x) => b.run(x))
    expect(statements).toEqual([[1]])
    open()
    expect(await Promise.all(results)).toEqual([10, 20, 30, 40, 50])
    expect(statements).toEqual([[1], [2, 3, 4], [5]])
  })

  test('behavior: with two batches in flight, a barrier waits for the earlier one even when the later one ends first', async () => {
    const gates = new Map<number, PromiseWithResolvers<void>>()
    const gate = (x: number) => {
      if (!gates.has(x)) gates.set(x, Promise.withResolvers<void>())
      return gates.get(x)!
    }
    const b = new Batcher<number, number>({
      one: async (x) => {
        await gate(x).promise
        return x
      },
      many: async (xs) => {
        await gate(xs[0]!).promise
        return xs
      },
      inFlight: 2,
    })
    const first = b.run(1)
    const second = b.run(2)
    let passed = false
    const barrier = b.barrier().then(() => {
      passed = true
    })
    const third = b.run(3) // waits: two are under way
    gate(2).resolve()
    expect(await second).toBe(2)
    // 3 now runs in the freed slot; let it end too: 1 is still under way.
    gate(3).resolve()
    expect(await third).toBe(3)
    await Bun.sleep(5)
    expect(passed).toBe(false)
    gate(1).resolve()
    expect(await first).toBe(1)
    await barrier
    expect(passed).toBe(true)
  })

  test('behavior: with behindAtMost 1, a call goes behind a lone one at once; behind a batch of more, calls wait for it', async () => {
    const gates = new Map<number, PromiseWithResolvers<void>>()
    const gate = (x: number) => {
      if (!gates.has(x)) gates.set(x, Promise.withResolvers<void>())
      return gates.get(x)!
    }
    const statements: number[][] = []
    const b = new Batcher<number, number>({
      one: async (x) => {
        statements.push([x])
        await gate(x).promise
        return x
      },
      many: async (xs) => {
        statements.push(xs)
        await gate(xs[0]!).promise
        return xs
      },
      inFlight: 2,
      behindAtMost: 1,
    })
    const one = b.run(1)
    const two = b.run(2) // behind the lone 1, at once
    expect(statements).toEqual([[1], [2]])
    const rest = [3, 4, 5].map((x) => b.run(x)) // two under way: they wait
    expect(statements).toEqual([[1], [2]])
    gate(1).resolve()
    expect(await one).toBe(1)
    // 1 done: behind the lone 2, the three waiting go together.
    await Bun.sleep(1)
    expect(statements).toEqual([[1], [2], [3, 4, 5]])
    gate(2).resolve()
    expect(await two).toBe(2)
    // Behind the batch of three (more than one item), a new call waits for it.
    const six = b.run(6)
    await Bun.sleep(1)
    expect(statements).toEqual([[1], [2], [3, 4, 5]])
    gate(3).resolve()
    expect(await Promise.all(rest)).toEqual([3, 4, 5])
    gate(6).resolve()
    expect(await six).toBe(6)
    expect(statements).toEqual([[1], [2], [3, 4, 5], [6]])
    expect(b.stats.behind).toBe(2)
  })

  test('behavior: stats sum the seconds from each statement sent to its answer, lone or batched', async () => {
    const { b, open } = recording()
    const first = b.run(1) // alone, at once
    const rest = [2, 3].map((x) => b.run(x)) // together, once the first is answered
    await Bun.sleep(60)
    open()
    await Promise.all([first, ...rest])
    expect(b.stats.statements).toBe(2)
    // The first statement waited at least the 60 ms; the batch behind it almost nothing.
    expect(b.stats.seconds).toBeGreaterThanOrEqual(0.055)
    expect(b.stats.seconds).toBeLessThan(30)
  })

  test('error: a batch whose statement fails runs its items one by one; only the bad one fails', async () => {
    const { b, statements, open } = recording((x) => x === 3)
    const results = [1, 2, 3, 4].map((x) => b.run(x).catch((e: Error) => e.message))
    open()
    expect(await Promise.all(results)).toEqual([10, 20, 'bad item 3', 40])
    expect(statements).toEqual([[1], [2, 3, 4], [2], [3], [4]])
  })
})

const db = await Postgres.fresh(
  Object.fromEntries(
    Object.entries({
      ...plans,
      single: { tier: 0, requestsPerMinute: null, maxConcurrent: 1, tokensPerMonth: null },
    }).map(([k, p]) => [k, { wallet: null, ...p }]),
  ) as never,
)
const { sql } = db
// As the gateway's (DATABASE_TIMEOUT_MS): a ledger call its connection never answers is given
// up on, and the connection replaced (Db.onOrdered), rather than holding every call after it.
Db.deadline(sql, 3_000)

const voucher = (channelId: Channels.Hex, amount: bigint) => Ledger.voucher(sql, channelId, amount)

const account = (credits: bigint, plan?: string) => Ledger.account(sql, credits, plan)

const admit = (keyHash: Uint8Array, want: bigint, requestId?: string) =>
  Ledger.admit(sql, keyHash, want, { stream: false, requestId })

/** Finishes a request; a channel's through the channel batches, as the gateway does. */
const finish = (id: string, cost: bigint, channelId?: string) =>
  Reservations.finish(
    sql,
    { id, cost, promptTokens: 1, completionTokens: 1, status: 'ok', latencyMs: 1, ttftMs: null },
    { channelId },
  )

const state = (accountId: string) => Ledger.accountState(sql, accountId)

describe('batched ledger calls', () => {
  test('behavior: concurrent admissions over three accounts hold exactly what each account has; finishes charge each once', async () => {
    const accounts = [await account(100n), await account(55n), await account(1_000n)]
    const all = await Promise.all(
      Array.from({ length: 60 }, (_, i) => admit(accounts[i % 3]!.keyHash, 10n)),
    )
    const ok = (a: number) => all.filter((r, i) => i % 3 === a && r.status === 'ok')
    expect(ok(0).length).toBe(10)
    expect(ok(1).length).toBe(5)
    expect(ok(2).length).toBe(20)
    expect(all.filter((r) => r.status === 'insufficient').length).toBe(25)
    expect((await state(accounts[1]!.id)).reserved).toBe(50n)

    // Every finish twice at once: charged once, the second finds nothing.
    const admitted = all.filter((r) => r.status === 'ok')
    const finished = await Promise.all(
      admitted.flatMap((r) => [finish(r.requestId, 7n), finish(r.requestId, 7n)]),
    )
    expect(finished.filter((f) => f?.charged === 7n).length).toBe(admitted.length)
    expect(finished.filter((f) => f === undefined).length).toBe(admitted.length)
    const after = await Promise.all(accounts.map((a) => state(a.id)))
    expect(after.map((s) => s.balance)).toEqual([30n, 20n, 860n])
    expect(after.map((s) => s.reserved)).toEqual([0n, 0n, 0n])
    expect(after.map((s) => s.active_requests)).toEqual([0, 0, 0])
    expect(after.map((s) => s.usage)).toEqual([10, 5, 20])
    // They went in batches, and no batch failed over to single statements.
    const stats = Batch.stats(sql).ledger!
    expect(stats.items).toBe(60 + 2 * admitted.length)
    expect(stats.statements).toBeLessThan(stats.items / 4)
    expect(stats.fallbacks).toBe(0)
  })

  test('behavior: an admission made while the finish before it is under way goes at once, behind it, and counts it done (one request at a time)', async () => {
    const a = await account(1_000n, 'single')
    const behind = Batch.stats(sql).ledger?.behind ?? 0
    let last = await admit(a.keyHash, 10n)
    const finishes: Promise<unknown>[] = []
    for (let i = 0; i < 30; i++) {
      expect(last.status).toBe('ok')
      // Not waited for, as the gateway settles a completion in the background.
      finishes.push(finish(last.requestId, 1n))
      last = await admit(a.keyHash, 10n)
    }
    expect(last.status).toBe('ok')
    finishes.push(finish(last.requestId, 1n))
    await Promise.all(finishes)
    expect(Batch.stats(sql).ledger!.behind - behind).toBeGreaterThanOrEqual(30)
    const s = await state(a.id)
    expect([s.balance, s.reserved, s.active_requests, s.usage]).toEqual([969n, 0n, 0, 31])
  })

  test('behavior: a retry with the Idempotency-Key of a request whose finish is under way, not waited for, finds it completed', async () => {
    const a = await account(1_000n)
    const admitKeyed = (requestId: string) =>
      Reservations.admit(sql, {
        keyHash: a.keyHash,
        model: 'm',
        stream: false,
        minTier: 0,
        promptTokens: 1,
        want: 10n,
        need: 10n,
        idempotencyKey: 'retried',
        fingerprint: new Uint8Array([7]),
        requestId,
        leaseSeconds: 60,
      })
    const first = crypto.randomUUID()
    expect((await admitKeyed(first)).status).toBe('ok')
    // Settled in the background (as a completion answered before its charge is written), and
    // the retry right behind it: it must not be answered as still under way.
    const reservation = Reservations.reservation(sql, {
      id: first,
      held: 10n,
      leaseSeconds: 60,
      settleInBackground: true,
      idempotency: { key: 'retried', fingerprint: new Uint8Array([7]) },
    })
    const finished = reservation.settle(
      { cost: 4n, promptTokens: 1, completionTokens: 1, status: 'ok', latencyMs: 1, ttftMs: null },
      true,
    )
    const retry = await admitKeyed(crypto.randomUUID())
    expect(retry).toEqual({ status: 'idempotency_completed', otherRequest: first })
    expect(await finished).toEqual({ charged: 4n })
    expect((await state(a.id)).balance).toBe(996n)
  })

  test.skipIf(db.max === 1)(
    'error: the ledger stream connection dropped (its backend ended): charges are tried again and land once, and the next calls open it again',
    async () => {
      const a = await account(1_000n)
      const held = await Promise.all([admit(a.keyHash, 10n), admit(a.keyHash, 10n)])
      const [own] = await Db.ordered(sql)`select pg_backend_pid() as pid`
      const [pool] = await sql`select pg_backend_pid() as pid`
      // Its own connection, apart from the pool's.
      expect(own!.pid).not.toBe(pool!.pid)
      await sql`select pg_terminate_backend(${own!.pid})`
      // As the gateway charges: through a reservation, which tries a failed charge again.
      const charged = await Promise.all(
        held.map((r) =>
          Reservations.reservation(sql, { id: r.requestId, held: 10n, leaseSeconds: 60 })
            .settle({
              cost: 3n,
              promptTokens: 1,
              completionTokens: 1,
              status: 'ok',
              latencyMs: 1,
              ttftMs: null,
            })
            .catch((e: unknown) => e),
        ),
      )
      // Each answered with its charge. (Seen twice in CI: a charge sent as the connection ended
      // got no answer at all from postgres.js; past the deadline it is a 503, the connection is
      // replaced, and the charge lands in the background.)
      for (const c of charged)
        if (!(c instanceof Db.DatabaseTimeoutError)) expect(c).toEqual({ charged: 3n })
      for (let i = 0; i < 100 && (await state(a.id)).usage < 2; i++) await Bun.sleep(100)
      expect((await admit(a.keyHash, 10n)).status).toBe('ok')
      const [again] = await Db.ordered(sql)`select pg_backend_pid() as pid`
      expect(again!.pid).not.toBe(own!.pid)
      const s = await state(a.id)
      expect([s.balance, s.reserved, s.active_requests, s.usage]).toEqual([994n, 10n, 1, 2])
    },
    20_000,
  )

  test.skipIf(!process.env.DATABASE_URL)(
    'error: a batch of admissions that committed and lost its answer with its connection is not run again into its own request ids: each fails as out of reach (a 503), and their holds are released',
    async () => {
      const { link, pool } = await Ledger.linked(db.schema!, 2)
      const [a, b] = [await account(1_000n), await account(1_000n)]
      // Both account rows held apart, so that the calls queue: two on a (one alone, one
      // behind it), then three on b, which go as one batch once a's are done.
      const rows = await Ledger.locked(
        sql,
        [a, b].map((x) => (tx) => tx`select 1 from accounts where id = ${x.id} for update`),
      )
      try {
        // The batch statement prepared on the ledger's connection first (postgres.js waits for
        // a new statement's description before it sends it).
        const c = await account(1_000n)
        const warm = await Promise.all([1, 2, 3, 4].map(() => Ledger.admit(pool, c.keyHash, 1n)))
        expect(Batch.stats(pool).ledger!.statements).toBeLessThan(4)
        const first = [1, 2].map(() => Ledger.admit(pool, a.keyHash, 10n))
        await Bun.sleep(50)
        const batch = [1, 2, 3].map(() =>
          Ledger.admit(pool, b.keyHash, 10n).catch((e: { code?: string }) => e),
        )
        const sent = Batch.stats(pool).ledger!.statements
        await rows.free(0)
        expect((await Promise.all(first)).map((r) => r.status)).toEqual(['ok', 'ok'])
        for (let i = 0; i < 100 && Batch.stats(pool).ledger!.statements === sent; i++)
          await Bun.sleep(10)
        // The batch waits on b's row: it commits once that is free, its answer held.
        link.stall('answers')
        await rows.free(1)
        for (let i = 0; i < 100 && (await state(b.id)).open < 3; i++) await Bun.sleep(10)
        expect((await state(b.id)).open).toBe(3)
        await Ledger.loseAnswer(link, batch)
        // Released, each charged nothing (a finish `database_unavailable`).
        const released = await Gateway.released(sql, b.id)
        expect([released.open, released.reserved, released.balance]).toEqual([0, 0n, 1_000n])
        const usage = await sql`select status, cost from usage where account_id = ${b.id}`
        expect(usage.map((r) => `${r.status}:${r.cost}`)).toEqual(
          Array(3).fill('database_unavailable:0'),
        )
        expect(warm.every((r) => r.status === 'ok')).toBe(true)
      } finally {
        await rows.end()
        await pool.end({ timeout: 1 })
      }
    },
    20_000,
  )

  test.skipIf(db.max === 1)(
    'error: once its pool has ended, the ledger stream opens no connection of its own: its calls are refused as ended',
    async () => {
      // A pool whose ledger stream was never used (its connection not opened) before the end.
      const pool = Db.connect({ url: db.url, max: 2, ...(db.schema ? { schema: db.schema } : {}) })
      expect((await pool`select 1 as one`)[0]!.one).toBe(1)
      await pool.end()
      const late = await Db.ordered(pool)`select 1 as one`.catch((e: { code?: string }) => e.code)
      expect(late).toBe('CONNECTION_ENDED')
    },
  )

  test('error: in a batch, an unknown key is unauthorized and a duplicate request id fails alone', async () => {
    const a = await account(1_000n)
    const dup = crypto.randomUUID()
    const results = await Promise.all([
      admit(a.keyHash, 1n),
      admit(new Uint8Array(32), 1n),
      admit(a.keyHash, 1n, dup),
      admit(a.keyHash, 1n, dup).catch((e: Error) => e),
      admit(a.keyHash, 1n),
    ])
    expect(results.map((r) => (r instanceof Error ? 'error' : r.status))).toEqual([
      'ok',
      'unauthorized',
      'ok',
      'error',
      'ok',
    ])
    const s = await state(a.id)
    expect(s.reserved).toBe(3n)
    expect(s.active_requests).toBe(3)
  })

  test('behavior: concurrent channel admissions on two channels: each holds what its channel has, as one by one would in some order', async () => {
    const channels = [await Ledger.channel(sql, 1_000n), await Ledger.channel(sql, 1_000n)]
    for (const c of channels) await voucher(c.channelId, 100n)
    const before = Batch.stats(sql).channelAdmit
    const results = await Promise.all(
      channels.flatMap((c) =>
        Array.from({ length: 5 }, () => Ledger.hold(sql, c.channelId, { want: 30n, need: 30n })),
      ),
    )
    // Batches run several at once, so which of a channel's concurrent requests come first is
    // the database's choice: three of each five fit, each holding 30, whichever they are.
    for (const [n, c] of channels.entries()) {
      const mine = results.slice(n * 5, n * 5 + 5)
      expect(mine.map((r): string => r.status).sort()).toEqual([
        'insufficient',
        'insufficient',
        'ok',
        'ok',
        'ok',
      ])
      for (const r of mine)
        if (r.status === 'ok') expect((r as { held: bigint }).held).toBe(30n)
        else expect((r as { available: bigint }).available).toBe(10n)
      expect((await Ledger.channelState(sql, c.channelId)).reserved).toBe(90n)
    }
    const after = Batch.stats(sql).channelAdmit!
    expect(after.items - (before?.items ?? 0)).toBe(10)
    expect(after.statements - (before?.statements ?? 0)).toBeLessThan(10)
    expect(after.fallbacks).toBe(0)
  })

  test('behavior: channel charges on many channels, with admissions and vouchers under way at once: batched, no deadlock, each charged once', async () => {
    const channels = await Promise.all(
      Array.from({ length: 8 }, () => Ledger.channel(sql, 1_000_000n)),
    )
    // Charges queued in the reverse of the channels' id order, to cross the admissions' locks.
    channels.sort((a, b) => (a.channelId < b.channelId ? 1 : -1))
    for (const c of channels) await voucher(c.channelId, 500_000n)
    const admit = (channelId: Channels.AdmitInput['channelId'], requestId = crypto.randomUUID()) =>
      Ledger.hold(sql, channelId, { want: 1_000n, need: 100n, requestId })
    const held = await Promise.all(
      channels.flatMap((c) =>
        Array.from({ length: 4 }, async () => {
          const id = crypto.randomUUID()
          expect((await admit(c.channelId, id)).status).toBe('ok')
          return Reservations.reservation(sql, {
            id,
            held: 1_000n,
            leaseSeconds: 60,
            channelId: c.channelId,
          })
        }),
      ),
    )
    const before = Batch.stats(sql).channelFinish
    const outcome = { promptTokens: 1, completionTokens: 1, status: 'ok', latencyMs: 1, ttftMs: 1 }
    const [charges] = await Promise.all([
      Promise.all(held.map((r, i) => r.settle({ ...outcome, cost: BigInt(100 + i) }))),
      Promise.all(channels.map((c) => admit(c.channelId))),
      Promise.all(channels.map((c) => voucher(c.channelId, 600_000n))),
    ])
    expect(charges.map((c) => c.charged)).toEqual(held.map((_, i) => BigInt(100 + i)))
    const after = Batch.stats(sql).channelFinish!
    expect(after.items - (before?.items ?? 0)).toBe(held.length)
    expect(after.statements - (before?.statements ?? 0)).toBeLessThan(held.length)
    expect(after.fallbacks).toBe(0)
    for (const [n, c] of channels.entries()) {
      const state = await Ledger.channelState(sql, c.channelId)
      const spent = [0, 1, 2, 3].reduce((sum, k) => sum + BigInt(100 + n * 4 + k), 0n)
      expect(state.spent).toBe(spent)
      expect(state.acceptedCumulative).toBe(600_000n)
      // The admission that ran alongside still holds its 1,000.
      expect(state.reserved).toBe(1_000n)
    }
  })

  test('behavior: everything a channel writes commits durably (synchronous commit): vouchers, holds, charges; an account does not wait for the flush', async () => {
    // What synchronous_commit is as each row's transaction commits (a deferred trigger runs at
    // commit, after everything the statement set), for vouchers, reservations and usage rows.
    await sql.unsafe(`
      create table commit_modes (payer text, mode text);
      create function commit_mode() returns trigger language plpgsql as $$
      begin
        insert into commit_modes values (tg_table_name || ':' ||
          case when new.channel_id is null then 'account' else 'channel' end,
          current_setting('synchronous_commit'));
        return new;
      end $$;
      create constraint trigger commit_mode after insert on usage deferrable initially deferred
        for each row execute function commit_mode();
      create constraint trigger commit_mode after insert on reservations deferrable initially deferred
        for each row execute function commit_mode();
      create constraint trigger commit_mode after insert on vouchers deferrable initially deferred
        for each row execute function commit_mode();`)
    try {
      const c = await Ledger.channel(sql, 1_000n)
      await voucher(c.channelId, 100n)
      const channelRequest = crypto.randomUUID()
      const admitted = await Ledger.hold(sql, c.channelId, {
        want: 10n,
        need: 10n,
        requestId: channelRequest,
      })
      expect(admitted.status).toBe('ok')
      expect((await finish(channelRequest, 7n, c.channelId))?.charged).toBe(7n)
      const a = await account(100n)
      const r = await admit(a.keyHash, 10n)
      expect((await finish(r.requestId, 7n))?.charged).toBe(7n)
      // Dead requests swept together: the channel's charge is durable there too.
      const dead = crypto.randomUUID()
      expect(
        (await Ledger.hold(sql, c.channelId, { want: 10n, need: 10n, requestId: dead })).status,
      ).toBe('ok')
      await admit(a.keyHash, 10n)
      await sql`update reservations set expires_at = now() - interval '1 second'
        where id = ${dead} or account_id = ${a.id}`
      expect(await Reservations.sweep(sql)).toBe(2)
      const modes = await sql`
        select payer, array_agg(distinct mode) as modes, count(*)::int as n
        from commit_modes group by payer order by payer`
      expect(modes.map((m) => `${m.payer}:${m.modes.join()}:${m.n}`)).toEqual([
        'reservations:account:off:2',
        'reservations:channel:on:2',
        'usage:account:off:2',
        'usage:channel:on:2',
        'vouchers:channel:on:1',
      ])
    } finally {
      await sql.unsafe(
        'drop trigger commit_mode on usage; drop trigger commit_mode on reservations; drop trigger commit_mode on vouchers; drop function commit_mode(); drop table commit_modes',
      )
    }
  })

  test('behavior: concurrent vouchers on two channels: each channel keeps its highest, every outcome is the sequential one', async () => {
    const open = async () => (await Ledger.channel(sql, 1_000n)).channelId
    const channels = [await open(), await open()]
    const before = Batch.stats(sql).voucher
    const amounts = [5n, 3n, 9n, 9n, 2_000n, 12n, 4n]
    const results = await Promise.all(
      channels.flatMap((channelId) => amounts.map((amount) => voucher(channelId, amount))),
    )
    // Taken in order per channel: 5 accepted, 3 replay, 9 accepted, 9 replay, 2000 over the
    // deposit, 12 accepted, 4 replay.
    const expected: string[] = [
      'accepted',
      'replay',
      'accepted',
      'replay',
      'exceeds_deposit',
      'accepted',
      'replay',
    ]
    expect(results.map((r): string => r.status)).toEqual([...expected, ...expected])
    for (const channelId of channels) {
      expect((await Channels.get(sql, channelId))!.acceptedCumulative).toBe(12n)
      const [v] =
        await sql`select count(*)::int as n from vouchers where channel_id = ${Buffer.from(channelId.slice(2), 'hex')}`
      expect(v!.n).toBe(3)
    }
    const after = Batch.stats(sql).voucher!
    expect(after.items - (before?.items ?? 0)).toBe(14)
    expect(after.statements - (before?.statements ?? 0)).toBe(2)
    expect(after.fallbacks).toBe(0)
  })
})
