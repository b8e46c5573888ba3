/**
 * The paying client under adversity: a server that claims more than was signed, answers
 * lost in flight, a slow signer, concurrent first streams, aborted streams, malformed
 * receipts and store entries, a store another process shares, a server that does not find
 * its channels. Each is held to the client's limits (maxDeposit, maxTotal) and its
 * one-stream-per-channel promise.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtemp } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import type { Hex, LocalAccount } from 'viem'
import { generatePrivateKey, privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import {
  ChallengeRefusedError,
  ChannelNotFoundError,
  ClientError,
  createFetch,
  LimitExceededError,
  type Options,
  type PayingFetch,
  PaymentFailedError,
  Store,
  StoreInUseError,
} from '../../src/client/index.ts'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Payer from '../helpers/Payer.ts'
import * as ScriptedPayments from '../helpers/ScriptedPayments.ts'

const chain = await Anvil.start({ accounts: 23 })
afterAll(() => chain.stop())
const payments = { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 5_000 }
const gw = await Gateway.create({ chain: Gateway.chainOf(chain), payments })
const words = Array.from({ length: 80 }, (_, i) => `w${i}`).join(' ')
const messages = [{ role: 'user' as const, content: words }]

const plain = (f: (input: string | URL | Request, init?: RequestInit) => Promise<Response>) =>
  Object.assign(f, { preconnect: globalThis.fetch.preconnect }) as typeof fetch

const client = (payer: number, options: Partial<Options> = {}) =>
  Payer.client(chain, gw.url, payer, options)

const payloadOf = (authorization: string | null | undefined) =>
  authorization?.startsWith('Payment ')
    ? (Credential.deserialize(authorization).payload as Record<string, unknown>)
    : undefined

const headerOf = (init?: RequestInit) => new Headers(init?.headers).get('authorization')

/**
 * A store file holding one entry of `payer`'s, with another server, that does not parse
 * (`chainId` a string where a number belongs); its path.
 */
async function storeWithMalformedEntry(payer: number): Promise<string> {
  const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
  const address = privateKeyToAccount(chain.payers[payer]!.privateKey).address
  const entry = {
    channelId: `0x${'ab'.repeat(32)}`,
    chainId: String(chain.chainId),
    escrow: chain.escrowAddress,
    currency: chain.currencyAddress,
    recipient: chain.payee.address,
    deposit: '1500',
    signed: '1500',
    url: 'http://127.0.0.1:1/v1/chat/completions',
  }
  await Bun.write(
    path,
    JSON.stringify({ channels: { [`http://127.0.0.1:1#${address}`]: entry }, closedTotals: {} }),
  )
  return path
}

describe('createFetch under adversity', () => {
  test('error: close signs no final voucher above what the client signed, whatever the server says was spent', async () => {
    let closeAmount: bigint | undefined
    const lying = plain(async (input, init) => {
      const url = String(input instanceof Request ? input.url : input)
      const p = payloadOf(headerOf(init))
      if (p?.action === 'close') {
        closeAmount = BigInt(p.cumulativeAmount as string)
        return new Response('{}', { status: 503 })
      }
      const res = await globalThis.fetch(input, init)
      if (url.includes('/v1/channels/') && res.ok) {
        const shown = (await res.json()) as Record<string, string>
        // The server claims the whole deposit was spent.
        return Response.json({ ...shown, spent: shown.deposit })
      }
      return res
    })
    const { fetch, openai } = client(0, { fetch: lying })
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    const state = (await fetch.channel(gw.url))!
    const e = await fetch.close().catch((e: unknown) => e)
    expect(e).toBeInstanceOf(ClientError)
    // Refusing to sign is fine; signing past what was signed is not.
    if (closeAmount !== undefined) expect(closeAmount).toBeLessThanOrEqual(BigInt(state.signed))
  }, 60_000)

  test('error: with maxPrice.input set, a challenge whose inputAmount cannot be read (missing, a number, an exponent) is refused and nothing is signed', async () => {
    for (const inputAmount of [undefined, 50_000_000, '5e7']) {
      let signed = 0
      // The gateway, its challenges' input price rewritten (the client refuses before it
      // could find the binding broken).
      const rewriting = plain(async (input, init) => {
        if (headerOf(init)?.startsWith('Payment ')) signed++
        const res = await globalThis.fetch(input, init)
        const header = res.headers.get('www-authenticate')
        if (res.status !== 402 || !header) return res
        const challenges = Challenge.deserialize(header).map((c) => ({
          ...c,
          request: { ...c.request, inputAmount },
        }))
        const headers = new Headers(res.headers)
        headers.set('www-authenticate', Challenge.serializeAll(challenges))
        return new Response(await res.text(), { status: 402, headers })
      })
      const { openai, fetch } = client(0, {
        fetch: rewriting,
        maxPrice: { input: 3_000_000n, output: 2_000_000n },
      })
      const e = await openai.chat.completions.create({ model: 'fake', messages }).catch((e) => e)
      expect(e.cause).toBeInstanceOf(ChallengeRefusedError)
      expect((e.cause as Error).message).toContain('maxPrice.input')
      expect(signed).toBe(0)
      expect(await fetch.channel(gw.url)).toBeUndefined()
    }
  }, 60_000)

  test('behavior: a paid request answered 429 waits out a short Retry-After only as long as its own signal lets it, and hands a long one to the caller', async () => {
    let limited: string | undefined
    const limiting = plain(async (input, init) => {
      if (limited !== undefined && headerOf(init)?.startsWith('Payment '))
        return Response.json(
          { error: { type: 'rate_limit_exceeded', message: 'slow down' } },
          { status: 429, headers: { 'retry-after': limited } },
        )
      return globalThis.fetch(input, init)
    })
    const { openai, fetch } = client(1, { fetch: limiting })
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 5 })
    const url = `${gw.url}/v1/chat/completions`
    const ask = (signal?: AbortSignal) =>
      fetch(url, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'fake', messages, max_tokens: 5 }),
        ...(signal ? { signal } : {}),
      })
    // An hour: the 429 is the answer, at once (the caller's SDK waits it out if it will).
    limited = '3600'
    let at = performance.now()
    const res = await ask()
    expect(res.status).toBe(429)
    expect(res.headers.get('retry-after')).toBe('3600')
    expect(performance.now() - at).toBeLessThan(2_000)
    // Twenty seconds: waited for, but the request's own signal ends the wait.
    limited = '20'
    at = performance.now()
    const e = await ask(AbortSignal.timeout(300)).catch((e: unknown) => e)
    expect(e).toBeInstanceOf(Error)
    expect((e as Error).name).toBe('TimeoutError')
    expect(performance.now() - at).toBeLessThan(3_000)
  }, 60_000)

  test('error: a channel view without its spent amount in base units (missing, a number, not JSON): close is a typed refusal and signs nothing', async () => {
    const views = [
      (shown: Record<string, string>) => Response.json({ ...shown, spent: undefined }),
      (shown: Record<string, string>) => Response.json({ ...shown, spent: 12 }),
      (shown: Record<string, string>) => Response.json({ ...shown, settled: '-1' }),
      () => new Response('not json', { headers: { 'content-type': 'application/json' } }),
    ]
    let view = views[0]!
    let closes = 0
    const malformed = plain(async (input, init) => {
      const url = String(input instanceof Request ? input.url : input)
      if (payloadOf(headerOf(init))?.action === 'close') closes++
      const res = await globalThis.fetch(input, init)
      if (url.includes('/v1/channels/') && res.ok)
        return view((await res.json()) as Record<string, string>)
      return res
    })
    const { fetch, openai } = client(13, { fetch: malformed })
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    for (view of views) {
      const e = await fetch.close().catch((e: unknown) => e)
      expect(e).toBeInstanceOf(ClientError)
      expect((e as Error).message).toContain('names no spent (and settled) amount')
    }
    expect(closes).toBe(0)
    // The channel is kept: with the server answering properly again, it closes.
    view = (shown) => Response.json(shown)
    expect(await fetch.close()).toMatch(/^0x[0-9a-f]{64}$/)
  }, 60_000)

  test('behavior: a channel closed elsewhere with more spent than this process signed is forgotten as closed, not refused', async () => {
    // Another process on the store signed more on the channel, and closed it.
    const closedElsewhere = plain(async (input, init) => {
      const url = String(input instanceof Request ? input.url : input)
      const res = await globalThis.fetch(input, init)
      if (url.includes('/v1/channels/') && res.ok) {
        const shown = (await res.json()) as Record<string, string>
        return Response.json({ ...shown, spent: shown.deposit, status: 'closed' })
      }
      return res
    })
    const { fetch, openai } = client(12, { fetch: closedElsewhere })
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    const e = await fetch.close().catch((e: unknown) => e)
    expect(e).toBeInstanceOf(ClientError)
    expect((e as Error).message).toContain('is closed already; it is forgotten')
    expect(await fetch.channel(gw.url)).toBeUndefined()
  }, 60_000)

  test('behavior: a top-up whose answer was lost is not paid again: the deposit on chain stays within maxDeposit', async () => {
    let lose = true
    const flaky = plain(async (input, init) => {
      const res = await globalThis.fetch(input, init)
      if (lose && payloadOf(headerOf(init))?.action === 'topUp') {
        lose = false
        // The server took the top-up; its answer never arrives (a connection reset).
        await res.body?.cancel()
        throw new TypeError('fetch failed')
      }
      return res
    })
    const { fetch, openai } = client(1, {
      fetch: flaky,
      deposit: 300n,
      limits: { maxDeposit: 700n, maxTotal: 1_000_000n },
    })
    const ask = () => openai.chat.completions.create({ model: 'fake', messages, max_tokens: 100 })
    const errors: unknown[] = []
    for (let i = 0; i < 4; i++) await ask().catch((e) => errors.push(e))
    const state = (await fetch.channel(gw.url))!
    const onChain = (await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: state.channelId as Hex,
    }))!
    expect(errors.length).toBeGreaterThan(0)
    expect(onChain.deposit).toBeLessThanOrEqual(700n)
  }, 60_000)

  test('behavior: two first streams at once on a fresh client: each is served whole or refused by the client, none cut by the server', async () => {
    const { openai } = client(2)
    const short = Array.from({ length: 20 }, (_, i) => `s${i}`).join(' ')
    const run = async () => {
      let text = ''
      const s = await openai.chat.completions.create({
        model: 'fake-slow',
        messages: [{ role: 'user', content: short }],
        stream: true,
      })
      for await (const c of s) text += c.choices[0]?.delta?.content ?? ''
      return text
    }
    const all = await Promise.allSettled([run(), run()])
    expect(all.some((r) => r.status === 'fulfilled')).toBe(true)
    for (const r of all) {
      if (r.status === 'fulfilled') expect(r.value).toBe(short)
      else expect((r.reason as Error).cause ?? r.reason).toBeInstanceOf(ClientError)
    }
  }, 60_000)

  test('behavior: a malformed Payment-Receipt on a paid whole completion: the answer still reaches the caller', async () => {
    const mangled = plain(async (input, init) => {
      const res = await globalThis.fetch(input, init)
      if (!res.headers.has('payment-receipt')) return res
      const headers = new Headers(res.headers)
      headers.set('payment-receipt', 'not*a*receipt')
      return new Response(res.body, { status: res.status, headers })
    })
    const { openai } = client(3, { fetch: mangled })
    const r = await openai.chat.completions
      .create({ model: 'fake', messages, max_tokens: 20 })
      .catch((e: unknown) => e)
    expect(r).not.toBeInstanceOf(Error)
  }, 60_000)

  test('behavior: a slow signer (remote wallet): concurrent vouchers on one channel still count while signing; two servers stay within maxTotal', async () => {
    const other = await Gateway.create(
      { chain: Gateway.chainOf(chain), payments },
      { db: gw.db, upstream: gw.upstream },
    )
    try {
      const inner = privateKeyToAccount(chain.payers[5]!.privateKey)
      let slow = false
      const account = {
        ...inner,
        async signTypedData(td: Parameters<typeof inner.signTypedData>[0]) {
          if (slow && (td as { primaryType?: string }).primaryType === 'Voucher') {
            slow = false
            await Bun.sleep(1_500)
          }
          return inner.signTypedData(td)
        },
      } as LocalAccount
      const fetch = createFetch({
        account,
        limits: { maxDeposit: 2_000n, maxTotal: 2_000n },
        allow: { escrows: [chain.escrowAddress] },
        margin: 64n,
        store: Store.memory(),
      })
      const sdk = (at: string) =>
        new OpenAI({ baseURL: `${at}/v1`, apiKey: 'unused', fetch, maxRetries: 0 })
      await sdk(gw.url).chat.completions.create({ model: 'fake', messages, max_tokens: 5 })
      // A whole completion (signing far ahead, slowly) and a stream (signing at once) on the
      // first server; then the first request to a second server.
      slow = true
      const whole = sdk(gw.url).chat.completions.create({ model: 'fake', messages, max_tokens: 5 })
      await Bun.sleep(20)
      const stream = (async () => {
        const s = await sdk(gw.url).chat.completions.create({
          model: 'fake',
          messages,
          max_tokens: 5,
          stream: true,
        })
        for await (const _ of s);
      })()
      await Bun.sleep(300)
      await sdk(other.url).chat.completions.create({ model: 'fake', messages, max_tokens: 5 })
      await Promise.allSettled([whole, stream])
      const here = BigInt((await fetch.channel(gw.url))!.signed)
      const there = BigInt((await fetch.channel(other.url))!.signed)
      expect(here + there).toBeLessThanOrEqual(2_000n)
    } finally {
      await other.stop()
    }
  }, 60_000)

  test('behavior: a stream aborted by its AbortSignal (body left unread) does not keep later streams refused', async () => {
    const { fetch } = client(6)
    const body = (stream: boolean) =>
      JSON.stringify({ model: 'fake-slow', messages, stream, max_tokens: 50 })
    const post = (stream: boolean, signal?: AbortSignal) =>
      fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: body(stream),
        signal,
      })
    await (await post(false)).text()
    const ac = new AbortController()
    const first = await post(true, ac.signal)
    const reader = first.body!.getReader()
    await reader.read()
    ac.abort()
    await Bun.sleep(500)
    const second = await post(true).catch((e: unknown) => e)
    expect(second).toBeInstanceOf(Response)
    await (second as Response).body?.cancel()
  }, 60_000)

  test('error: a store entry for another server that does not parse stops the request (it would stop counting against maxTotal)', async () => {
    const path = await storeWithMalformedEntry(7)
    const { fetch, openai } = client(7, {
      store: Store.file(path),
      limits: { maxDeposit: 2_000n, maxTotal: 2_000n },
    })
    const r = await openai.chat.completions
      .create({ model: 'fake', messages, max_tokens: 5 })
      .catch((e: unknown) => e)
    if (r instanceof Error) expect(r.cause ?? r).toBeInstanceOf(ClientError)
    else expect(BigInt((await fetch.channel(gw.url))!.deposit)).toBeLessThanOrEqual(500n)
  }, 60_000)

  test('behavior: a channel closed elsewhere (another process on the same store): what it paid still counts against maxTotal', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
    const limits = { maxDeposit: 5_000n, maxTotal: 5_000n }
    const agentStore = Store.file(path)
    const cliStore = Store.file(path)
    const agent = client(8, { store: agentStore, limits })
    const cli = client(8, { store: cliStore, limits })
    const ask = (c: typeof agent) =>
      c.openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    await ask(agent)
    // The agent gives the store up (it would refuse the other otherwise), keeping its channel.
    await agentStore.release!()
    await ask(cli)
    // `tollway channel close` from another shell, same channels.json.
    await cli.fetch.close()
    await cliStore.release!()
    const paid = await Store.file(path).closedTotal(
      `${new URL(gw.url).origin}#${privateKeyToAccount(chain.payers[8]!.privateKey).address}`,
    )
    expect(paid).toBeGreaterThan(0n)
    await ask(agent)
    const fresh = (await agent.fetch.channel(gw.url))!
    expect(BigInt(fresh.deposit)).toBeLessThanOrEqual(5_000n - paid)
  }, 60_000)
  test('behavior: a malformed entry of another wallet in a shared store does not stop this wallet', async () => {
    // Another wallet (payer 10) keeps an entry this wallet (payer 9) never wrote or reads.
    const path = await storeWithMalformedEntry(10)
    const { openai } = client(9, { store: Store.file(path) })
    const r = await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 5 })
    expect(r.choices[0]!.message.content).toBeTruthy()
  }, 60_000)

  test('behavior: streams read to their end leave no abort listener on a shared AbortSignal', async () => {
    const { fetch } = client(11)
    const signal = new AbortController().signal
    let listeners = 0
    const add = signal.addEventListener.bind(signal)
    const remove = signal.removeEventListener.bind(signal)
    signal.addEventListener = ((type: string, l: never, o: never) => {
      if (type === 'abort') listeners++
      return add(type, l, o)
    }) as never
    signal.removeEventListener = ((type: string, l: never, o: never) => {
      if (type === 'abort') listeners--
      return remove(type, l, o)
    }) as never
    const post = (stream: boolean) =>
      fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'fake', messages, stream, max_tokens: 5 }),
        signal,
      })
    await (await post(false)).text()
    const before = listeners
    for (let i = 0; i < 5; i++) await (await post(true)).text()
    // Each stream ended: nothing of theirs (reader, channel) is kept alive by the signal.
    expect(listeners - before).toBe(0)
  }, 60_000)

  test('error: requestClose whose record of the forced close fails to write (a full disk) keeps the channel in the store', async () => {
    const inner = Store.memory()
    let fail = true
    const store: Store.Store = {
      ...inner,
      set: async (key, state) => {
        if (fail && key.endsWith('#closing')) {
          fail = false
          throw new Error('ENOSPC: no space left on device')
        }
        return inner.set(key, state)
      },
    }
    const { fetch, openai } = client(14, { store })
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    const state = (await fetch.channel(gw.url))!
    expect(await fetch.requestClose().catch((e: unknown) => e)).toBeInstanceOf(Error)
    const kept = (await fetch.channel(gw.url)) ?? (await fetch.closing(gw.url))
    expect(kept?.channelId).toBe(state.channelId)
    // Asked again (the disk has room now), the forced close is recorded.
    await fetch.requestClose()
    expect((await fetch.closing(gw.url))?.channelId).toBe(state.channelId)
  }, 60_000)

  test('error: a close answered 200 without a receipt (not JSON, or no receipt) is a typed error and the channel is kept', async () => {
    const answers = [() => new Response('ok', { status: 200 }), () => Response.json({})]
    let answer = answers[0]!
    const odd = plain(async (input, init) => {
      if (payloadOf(headerOf(init))?.action === 'close') return answer()
      return globalThis.fetch(input, init)
    })
    const { fetch, openai } = client(15, { fetch: odd })
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    const state = (await fetch.channel(gw.url))!
    for (answer of answers) {
      const e = await fetch.close().catch((e: unknown) => e)
      expect(e).toBeInstanceOf(ClientError)
      expect((e as Error).message).toContain('without a receipt')
      expect((await fetch.channel(gw.url))?.channelId).toBe(state.channelId)
    }
  }, 60_000)

  /**
   * Closes `payer`'s channel with the close's answer lost, then asks again: the next channel's
   * deposit must leave room for what the closed one paid. `forgotten`: the server forgets the
   * closed channel (its view a 404), so only the escrow says it is finalized.
   */
  async function closeLostThenAsk(payer: number, forgotten: boolean) {
    let lose = true
    let gone: string | undefined
    const flaky = plain(async (input, init) => {
      const url = String(input instanceof Request ? input.url : input)
      if (gone && url.endsWith(`/v1/channels/${gone}`))
        return Response.json({ type: 'about:blank' }, { status: 404 })
      const res = await globalThis.fetch(input, init)
      if (lose && payloadOf(headerOf(init))?.action === 'close') {
        lose = false
        await res.body?.cancel()
        throw new TypeError('fetch failed')
      }
      return res
    })
    const limits = { maxDeposit: 5_000n, maxTotal: 5_000n }
    const { fetch, openai } = client(payer, { fetch: flaky, limits })
    const ask = () => openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    await ask()
    const first = (await fetch.channel(gw.url))!
    // The server closed the channel; the answer never came back.
    expect(await fetch.close().catch((e: unknown) => e)).toBeInstanceOf(TypeError)
    if (forgotten) gone = first.channelId
    const onChain = (await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: first.channelId as Hex,
    }))!
    expect(onChain.finalized).toBe(true)
    const paid = onChain.settled
    expect(paid).toBeGreaterThan(0n)
    await ask()
    const next = (await fetch.channel(gw.url))!
    expect(next.channelId).not.toBe(first.channelId)
    expect(BigInt(next.deposit)).toBeLessThanOrEqual(5_000n - paid)
  }

  test('error: a close whose answer was lost, then a request: what the closed channel paid still counts against maxTotal', async () => {
    await closeLostThenAsk(0, false)
  }, 60_000)

  test('error: a close whose answer was lost, the server then forgets the channel: what the escrow says it paid still counts against maxTotal', async () => {
    await closeLostThenAsk(5, true)
  }, 60_000)

  test('error: a stored channel on another chain (same gateway URL) is not overwritten by a new one: its deposit stays reachable and counts against maxTotal', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
    const address = privateKeyToAccount(chain.payers[17]!.privateKey).address
    const key = `${new URL(gw.url).origin}#${address}`
    const old = {
      channelId: `0x${'cd'.repeat(32)}` as Hex,
      chainId: chain.chainId + 1,
      escrow: chain.escrowAddress,
      currency: chain.currencyAddress,
      recipient: chain.payee.address,
      deposit: '1500',
      signed: '1500',
      url: `${gw.url}/v1/chat/completions`,
    }
    await Bun.write(path, JSON.stringify({ channels: { [key]: old }, closedTotals: {} }))
    const limits = { maxDeposit: 5_000n, maxTotal: 5_000n }
    const { fetch, openai } = client(17, { store: Store.file(path), limits })
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    expect(await Bun.file(path).text()).toContain(old.channelId)
    const next = (await fetch.channel(gw.url))!
    expect(next.channelId).not.toBe(old.channelId)
    expect(BigInt(next.deposit)).toBeLessThanOrEqual(5_000n - 1_500n)
    // Set apart, where requestClose and withdraw reach it; this server cannot close it.
    expect((await fetch.closing(gw.url))?.channelId).toBe(old.channelId)
  }, 60_000)

  test('error: two paying fetches in one process on one store file, first requests at once: no channel is left unrecorded', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
    const a = client(4, { store: Store.file(path) })
    const b = client(4, { store: Store.file(path) })
    const ask = (c: typeof a) =>
      c.openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    const results = await Promise.allSettled([ask(a), ask(b)])
    const payer = Buffer.from(chain.payers[4]!.address.slice(2), 'hex')
    const rows = await gw.sql`select channel_id from channels where payer = ${payer}`
    const text = await Bun.file(path).text()
    for (const r of rows) expect(text).toContain(`0x${Buffer.from(r.channel_id).toString('hex')}`)
    expect(results.some((r) => r.status === 'fulfilled')).toBe(true)
    // The other is told the store is in use.
    const refused = results.find((r) => r.status === 'rejected')
    if (refused) expect((refused.reason as Error).cause).toBeInstanceOf(StoreInUseError)
  }, 60_000)
})

/**
 * A scripted server (no gateway, no chain) that pays its own gas (EIP-3009 `authorization`
 * opens, its token's domain stated) and does not know its channels: `GET /v1/channels/{id}`
 * answers 404, and an open, or a voucher, may be answered 410 channel-not-found, as a gateway
 * whose chain read is a block behind its own `openWithAuthorization` answers (`opens` says
 * which opens, by their count, and how: `true` not found, `'unverified'` 402
 * verification-failed). What the paying client sends is kept, with the request it was sent for.
 */
function unknowing(
  refuse: {
    opens: (sent: number) => boolean | 'unverified'
    vouchers: boolean | ((opensSent: number) => boolean)
  },
  /** How long its challenges live. */
  expiresMs = 600_000,
) {
  const state = {
    /** The request under way (set by the test). */
    request: 0,
    sent: [] as {
      request: number
      action: string
      channelId: Hex
      amount: bigint
      nonce?: string
    }[],
    fetch: undefined as unknown as typeof fetch,
  }
  const challenge = () =>
    ScriptedPayments.challenge(
      {
        amount: 1n,
        currency: chain.currencyAddress,
        recipient: chain.payee.address,
        methodDetails: {
          chainId: chain.chainId,
          escrowContract: chain.escrowAddress,
          feePayer: true,
          credentialTypes: ['authorization'],
          tokenDomain: { name: 'Scripted', version: '1' },
        },
      },
      expiresMs,
    )
  const notFound = () =>
    new Response(
      JSON.stringify({
        type: 'https://paymentauth.org/problems/session/channel-not-found',
        title: 'Channel Not Found',
        status: 410,
        detail: 'No channel with this id on our escrow.',
      }),
      { status: 410, headers: { 'content-type': 'application/problem+json' } },
    )
  const f = async (input: string | URL | Request, init: RequestInit = {}) => {
    if (String(input).includes('/v1/channels/')) return new Response(null, { status: 404 })
    const authorization = new Headers(init.headers).get('authorization')
    const p = payloadOf(authorization)
    if (!p)
      return new Response('{}', {
        status: 402,
        headers: { 'www-authenticate': Challenge.serialize(challenge()) },
      })
    const nonce = (p.authorization as { nonce?: string } | undefined)?.nonce
    state.sent.push({
      request: state.request,
      action: p.action as string,
      channelId: p.channelId as Hex,
      amount: BigInt(p.cumulativeAmount as string),
      ...(nonce ? { nonce } : {}),
    })
    const opens = state.sent.filter((s) => s.action === 'open').length
    const refused =
      p.action === 'open'
        ? refuse.opens(opens)
        : typeof refuse.vouchers === 'function'
          ? refuse.vouchers(opens)
          : refuse.vouchers
    if (refused === 'unverified')
      return new Response(
        JSON.stringify({ type: 'https://paymentauth.org/problems/verification-failed' }),
        {
          status: 402,
          headers: {
            'content-type': 'application/problem+json',
            'www-authenticate': Challenge.serialize(challenge()),
          },
        },
      )
    if (refused) return notFound()
    if (init.method === 'HEAD') return new Response(null)
    return Response.json({ ok: true })
  }
  state.fetch = Object.assign(f, { preconnect: () => {} }) as unknown as typeof fetch
  return state
}

describe('createFetch against a server that does not find its channels', () => {
  const url = 'http://127.0.0.1:9/v1/chat/completions'
  const post = { method: 'POST', body: '{"model":"m","messages":[]}' }
  /** The usual gasless payer: no rpcUrl. */
  const paying = (s: ReturnType<typeof unknowing>, limits: Options['limits']) =>
    createFetch({
      account: generatePrivateKey(),
      limits,
      margin: 100n,
      allow: { escrows: [chain.escrowAddress] },
      store: Store.memory(),
      fetch: s.fetch,
    })
  /** The channels request `n` sent opens of, and the authorizations (their nonces). */
  const opened = (s: ReturnType<typeof unknowing>, n: number) => {
    const opens = s.sent.filter((x) => x.request === n && x.action === 'open')
    return {
      channels: [...new Set(opens.map((x) => x.channelId))],
      nonces: [...new Set(opens.map((x) => x.nonce))],
      sent: opens.length,
    }
  }
  /** Request 1 opened one channel with one authorization, the one in use, none set apart;
   * what it sent of opens. */
  const servedOnOne = async (s: ReturnType<typeof unknowing>, f: PayingFetch) => {
    const one = opened(s, 1)
    expect(one.channels).toHaveLength(1)
    expect(one.nonces).toHaveLength(1)
    expect((await f.channel(url))?.channelId).toBe(one.channels[0]!)
    expect((await f.setApart(url)).refused).toBeUndefined()
    return one
  }
  /** All signed and sent: the highest cumulative amount of each channel, summed. */
  const signed = (s: ReturnType<typeof unknowing>) => {
    const most = new Map<string, bigint>()
    for (const x of s.sent)
      if (x.amount > (most.get(x.channelId) ?? 0n)) most.set(x.channelId, x.amount)
    return [...most.values()].reduce((a, b) => a + b, 0n)
  }

  test('error: every open answered channel-not-found, every channel unknown: each request signs one open, sends it again, then fails typed; the channel is kept and counted against maxTotal', async () => {
    const s = unknowing({ opens: () => true, vouchers: true })
    const f = paying(s, { maxDeposit: 1000n, maxTotal: 1500n })
    s.request = 1
    const first = await f(url, post).catch((e: unknown) => e)
    const one = opened(s, 1)
    expect(one.channels).toHaveLength(1)
    expect(one.nonces).toHaveLength(1)
    expect(one.sent).toBeGreaterThan(1)
    expect(signed(s)).toBeLessThanOrEqual(1500n)
    expect(first).toBeInstanceOf(ChannelNotFoundError)
    expect((first as ChannelNotFoundError).channelId).toBe(one.channels[0]!)
    expect((first as Error).message).toContain('no second channel was opened')
    // Kept, and still counted: the next channel's deposit is what maxTotal leaves.
    const apart = (await f.setApart(url)).refused
    expect(apart).toMatchObject({ channelId: one.channels[0], signed: '1000' })
    s.request = 2
    const second = await f(url, post).catch((e: unknown) => e)
    const two = opened(s, 2)
    expect(two.channels).toHaveLength(1)
    expect(signed(s)).toBeLessThanOrEqual(1500n)
    expect(second).toBeInstanceOf(ClientError)
    expect(BigInt((await f.channel(url))!.deposit)).toBeLessThanOrEqual(500n)
    // Neither is forgotten: the first set apart, the second in use (one set apart at a time).
    expect((await f.setApart(url)).refused?.channelId).toBe(one.channels[0]!)
    expect((await f.channel(url))?.channelId).toBe(two.channels[0]!)
  }, 60_000)

  test('error: a channel used up to maxTotal whose next voucher is answered channel-not-found, the channel unknown: no second channel is signed past maxTotal; the first is kept and counted', async () => {
    const s = unknowing({ opens: () => false, vouchers: true })
    const f = paying(s, { maxDeposit: 1000n, maxTotal: 1000n })
    s.request = 1
    expect((await f(url, post)).status).toBe(200)
    const { channelId } = (await f.channel(url))!
    expect(signed(s)).toBe(1000n)
    s.request = 2
    const e = await f(url, post).catch((e: unknown) => e)
    expect(opened(s, 2).sent).toBe(0)
    expect(signed(s)).toBeLessThanOrEqual(1000n)
    expect(e).toBeInstanceOf(LimitExceededError)
    expect((await f.setApart(url)).refused).toMatchObject({ channelId, signed: '1000' })
    // Still counted on the next request: nothing more is signed.
    s.request = 3
    expect(await f(url, post).catch((e: unknown) => e)).toBeInstanceOf(LimitExceededError)
    expect(s.sent.filter((x) => x.request === 3)).toEqual([])
  }, 60_000)

  test('error: an open refused as unverifiable, then its channel not found: no second open in the same request, a typed error; the channel is kept', async () => {
    const s = unknowing({ opens: () => 'unverified', vouchers: true })
    const f = paying(s, { maxDeposit: 1000n, maxTotal: 5000n })
    s.request = 1
    const e = await f(url, post).catch((e: unknown) => e)
    const one = opened(s, 1)
    expect(one.channels).toHaveLength(1)
    expect(one.nonces).toHaveLength(1)
    expect(e).toBeInstanceOf(ChannelNotFoundError)
    expect((e as Error).message).toContain('no second channel is opened in one request')
    expect((await f.setApart(url)).refused?.channelId).toBe(one.channels[0]!)
  }, 60_000)

  test('behavior: an open the server does not find at first (its chain read a block behind) is sent again, the same one: served, one channel, one authorization', async () => {
    const s = unknowing({ opens: (n) => n === 1, vouchers: false })
    const f = paying(s, { maxDeposit: 1000n, maxTotal: 1500n })
    s.request = 1
    expect((await f(url, post)).status).toBe(200)
    expect(await servedOnOne(s, f)).toMatchObject({ sent: 2 })
  }, 60_000)

  test('behavior: concurrent first requests while the open is not found at first: they wait for it to be sent again, and all are served on the one channel', async () => {
    // Until the open has been sent twice, the server knows no channel (vouchers too).
    const s = unknowing({ opens: (n) => n === 1, vouchers: (opens) => opens < 2 })
    const f = paying(s, { maxDeposit: 1000n, maxTotal: 1500n })
    s.request = 1
    const answers = await Promise.all([1, 2, 3].map(() => f(url, post).catch((e: unknown) => e)))
    expect(answers.map((a) => (a as Response).status)).toEqual([200, 200, 200])
    await servedOnOne(s, f)
  }, 60_000)

  test('error: a 429 whose Retry-After outlasts the credential challenge is the caller answer at once: no credential goes out again on an expired challenge', async () => {
    const s = unknowing({ opens: () => false, vouchers: false }, 15_000)
    let sends = 0
    const limiting = plain(async (input, init = {}) => {
      if (payloadOf(headerOf(init))) {
        sends++
        return new Response('{}', { status: 429, headers: { 'retry-after': '12' } })
      }
      return s.fetch(input, init)
    })
    const f = paying({ ...s, fetch: limiting }, { maxDeposit: 1000n, maxTotal: 5000n })
    const at = performance.now()
    const res = await f(url, post)
    expect(res.status).toBe(429)
    expect(sends).toBe(1)
    expect(performance.now() - at).toBeLessThan(5_000)
  }, 60_000)

  test('error: an open refused outright (a deposit below the least), unknown to the server: forgotten, not kept where nothing could clear it; the next request is not stuck', async () => {
    const s = unknowing({ opens: (n) => n <= 2, vouchers: false })
    const refusing = plain(async (input, init = {}) => {
      const p = payloadOf(headerOf(init))
      const opens = s.sent.filter((x) => x.action === 'open').length
      if (p?.action === 'open' && opens < 2) {
        await s.fetch(input, init)
        return new Response(
          JSON.stringify({
            type: 'https://paymentauth.org/problems/session/payment-insufficient',
            detail: 'A deposit of at least 100000 is needed.',
          }),
          { status: 402, headers: { 'content-type': 'application/problem+json' } },
        )
      }
      return s.fetch(input, init)
    })
    const f = paying({ ...s, fetch: refusing }, { maxDeposit: 1000n, maxTotal: 5000n })
    for (const n of [1, 2]) {
      s.request = n
      expect(await f(url, post).catch((e: unknown) => e)).toBeInstanceOf(PaymentFailedError)
      expect(await f.channel(url)).toBeUndefined()
      expect(await f.setApart(url)).toEqual({})
    }
    s.request = 3
    expect((await f(url, post)).status).toBe(200)
  }, 60_000)
})
