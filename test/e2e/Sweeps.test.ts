/**
 * The lease sweep runs one at a time in an instance: one that waits (a database slow to
 * answer, a lock on the reservations) is not joined by another at each interval, each on a
 * connection of the pool (ten intervals on, all of them), each releasing the same rows again.
 */
import { expect, test } from 'bun:test'
import * as Db from '../../src/ledger/Db.ts'
import * as Instances from '../../src/ledger/Instances.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'
import * as Upstream from '../helpers/Upstream.ts'

const server = Boolean(process.env.DATABASE_URL)

test.skipIf(!server)(
  'behavior: a sweep held up by a lock is not joined by more sweeps at each interval; once the lock goes, it releases the expired reservation once',
  async () => {
    const { db, gw, id, requestId, waiting, unlock, done } = await sweepHeld()
    try {
      while ((await waiting()) === 0) await Bun.sleep(20)
      // Twenty intervals more: each used to start a sweep of its own, on a connection of its own.
      await Bun.sleep(1_000)
      expect(await waiting()).toBe(1)

      // The sweep under way goes on: the reservation is released, once.
      await unlock()
      await gw.stop()
      const [r] = await db.sql`select count(*)::int as n from reservations where id = ${requestId}`
      expect(r!.n).toBe(0)
      const usage = await db.sql`select status from usage where account_id = ${id}`
      expect(usage.map((u) => u.status)).toEqual(['abandoned'])
      expect(
        gw.logs.filter((l) => l.includes('released reservations of dead requests')),
      ).toHaveLength(1)
      expect(gw.logs.filter((l) => l.includes('sweep failed'))).toEqual([])
      await Ledger.accountState(db.sql, id)
    } finally {
      await done()
    }
  },
  30_000,
)

test.skipIf(!server)(
  'behavior: a sweep held up past the database deadline gives up (its session ended), so a later sweep runs; once the lock goes, the expired reservation is released',
  async () => {
    const { db, gw, id, unlock, done } = await sweepHeld({ databaseTimeoutMs: 1_000 })
    try {
      // The lock outlives the deadline: the sweep waiting on it is given up on (it waited for
      // ever before, and no other sweep ran), and the next one waits in turn.
      const failed = () => gw.logs.filter((l) => l.includes('sweep failed'))
      for (let i = 0; i < 200 && failed().length === 0; i++) await Bun.sleep(100)
      expect(failed()[0]).toContain('did not answer in time')
      await unlock()
      await gw.stop()
      const usage = await db.sql`select status from usage where account_id = ${id}`
      expect(usage.map((u) => u.status)).toEqual(['abandoned'])
      await Ledger.accountState(db.sql, id)
    } finally {
      await done()
    }
  },
  60_000,
)

test.skipIf(!server)(
  'behavior: a stop lets the sweep under way finish before it returns: the expired reservation the sweep waited on is released by the time the stop is done, and nothing failed',
  async () => {
    const { gw, id, requestId, waiting, watcher, free, done } = await sweepHeld()
    try {
      for (let i = 0; i < 250 && (await waiting()) === 0; i++) await Bun.sleep(20)
      // The stop begins while the sweep waits on the lock; the lock goes a moment later.
      const order: string[] = []
      const stopped = gw.stop().then(() => order.push('stopped'))
      await Bun.sleep(300)
      order.push('freed')
      await free()
      await stopped
      expect(order).toEqual(['freed', 'stopped'])
      const [r] = await watcher`select count(*)::int as n from reservations where id = ${requestId}`
      expect(r!.n).toBe(0)
      const usage = await watcher`select status from usage where account_id = ${id}`
      expect(usage.map((u) => u.status)).toEqual(['abandoned'])
      expect(
        gw.logs.filter((l) => l.includes('released reservations of dead requests')),
      ).toHaveLength(1)
      expect(gw.logs.filter((l) => l.includes('sweep failed'))).toEqual([])
    } finally {
      await done()
    }
  },
  30_000,
)

test.skipIf(!server)(
  'behavior: a stop that comes while the sweep ends the sessions of dead instances makes it go no further: the expired reservation is left for another instance',
  async () => {
    const db = await Postgres.fresh(Gateway.plans as never)
    const gw = await Gateway.create({}, { db, upstream: Upstream.start() }, { sweepMs: 50 })
    const name = (await Instances.nameOf(db.sql))!
    const { id, keyHash } = await Ledger.account(db.sql, 1_000n)
    const { requestId } = await Ledger.admit(db.sql, keyHash, 10n)
    const watcher = Db.connect({ url: db.url, schema: db.schema!, max: 1 })
    // The instances table held: the sweep waits in its first step (ending dead instances'
    // sessions); the lease expires meanwhile, seen once the lock goes.
    const locked = await holding(db, [
      'lock table tollway_instances in access exclusive mode',
      `update reservations set expires_at = now() - interval '1 second' where id = '${requestId}'`,
    ])
    try {
      const ending = async () => {
        const [r] = await watcher`select count(*)::int as n from pg_stat_activity
          where application_name = ${name} and wait_event_type = 'Lock'
            and query like '%pg_terminate_backend%'`
        return r!.n as number
      }
      for (let i = 0; i < 250 && (await ending()) === 0; i++) await Bun.sleep(20)
      expect(await ending()).toBe(1)
      const stopped = gw.stop()
      await Bun.sleep(300)
      await locked.free()
      await stopped
      // It went on to release it before: a stopping instance's sweep made two more calls.
      const [r] = await watcher`select count(*)::int as n from reservations where id = ${requestId}`
      expect(r!.n).toBe(1)
      expect(gw.logs.filter((l) => l.includes('released reservations'))).toEqual([])
      expect(gw.logs.filter((l) => l.includes('sweep failed'))).toEqual([])
      const usage = await watcher`select status from usage where account_id = ${id}`
      expect(usage).toHaveLength(0)
    } finally {
      await locked.done()
      await watcher.end({ timeout: 1 })
    }
  },
  30_000,
)

/** Another session runs `statements` in a transaction it keeps open until `free`. */
async function holding(db: Postgres.TestDb, statements: string[]) {
  const locker = Db.connect({ url: db.url, schema: db.schema!, max: 1 })
  const locked = Promise.withResolvers<void>()
  const release = Promise.withResolvers<void>()
  const held = locker.begin(async (tx) => {
    for (const s of statements) await tx.unsafe(s)
    locked.resolve()
    await release.promise
  })
  await locked.promise
  return {
    free: async () => {
      release.resolve()
      await held
    },
    done: async () => {
      release.resolve()
      await held.catch(() => {})
      await locker.end({ timeout: 1 })
    },
  }
}

/**
 * A gateway sweeping every 50 ms (`config` its own) whose sweep meets a lock: an account's
 * admitted request, its lease expired while another session holds the reservations table
 * (`lockedExpired`). `waiting` counts the gateway's sessions waiting on a lock.
 */
async function sweepHeld(config: Record<string, unknown> = {}) {
  const db = await Postgres.fresh(Gateway.plans as never)
  const gw = await Gateway.create(config, { db, upstream: Upstream.start() }, { sweepMs: 50 })
  const name = (await Instances.nameOf(db.sql))!
  expect(name).toBeDefined()
  const { id, keyHash } = await Ledger.account(db.sql, 1_000n)
  const { requestId } = await Ledger.admit(db.sql, keyHash, 10n)
  const locked = await lockedExpired(db, requestId)
  // The sweep's statements: the Idempotency-Key prune, a turn of its own (one at a time too),
  // reads the reservations table as well, and waits on the lock beside the sweep.
  const waiting = async () => {
    const [r] = await locked.watcher`select count(*)::int as n from pg_stat_activity
      where application_name = ${name} and wait_event_type = 'Lock'
        and query not like '%idempotency_keys%'`
    return r!.n as number
  }
  return { db, gw, id, requestId, waiting, ...locked }
}

/**
 * Another session takes the reservations table (access exclusive) and expires the lease of
 * `requestId` meanwhile; resolves once it holds it. `watcher` is a connection of its own to
 * watch with (the gateway's pool may have none free); `unlock` ends the lock and waits for the
 * release; `done` ends both connections.
 */
async function lockedExpired(db: Postgres.TestDb, requestId: string) {
  const locked = await holding(db, [
    'lock table reservations in access exclusive mode',
    `update reservations set expires_at = now() - interval '1 second' where id = '${requestId}'`,
  ])
  const watcher = Db.connect({ url: db.url, schema: db.schema!, max: 1 })
  return {
    watcher,
    /** Ends the lock (its transaction commits), not waiting for what waited on it. */
    free: locked.free,
    /** Ends the lock, then waits (5 s at most) for the reservation to be released. */
    unlock: async () => {
      await locked.free()
      for (let i = 0; i < 100; i++) {
        const [r] =
          await watcher`select count(*)::int as n from reservations where id = ${requestId}`
        if (r!.n === 0) break
        await Bun.sleep(50)
      }
    },
    done: async () => {
      await locked.done()
      await watcher.end({ timeout: 1 })
    },
  }
}
