/**
 * Where PostgreSQL runs no autovacuum (a server with `autovacuum = off`, as on the machines CI
 * runs on, and always the embedded PGlite), the reservations every request writes and deletes
 * would fill the table without end: the gateway vacuums it with each lease sweep.
 */
import { afterAll, expect, test } from 'bun:test'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as Config from '../../src/Config.ts'
import type * as Db from '../../src/ledger/Db.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import { start } from '../../src/main.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const plans = {
  unlimited: {
    tier: 0,
    requestsPerMinute: null,
    maxConcurrent: null,
    tokensPerMonth: null,
    wallet: null,
  },
}
const db = await Postgres.fresh(plans)
const sql = db.sql
const runs = await Reservations.autovacuumRuns(sql)
const pagesOf = async (db: Db.Sql) =>
  Number((await db`select pg_relation_size('reservations') / 8192 as n`)[0]!.n)
const pages = () => pagesOf(sql)

/** An account with credits and a key, through the admin API of the gateway at `url`. */
async function keyOf(url: string, adminToken: string) {
  const admin = (path: string, body: unknown) =>
    fetch(`${url}/admin${path}`, {
      method: 'POST',
      headers: { authorization: `Bearer ${adminToken}`, 'content-type': 'application/json' },
      body: JSON.stringify(body),
    }).then((r) => r.json() as Promise<Record<string, string>>)
  const { id } = await admin('/accounts', { name: 'v', plan: 'unlimited' })
  await admin(`/accounts/${id}/credits`, { amount: '100000000', note: 'test' })
  return { key: (await admin(`/accounts/${id}/keys`, { name: 'k' })).key! }
}

/** `n` completions of the echo model, one after the other. */
async function completions(url: string, key: string, n: number) {
  for (let i = 0; i < n; i++) {
    const res = await fetch(`${url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        model: 'tollway-echo',
        max_tokens: 2,
        messages: [{ role: 'user', content: 'hi there' }],
      }),
    })
    expect(res.status).toBe(200)
    await res.arrayBuffer()
  }
}

/** `n` requests admitted and finished, one after the other. */
async function requests(keyHash: Uint8Array, n: number) {
  for (let i = 0; i < n; i++) {
    const a = await Ledger.admit(sql, keyHash, 10n)
    expect(a.status).toBe('ok')
    await Reservations.finish(sql, {
      id: a.requestId,
      cost: 1n,
      promptTokens: 1,
      completionTokens: 1,
      status: 'ok',
      latencyMs: 1,
      ttftMs: 1,
    })
  }
}

test.skipIf(runs)(
  'behavior: with no autovacuum, vacuum keeps finished reservations from growing the table',
  async () => {
    const { keyHash } = await Ledger.account(sql, 1_000_000n)
    await requests(keyHash, 300)
    const grown = await pages()
    expect(grown).toBeGreaterThanOrEqual(3)
    expect(await Reservations.vacuum(sql)).toBe(true)
    await requests(keyHash, 300)
    // Unvacuumed, the second 300 take as many pages again.
    expect(await pages()).toBeLessThanOrEqual(grown)
  },
  30_000,
)

test.if(runs)('behavior: where autovacuum runs, vacuum leaves the table to it', async () => {
  expect(await Reservations.vacuum(sql)).toBe(false)
})

test.skipIf(runs)(
  'behavior: a gateway on a database without autovacuum says so at start and vacuums reservations with its sweep',
  async () => {
    const logs: string[] = []
    const adminToken = 'test-admin-token-0123456789'
    const gateway = await start(
      Config.from({
        port: 0,
        adminToken,
        logLevel: 'info',
        devChain: false,
        plans,
        defaultPlan: 'unlimited',
      }),
      { sql, listen: false, sweepMs: 100, logDestination: { write: (l: string) => logs.push(l) } },
    )
    afterAll(() => gateway.stop())
    expect(logs.some((l) => l.includes('"level":40') && l.includes('runs no autovacuum'))).toBe(
      true,
    )
    const { key } = await keyOf(gateway.url, adminToken)
    await sql`vacuum reservations`
    await completions(gateway.url, key, 600)
    await Bun.sleep(300)
    // 600 requests unvacuumed take 12 pages (a reservation row is about 160 bytes).
    expect(await pages()).toBeLessThanOrEqual(4)
  },
  60_000,
)

test('behavior: the embedded database is vacuumed at start, before the first request', async () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'tollway-vacuum-'))
  const adminToken = 'test-admin-token-0123456789'
  const config = Config.from({
    port: 0,
    adminToken,
    logLevel: 'warn',
    devChain: false,
    dataDir,
    plans,
    defaultPlan: 'unlimited',
  })
  const first = await start(config)
  try {
    const { key } = await keyOf(first.url, adminToken)
    await completions(first.url, key, 600)
    expect(await pagesOf(first.sql)).toBeGreaterThanOrEqual(8)
  } finally {
    await first.stop()
  }
  const second = await start(config)
  try {
    expect(await pagesOf(second.sql)).toBeLessThanOrEqual(1)
  } finally {
    await second.stop()
    rmSync(dataDir, { recursive: true, force: true })
  }
}, 120_000)
