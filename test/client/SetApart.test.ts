/**
 * The paying client's channels set apart (refused by the server as closing, or under forced
 * close) and its budget over servers and restarts, against a real gateway and anvil.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtemp } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import { createFetch, Store } from '../../src/client/index.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chain = await Anvil.start({ accounts: 7 })
afterAll(() => chain.stop())
const payments = { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 5_000 }
const gw = await Gateway.create({ chain: Gateway.chainOf(chain), payments })
const words = Array.from({ length: 80 }, (_, i) => `w${i}`).join(' ')
const messages = [{ role: 'user' as const, content: words }]

function client(payer: number, o: { maxTotal?: bigint; store?: Store.Store } = {}) {
  const maxTotal = o.maxTotal ?? 1_000_000n
  const fetch = createFetch({
    account: chain.payers[payer]!.privateKey,
    rpcUrl: chain.rpcUrl,
    limits: { maxDeposit: maxTotal, maxTotal },
    allow: { escrows: [chain.escrowAddress], currencies: [chain.currencyAddress] },
    margin: 64n,
    store: o.store ?? Store.memory(),
  })
  const ask = (at = gw.url) =>
    new OpenAI({
      baseURL: `${at}/v1`,
      apiKey: 'unused',
      fetch,
      maxRetries: 0,
    }).chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
  return { fetch, ask }
}

/** Leaves the channel closing on the server, as a close kept waiting does. */
const closingOnServer = (channelId: string) =>
  gw.sql`update channels set close_requested_at = now(), cooperative_close = true
    where channel_id = ${Buffer.from(channelId.slice(2), 'hex')}`

describe('channels set apart', () => {
  test('behavior: a channel set apart still counts against maxTotal: the next one takes what it left', async () => {
    const { fetch, ask } = client(0, { maxTotal: 5_000n })
    await ask()
    const old = (await fetch.channel(gw.url))!
    await closingOnServer(old.channelId)
    await ask()
    const fresh = (await fetch.channel(gw.url))!
    const apart = (await fetch.closing(gw.url))!
    expect(apart.channelId).toBe(old.channelId)
    expect(BigInt(fresh.deposit)).toBeLessThanOrEqual(5_000n - BigInt(apart.signed))
  }, 60_000)

  test('behavior: a channel refused as closing does not take the place of one under forced close; each is reachable', async () => {
    const { fetch, ask } = client(1)
    await ask()
    const a = await fetch.requestClose(gw.url)
    expect((await fetch.closing(gw.url))!.channelId).toBe(a.channelId)
    await ask()
    const b = (await fetch.channel(gw.url))!.channelId
    await closingOnServer(b)
    await ask()
    // A keeps its forced-close slot (withdraw takes its deposit back); B is set apart too.
    expect((await fetch.closing(gw.url))!.channelId).toBe(a.channelId)
    // close() closes the one in use, then B.
    await fetch.close()
    await fetch.close()
    expect((await fetch.closing(gw.url))!.channelId).toBe(a.channelId)
  }, 60_000)

  test('behavior: with one set apart and one in use, requestClose forces the one named', async () => {
    const { fetch, ask } = client(2)
    await ask()
    const a = (await fetch.channel(gw.url))!.channelId
    await closingOnServer(a)
    await ask()
    const b = (await fetch.channel(gw.url))!.channelId
    expect(b).not.toBe(a)
    const forced = await fetch.requestClose(gw.url, { channelId: a })
    expect(forced.channelId).toBe(a)
    // B is still the channel in use.
    expect((await fetch.channel(gw.url))!.channelId).toBe(b)
    expect((await fetch.closing(gw.url))!).toMatchObject({ channelId: a })
  }, 60_000)
})

describe('a channel the server lost', () => {
  test('behavior: a channel the server no longer knows but the escrow holds is set apart (its deposit reachable), not forgotten', async () => {
    const { fetch, ask } = client(4)
    await ask()
    const lost = (await fetch.channel(gw.url))!.channelId
    // The gateway loses its record of the channel (a database restored from before it).
    // (Its vouchers are append-only: the test lifts the guard for this one deletion.)
    const id = Buffer.from(lost.slice(2), 'hex')
    await gw.sql.begin(async (tx) => {
      await tx`alter table vouchers disable trigger vouchers_append_only`
      await tx`delete from usage where channel_id = ${id}`
      await tx`delete from vouchers where channel_id = ${id}`
      await tx`delete from chain_transactions where channel_id = ${id}`
      await tx`delete from reservations where channel_id = ${id}`
      await tx`delete from channels where channel_id = ${id}`
      await tx`alter table vouchers enable trigger vouchers_append_only`
    })
    await ask()
    expect((await fetch.channel(gw.url))!.channelId).not.toBe(lost)
    expect((await fetch.closing(gw.url))!.channelId).toBe(lost)
    // Its deposit can still be taken back: a forced close of it goes through.
    const forced = await fetch.requestClose(gw.url, { channelId: lost as `0x${string}` })
    expect(forced.channelId).toBe(lost)
  }, 60_000)
})

describe('the budget over servers and restarts', () => {
  test('behavior: a restarted agent counts what its store holds with other servers against maxTotal', async () => {
    const other = await Gateway.create(
      { chain: Gateway.chainOf(chain), payments },
      { db: gw.db, upstream: gw.upstream },
    )
    try {
      const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
      const first = client(3, { maxTotal: 5_000n, store: Store.file(path) })
      await first.ask(gw.url)
      const here = (await first.fetch.channel(gw.url))!
      // Restarted: a new wrapper on the same store, paying the other server first.
      const second = client(3, { maxTotal: 5_000n, store: Store.file(path) })
      await second.ask(other.url)
      const there = (await second.fetch.channel(other.url))!
      expect(BigInt(there.deposit)).toBeLessThanOrEqual(5_000n - BigInt(here.signed))
    } finally {
      await other.stop()
    }
  }, 60_000)
})
