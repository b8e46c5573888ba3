/**
 * The database out of reach (every connection cut, new ones refused), through a TCP
 * forwarder between the gateway and PostgreSQL that the test cuts and mends: requests get a
 * typed 503 with Retry-After (they got a 500 "this is a bug"), the process stays up, and once
 * the database is back the same requests go through without a restart.
 */
import { afterAll, expect, test } from 'bun:test'
import * as Db from '../../src/ledger/Db.ts'
import * as Instances from '../../src/ledger/Instances.ts'
import * as Anvil from '../helpers/Anvil.ts'
import { forwarder } from '../helpers/Forwarder.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Postgres from '../helpers/Postgres.ts'
import * as Sse from '../helpers/Sse.ts'
import * as Upstream from '../helpers/Upstream.ts'

const server = process.env.DATABASE_URL ? new URL(process.env.DATABASE_URL) : undefined

/**
 * A gateway (with `overrides`) whose database is reached through a forwarder the test cuts or
 * stalls; an account's id and key; a one-word completion and a credits read with that key.
 */
async function behindLink(overrides: Record<string, unknown> = {}, plan = 'unlimited') {
  const db = await Postgres.fresh()
  const link = await forwarder(server!)
  const sql = Db.connect({ url: link.url, schema: db.schema!, max: 4 })
  afterAll(() => sql.end({ timeout: 1 }))
  const gw = await Gateway.create(overrides, { db: { ...db, sql }, upstream: Upstream.start() })
  const { id, key } = await gw.account({ plan })
  const chat = (body: Record<string, unknown> = {}) =>
    fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }], ...body }),
    })
  const credits = () =>
    fetch(`${gw.url}/v1/credits`, {
      headers: { authorization: `Bearer ${key}` },
      signal: AbortSignal.timeout(5_000),
    })
  /** The status of a completion once one is answered 200, or the last of 50 tries a tenth of
   * a second apart (the database back, postgres.js connecting again). */
  const served = async () => {
    let status = (await chat()).status
    for (let i = 0; i < 50 && status !== 200; i++) {
      await Bun.sleep(100)
      status = (await chat()).status
    }
    return status
  }
  return { db, link, gw, id, chat, credits, served, pool: sql }
}

/** The gateway's metrics, as the operator scrapes them. */
async function metrics(gw: Gateway.TestGateway) {
  const res = await fetch(`${gw.url}/metrics`, {
    headers: { authorization: `Bearer ${gw.config.adminToken}` },
  })
  return res.text()
}

// The embedded database runs in the gateway's process: nothing to cut.
test.skipIf(!server)(
  'error: the database out of reach → 503 database_unavailable with Retry-After, never a 500; back, it serves again',
  async () => {
    const { link, gw, id, chat, credits, served } = await behindLink()
    expect((await chat()).status).toBe(200)

    await link.cut()
    for (const res of [await chat(), await credits(), await chat()]) {
      expect(res.status).toBe(503)
      expect(res.headers.get('retry-after')).toBe('5')
      const body = (await res.json()) as { error: { type: string; code: string } }
      expect(body.error.code).toBe('database_unavailable')
    }
    expect(gw.logs.join('\n')).not.toContain('this is a bug')

    await link.mend()
    expect(await served()).toBe(200)
    expect((await credits()).status).toBe(200)
    // Nothing of the refused requests was written: the ledger holds its invariants, nothing is
    // held, and the two answered requests are its only usage rows and charges. (An admission
    // whose answer the cut lost may have gone through: it is released once the database is
    // back, its row a `database_unavailable` charged nothing.)
    const l = await Gateway.released(gw.sql, id)
    expect(l.open_reservations).toBe(0n)
    expect(l.reserved).toBe(0n)
    const rows = (await gw.sql`select status, cost from usage where account_id = ${id}`).filter(
      (r) => r.status !== 'database_unavailable' || r.cost !== 0n,
    )
    expect(rows.map((r) => r.status)).toEqual(['ok', 'ok'])
    expect(1_000_000n - l.balance).toBe(rows.reduce((n, r) => n + (r.cost as bigint), 0n))
  },
  30_000,
)

test.skipIf(!server)(
  'error: a database that takes connections but does not answer → 503 database_unavailable after DATABASE_TIMEOUT_MS, not a hung request; nothing is held once it answers again (an admission it ran meanwhile released, charged nothing)',
  async () => {
    const { db, link, id, chat, credits, served } = await behindLink({ databaseTimeoutMs: 1_000 })
    expect((await chat()).status).toBe(200)

    link.stall()
    const started = performance.now()
    const refused = [await chat(), await credits()]
    const waited = performance.now() - started
    for (const res of refused) {
      expect(res.status).toBe(503)
      const body = (await res.json()) as { error: { code: string } }
      expect(body.error.code).toBe('database_unavailable')
    }
    // Each waited its deadline (1 s, checked every quarter second), not longer.
    expect(waited).toBeLessThan(4_000)

    link.resume()
    expect(await served()).toBe(200)
    // The admission its request gave up on: its connection is replaced at the deadline, its
    // server process ended first if the pool can reach it. Whether the database ran it before
    // (the stall let go of it before its connection went), it holds nothing: released, charged
    // nothing. The balance moved by the answered requests only (read on the schema's own
    // connection, which the stall never touched).
    const l = await Gateway.released(db.sql, id)
    expect(l.open_reservations).toBe(0n)
    expect(l.reserved).toBe(0n)
    const rows =
      await db.sql`select status, cost from usage where account_id = ${id} order by created_at`
    expect(rows.filter((r) => r.status === 'ok').length).toBe(2)
    for (const r of rows.filter((r) => r.status !== 'ok'))
      expect([r.status, r.cost]).toEqual(['database_unavailable', 0n])
    expect(1_000_000n - l.balance).toBe(rows.reduce((n, r) => n + (r.cost as bigint), 0n))
  },
  30_000,
)

test.skipIf(!server)(
  'error: GET /v1/receipts/key?key_id= while the database takes connections but does not answer → 503 database_unavailable after DATABASE_TIMEOUT_MS, not a hung request',
  async () => {
    const { link, gw } = await behindLink({ databaseTimeoutMs: 1_000 })
    const ask = (keyId: string) =>
      fetch(`${gw.url}/v1/receipts/key?key_id=${keyId}`, { signal: AbortSignal.timeout(10_000) })
    expect((await ask('0'.repeat(16))).status).toBe(404)
    link.stall()
    // Anyone may ask for any key id: each one a look-up in the database.
    const res = await ask('1'.repeat(16))
    expect(res.status).toBe(503)
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe(
      'database_unavailable',
    )
    link.resume()
    expect((await ask('0'.repeat(16))).status).toBe(404)
  },
  30_000,
)

for (const payments of [false, true])
  test.skipIf(!server)(
    `behavior: a gateway stopping while its database does not answer stops within the deadline, not when the database answers${payments ? ' (with payments: its settlement worker and LISTEN stop too)' : ''}`,
    async () => {
      const chain = payments ? await Anvil.start() : undefined
      if (chain) afterAll(() => chain.stop())
      const { link, gw, chat } = await behindLink({
        databaseTimeoutMs: 1_000,
        ...(chain
          ? {
              chain: Gateway.chainOf(chain),
              payments: { challengeSecret: 'test-challenge-secret-0123456789' },
            }
          : {}),
      })
      link.stall()
      const res = await chat()
      expect(res.status).toBe(503)
      // Its admission is still on its way: the stop waits for it no longer than the deadline.
      const started = performance.now()
      const stopped = await Promise.race([
        gw.stop().then(() => true),
        Bun.sleep(8_000).then(() => false),
      ])
      expect(stopped).toBe(true)
      expect(performance.now() - started).toBeLessThan(8_000)
      link.resume()
    },
    30_000,
  )

test.skipIf(!server)(
  'behavior: admissions that waited behind a database that did not answer, and were given up on, are not run when it answers again (they took the plan rate)',
  async () => {
    // Five a minute, any number at once.
    const rated = { tier: 0, requestsPerMinute: 5, maxConcurrent: null, tokensPerMonth: null }
    const { link, chat } = await behindLink(
      { databaseTimeoutMs: 1_000, plans: { ...Gateway.plans, rated } },
      'rated',
    )
    expect((await chat()).status).toBe(200)
    link.stall()
    // Ten at once: one or two go to the database (and hang there), the rest wait behind them.
    const refused = await Promise.all(Array.from({ length: 10 }, () => chat()))
    expect(refused.map((r) => r.status)).toEqual(Array(10).fill(503))
    link.resume()
    // The first, and the one or two that did reach the database, leave room in the five.
    // (Every refused one run when the database answered: 11, a 429.)
    let res = await chat()
    for (let i = 0; i < 50 && res.status === 503; i++) {
      await Bun.sleep(100)
      res = await chat()
    }
    expect(res.status).toBe(200)
  },
  30_000,
)

test.skipIf(!server)(
  'behavior: an admission the database committed whose answer was lost after the deadline (its connection dropped) is released once the database is back, not held for its lease',
  async () => {
    const { db, link, id, chat } = await behindLink({ databaseTimeoutMs: 1_000 }, 'free')
    expect((await chat()).status).toBe(200)
    // The statements reach the database; its answers do not come back.
    link.stall('answers')
    expect((await chat()).status).toBe(503)
    // The connection that carried the admission drops: its answer is an error now.
    await link.cut()
    await link.mend()
    const l = await Gateway.released(db.sql, id)
    expect(l.open_reservations).toBe(0n)
    const rows = await db.sql`select status, cost from usage where account_id = ${id}`
    expect(rows.map((r) => r.status).sort()).toEqual(['database_unavailable', 'ok'])
    expect(rows.find((r) => r.status === 'database_unavailable')!.cost).toBe(0n)
  },
  30_000,
)

test.skipIf(!server)(
  'error: a stream whose extension the database does not answer ends with an error event database_unavailable after the deadline, not retried deadline after deadline',
  async () => {
    const { link, chat } = await behindLink({ databaseTimeoutMs: 1_000 })
    // 300 words at 50 ms, extended 16 tokens at a time.
    const words = Array.from({ length: 300 }, (_, i) => `w${i}`).join(' ')
    const res = await chat({
      model: 'fake-slow',
      stream: true,
      messages: [{ role: 'user', content: words }],
    })
    const reader = res.body!.getReader()
    let raw = ''
    while (!Sse.text(Sse.events(raw)).includes('w0'))
      raw += new TextDecoder().decode((await reader.read()).value)
    link.stall()
    const started = performance.now()
    for (let r = await reader.read(); !r.done; r = await reader.read())
      raw += new TextDecoder().decode(r.value)
    const error = Sse.json(raw).find((e) => e.error) as { error: { code: string } }
    expect(error.error.code).toBe('database_unavailable')
    // One deadline (1 s, checked each quarter second) after the extension went out, and the
    // end's charge given up on after another: not three deadlines for the extension.
    expect(performance.now() - started).toBeLessThan(3_500)
    link.resume()
  },
  30_000,
)

test.skipIf(!server)(
  'error: a ledger connection lost without a reset (what it carries dropped, new connections fine) is replaced after the deadline: the next requests are served, not refused until TCP gives up',
  async () => {
    const { db, link, gw, id, chat, served } = await behindLink({ databaseTimeoutMs: 1_000 })
    expect((await chat()).status).toBe(200)
    link.drop()
    expect((await chat()).status).toBe(503)
    // The lost connection's calls failed with it; the next ones go down a new connection.
    expect(await served()).toBe(200)
    expect(gw.logs.join('\n')).toContain('the ledger connection did not answer within')
    expect(await metrics(gw)).toMatch(
      /^tollway_database_connections_lost_total\{connection="ordered"\} [1-9]\d*$/m,
    )
    // The refused request holds nothing; the answered two are charged.
    const l = await Gateway.released(db.sql, id)
    expect([l.open_reservations, l.reserved]).toEqual([0n, 0n])
    const rows = await db.sql`select status from usage where account_id = ${id} and status = 'ok'`
    expect(rows.length).toBeGreaterThanOrEqual(2)
  },
  30_000,
)

test.skipIf(!server)(
  'error: pool connections lost without a reset (what they carry dropped, new connections fine) are closed as calls on them pass the deadline: account reads are served again, not refused until TCP gives up',
  async () => {
    const { link, gw, credits } = await behindLink({ databaseTimeoutMs: 1_000 })
    expect((await credits()).status).toBe(200)
    link.drop()
    // Each lost connection (the pool has 4) is found by a call on it; each such read is a 503
    // after the deadline.
    const refused: number[] = []
    let res = await credits()
    while (res.status !== 200 && refused.length < 8) {
      refused.push(res.status)
      res = await credits()
    }
    expect(res.status).toBe(200)
    expect(refused.length).toBeGreaterThanOrEqual(1)
    expect(refused.every((s) => s === 503)).toBe(true)
    // Closed a tick after the deadline passed (a read may be served meanwhile on a connection
    // opened after the drop).
    const closed = 'database connections that did not answer within DATABASE_TIMEOUT_MS were closed'
    for (let i = 0; i < 30 && !gw.logs.join('\n').includes(closed); i++) await Bun.sleep(100)
    expect(gw.logs.join('\n')).toContain(closed)
    expect(await metrics(gw)).toMatch(
      /^tollway_database_connections_lost_total\{connection="pool"\} [1-9]\d*$/m,
    )
  },
  30_000,
)

/** Before the admission a lock holds: its connection as it was, dropped and served again
 * once, or dropped while idle (the held admission is the first call on its new one). */
const drops = {
  none: '',
  served:
    ' (its connection dropped and opened again before: the new server process is the one ended)',
  idle: ' (its connection dropped while idle, the held admission the first call on the new one)',
}
for (const [dropped, title] of Object.entries(drops))
  test.skipIf(!server)(
    `error: an admission held past the deadline by a lock (the database slow, not gone) is ended with its connection: once the lock goes it does not commit a hold its request was told 503 for${title}`,
    async () => {
      const { db, gw, id, chat, served, pool } = await behindLink({ databaseTimeoutMs: 1_000 })
      expect((await chat()).status).toBe(200)
      // Its charge written (it follows its answer), so that the admission is what waits.
      const charged = async (n: number) => {
        for (let i = 0; i < 100; i++) {
          const [u] = await db.sql`
            select count(*)::int as n from usage where account_id = ${id} and status = 'ok'`
          if (u!.n === n) return
          await Bun.sleep(10)
        }
      }
      await charged(1)
      if (dropped !== 'none') {
        // The gateway's sessions end (a restarted pooler, an admin): its next calls open new
        // ones, with new server processes.
        await db.sql`
          select pg_terminate_backend(pid) from pg_stat_activity
          where datname = current_database() and pid <> pg_backend_pid()
            and application_name = ${(await Instances.nameOf(pool))!}`
        await Bun.sleep(100)
      }
      if (dropped === 'served') {
        expect(await served()).toBe(200)
        await charged(2)
      }
      // The account row held by another transaction (a migration, an admin's, another batch).
      const tx = await db.sql.reserve()
      try {
        await tx`begin`
        await tx`select 1 from accounts where id = ${id} for update`
        expect((await chat()).status).toBe(503)
        // Past the deadline, its connection replaced and its release tried (finding nothing
        // yet: the admission waits for the row); then the lock goes.
        await Bun.sleep(1_500)
        await tx`commit`
      } finally {
        tx.release()
      }
      // Nothing held: the admission was rolled back (or, had it committed first, released).
      await Bun.sleep(500)
      const l = await Gateway.released(db.sql, id)
      expect([l.open_reservations, l.reserved]).toEqual([0n, 0n])
      expect((await chat()).status).toBe(200)
      expect(gw.logs.join('\n')).toContain('the ledger connection did not answer within')
      expect(await metrics(gw)).toMatch(
        /^tollway_database_connections_lost_total\{connection="ordered"\} [1-9]\d*$/m,
      )
    },
    30_000,
  )
