/**
 * Where PostgreSQL runs no autovacuum (a server with `autovacuum = off`, as on the machines CI
 * runs on, and always the embedded PGlite), the reservations every request writes and deletes
 * would fill the table without end, and so would the row versions each channel request's charge
 * leaves in the channels table: the gateway vacuums both with each lease sweep.
 */
import { expect, test } from 'bun:test'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import * as Config from '../../src/Config.ts'
import type * as Channels from '../../src/ledger/Channels.ts'
import type * as Db from '../../src/ledger/Db.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import { start } from '../../src/main.ts'
import * as Gateway from '../helpers/Gateway.ts'
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
const pagesOf = async (db: Db.Sql, table = 'reservations') =>
  Number((await db`select pg_relation_size(${table}) / 8192 as n`)[0]!.n)

/** `n` requests admitted and finished, one after the other. */
async function requests(keyHash: Uint8Array, n: number) {
  for (let i = 0; i < n; i++) {
    const a = await Ledger.admit(sql, keyHash, 10n)
    expect(a.status).toBe('ok')
    await finishedAtOne(a.requestId)
  }
}

/** Finishes request `id` (of `channelId`, if given) charged 1 for 1 token in and 1 out. */
function finishedAtOne(id: string, channelId?: Channels.Hex) {
  const o = {
    id,
    cost: 1n,
    promptTokens: 1,
    completionTokens: 1,
    status: 'ok',
    latencyMs: 1,
    ttftMs: 1,
  } as const
  return Reservations.finish(sql, o, channelId ? { channelId } : undefined)
}

/** `n` requests on `channelId` admitted and finished, one after the other. */
async function channelRequests(channelId: Channels.Hex, n: number) {
  for (let i = 0; i < n; i++) {
    const requestId = crypto.randomUUID()
    expect((await Ledger.hold(sql, channelId, { want: 10n, need: 10n, requestId })).status).toBe(
      'ok',
    )
    await finishedAtOne(requestId, channelId)
  }
}

/** `n` completions of `model`, one after the other. */
async function completions(client: OpenAI, model: string, n: number) {
  for (let i = 0; i < n; i++)
    await client.chat.completions.create({
      model,
      max_tokens: 2,
      messages: [{ role: 'user', content: 'hi there' }],
    })
}

test.skipIf(runs)(
  'behavior: with no autovacuum, vacuum keeps finished reservations from growing the table',
  async () => {
    const { keyHash } = await Ledger.account(sql, 1_000_000n)
    await requests(keyHash, 300)
    const grown = await pagesOf(sql)
    expect(grown).toBeGreaterThanOrEqual(3)
    expect(await Reservations.vacuum(sql)).toBe(true)
    await requests(keyHash, 300)
    // Unvacuumed, the second 300 take as many pages again.
    expect(await pagesOf(sql)).toBeLessThanOrEqual(grown)
  },
  30_000,
)

test.skipIf(runs)(
  'behavior: with no autovacuum, vacuum keeps a busy channel from growing the channels table',
  async () => {
    // Each charge moves the channel's spent, a column of the channels_unsettled index's
    // predicate: never a HOT update, so each leaves a dead row version only a vacuum frees.
    const { channelId } = await Ledger.channel(sql, 10n ** 12n)
    await Ledger.voucher(sql, channelId, 10n ** 12n)
    await channelRequests(channelId, 1_000)
    const grown = await pagesOf(sql, 'channels')
    expect(grown).toBeGreaterThanOrEqual(3)
    expect(await Reservations.vacuum(sql)).toBe(true)
    await channelRequests(channelId, 1_000)
    // Unvacuumed, the second 1,000 take about as many pages again.
    expect(await pagesOf(sql, 'channels')).toBeLessThanOrEqual(grown)
  },
  30_000,
)

test.if(runs)('behavior: where autovacuum runs, vacuum leaves the table to it', async () => {
  expect(await Reservations.vacuum(sql)).toBe(false)
})

test.skipIf(runs)(
  'behavior: a gateway on a database without autovacuum says so at start and vacuums reservations with its sweep',
  async () => {
    const gw = await Gateway.create({}, undefined, { sweepMs: 100 })
    expect(gw.logs.some((l) => l.includes('"level":40') && l.includes('runs no autovacuum'))).toBe(
      true,
    )
    const { key } = await gw.account()
    await completions(gw.openai(key), 'fake', 600)
    await Bun.sleep(300)
    // 600 requests unvacuumed take 12 pages (a reservation row is about 160 bytes).
    expect(await pagesOf(gw.sql)).toBeLessThanOrEqual(4)
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
    const { key } = await Gateway.account(first.url, adminToken)
    const client = new OpenAI({ apiKey: key, baseURL: `${first.url}/v1`, maxRetries: 0 })
    await completions(client, 'tollway-echo', 600)
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
