/**
 * The paying client's channels set apart (refused by the server as closing, or under forced
 * close), its budget over servers, payers and restarts, one stream per channel, and records
 * it must not lose, against a real gateway and anvil.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtemp } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import { privateKeyToAccount } from 'viem/accounts'
import { ChannelStateError, ClientError, createFetch, Store } from '../../src/client/index.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chain = await Anvil.start({ accounts: 15 })
afterAll(() => chain.stop())
const payments = { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 5_000 }
const gw = await Gateway.create({ chain: Gateway.chainOf(chain), payments })
const words = Array.from({ length: 80 }, (_, i) => `w${i}`).join(' ')
const messages = [{ role: 'user' as const, content: words }]

function client(
  payer: number,
  o: { maxTotal?: bigint; store?: Store.Store; fetch?: typeof fetch; margin?: bigint } = {},
) {
  const maxTotal = o.maxTotal ?? 1_000_000n
  const fetch = createFetch({
    account: chain.payers[payer]!.privateKey,
    rpcUrl: chain.rpcUrl,
    limits: { maxDeposit: maxTotal, maxTotal },
    allow: { escrows: [chain.escrowAddress], currencies: [chain.currencyAddress] },
    margin: o.margin ?? 64n,
    store: o.store ?? Store.memory(),
    fetch: o.fetch,
  })
  const sdk = (at = gw.url) =>
    new OpenAI({ baseURL: `${at}/v1`, apiKey: 'unused', fetch, maxRetries: 0 })
  const ask = (at = gw.url) =>
    sdk(at).chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
  return { fetch, ask, sdk }
}
/** Leaves the channel closing on the server, as a close kept waiting does. */
const closingOnServer = (channelId: string) =>
  gw.sql`update channels set close_requested_at = now(), cooperative_close = true
    where channel_id = ${Buffer.from(channelId.slice(2), 'hex')}`

const plain = (f: (input: string | URL | Request, init?: RequestInit) => Promise<Response>) =>
  Object.assign(f, { preconnect: globalThis.fetch.preconnect }) as typeof fetch

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

describe('two channels set apart', () => {
  test('behavior: one under forced close and one refused as closing: setApart names both, and close, requestClose and withdraw act on the one named or say why not', async () => {
    const { fetch, ask } = client(12)
    await ask()
    const forced = (await fetch.requestClose(gw.url)).channelId
    await ask()
    const refused = (await fetch.channel(gw.url))!.channelId
    await closingOnServer(refused)
    await ask()
    const inUse = (await fetch.channel(gw.url))!.channelId
    const apart = await fetch.setApart(gw.url)
    expect([apart.forced?.channelId, apart.refused?.channelId]).toEqual([forced, refused])
    // One forced close at a time: the one in use is not sent, and the error names the other.
    const busy = await fetch.requestClose(gw.url).catch((e: unknown) => e)
    expect(busy).toBeInstanceOf(ChannelStateError)
    expect((busy as Error).message).toContain(`Channel ${forced} is under forced close already`)
    // withdraw takes only the channel under forced close.
    const wrong = await fetch.withdraw(gw.url, { channelId: refused }).catch((e: unknown) => e)
    expect(wrong).toBeInstanceOf(ChannelStateError)
    const unknown = `0x${'ab'.repeat(32)}` as const
    const none = await fetch.close(gw.url, { channelId: unknown }).catch((e: unknown) => e)
    expect(none).toBeInstanceOf(ChannelStateError)
    expect((none as Error).message).toContain(refused)
    // The one named is closed, not the one in use (the default).
    await fetch.close(gw.url, { channelId: refused })
    expect((await fetch.channel(gw.url))!.channelId).toBe(inUse)
    const left = await fetch.setApart(gw.url)
    expect(left.refused).toBeUndefined()
    expect(left.forced?.channelId).toBe(forced)
  }, 60_000)

  test('error: a second channel refused as closing while one is set apart already: the request is refused saying what to close, nothing is forgotten', async () => {
    const { fetch, ask } = client(13, { maxTotal: 5_000n })
    await ask()
    const a = (await fetch.channel(gw.url))!.channelId
    await closingOnServer(a)
    await ask()
    const b = (await fetch.channel(gw.url))!
    expect(b.channelId).not.toBe(a)
    await closingOnServer(b.channelId)
    const e = await ask().catch((e: unknown) => e)
    const cause = (e as Error).cause
    expect(cause).toBeInstanceOf(ChannelStateError)
    expect((cause as Error).message).toContain(
      `Channel ${b.channelId} is closing, and channel ${a}, set apart before, still is`,
    )
    // Both kept: B in use (no third channel opened over it), A set apart; both still count.
    expect((await fetch.channel(gw.url))!.channelId).toBe(b.channelId)
    expect((await fetch.setApart(gw.url)).refused?.channelId).toBe(a)
    // As the message says: close the one in use, then the next request opens another.
    await fetch.close()
    await ask()
    const c = (await fetch.channel(gw.url))!
    expect([a, b.channelId]).not.toContain(c.channelId)
    const paidB =
      await gw.sql`select settled from channels where channel_id = ${Buffer.from(b.channelId.slice(2), 'hex')}`
    const signedA = BigInt((await fetch.closing(gw.url))!.signed)
    expect(BigInt(c.deposit)).toBeLessThanOrEqual(5_000n - signedA - BigInt(paidB[0]!.settled))
    await fetch.close()
    expect(await fetch.close()).toMatch(/^0x/)
    expect(await fetch.closing(gw.url)).toBeUndefined()
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

describe('budget', () => {
  test('behavior: first requests to two servers at once sign no more than maxTotal together', async () => {
    const other = await Gateway.create(
      { chain: Gateway.chainOf(chain), payments },
      { db: gw.db, upstream: gw.upstream },
    )
    try {
      // Both 402s are handed over at the same moment, as two servers answering at once.
      const waiting: (() => void)[] = []
      const together = plain(async (input, init) => {
        const res = await globalThis.fetch(input, init)
        if (res.status === 402 && !new Headers(init?.headers).has('authorization')) {
          const { promise, resolve } = Promise.withResolvers<void>()
          waiting.push(resolve)
          if (waiting.length === 2) for (const w of waiting) w()
          await promise
        }
        return res
      })
      const { fetch, ask } = client(5, { maxTotal: 100_000n, margin: 10_000n, fetch: together })
      await Promise.allSettled([ask(gw.url), ask(other.url)])
      const a = await fetch.channel(gw.url)
      const b = await fetch.channel(other.url)
      expect(BigInt(a?.signed ?? '0') + BigInt(b?.signed ?? '0')).toBeLessThanOrEqual(100_000n)
    } finally {
      await other.stop()
    }
  }, 60_000)

  test('behavior: a store two wallets share: each counts only its own channels', async () => {
    const store = Store.memory()
    const a = client(6, { maxTotal: 5_000n, store })
    await a.ask()
    const b = client(7, { maxTotal: 5_000n, store })
    await b.ask()
    expect((await b.fetch.channel(gw.url))!.deposit).toBe('5000')
  }, 60_000)
})

describe('one stream per channel', () => {
  test('behavior: two streams started at once: one runs, the other is refused by the client (not cut by the server)', async () => {
    const { sdk } = client(8)
    await sdk().chat.completions.create({ model: 'fake', messages, max_tokens: 5 })
    const run = async () => {
      let text = ''
      const s = await sdk().chat.completions.create({ model: 'fake', messages, stream: true })
      for await (const c of s) text += c.choices[0]?.delta?.content ?? ''
      return text
    }
    const [x, y] = await Promise.allSettled([run(), run()])
    const done = [x, y].filter((r) => r.status === 'fulfilled')
    const refused = [x, y].filter((r) => r.status === 'rejected')
    expect(done.map((r) => (r as PromiseFulfilledResult<string>).value)).toEqual([words])
    expect(((refused[0] as PromiseRejectedResult).reason as Error).cause).toBeInstanceOf(
      ClientError,
    )
  }, 60_000)
})

describe('records it must not lose', () => {
  test('error: the status of a refused channel cannot be read (a 503): the request fails, the channel is kept; the next one sets it apart', async () => {
    let failGet = false
    const flaky = plain(async (input, init) => {
      const u = String(input instanceof Request ? input.url : input)
      if (failGet && u.includes('/v1/channels/') && (!init?.method || init.method === 'GET')) {
        failGet = false
        return new Response('busy', { status: 503 })
      }
      return globalThis.fetch(input, init)
    })
    const { fetch, ask } = client(9, { fetch: flaky, maxTotal: 5_000n })
    await ask()
    const old = (await fetch.channel(gw.url))!
    await closingOnServer(old.channelId)
    failGet = true
    const e = await ask().catch((e: unknown) => e)
    expect((e as Error).cause).toBeInstanceOf(ClientError)
    expect((await fetch.channel(gw.url))!.channelId).toBe(old.channelId)
    await ask()
    expect((await fetch.closing(gw.url))!.channelId).toBe(old.channelId)
    const fresh = (await fetch.channel(gw.url))!
    expect(BigInt(fresh.deposit)).toBeLessThanOrEqual(5_000n - BigInt(old.signed))
  }, 60_000)

  test('behavior: a set-apart channel the server has closed meanwhile leaves its slot on close()', async () => {
    const { fetch, ask } = client(10, { maxTotal: 5_000n })
    await ask()
    const b = (await fetch.channel(gw.url))!.channelId
    await closingOnServer(b)
    await ask()
    await gw.sql`update channels set finalized = true where channel_id = ${Buffer.from(b.slice(2), 'hex')}`
    await fetch.close() // the one in use
    const e = await fetch.close().catch((e: unknown) => e)
    expect(e).toBeInstanceOf(ClientError)
    expect((e as Error).message).toContain('closed already')
    expect(await fetch.closing(gw.url)).toBeUndefined()
  }, 60_000)

  test('behavior: a first load that fails leaves nothing behind: the next request resumes the stored channel', async () => {
    const inner = Store.memory()
    const first = client(11, { store: inner })
    await first.ask()
    const key = `${new URL(gw.url).origin}#${privateKeyToAccount(chain.payers[11]!.privateKey).address}`
    const stored = (await inner.get(key))!
    let fail = true
    const flaky: Store.Store = {
      ...inner,
      all: async () => {
        if (fail) {
          fail = false
          throw new Error('EIO')
        }
        return inner.all!()
      },
    }
    const second = client(11, { store: flaky })
    await second.ask().catch(() => {})
    await second.ask()
    expect((await second.fetch.channel(gw.url))!.channelId).toBe(stored.channelId)
  }, 60_000)
})
