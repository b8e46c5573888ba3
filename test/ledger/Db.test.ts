/**
 * The pool's connections under a link that fails quietly: one that drops what it carries
 * without a reset (a failover, a NAT that forgot it) is closed once a call with a deadline on
 * it goes unanswered, not kept until TCP gives up; a statement still running past the deadline
 * is ended in the database first. Needs DATABASE_URL (a server to forward to).
 */
import { afterAll, expect, test } from 'bun:test'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as Config from '../../src/Config.ts'
import * as Accounts from '../../src/ledger/Accounts.ts'
import * as Db from '../../src/ledger/Db.ts'
import * as Page from '../../src/ledger/Page.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import * as Settlements from '../../src/ledger/Settlements.ts'
import { forwarder } from '../helpers/Forwarder.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const server = Boolean(process.env.DATABASE_URL)

/**
 * A pool of `max` through a link the test breaks (over TLS with `tls`, the link named `host`),
 * with a deadline (1 s unless given); what it reports. With `otherPids`, the link gives process
 * ids other than the server's, as a pooler does; with `applicationName`, the URL names the
 * sessions.
 */
async function pool(
  max: number,
  tls?: { key: string; cert: string },
  host?: string,
  deadline = 1_000,
  otherPids = false,
  applicationName?: string,
) {
  const link = await forwarder(new URL(process.env.DATABASE_URL!), { tls, otherPids })
  const url = new URL(link.url)
  if (tls) url.searchParams.set('sslmode', 'require')
  if (applicationName) url.searchParams.set('application_name', applicationName)
  if (host) url.hostname = host
  const sql = Db.connect({ url: url.toString(), max })
  afterAll(() => sql.end({ timeout: 1 }))
  const lost: string[] = []
  Db.deadline(sql, deadline, (which) => lost.push(which))
  return { link, sql, lost }
}

/** A self-signed key and certificate (PEM) for a TLS link, made with openssl. */
function certificate() {
  const dir = mkdtempSync(join(tmpdir(), 'tollway-pg-tls-'))
  const [key, cert] = [join(dir, 'key.pem'), join(dir, 'cert.pem')]
  const made = Bun.spawnSync(
    ['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1'].concat(
      ['-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=tollway-test'],
    ),
  )
  expect(made.exitCode).toBe(0)
  const pem = { key: readFileSync(key, 'utf8'), cert: readFileSync(cert, 'utf8') }
  rmSync(dir, { recursive: true })
  return pem
}

for (const over of ['TCP', 'TLS'] as const)
  test.skipIf(!server)(
    `error: a pool connection lost without a reset (over ${over}) is closed once a call on it passes the deadline: the calls after it are answered on a new one, not held until TCP gives up`,
    async () => {
      // One connection: every call goes down it. A deadline of 3 s. Over TLS, postgres.js writes
      // through a TLS socket of its own (Db.ts, followTls).
      const tls = over === 'TLS' ? certificate() : undefined
      const { link, sql, lost } = await pool(1, tls, tls && 'localhost', 3_000)
      expect((await Db.answered(sql, sql`select 1 as x`))[0]).toEqual({ x: 1 })
      link.drop()
      const started = performance.now()
      await expect(Db.answered(sql, sql`select 2 as x`)).rejects.toBeInstanceOf(
        Db.DatabaseTimeoutError,
      )
      // Its server processes ended first, on a connection opened for that (the pool's one is
      // lost: queued behind it, the terminate would wait out a deadline of its own), then the
      // socket closed: within the deadline and a tick or two, not two deadlines.
      for (let i = 0; i < 50 && lost.length === 0; i++) await Bun.sleep(100)
      expect(lost).toEqual(['pool'])
      expect(performance.now() - started).toBeLessThan(4_800)
      // Once told, postgres.js has heard of the close: the next call goes down a new connection.
      expect((await Db.answered(sql, sql`select 3 as x`))[0]).toEqual({ x: 3 })
    },
    20_000,
  )

test.skipIf(!server)(
  'error: channel admissions held on a lock past the deadline are ended in the database before their connections are given up: none commits a hold its request was told 503 for (one sent a moment after the other, on a connection of its own, too)',
  async () => {
    const db = await Postgres.fresh()
    const { sql } = db
    Db.deadline(sql, 1_000)
    const c = await Ledger.channel(sql, 1000n)
    await Ledger.voucher(sql, c.channelId, 500n)
    const id = Buffer.from(c.channelId.slice(2), 'hex')
    // Another transaction holds the channel's row (a settle, a top-up, a slow batch).
    const held = await Ledger.locked(sql, [
      (tx) => tx`select 1 from channels where channel_id = ${id} for update`,
    ])
    const admit = (requestId: string) =>
      Reservations.admitOnChannel(sql, {
        channelId: c.channelId,
        model: 'm',
        stream: false,
        want: 100n,
        need: 100n,
        requestId,
        leaseSeconds: 60,
      }).catch((e: unknown) => e)
    const first = admit(crypto.randomUUID())
    // The second goes out while the first waits: its socket is younger than the deadline when
    // the first one's expires.
    await Bun.sleep(150)
    const second = admit(crypto.randomUUID())
    for (const refused of [await first, await second]) expect(Db.isUnreachable(refused)).toBe(true)
    await Bun.sleep(1_500)
    await held.free(0)
    await held.end()
    // Whatever the admissions did is gone: rolled back, or released.
    for (let i = 0; i < 30; i++) {
      const [r] = await sql`select count(*)::int as n from reservations where channel_id = ${id}`
      if (r!.n === 0) break
      await Bun.sleep(100)
    }
    await Bun.sleep(300)
    expect(await sql`select id from reservations where channel_id = ${id}`).toHaveLength(0)
    expect(await Ledger.channelState(sql, c.channelId)).toMatchObject({ reserved: 0n })
  },
  20_000,
)

test.skipIf(!server)(
  'behavior: over TLS the pool names its server (SNI), as postgres.js does on sockets of its own',
  async () => {
    const { link, sql } = await pool(1, certificate(), 'localhost')
    expect((await Db.answered(sql, sql`select 1 as x`))[0]).toEqual({ x: 1 })
    expect(link.servernames).toEqual(['localhost'])
  },
  15_000,
)

for (const pids of ['the server', 'a pooler', 'the server, the URL naming the sessions'] as const)
  test.skipIf(!server)(
    `behavior: when a call passes the deadline, only the connection that waits on its statement is closed: one idle in a transaction that holds a lock (as the settlement holds its advisory lock) stays (process ids from ${pids})`,
    async () => {
      const { sql, lost } = await pool(
        3,
        undefined,
        undefined,
        1_000,
        pids === 'a pooler',
        pids.includes('URL') ? 'someone-else' : undefined,
      )
      // A transaction that holds a lock and waits, its connection idle (it read its answers).
      const holder = await sql.reserve()
      await holder`begin`
      await holder`select pg_advisory_xact_lock(4242)`
      // A call that waits on that lock past the deadline.
      await expect(
        Db.answered(sql, sql`select pg_advisory_xact_lock(4242)`),
      ).rejects.toBeInstanceOf(Db.DatabaseTimeoutError)
      for (let i = 0; i < 30 && lost.length === 0; i++) await Bun.sleep(100)
      expect(lost).toEqual(['pool'])
      // The holder's connection was not closed: its transaction still holds the lock and commits.
      const [held] = await holder`select count(*)::int as n from pg_locks
      where locktype = 'advisory' and objid = 4242 and pid = pg_backend_pid() and granted`
      expect(held).toEqual({ n: 1 })
      await holder`commit`
      holder.release()
      expect((await Db.answered(sql, sql`select 1 as x`))[0]).toEqual({ x: 1 })
    },
    15_000,
  )

for (const over of ['TCP', 'TLS'] as const)
  test.skipIf(!server)(
    `error: after a failover (the sessions gone at the server, their connections silent; over ${over}), the first call past the deadline closes every connection whose session is gone, idle ones too: the calls after it are answered, none waits out a deadline of its own`,
    async () => {
      const tls = over === 'TLS' ? certificate() : undefined
      const { link, sql, lost } = await pool(3, tls, tls && 'localhost', 2_000)
      // Three connections, each used.
      const used = await Promise.all(
        Array.from({ length: 3 }, () =>
          Db.answered(sql, sql`select pg_sleep(0.1), pg_backend_pid() as pid`),
        ),
      )
      expect(new Set(used.map(([r]) => r!.pid)).size).toBe(3)
      link.vanish()
      await expect(Db.answered(sql, sql`select 2 as x`)).rejects.toBeInstanceOf(
        Db.DatabaseTimeoutError,
      )
      // Told of the loss at once (a millisecond's poll): postgres.js has heard of the closes by
      // then, and sends nothing more down those connections (Bun hears of a destroyed socket's
      // close about 1.4 ms later; a call sent between failed CONNECTION_CLOSED).
      for (let i = 0; i < 5_000 && lost.length === 0; i++) await Bun.sleep(1)
      expect(lost).toEqual(['pool'])
      expect(Db.lostConnections(sql).pool).toBe(3)
      // More calls than connections at once: any on a connection still open to the old sessions
      // would be a DatabaseTimeoutError.
      const answers = await Promise.all(
        [1, 2, 3, 4, 5, 6].map((i) => Db.answered(sql, sql`select ${i}::int as x`)),
      )
      expect(answers.map(([r]) => r!.x)).toEqual([1, 2, 3, 4, 5, 6])
    },
    20_000,
  )

test.skipIf(!server)(
  'behavior: after a moment out of reach in which every connection of the pool was refused, the calls sent once the database is back are answered, one on each connection, not held by postgres.js backoff past the deadline',
  async () => {
    // A deadline (5 s) under postgres.js's longest wait (10 to 20 s), over the capped one (1 s).
    const { link, sql } = await pool(10, undefined, undefined, 5_000)
    expect((await sql`select 1 as x`)[0]).toEqual({ x: 1 })
    await link.cut()
    // Ten calls at once: each connection tries to connect, and each is refused, raising the
    // pool's count of failures to ten (postgres.js waits longer after each).
    const refused = await Promise.all(
      Array.from({ length: 10 }, (_, i) => sql`select ${i}::int as x`.catch((e: unknown) => e)),
    )
    expect(refused.map((e) => Db.isUnreachable(e))).toEqual(Array(10).fill(true))
    await link.mend()
    // The database is back: a call on each of the ten connections (each closed, each connects
    // again first) is answered.
    const answers = await Promise.all(
      Array.from({ length: 10 }, (_, i) =>
        Db.answered(sql, sql`select ${i}::int as x`).then(
          ([r]) => r!.x,
          (e: unknown) => (e as { code?: string }).code,
        ),
      ),
    )
    expect(answers).toEqual(Array.from({ length: 10 }, (_, i) => i))
  },
  20_000,
)

test.skipIf(!server)(
  'error: a statement a reserved connection is sent once its socket erred (ECONNRESET) and before it closed fails as closed: it is not lost, its caller waiting for ever (the settlement pass unlocking after a failed statement hung so; patches/postgres+3.4.9.patch)',
  async () => {
    const { link, sql } = await pool(2)
    const reserved = await sql.reserve()
    expect((await reserved`select 1 as x`)[0]).toEqual({ x: 1 })
    // The next statement goes out the moment the one under way fails, as a caller's finally
    // sends its unlock: between the socket's error and its close event.
    const next = reserved`select pg_sleep(5)`.then(
      () => 'ran',
      () =>
        reserved`select 2 as x`.then(
          () => 'the next ran',
          (e: unknown) => (e as { code?: string }).code,
        ),
    )
    await Bun.sleep(100)
    link.reset()
    const hung = Bun.sleep(3_000).then(() => 'hung')
    expect(await Promise.race([next, hung])).toBe('CONNECTION_CLOSED')
    reserved.release()
    expect((await Db.answered(sql, sql`select 3 as x`))[0]).toEqual({ x: 3 })
  },
  15_000,
)

test.skipIf(!server)(
  'error: a settlement pass whose connection is lost without a reset ends within the deadline (its statement cut, the connection closed, the lock gone with its session): the next pass takes the lock, not after TCP gives up',
  async () => {
    const { link, sql } = await pool(3, undefined, undefined, 1_000)
    const store = Settlements.store(sql)
    const started = performance.now()
    const pass = store.withLock(async (locked) => {
      await locked.clock()
      link.drop()
      return locked.clock()
    })
    const hung = Bun.sleep(5_000).then(() => 'hung')
    const ended = await Promise.race([
      pass.then(
        () => 'ran',
        (e: unknown) => e,
      ),
      hung,
    ])
    expect(Db.isUnreachable(ended)).toBe(true)
    expect(performance.now() - started).toBeLessThan(4_000)
    expect(await store.withLock(async (locked) => typeof (await locked.clock()))).toEqual({
      locked: true,
      value: 'string',
    })
  },
  15_000,
)

test.skipIf(!server)(
  'behavior: on a database whose default date style is not ISO, the pool still gives times as ISO text, and a listing pages through its rows by its cursors',
  async () => {
    const name = `tollway_datestyle_${process.pid}`
    const admin = Db.connect({ url: process.env.DATABASE_URL!, max: 1 })
    await admin.unsafe(`drop database if exists ${name}`)
    await admin.unsafe(`create database ${name}`)
    await admin.unsafe(`alter database ${name} set datestyle = 'SQL, DMY'`)
    const url = new URL(process.env.DATABASE_URL!)
    url.pathname = `/${name}`
    const sql = Db.connect({ url: url.toString(), max: 2 })
    try {
      const [r] = await sql`select now()::text as t, current_setting('datestyle') as style`
      expect(r!.style).toBe('ISO, MDY')
      expect(Page.shapes.timestamp.test(r!.t as string)).toBe(true)
      await Db.migrate(sql)
      await Accounts.syncPlans(sql, Config.from({}).plans)
      const accounts = [] as string[]
      for (let i = 0; i < 3; i++)
        accounts.push(await Accounts.create(sql, { name: `a${i}`, plan: 'free' }))
      const seen: string[] = []
      let cursor: string | undefined
      do {
        const page = await Accounts.list(sql, { limit: 1, cursor })
        seen.push(...page.data.map((a) => a.id))
        cursor = page.next_cursor ?? undefined
      } while (cursor)
      expect(seen.sort()).toEqual(accounts.sort())
    } finally {
      await sql.end({ timeout: 1 })
      await admin.unsafe(`drop database if exists ${name} with (force)`)
      await admin.end({ timeout: 1 })
    }
  },
  30_000,
)

test.skipIf(!server)(
  'error: a settlement lock whose statement answers past the deadline, having taken the lock, is let go once its answer comes: the connection goes back to the pool without it, and another session takes it',
  async () => {
    const { link, sql } = await pool(1, undefined, undefined, 1_000)
    expect((await sql`select 1 as x`)[0]).toEqual({ x: 1 })
    // The statement reaches the database, which takes the lock; its answer is held past the
    // deadline, then passes a moment after the caller gave up (before the look for stuck
    // connections, which then finds none to close).
    link.stall('answers')
    const pass = await Settlements.store(sql)
      .withLock(async () => 'ran')
      .then(
        () => 'answered',
        (e: unknown) => e,
      )
    link.resume()
    expect(pass).toBeInstanceOf(Db.DatabaseTimeoutError)
    const other = Db.connect({ url: process.env.DATABASE_URL!, max: 1 })
    try {
      let taken: unknown
      for (let i = 0; i < 60; i++) {
        taken = await Settlements.store(other).withLock(async () => 'ran')
        if ((taken as { locked: boolean }).locked) break
        await Bun.sleep(50)
      }
      expect(taken).toEqual({ locked: true, value: 'ran' })
    } finally {
      await other.end({ timeout: 1 })
    }
  },
  15_000,
)

test.skipIf(!server)(
  'error: a reserved connection (the settlement lock holder) whose socket closed fails its statements as closed, again and again, even once the pool has opened the connection again for others: none throws where nothing catches it (ending the process), none runs on the new session (outside its lock), and its release leaves the pool whole (patches/postgres+3.4.9.patch)',
  async () => {
    // One connection: the reserved one, which the pool opens again for the next caller.
    const { link, sql } = await pool(1)
    const reserved = await sql.reserve()
    const [held] =
      await reserved`select pg_try_advisory_lock(4343) as locked, pg_backend_pid() as pid`
    expect(held!.locked).toBe(true)
    await link.cut()
    // The close reaches postgres.js, which sets the connection's socket aside.
    await Bun.sleep(100)
    await expect(reserved`select 1 as x`).rejects.toMatchObject({ code: 'CONNECTION_CLOSED' })
    await link.mend()
    // The pool opens the connection again for another caller: a new session.
    const [other] = await Db.answered(sql, sql`select pg_backend_pid() as pid`)
    expect(other!.pid).not.toBe(held!.pid)
    // The holder's statements still fail: run there, they would run without its lock.
    for (const n of [2, 3])
      await expect(reserved`select ${n}::int as x`).rejects.toMatchObject({
        code: 'CONNECTION_CLOSED',
      })
    reserved.release()
    // Released, the connection is not handed back twice: the pool answers every call.
    const answers = await Promise.all(
      [1, 2, 3, 4].map((i) => Db.answered(sql, sql`select ${i}::int as x`)),
    )
    expect(answers.map(([r]) => r!.x)).toEqual([1, 2, 3, 4])
  },
  15_000,
)

test.skipIf(!server)(
  "error: a transaction whose connection closed fails its later statements, and what waited in it, even once the pool has opened the connection again for another caller: none runs (or commits) on that caller's session (patches/postgres+3.4.9.patch)",
  async () => {
    const { link, sql } = await pool(1)
    let late: unknown
    const ended = sql
      .begin(async (tx) => {
        await tx`select 1`
        await link.cut()
        // The close reaches postgres.js.
        await Bun.sleep(100)
        await link.mend()
        // The pool opens the connection again for another caller.
        expect((await Db.answered(sql, sql`select 1 as x`))[0]).toEqual({ x: 1 })
        late = await tx`select 2 as x`.catch((e: unknown) => e)
      })
      .catch((e: unknown) => e)
    expect(await ended).toMatchObject({ code: 'CONNECTION_CLOSED' })
    for (let i = 0; i < 50 && late === undefined; i++) await Bun.sleep(50)
    expect(late).toMatchObject({ code: 'CONNECTION_CLOSED' })
  },
  15_000,
)

test.skipIf(!server)(
  'error: a session ended by the server while a statement ran takes its error with it: the next statement, on a new session, runs (patches/postgres+3.4.9.patch)',
  async () => {
    const sql = Db.connect({ url: process.env.DATABASE_URL!, max: 1 })
    const other = Db.connect({ url: process.env.DATABASE_URL!, max: 1 })
    afterAll(() => Promise.all([sql.end({ timeout: 1 }), other.end({ timeout: 1 })]))
    const [me] = await sql`select pg_backend_pid() as pid`
    const sleeping = sql`select pg_sleep(10)`.catch((e: unknown) => e)
    // The statement is under way when its process is ended: the server sends a 57P01 for it,
    // then closes the session.
    for (let i = 0; i < 50; i++) {
      const [row] = await other`select state from pg_stat_activity where pid = ${me!.pid}`
      if (row?.state === 'active') break
      await Bun.sleep(20)
    }
    await other`select pg_terminate_backend(${me!.pid})`
    expect(await sleeping).toBeInstanceOf(Error)
    // Unpatched, this one failed with the dead session's 57P01, though it never ran there.
    const [next] = await sql`select 1 as x, pg_backend_pid() as pid`
    expect(next!.x).toBe(1)
    expect(next!.pid).not.toBe(me!.pid)
  },
  15_000,
)

test.skipIf(!server)(
  "error: an exclusive turn whose connection closed while its work ran lasts until that work is done (the next holder of the lock starts only then) and answers with the work's outcome",
  async () => {
    const { link, sql } = await pool(2)
    const turn = Db.exclusive(sql, 'tollway.test.exclusive.cut')
    const events: string[] = []
    const work = Promise.withResolvers<string>()
    const first = turn(async () => {
      events.push('first began')
      const result = await work.promise
      events.push('first ended')
      return result
    })
    for (let i = 0; i < 100 && events.length === 0; i++) await Bun.sleep(20)
    expect(events).toEqual(['first began'])
    // The transaction holding the lock loses its connection while the work still runs.
    await link.cut()
    await Bun.sleep(100)
    await link.mend()
    const second = turn(async () => {
      events.push('second began')
      return 'second'
    })
    await Bun.sleep(500)
    expect(events).toEqual(['first began'])
    work.resolve('first')
    expect(await first).toBe('first')
    expect(await second).toBe('second')
    expect(events).toEqual(['first began', 'first ended', 'second began'])
  },
  15_000,
)

test('behavior: a database URL loses its application_name (the gateway names its sessions), and keeps everything else', () => {
  const base = 'postgres://u:p@db.example:5432/app'
  expect(Db.unnamed(base)).toBe(base)
  expect(Db.unnamed(`${base}?application_name=x`)).toBe(base)
  expect(Db.unnamed(`${base}?sslmode=require&application_name=x&connect_timeout=5`)).toBe(
    `${base}?sslmode=require&connect_timeout=5`,
  )
  expect(Db.unnamed(`${base}?sslmode=verify-full`)).toBe(`${base}?sslmode=verify-full`)
  // Several hosts, as postgres.js takes them.
  expect(
    Db.unnamed(
      'postgres://u@h1:5432,h2:5433/app?application_name=x&target_session_attrs=read-write',
    ),
  ).toBe('postgres://u@h1:5432,h2:5433/app?target_session_attrs=read-write')
})
