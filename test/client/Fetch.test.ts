/**
 * The paying fetch under the official `openai` SDK, against a real gateway, anvil and PostgreSQL.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtemp } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import { encodeAbiParameters, encodeEventTopics, erc20Abi, type Hex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import { getBalance, waitForTransactionReceipt, writeContract } from 'viem/actions'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import {
  ChainRequiredError,
  ChallengeRefusedError,
  ClientError,
  CloseNotReadyError,
  createFetch,
  LimitExceededError,
  type Options,
  PaymentFailedError,
  Store,
  StoreInUseError,
} from '../../src/client/index.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Receipt from '../../src/payment/Receipt.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Payer from '../helpers/Payer.ts'

const chain = await Anvil.start({ accounts: 31 })
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 5_000 },
})
const balance = (owner: Hex) =>
  Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner })

const words = Array.from({ length: 80 }, (_, i) => `w${i}`).join(' ')
const messages = [{ role: 'user' as const, content: words }]

const client = (payer: number, options: Partial<Options> = {}) =>
  Payer.client(chain, gw.url, payer, options)

describe('createFetch', () => {
  test('behavior: non-streaming under the openai SDK: opens a channel, pays, hands the receipt over; close settles', async () => {
    const receipts: unknown[] = []
    const { fetch, openai } = client(0, { onReceipt: (r) => receipts.push(r) })
    const payer = chain.payers[0]!.address
    const before = await balance(payer)
    const res = await openai.chat.completions.create({ model: 'fake', messages })
    expect(res.choices[0]!.message.content).toBe(words)
    expect(receipts.length).toBe(1)
    const state = (await fetch.channel(gw.url))!
    expect(receipts[0]).toMatchObject({ reference: state.channelId, status: 'success' })
    const again = await openai.chat.completions.create({
      model: 'fake',
      messages: [{ role: 'user', content: 'short' }],
    })
    expect(again.choices[0]!.message.content).toBe('short')
    expect((await fetch.channel(gw.url))!.channelId).toBe(state.channelId)
    const spent = (await Channels.get(gw.sql, state.channelId))!.spent

    const txHash = await fetch.close()
    expect(txHash).toMatch(/^0x[0-9a-f]{64}$/)
    expect(await balance(payer)).toBe(before - spent)
    const onChain = (await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: state.channelId,
    }))!
    expect(onChain.finalized).toBe(true)
    expect(await fetch.channel(gw.url)).toBeUndefined()
  }, 60_000)

  test('behavior: close with a spent that grew since it was read: the 402 names the spent, the close is signed once more and goes through', async () => {
    // The channel's status, as a read made before a request of ours ended would have it.
    const stale: typeof globalThis.fetch = Object.assign(
      async (input: string | URL | Request, init?: RequestInit) => {
        const res = await globalThis.fetch(input, init)
        if (!String(input instanceof Request ? input.url : input).includes('/v1/channels/'))
          return res
        return Response.json({ ...((await res.json()) as object), spent: '0' })
      },
      { preconnect: globalThis.fetch.preconnect },
    )
    const { fetch, openai } = client(3, { fetch: stale })
    await openai.chat.completions.create({ model: 'fake', messages })
    const { channelId } = (await fetch.channel(gw.url))!
    const spent = (await Channels.get(gw.sql, channelId))!.spent
    expect(spent).toBeGreaterThan(0n)
    const payee = await balance(chain.payee.address)
    expect(await fetch.close()).toMatch(/^0x[0-9a-f]{64}$/)
    expect(await balance(chain.payee.address)).toBe(payee + spent)
    expect((await Channels.get(gw.sql, channelId))!).toMatchObject({
      finalized: true,
      settled: spent,
    })
  })

  test('behavior: streaming with several mid-stream vouchers: the SDK sees only chat chunks, onVoucher fires', async () => {
    const vouchers: bigint[] = []
    const receipts: unknown[] = []
    const { openai } = client(1, {
      onVoucher: (v) => vouchers.push(v.cumulativeAmount),
      onReceipt: (r) => receipts.push(r),
    })
    const stream = await openai.chat.completions.create({ model: 'fake', messages, stream: true })
    let text = ''
    let chunks = 0
    for await (const chunk of stream) {
      chunks++
      expect(chunk.object).toBe('chat.completion.chunk')
      text += chunk.choices[0]?.delta?.content ?? ''
    }
    expect(text).toBe(words)
    expect(chunks).toBeGreaterThan(1)
    expect(vouchers.length).toBeGreaterThanOrEqual(3)
    expect([...vouchers].sort((a, b) => (a < b ? -1 : 1))).toEqual(vouchers)
    expect(receipts.at(-1)).toMatchObject({ status: 'success', method: 'evm' })
  }, 60_000)

  test('behavior: a restarted agent (new wrapper, same JSON store) resumes its channel', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
    const firstStore = Store.file(path)
    const first = client(2, { store: firstStore })
    await first.openai.chat.completions.create({ model: 'fake', messages })
    const state = (await first.fetch.channel(gw.url))!
    const spentFirst = (await Channels.get(gw.sql, state.channelId))!.spent
    // The first agent ends: its store gives the server up.
    await firstStore.release!()
    const second = client(2, { store: Store.file(path) })
    const res = await second.openai.chat.completions.create({ model: 'fake', messages })
    expect(res.choices[0]!.message.content).toBe(words)
    expect((await second.fetch.channel(gw.url))!.channelId).toBe(state.channelId)
    // No second channel: the first one carries both requests.
    expect((await Channels.get(gw.sql, state.channelId))!.spent).toBeGreaterThan(spentFirst)
    const payer = Buffer.from(chain.payers[2]!.address.slice(2), 'hex')
    const [row] = await gw.sql`select count(*)::int as n from channels where payer = ${payer}`
    expect(row!.n).toBe(1)
  }, 60_000)

  test('behavior: release() gives the store up: a second paying fetch on it resumes the channel, and the released one refuses further use', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
    const first = client(22, { store: Store.file(path) })
    await first.openai.chat.completions.create({ model: 'fake', messages })
    const state = (await first.fetch.channel(gw.url))!
    // While the first holds it, a second paying fetch on the same file is refused.
    const refused = await client(22, { store: Store.file(path) })
      .openai.chat.completions.create({ model: 'fake', messages })
      .catch((e) => e)
    expect(refused.cause).toBeInstanceOf(StoreInUseError)
    await first.fetch.release()
    const second = client(22, { store: Store.file(path) })
    const res = await second.openai.chat.completions.create({ model: 'fake', messages })
    expect(res.choices[0]!.message.content).toBe(words)
    expect((await second.fetch.channel(gw.url))!.channelId).toBe(state.channelId)
    // The released one neither pays nor closes: the channel is the second's now.
    const late = await first
      .fetch(`${gw.url}/v1/chat/completions`, { method: 'POST' })
      .catch((e) => e)
    expect(late).toBeInstanceOf(ClientError)
    expect(late.message).toContain('released')
    expect(await first.fetch.close(gw.url).catch((e) => e)).toBeInstanceOf(ClientError)
    expect(await first.fetch.withdraw(gw.url).catch((e) => e)).toBeInstanceOf(ClientError)
    const payer = Buffer.from(chain.payers[22]!.address.slice(2), 'hex')
    const [row] = await gw.sql`select count(*)::int as n from channels where payer = ${payer}`
    expect(row!.n).toBe(1)
  }, 60_000)

  test('error: another process paying this server through the same store → StoreInUseError, no channel opened; once it ends, the store is this one', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
    const payer = privateKeyToAccount(chain.payers[16]!.privateKey).address
    const key = `${new URL(gw.url).origin}#${payer}`
    const storeModule = join(import.meta.dir, '../../src/client/Store.ts')
    const holder = Bun.spawn(
      [
        process.execPath,
        '-e',
        `import * as Store from ${JSON.stringify(storeModule)}
        await Store.file(${JSON.stringify(path)}).own(${JSON.stringify(key)})
        console.log('owned')
        setInterval(() => {}, 1000)`,
      ],
      { stdout: 'pipe', stderr: 'inherit' },
    )
    const { openai, fetch } = client(16, { store: Store.file(path) })
    try {
      const reader = holder.stdout.getReader()
      expect(new TextDecoder().decode((await reader.read()).value)).toContain('owned')
      const e = await openai.chat.completions.create({ model: 'fake', messages }).catch((e) => e)
      expect(e).toBeInstanceOf(OpenAI.APIConnectionError)
      expect(e.cause).toBeInstanceOf(StoreInUseError)
      expect((e.cause as Error).message).toContain(`pid ${holder.pid}`)
      expect(await fetch.channel(gw.url)).toBeUndefined()
      const address = Buffer.from(payer.slice(2), 'hex')
      const [none] = await gw.sql`select count(*)::int as n from channels where payer = ${address}`
      expect(none!.n).toBe(0)
    } finally {
      holder.kill()
      await holder.exited
    }
    const res = await openai.chat.completions.create({ model: 'fake', messages })
    expect(res.choices[0]!.message.content).toBe(words)
    expect((await fetch.channel(gw.url))?.channelId).toBeDefined()
  }, 60_000)

  test('error: an escrow not on the allow-list is refused, nothing signed', async () => {
    const store = Store.memory()
    const { openai, fetch } = client(3, {
      allow: { escrows: ['0x0000000000000000000000000000000000000001'] },
      store,
    })
    const e = await openai.chat.completions.create({ model: 'fake', messages }).catch((e) => e)
    // The SDK wraps what fetch throws before a response in APIConnectionError; ours is the cause.
    expect(e).toBeInstanceOf(OpenAI.APIConnectionError)
    expect(e.cause).toBeInstanceOf(ChallengeRefusedError)
    expect((e.cause as Error).message).toContain('allow.escrows')
    expect(await fetch.channel(gw.url)).toBeUndefined()
  })

  test('error: a recipient not on allow.recipients, or a price over maxPrice, is refused, nothing signed; within them it pays', async () => {
    const { escrowAddress, currencyAddress, payee } = chain
    const escrows = [escrowAddress]
    const refusals: [Partial<Options>, string][] = [
      [{ allow: { escrows, recipients: [currencyAddress] } }, 'allow.recipients'],
      // The fake model costs 1,000,000 and 2,000,000 base units per 1M prompt and output tokens.
      [{ maxPrice: { output: 1_999_999n } }, 'maxPrice.output'],
      [{ maxPrice: { input: 999_999n, output: 2_000_000n } }, 'maxPrice.input'],
    ]
    for (const [options, named] of refusals) {
      const { openai, fetch } = client(9, options)
      const e = await openai.chat.completions.create({ model: 'fake', messages }).catch((e) => e)
      expect(e.cause).toBeInstanceOf(ChallengeRefusedError)
      expect((e.cause as Error).message).toContain(named)
      expect(await fetch.channel(gw.url)).toBeUndefined()
    }
    const { openai } = client(9, {
      allow: { escrows, recipients: [payee.address] },
      maxPrice: { input: 1_000_000n, output: 2_000_000n },
    })
    const res = await openai.chat.completions.create({ model: 'fake', messages })
    expect(res.choices[0]!.message.content).toBe(words)
  })

  test('error: maxTotal reached mid-stream stops with LimitExceededError; the server charged only what was authorized', async () => {
    const vouchers: bigint[] = []
    const { openai, fetch } = client(4, {
      limits: { maxDeposit: 1_000_000n, maxTotal: 200n },
      onVoucher: (v) => vouchers.push(v.cumulativeAmount),
    })
    const stream = await openai.chat.completions.create({ model: 'fake', messages, stream: true })
    let text = ''
    const e = await (async () => {
      for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? ''
    })().catch((e) => e)
    expect(e).toBeInstanceOf(LimitExceededError)
    expect((e as LimitExceededError).limit).toBe('maxTotal')
    expect((e as Error).message).toContain('maxTotal')
    expect(text.length).toBeGreaterThan(0)
    expect(text).not.toBe(words)
    const state = (await fetch.channel(gw.url))!
    expect(BigInt(state.signed)).toBeLessThanOrEqual(200n)
    // The request ends (and its reservation is released) once the server sees the client left.
    let channel = (await Channels.get(gw.sql, state.channelId))!
    for (let i = 0; i < 50 && channel.reserved !== 0n; i++) {
      await Bun.sleep(100)
      channel = (await Channels.get(gw.sql, state.channelId))!
    }
    expect(channel.spent).toBeLessThanOrEqual(200n)
    expect(channel.acceptedCumulative).toBeLessThanOrEqual(200n)
  }, 60_000)

  test('behavior: a deposit too small for the stream is topped up mid-stream', async () => {
    const { openai, fetch } = client(5, { deposit: 200n })
    const stream = await openai.chat.completions.create({ model: 'fake', messages, stream: true })
    let text = ''
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? ''
    expect(text).toBe(words)
    const state = (await fetch.channel(gw.url))!
    const channel = (await Channels.get(gw.sql, state.channelId))!
    expect(channel.deposit).toBeGreaterThan(200n)
    expect(channel.deposit).toBe(BigInt(state.deposit))
    expect(channel.reserved).toBe(0n)
  }, 60_000)

  test('error: a top-up past maxDeposit stops with LimitExceededError naming maxDeposit', async () => {
    const { openai, fetch } = client(6, { limits: { maxDeposit: 200n, maxTotal: 1_000_000n } })
    const stream = await openai.chat.completions.create({ model: 'fake', messages, stream: true })
    const e = await (async () => {
      for await (const _ of stream);
    })().catch((e) => e)
    expect(e).toBeInstanceOf(LimitExceededError)
    expect((e as LimitExceededError).limit).toBe('maxDeposit')
    expect((e as Error).message).toContain('maxDeposit')
    const state = (await fetch.channel(gw.url))!
    expect(BigInt(state.deposit)).toBe(200n)
    expect(BigInt(state.signed)).toBeLessThanOrEqual(200n)
  }, 60_000)

  test('behavior: concurrent first requests share one channel', async () => {
    const { openai, fetch } = client(7)
    const all = await Promise.all(
      // With max_tokens each request holds its whole output up front (else concurrent whole
      // completions share the authorized balance and one may be cut where it runs out).
      Array.from({ length: 4 }, () =>
        openai.chat.completions.create({ model: 'fake', messages, max_tokens: 400 }),
      ),
    )
    for (const res of all) expect(res.choices[0]!.message.content).toBe(words)
    const payer = Buffer.from(chain.payers[7]!.address.slice(2), 'hex')
    const [row] = await gw.sql`select count(*)::int as n from channels where payer = ${payer}`
    expect(row!.n).toBe(1)
    expect((await fetch.channel(gw.url))!.channelId).toBeDefined()
  }, 60_000)

  test('behavior: a request over the voucher rate (429 with Retry-After) is sent again after the wait', async () => {
    const slow = await Gateway.create({
      chain: Gateway.chainOf(chain),
      payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherRatePerSecond: 1 },
    })
    try {
      const fetch = createFetch({
        account: chain.payers[5]!.privateKey,
        rpcUrl: chain.rpcUrl,
        limits: { maxDeposit: 1_000_000n, maxTotal: 1_000_000n },
        allow: { escrows: [chain.escrowAddress] },
        margin: 1n,
        completionMargin: 1n,
        store: Store.memory(),
      })
      const openai = new OpenAI({
        baseURL: `${slow.url}/v1`,
        apiKey: 'unused',
        fetch,
        maxRetries: 0,
      })
      // Each request needs a higher voucher than the last: the second and third wait for the rate.
      for (let i = 0; i < 3; i++) {
        const res = await openai.chat.completions.create({
          model: 'fake',
          messages,
          max_tokens: 200,
        })
        expect(res.choices[0]!.message.content).toBe(words)
      }
    } finally {
      await slow.stop()
    }
  }, 60_000)

  test('behavior: with no rpcUrl, a wallet key is enough: the challenge states the token domain, the server pays the gas', async () => {
    const payer = chain.payers[9]!
    const receipts: unknown[] = []
    const fetch = createFetch({
      account: payer.privateKey,
      limits: { maxDeposit: 1_000_000n, maxTotal: 1_000_000n },
      allow: { escrows: [chain.escrowAddress] },
      margin: 64n,
      store: Store.memory(),
      onReceipt: (r) => receipts.push(r),
    })
    const openai = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: 'unused', fetch, maxRetries: 0 })
    const ethBefore = await getBalance(chain.payeeClient, { address: payer.address })
    const stream = await openai.chat.completions.create({ model: 'fake', messages, stream: true })
    let text = ''
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? ''
    expect(text).toBe(words)
    expect(receipts.at(-1)).toMatchObject({ status: 'success' })
    const state = (await fetch.channel(gw.url))!
    const channel = (await Channels.get(gw.sql, state.channelId))!
    expect(channel.spent).toBeGreaterThan(0n)
    expect(channel.deposit).toBe(1_000_000n)
    // The payer sent no transaction: not a wei of gas spent.
    expect(await getBalance(chain.payeeClient, { address: payer.address })).toBe(ethBefore)
  }, 60_000)

  test('error: a prompt that costs more than maxTotal is refused before any voucher covers it', async () => {
    const { openai, fetch } = client(8, { limits: { maxDeposit: 1_000n, maxTotal: 50n } })
    const e = await openai.chat.completions.create({ model: 'fake', messages }).catch((e) => e)
    expect(e.cause).toBeInstanceOf(LimitExceededError)
    expect((e.cause as LimitExceededError).limit).toBe('maxTotal')
    const state = (await fetch.channel(gw.url))!
    expect(BigInt(state.signed)).toBeLessThanOrEqual(50n)
    const channel = (await Channels.get(gw.sql, state.channelId))!
    expect(channel.spent).toBe(0n)
  }, 60_000)

  test('behavior: maxTotal counts channels closed before a restart (closed totals kept in Store.file)', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
    const firstStore = Store.file(path)
    const first = client(12, { store: firstStore })
    await first.openai.chat.completions.create({ model: 'fake', messages })
    const state = (await first.fetch.channel(gw.url))!
    const spent = (await Channels.get(gw.sql, state.channelId))!.spent
    await first.fetch.close()
    const limits = { maxDeposit: 1_000_000n, maxTotal: spent + 100n }
    await firstStore.release!()
    // A restarted agent with the same store has only 100 left: not enough for this request.
    const second = client(12, { store: Store.file(path), limits })
    const e = await second.openai.chat.completions
      .create({ model: 'fake', messages })
      .catch((e) => e)
    expect(e.cause).toBeInstanceOf(LimitExceededError)
    expect((e.cause as LimitExceededError).limit).toBe('maxTotal')
    // The same limits with a store that forgot the closed channel would pay.
    const fresh = client(12, { limits })
    const res = await fresh.openai.chat.completions.create({ model: 'fake', messages })
    expect(res.choices[0]!.message.content).toBe(words)
  }, 60_000)

  test('error: a channel closed on chain without this store knowing: requestClose and withdraw say so and forget it, and count what the payee took', async () => {
    const payer = chain.payers[13]!
    const { fetch, openai } = client(13)
    await openai.chat.completions.create({ model: 'fake', messages })
    const state = (await fetch.channel(gw.url))!
    await fetch.close()
    const { settled } = (await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: state.channelId,
    }))!
    expect(settled).toBeGreaterThan(0n)
    const key = `${new URL(gw.url).origin}#${payer.address}`
    // A copy of the agent whose store still holds the channel, open or set apart as closing.
    for (const [where, call] of [
      [key, 'requestClose'],
      [`${key}#closing`, 'withdraw'],
    ] as const) {
      const stale = Store.memory()
      await stale.set(where, state)
      const copy = client(13, { store: stale })
      const e = await copy.fetch[call](gw.url).catch((e) => e)
      expect((e as Error).message).toBe(
        `Channel ${state.channelId} is already closed on chain; it is forgotten, nothing to withdraw.`,
      )
      expect(await stale.get(where)).toBeUndefined()
      expect(await stale.closedTotal(key)).toBe(settled)
    }
  }, 60_000)

  // Last: it moves block time past the grace period.
  test('behavior: requestClose, then withdraw: too early → CloseNotReadyError saying when; after the grace period the unsettled deposit comes back', async () => {
    const payer = chain.payers[10]!
    const store = Store.memory()
    const { fetch, openai } = client(10, { store })
    // Two streams (vouchers a margin ahead): the second spends past the first one's vouchers,
    // which can then be settled.
    for (let i = 0; i < 2; i++) {
      const stream = await openai.chat.completions.create({ model: 'fake', messages, stream: true })
      for await (const _ of stream);
    }
    const state = (await fetch.channel(gw.url))!
    const ref = { escrow: chain.escrowAddress, channelId: state.channelId }
    const settled = await gw.admin(`/channels/${state.channelId}/settle`, {})
    expect(((await settled.json()) as { result: { status: string } }).result.status).toBe(
      'confirmed',
    )
    const requested = await fetch.requestClose()
    expect(requested.channelId).toBe(state.channelId)
    const onChain = (await Escrow.getChannel(chain.payeeClient, ref))!
    expect(requested.withdrawableAt.getTime()).toBe(
      Number(onChain.closeRequestedAt + Escrow.closeGracePeriod) * 1000,
    )
    // Set apart: the next request would open another channel.
    expect(await fetch.channel(gw.url)).toBeUndefined()
    expect((await fetch.closing(gw.url))!.channelId).toBe(state.channelId)

    const early = await fetch.withdraw().catch((e) => e)
    expect(early).toBeInstanceOf(CloseNotReadyError)
    expect((early as CloseNotReadyError).withdrawableAt).toEqual(requested.withdrawableAt)

    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    const before = await balance(payer.address)
    const r = await fetch.withdraw()
    const after = (await Escrow.getChannel(chain.payeeClient, ref))!
    expect(after.finalized).toBe(true)
    expect(r.refund).toBe(after.deposit - after.settled)
    expect(r.refund + r.paid).toBe(BigInt(state.deposit))
    expect(await balance(payer.address)).toBe(before + r.refund)
    expect(await fetch.closing(gw.url)).toBeUndefined()
    // What the payee kept counts against maxTotal, across restarts too.
    expect(r.paid).toBeGreaterThan(0n)
    expect(await store.closedTotal(`${new URL(gw.url).origin}#${payer.address}`)).toBe(r.paid)
  }, 60_000)

  test('error: withdraw through a node whose receipt carries forged Withdrawn logs (another contract, another channel, a refund past the deposit) and junk counts what the escrow refunded', async () => {
    const payer = chain.payers[11]!
    const store = Store.memory()
    // The payer's node: the chain as it is, but each receipt with forged logs first.
    let forge = false
    const withdrawn = Escrow.abi.find((i) => i.type === 'event' && i.name === 'Withdrawn')!
    const forged = (address: Hex, channelId: Hex, refund: bigint) => ({
      address,
      topics: encodeEventTopics({
        abi: [withdrawn],
        eventName: 'Withdrawn',
        args: { channelId, payer: payer.address },
      } as never),
      data: encodeAbiParameters([{ type: 'uint128' }], [refund]),
    })
    const front = Bun.serve({
      port: 0,
      hostname: '127.0.0.1',
      async fetch(req) {
        const text = await req.text()
        const call = JSON.parse(text) as { id: number; method: string }
        const res = await fetch(chain.rpcUrl, {
          method: 'POST',
          body: text,
          headers: { 'content-type': 'application/json' },
        })
        const body = (await res.json()) as { result?: { logs: Record<string, unknown>[] } | null }
        if (forge && call.method === 'eth_getTransactionReceipt' && body.result) {
          const real = body.result.logs[0]!
          const at = { ...real, logIndex: '0x0' }
          const channelId = (real.topics as Hex[])[1]!
          body.result.logs = [
            { ...at, ...forged(chain.currencyAddress, channelId, 2n ** 128n - 1n) },
            { ...at, ...forged(chain.escrowAddress, `0x${'ee'.repeat(32)}`, 2n ** 128n - 1n) },
            { ...at, ...forged(chain.escrowAddress, channelId, 10n ** 30n) },
            { ...at, topics: null, data: 7 },
            ...body.result.logs,
          ]
        }
        return Response.json(body)
      },
    })
    try {
      const { fetch, openai } = client(11, { store, rpcUrl: `http://127.0.0.1:${front.port}` })
      for (let i = 0; i < 2; i++) {
        const stream = await openai.chat.completions.create({
          model: 'fake',
          messages,
          stream: true,
        })
        for await (const _ of stream);
      }
      const state = (await fetch.channel(gw.url))!
      const ref = { escrow: chain.escrowAddress, channelId: state.channelId }
      await gw.admin(`/channels/${state.channelId}/settle`, {})
      await fetch.requestClose()
      await chain.increaseTime(Number(Escrow.closeGracePeriod))
      forge = true
      const r = await fetch.withdraw()
      const after = (await Escrow.getChannel(chain.payeeClient, ref))!
      expect(after.finalized).toBe(true)
      expect(r.refund).toBe(after.deposit - after.settled)
      expect(r.paid).toBe(after.settled)
      expect(await store.closedTotal(`${new URL(gw.url).origin}#${payer.address}`)).toBe(r.paid)
    } finally {
      front.stop(true)
    }
  }, 60_000)

  test('behavior: withdraw after the grace period on a chain that mined no block since (anvil mines only on transactions) takes the deposit back', async () => {
    const { fetch, openai } = client(29, { store: Store.memory() })
    await openai.chat.completions.create({ model: 'fake', messages })
    const state = (await fetch.channel(gw.url))!
    await fetch.requestClose()
    // The grace period goes by with no transaction: the latest block keeps its time, the next
    // one (where the withdraw is mined) has the clock's.
    await chain.payeeClient.request({
      method: 'evm_increaseTime',
      params: [Number(Escrow.closeGracePeriod)],
    } as never)
    const r = await fetch.withdraw()
    expect(r.channelId).toBe(state.channelId)
    const after = (await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: state.channelId,
    }))!
    expect(after.finalized).toBe(true)
    expect(r.refund).toBe(after.deposit - after.settled)
  }, 60_000)

  test('error: requestClose without rpcUrl → ChainRequiredError; the channel stays', async () => {
    const store = Store.memory()
    const { fetch, openai } = client(11, { rpcUrl: undefined, store })
    await openai.chat.completions.create({ model: 'fake', messages })
    const e = await fetch.requestClose().catch((e) => e)
    expect(e).toBeInstanceOf(ChainRequiredError)
    expect((e as Error).message).toContain('rpcUrl')
    expect(await fetch.channel(gw.url)).toBeDefined()
  }, 60_000)
})

describe('createFetch: money it must not lose track of', () => {
  const channelsOf = async (payer: number) => {
    const address = Buffer.from(chain.payers[payer]!.address.slice(2), 'hex')
    return (await gw.sql`select channel_id from channels where payer = ${address}`).map(
      (r) => `0x${Buffer.from(r.channel_id).toString('hex')}`,
    )
  }

  test('behavior: a restarted agent whose first requests run at once resumes its stored channel, opens no other', async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
    const firstStore = Store.file(path)
    const first = client(14, { store: firstStore })
    await first.openai.chat.completions.create({ model: 'fake', messages, max_tokens: 50 })
    const { channelId } = (await first.fetch.channel(gw.url))!
    await firstStore.release!()
    const second = client(14, { store: Store.file(path) })
    const all = await Promise.all(
      Array.from({ length: 3 }, () =>
        second.openai.chat.completions.create({ model: 'fake', messages, max_tokens: 50 }),
      ),
    )
    for (const r of all) expect(r.choices[0]!.message.content).toBeString()
    expect((await second.fetch.channel(gw.url))!.channelId).toBe(channelId)
    expect(await channelsOf(14)).toEqual([channelId])
  }, 60_000)

  test('error: a top-up the server refuses records no deposit: the channel goes on paying within the one it has', async () => {
    const { openai, fetch } = client(15, { deposit: 300n })
    await openai.chat.completions.create({
      model: 'fake',
      messages: [{ role: 'user', content: 'hi' }],
      max_tokens: 2,
    })
    // The payer's tokens leave: an EIP-3009 top-up can no longer be pulled.
    const payer = chain.payerClient(15)
    const held = await balance(chain.payers[15]!.address)
    const hash = await writeContract(payer, {
      address: chain.currencyAddress,
      abi: erc20Abi,
      functionName: 'transfer',
      args: [chain.payers[16]!.address, held],
      chain: payer.chain,
      account: payer.account!,
    })
    await waitForTransactionReceipt(payer, { hash })
    // A stream that holds its whole answer up front: more than the deposit, a top-up first.
    const e = await (async () => {
      const stream = await openai.chat.completions.create({
        model: 'fake',
        messages,
        stream: true,
        max_tokens: 400,
      })
      for await (const _ of stream);
    })().catch((e) => e)
    // The SDK wraps what its fetch throws; the server's reason comes with it (a HEAD
    // answer has no body: the client asks again with a POST).
    const failed = ((e as Error).cause ?? e) as PaymentFailedError
    expect(failed).toBeInstanceOf(PaymentFailedError)
    // The token pull failed for want of funds: the draft's insufficient-balance.
    expect(String((failed.problem as { type?: string } | undefined)?.type)).toContain(
      'session/insufficient-balance',
    )
    const state = (await fetch.channel(gw.url))!
    expect(state.deposit).toBe('300')
    expect(BigInt(state.signed)).toBeLessThanOrEqual(300n)
    // The tokens come back: the next request tops up (recorded, the refused top-up had the
    // client believe in a deposit the escrow never got, and every voucher above 300 was refused).
    const back = chain.payerClient(16)
    await waitForTransactionReceipt(back, {
      hash: await writeContract(back, {
        address: chain.currencyAddress,
        abi: erc20Abi,
        functionName: 'transfer',
        args: [chain.payers[15]!.address, held],
        chain: back.chain,
        account: back.account!,
      }),
    })
    for (let i = 0; i < 300; i++) {
      if ((await Channels.get(gw.sql, state.channelId))!.reserved === 0n) break
      await Bun.sleep(50)
    }
    const next = await openai.chat.completions.create({
      model: 'fake',
      messages: [{ role: 'user', content: 'one' }],
      max_tokens: 2,
    })
    expect(next.choices[0]!.message.content).toBe('one')
    const after = (await fetch.channel(gw.url))!
    expect(after.channelId).toBe(state.channelId)
    expect((await Channels.get(gw.sql, state.channelId))!.deposit).toBe(BigInt(after.deposit))
    expect(BigInt(after.deposit)).toBeGreaterThan(300n)
  }, 60_000)

  test('behavior: concurrent whole completions that need a top-up all go through (one top-up at a time)', async () => {
    const { openai, fetch } = client(17, { deposit: 200n })
    for (let round = 0; round < 2; round++) {
      const all = await Promise.all(
        Array.from({ length: 4 }, () =>
          openai.chat.completions.create({ model: 'fake', messages, max_tokens: 100 }),
        ),
      )
      for (const r of all) expect(r.choices[0]!.message.content).toBeString()
    }
    const state = (await fetch.channel(gw.url))!
    const channel = (await Channels.get(gw.sql, state.channelId))!
    expect(BigInt(state.deposit)).toBe(channel.deposit)
    expect(channel.deposit).toBeGreaterThan(200n)
  }, 60_000)

  test('behavior: a channel the server refuses as closing is set apart, not forgotten: the next request opens another, close() closes both', async () => {
    const { openai, fetch } = client(18)
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    const old = (await fetch.channel(gw.url))!.channelId
    // A close that was kept waiting leaves the channel closing on the server.
    await gw.sql`update channels set close_requested_at = now(), cooperative_close = true
      where channel_id = ${Buffer.from(old.slice(2), 'hex')}`
    const res = await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
    expect(res.choices[0]!.message.content).toBeString()
    const fresh = (await fetch.channel(gw.url))!.channelId
    expect(fresh).not.toBe(old)
    expect((await fetch.closing(gw.url))!.channelId).toBe(old)
    // Closing closes the one in use, then the one set apart.
    await fetch.close()
    await fetch.close()
    for (const id of [old, fresh]) {
      const onChain = await Escrow.getChannel(chain.payeeClient, {
        escrow: chain.escrowAddress,
        channelId: id as Hex,
      })
      expect(onChain!.finalized).toBe(true)
    }
    expect(await fetch.closing(gw.url)).toBeUndefined()
    expect(await fetch.channel(gw.url)).toBeUndefined()
  }, 60_000)

  test('behavior: maxTotal holds over servers: a channel with a second server may take only what the first left', async () => {
    const other = await Gateway.create(
      {
        chain: Gateway.chainOf(chain),
        payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 5_000 },
      },
      { db: gw.db, upstream: gw.upstream },
    )
    try {
      const { fetch } = client(19, { limits: { maxDeposit: 5_000n, maxTotal: 5_000n } })
      const ask = (at: string) =>
        new OpenAI({
          baseURL: `${at}/v1`,
          apiKey: 'unused',
          fetch,
          maxRetries: 0,
        }).chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
      await ask(gw.url)
      const here = (await fetch.channel(gw.url))!
      await ask(other.url)
      const there = (await fetch.channel(other.url))!
      expect(BigInt(there.deposit)).toBeLessThanOrEqual(5_000n - BigInt(here.signed))
      expect(BigInt(here.signed) + BigInt(there.signed)).toBeLessThanOrEqual(5_000n)
    } finally {
      await other.stop()
    }
  }, 60_000)

  test('error: a receipt saying more was spent than was signed is not believed (the next voucher is not the whole deposit)', async () => {
    const lying: typeof globalThis.fetch = Object.assign(
      async (input: string | URL | Request, init?: RequestInit) => {
        const res = await globalThis.fetch(input, init)
        const header = res.headers.get('payment-receipt')
        if (!header) return res
        const headers = new Headers(res.headers)
        headers.set(
          'payment-receipt',
          Receipt.serialize({ ...Receipt.deserialize(header), spent: '99999999999' }),
        )
        return new Response(res.body, { status: res.status, headers })
      },
      { preconnect: globalThis.fetch.preconnect },
    )
    const { fetch, openai } = client(20, { fetch: lying, margin: 64n, completionMargin: 64n })
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 10 })
    await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 10 })
    const state = (await fetch.channel(gw.url))!
    expect(BigInt(state.signed)).toBeLessThan(BigInt(state.deposit) / 10n)
  }, 60_000)

  test('error: a second stream while one is under way on the channel is refused, saying why (the server would end the first); after it, streams go on', async () => {
    const { openai } = client(21)
    const first = await openai.chat.completions.create({ model: 'fake', messages, stream: true })
    const chunks = first[Symbol.asyncIterator]()
    await chunks.next()
    const second = await openai.chat.completions
      .create({ model: 'fake', messages, stream: true })
      .catch((e: unknown) => e)
    expect((second as Error).cause).toBeInstanceOf(ClientError)
    expect(((second as Error).cause as Error).message).toContain('one per channel')
    // The first was not cut.
    let text = ''
    for (let r = await chunks.next(); !r.done; r = await chunks.next())
      text += r.value.choices[0]?.delta?.content ?? ''
    expect(text.split(' ').length).toBeGreaterThan(70)
    const third = await openai.chat.completions.create({ model: 'fake', messages, stream: true })
    let again = ''
    for await (const c of third) again += c.choices[0]?.delta?.content ?? ''
    expect(again).toBe(words)
  }, 60_000)

  test('error: a malformed Payment challenge is a PaymentFailedError, not a parser crash', async () => {
    const garbage: typeof globalThis.fetch = Object.assign(
      async () =>
        new Response('{}', {
          status: 402,
          headers: {
            'www-authenticate': 'Payment id="x", method="evm", intent="session", request="%%%"',
          },
        }),
      { preconnect: globalThis.fetch.preconnect },
    )
    const { openai } = client(0, { fetch: garbage })
    const e = await openai.chat.completions
      .create({ model: 'fake', messages })
      .catch((e: unknown) => e)
    expect((e as Error).cause).toBeInstanceOf(PaymentFailedError)
  })
})

describe('PayingFetch.release', () => {
  const storeFile = async () => join(await mkdtemp(join(tmpdir(), 'tollway-')), 'channels.json')
  const post = (fetch: typeof globalThis.fetch, body: object) =>
    fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'fake', messages, ...body }),
    })

  test('behavior: release() while a stream is read waits for its end: every mid-stream voucher is accepted, and a second paying fetch takes the store over only after it', async () => {
    const path = await storeFile()
    const vouchers: bigint[] = []
    const first = client(23, {
      store: Store.file(path),
      onVoucher: (v) => vouchers.push(v.cumulativeAmount),
    })
    const stream = await first.openai.chat.completions.create({
      model: 'fake',
      messages,
      stream: true,
    })
    const chunks = stream[Symbol.asyncIterator]()
    let text = ''
    const next = await chunks.next()
    text += next.done ? '' : (next.value.choices[0]?.delta?.content ?? '')
    const { channelId } = (await first.fetch.channel(gw.url))!
    const atRelease = vouchers.length

    let released = false
    const releasing = first.fetch.release().then(() => {
      released = true
    })
    // Refused at once: no new work through a fetch being released.
    const late = await post(first.fetch, {}).catch((e: unknown) => e)
    expect(late).toBeInstanceOf(ClientError)
    await Bun.sleep(300)
    expect(released).toBe(false)
    // The store is still the first's while its stream is under way.
    const second = client(23, { store: Store.file(path) })
    const early = await second.openai.chat.completions
      .create({ model: 'fake', messages })
      .catch((e: unknown) => e)
    expect((early as Error).cause).toBeInstanceOf(StoreInUseError)

    for (let r = await chunks.next(); !r.done; r = await chunks.next())
      text += r.value.choices[0]?.delta?.content ?? ''
    expect(text).toBe(words)
    // The stream paid its way to the end after release() was called.
    expect(vouchers.length).toBeGreaterThan(atRelease)
    await releasing
    expect(released).toBe(true)
    const view = (await Channels.get(gw.sql, channelId))!
    expect(view.acceptedCumulative).toBe(vouchers.at(-1)!)
    // The second resumes the channel from what the first stored last.
    const key = `${new URL(gw.url).origin}#${privateKeyToAccount(chain.payers[23]!.privateKey).address}`
    expect(BigInt((await Store.file(path).get(key))!.signed)).toBe(vouchers.at(-1)!)
    const res = await second.openai.chat.completions.create({ model: 'fake', messages })
    expect(res.choices[0]!.message.content).toBe(words)
    expect((await second.fetch.channel(gw.url))!.channelId).toBe(channelId)
    expect((await Channels.get(gw.sql, channelId))!.acceptedCumulative).toBeGreaterThan(
      vouchers.at(-1)!,
    )
  }, 60_000)

  test('behavior: release() while a whole completion is under way resolves after its response is handed back', async () => {
    const path = await storeFile()
    const { fetch } = client(24, { store: Store.file(path) })
    await (await post(fetch, { max_tokens: 5 })).text()
    const order: string[] = []
    const answer = post(fetch, { model: 'fake-slow', max_tokens: 10 }).then((res) => {
      order.push('response')
      return res
    })
    await fetch.release().then(() => order.push('released'))
    expect(order).toEqual(['response', 'released'])
    expect((await answer).status).toBe(200)
    expect(await (await answer).text()).toContain('w4')
    // Given up: another paying fetch on the store resumes the channel.
    const second = client(24, { store: Store.file(path) })
    expect((await post(second.fetch, { max_tokens: 5 })).status).toBe(200)
  }, 60_000)

  test('behavior: release() while a stream is under way resolves once the caller cancels the stream', async () => {
    const path = await storeFile()
    const { fetch } = client(26, { store: Store.file(path) })
    const res = await post(fetch, { stream: true })
    const reader = res.body!.getReader()
    await reader.read()
    let released = false
    const releasing = fetch.release().then(() => {
      released = true
    })
    await Bun.sleep(200)
    expect(released).toBe(false)
    await reader.cancel()
    await releasing
    const second = client(26, { store: Store.file(path) })
    expect((await post(second.fetch, { max_tokens: 5 })).status).toBe(200)
  }, 60_000)

  test('behavior: release({ signal }) does not wait for a stream left unread: the signal cancels it (it errors with the reason), then the store is given up', async () => {
    const path = await storeFile()
    const first = client(25, { store: Store.file(path) })
    const res = await post(first.fetch, { stream: true })
    const reader = res.body!.getReader()
    await reader.read()
    const { channelId } = (await first.fetch.channel(gw.url))!
    const started = Date.now()
    await first.fetch.release({ signal: AbortSignal.timeout(300) })
    expect(Date.now() - started).toBeLessThan(10_000)
    const cut = await reader.read().catch((e: unknown) => e)
    expect((cut as Error).name).toBe('TimeoutError')
    const second = client(25, { store: Store.file(path) })
    const stream = await second.openai.chat.completions.create({
      model: 'fake',
      messages,
      stream: true,
    })
    let text = ''
    for await (const c of stream) text += c.choices[0]?.delta?.content ?? ''
    expect(text).toBe(words)
    expect((await second.fetch.channel(gw.url))!.channelId).toBe(channelId)
  }, 60_000)

  /** Whether `p` settles within `ms`. */
  const within = (p: Promise<unknown>, ms: number) =>
    Promise.race([
      p.then(
        () => true,
        () => true,
      ),
      Bun.sleep(ms).then(() => false),
    ])

  test('behavior: release() resolves after an open whose send threw synchronously (a fetch given in options)', async () => {
    const path = await storeFile()
    let thrown = false
    // A fetch wrapper that throws before returning a promise, on the first paid request (the open).
    const throwing = ((input: string | URL | Request, init?: RequestInit) => {
      if (!thrown && new Headers(init?.headers).has('authorization')) {
        thrown = true
        throw new TypeError('the network is down')
      }
      return globalThis.fetch(input, init)
    }) as typeof globalThis.fetch
    const { fetch } = client(27, { store: Store.file(path), fetch: throwing })
    const failed = await post(fetch, { max_tokens: 5 }).catch((e: unknown) => e)
    expect((failed as Error).message).toBe('the network is down')
    expect(await within(fetch.release({ signal: AbortSignal.timeout(300) }), 5_000)).toBe(true)
    const second = client(27, { store: Store.file(path) })
    expect((await post(second.fetch, { max_tokens: 5 })).status).toBe(200)
  }, 60_000)

  test('behavior: release() resolves after a request that gave up (12 tries) on the open it had just signed', async () => {
    const path = await storeFile()
    const { fetch } = client(28, { store: Store.file(path) })
    await (await post(fetch, { max_tokens: 5 })).text()
    // Every paid request is answered 402 (the first try carries none: the store is read on its
    // 402): verification failed 10 times, then the channel is unknown on the 12th and last try
    // (it is set apart, and a new one opened, its open never sent).
    let paid = 0
    const problem = (kind: string) => async (url: string) => {
      const fresh = await globalThis.fetch(url, { method: 'POST' })
      await fresh.body?.cancel()
      return new Response(JSON.stringify({ type: `https://tollway.dev/problems/${kind}` }), {
        status: 402,
        headers: {
          'content-type': 'application/problem+json',
          'www-authenticate': fresh.headers.get('www-authenticate')!,
        },
      })
    }
    const refusing = (async (input: string | URL | Request, init?: RequestInit) => {
      const url = String(input)
      if (url.endsWith('/v1/chat/completions') && new Headers(init?.headers).has('authorization'))
        return problem(++paid < 11 ? 'verification-failed' : 'channel-not-found')(url)
      return globalThis.fetch(input, init)
    }) as typeof globalThis.fetch
    const second = client(28, { store: Store.file(path), fetch: refusing })
    await (await post(fetch, { max_tokens: 5 })).text()
    await fetch.release()
    const failed = await post(second.fetch, { max_tokens: 5 }).catch((e: unknown) => e)
    expect(failed).toBeInstanceOf(PaymentFailedError)
    expect(paid).toBe(11)
    expect(await within(second.fetch.release({ signal: AbortSignal.timeout(300) }), 5_000)).toBe(
      true,
    )
  }, 60_000)
})
