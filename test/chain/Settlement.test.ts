import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import {
  type AbiEvent,
  encodeAbiParameters,
  encodeEventTopics,
  encodeFunctionData,
  type Hex,
  keccak256,
  toHex,
} from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import { getTransactionCount, prepareTransactionRequest, signTransaction } from 'viem/actions'
import * as Client from '../../src/chain/Client.ts'
import * as ChainErrors from '../../src/chain/Errors.ts'
import {
  ChannelBusyError,
  ChannelStateError,
  CloseBelowSpentError,
  TransactionRevertedError,
  TransactionTimeoutError,
} from '../../src/chain/Errors.ts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Settlement from '../../src/chain/Settlement.ts'
import * as Token from '../../src/chain/Token.ts'
import * as Voucher from '../../src/chain/Voucher.ts'
import type { GatewayError } from '../../src/Errors.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import * as Settlements from '../../src/ledger/Settlements.ts'
import * as ChainEscrow from '../../src/payment/evm/ChainEscrow.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const db = await Postgres.fresh()
const { sql } = db

let chain: Anvil.TestChain
beforeAll(async () => {
  chain = await Anvil.start()
})
afterAll(() => chain?.stop())
beforeEach(() => chain.reset())

const workers: Settlement.Worker[] = []
afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.stop()))
  // The chain is reset before each test: keep earlier channels out of later passes.
  await sql`update channels set finalized = true`
  // Block numbers go back with the chain: no test reads from another's cursor.
  await sql`delete from chain_cursors`
})

const deposit = 1_000_000n
const never = 3_600_000

function payer(index = 0) {
  const p = chain.payers[index]!
  return { ...p, account: privateKeyToAccount(p.privateKey), client: chain.payerClient(index) }
}

let n = 0
/** Opens a real channel on anvil and records it as the gateway does. */
async function openChannel(): Promise<Hex> {
  const { channelId } = await Escrow.open(payer().client, {
    escrow: chain.escrowAddress,
    payee: chain.payee.address,
    token: chain.currencyAddress,
    deposit,
    salt: keccak256(toHex(`settlement ${++n} ${crypto.randomUUID()}`)),
  })
  const c = (await Escrow.getChannel(chain.payeeClient, {
    escrow: chain.escrowAddress,
    channelId,
  }))!
  await Channels.observe(
    sql,
    ChainEscrow.onChain(c, { channelId, chainId: chain.chainId, escrow: chain.escrowAddress }),
  )
  return channelId
}

function sign(channelId: Hex, cumulativeAmount: bigint) {
  return Voucher.sign(payer().account, {
    chainId: chain.chainId,
    escrow: chain.escrowAddress,
    channelId,
    cumulativeAmount,
  })
}

/** A channel with vouchers of 200 and 300 accepted and 250 spent, whose payer forced its close
 * half a 60 s grace period and more ago. */
async function forcedPastHalf(): Promise<Hex> {
  const channelId = await openChannel()
  await accept(channelId, 200n, 300n)
  await spend(channelId, 250n)
  await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId })
  await chain.increaseTime(31)
  return channelId
}

/** A cooperative close of `channelId` at 40 with a request under way (drainMs 100): what it
 * throws (a ChannelBusyError, as the tests that use it expect). */
async function closedAt40(channelId: Hex): Promise<unknown> {
  return Settlement.close(chain.payeeClient, {
    store: Settlements.store(sql),
    escrow: chain.escrowAddress,
    channelId,
    cumulativeAmount: 40n,
    signature: await sign(channelId, 40n),
    drainMs: 100,
  }).catch((e: unknown) => e)
}

/** Accepts real vouchers for each amount, in order. */
async function accept(channelId: Hex, ...amounts: bigint[]) {
  for (const cumulativeAmount of amounts) {
    const signature = await sign(channelId, cumulativeAmount)
    const r = await Channels.acceptVoucher(sql, {
      channelId,
      cumulativeAmount,
      signature,
      minDelta: 1n,
    })
    expect(r.status).toBe('accepted')
  }
}

/** Admits one request of `want` on the channel, as the metered path does; its reservation
 * when admitted. */
async function admitted(channelId: Hex, want: bigint, o: { stream?: boolean; need?: bigint } = {}) {
  const id = crypto.randomUUID()
  const a = await Channels.admit(sql, {
    channelId,
    model: 'm',
    stream: o.stream ?? false,
    want,
    need: o.need ?? want,
    requestId: id,
    leaseSeconds: 60,
  })
  const reservation =
    a.status === 'ok'
      ? Reservations.reservation(sql, { id, held: a.held, leaseSeconds: 60, channelId })
      : undefined
  return { id, reservation }
}

/** A request's end, charged `cost`. */
const ended = (cost: bigint) =>
  ({ cost, promptTokens: 1, completionTokens: 1, status: 'ok', latencyMs: 1, ttftMs: 1 }) as const

/** Charges one request of `cost` to the channel, as the metered path does. */
async function spend(channelId: Hex, cost: bigint) {
  const { reservation } = await admitted(channelId, cost)
  expect(reservation).toBeDefined()
  expect((await reservation!.settle(ended(cost))).charged).toBe(cost)
}

/** Charges up to `cost` when the channel has that much authorized; else nothing. */
async function trySpend(channelId: Hex, cost: bigint) {
  const { reservation } = await admitted(channelId, cost, { stream: true, need: 1n })
  await reservation?.settle(ended(cost))
}

type Entry = { level: string; fields: Record<string, unknown>; msg: string }
function logger(entries: Entry[]): Settlement.Log {
  const at = (level: string) => (fields: Record<string, unknown>, msg: string) =>
    entries.push({ level, fields, msg })
  return { info: at('info'), warn: at('warn'), error: at('error') } as unknown as Settlement.Log
}

/** A worker that only acts when told (first pass and interval an hour away) unless overridden. */
function worker(options: Partial<Settlement.Options> = {}) {
  const w = Settlement.start({
    store: Settlements.store(sql),
    client: chain.payeeClient,
    escrow: chain.escrowAddress,
    chainId: chain.chainId,
    thresholdAmount: 10n ** 30n,
    idleMs: never,
    intervalMs: never,
    delayMs: never,
    watch: false,
    ...options,
  })
  workers.push(w)
  return w
}

/** The payee's client with its RPC down (nothing listens there; the URL holds a "key" that
 * must not reach the logs). */
const downClient = () =>
  Client.from({
    rpcUrl: 'http://127.0.0.1:9/secret-key',
    chainId: chain.chainId,
    privateKey: chain.payee.privateKey,
    pollingInterval: 20,
  })

/**
 * The payee's client through a JSON-RPC front to anvil that answers a call with the error
 * `refuse` gives for it (as a hosted node might), or with the result `answer` gives for it
 * (`{ result }`: as a node behind another might), and passes every other call on.
 */
function rpcFront(
  refuse: (call: {
    method: string
    params?: unknown[]
  }) => { code: number; message: string } | undefined,
  answer?: (call: { method: string; params?: unknown[] }) => { result: unknown } | undefined,
) {
  const server = Bun.serve({
    port: 0,
    hostname: '127.0.0.1',
    async fetch(req) {
      const text = await req.text()
      const call = JSON.parse(text) as { id: number; method: string; params?: unknown[] }
      const error = refuse(call)
      if (error) return Response.json({ jsonrpc: '2.0', id: call.id, error })
      const given = answer?.(call)
      if (given) return Response.json({ jsonrpc: '2.0', id: call.id, result: given.result })
      return fetch(chain.rpcUrl, { method: 'POST', body: text, headers: req.headers })
    },
  })
  const client = Client.from({
    rpcUrl: `http://127.0.0.1:${server.port}`,
    chainId: chain.chainId,
    privateKey: chain.payee.privateKey,
    pollingInterval: 20,
  })
  return { server, client }
}

/**
 * Two channels (100 and 200 spent), each settled by `w`, then the blocks from the first settle
 * up replaced by ones without them (a node that does not put the transactions of dropped blocks
 * back in its pool): both settles recorded confirmed, neither on chain. The channels are opened
 * first, so that the reorganization drops the settles only.
 */
async function settledThenDropped(w: Settlement.Worker) {
  const settled: { channelId: Hex; hash: Hex }[] = []
  const opened = [
    { channelId: await openChannel(), amount: 100n },
    { channelId: await openChannel(), amount: 200n },
  ]
  for (const { channelId, amount } of opened) {
    await accept(channelId, amount)
    await spend(channelId, amount)
  }
  for (const { channelId, amount } of opened) {
    const s = await w.settleNow(channelId)
    expect(s).toMatchObject({ status: 'confirmed', cumulativeAmount: amount })
    settled.push({ channelId, hash: (s as { hash: Hex }).hash })
  }
  const [first, second] = settled as [(typeof settled)[0], (typeof settled)[0]]
  const { blockNumber } = await chain.payeeClient.request({
    method: 'eth_getTransactionReceipt',
    params: [first.hash],
  } as never)
  const head = await chain.payeeClient.request({ method: 'eth_blockNumber' } as never)
  const depth = Number(BigInt(head as Hex) - BigInt(blockNumber as Hex)) + 1
  await chain.payeeClient.request({ method: 'anvil_reorg', params: [depth, []] } as never)
  return { first, second }
}

const balance = (owner: Hex) =>
  Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner })
const onChain = async (channelId: Hex) =>
  (await Escrow.getChannel(chain.payeeClient, { escrow: chain.escrowAddress, channelId }))!
/** What `inDb` last read of each channel in this test (the chain, and its channel ids, are
 * reset before each test). */
const seen = new Map<Hex, Awaited<ReturnType<typeof Ledger.channelState>>>()
afterEach(() => seen.clear())

/** The channel's row, after checking DESIGN.md's invariant (Ledger.channelState: `settled <=
 * spent <= acceptedCumulative <= deposit`) and that none of those went down since the last
 * read: every read of a channel by these tests checks them. */
const inDb = async (channelId: Hex) => {
  const now = await Ledger.channelState(sql, channelId)
  const before = seen.get(channelId)
  if (before)
    for (const k of ['settled', 'spent', 'acceptedCumulative', 'deposit'] as const)
      expect(now[k] >= before[k]).toBe(true)
  seen.set(channelId, now)
  return (await Channels.get(sql, channelId))!
}
const recorded = (channelId: Hex) => Settlements.transactions(sql, channelId)
const mine = (results: Settlement.Result[], channelId: Hex) =>
  results.filter((r) => r.channelId === channelId)

async function until<T>(read: () => Promise<T>, ok: (value: T) => boolean, ms = 10_000) {
  const deadline = Date.now() + ms
  for (;;) {
    const value = await read()
    if (ok(value)) return value
    if (Date.now() > deadline) throw new Error(`condition not met in ${ms} ms: ${String(value)}`)
    await Bun.sleep(25)
  }
}

async function ticked(w: Settlement.Worker) {
  const t = await w.tick()
  if (!t.locked) throw new Error('expected to hold the settlement lock')
  return t.results
}

describe('tick', () => {
  test('behavior: at the threshold, settles the highest accepted voucher ≤ spent and pays exactly that', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n, 300n, 600n)
    await spend(channelId, 350n)
    const before = await balance(chain.payee.address)

    // 300 settleable: below a threshold of 301 nothing happens.
    expect(mine(await ticked(worker({ thresholdAmount: 301n })), channelId)).toEqual([])
    expect(await recorded(channelId)).toEqual([])

    const [result] = mine(await ticked(worker({ thresholdAmount: 300n })), channelId)
    expect(result).toMatchObject({ status: 'confirmed', kind: 'settle', cumulativeAmount: 300n })
    expect(await balance(chain.payee.address)).toBe(before + 300n)
    expect((await onChain(channelId)).settled).toBe(300n)
    const c = await inDb(channelId)
    expect(c).toMatchObject({ settled: 300n, spent: 350n, finalized: false })
    const [tx] = await recorded(channelId)
    expect(tx).toMatchObject({ kind: 'settle', cumulativeAmount: 300n, status: 'confirmed' })
    expect(tx!.hash).toBe((result as { hash: Hex }).hash)
    // Settled: not due again until more is spent and covered.
    expect(mine(await ticked(worker({ thresholdAmount: 1n })), channelId)).toEqual([])
  })

  test('behavior: an idle channel is settled below the threshold; an active one is not', async () => {
    const channelId = await openChannel()
    await accept(channelId, 40n)
    await spend(channelId, 40n)
    const w = worker({ idleMs: 400 })
    expect(mine(await ticked(w), channelId)).toEqual([])
    await Bun.sleep(450)
    const [result] = mine(await ticked(w), channelId)
    expect(result).toMatchObject({ status: 'confirmed', cumulativeAmount: 40n })
    expect((await onChain(channelId)).settled).toBe(40n)
  })

  test('behavior: nothing settleable (nothing spent, or no voucher ≤ spent) sends nothing', async () => {
    const unspent = await openChannel()
    await accept(unspent, 100n)
    const uncovered = await openChannel()
    await accept(uncovered, 100n)
    await spend(uncovered, 50n)
    const before = await balance(chain.payee.address)
    const w = worker({ thresholdAmount: 0n, idleMs: 0 })
    const results = await ticked(w)
    expect([...mine(results, unspent), ...mine(results, uncovered)]).toEqual([])
    expect(await w.settleNow(uncovered)).toEqual({ status: 'nothing', channelId: uncovered })
    expect(await recorded(unspent)).toEqual([])
    expect(await recorded(uncovered)).toEqual([])
    expect(await balance(chain.payee.address)).toBe(before)
    expect((await onChain(uncovered)).settled).toBe(0n)
  })

  test('error: a reverted settle is recorded as reverted with a typed error, not retried, and the loop goes on', async () => {
    const channelId = await openChannel()
    // The voucher settlement picks (300, the highest ≤ spent) does not verify on chain (signed
    // by another key; the caller of acceptVoucher checks signatures): the settle must revert.
    // (A payer's withdrawal is read back before settling: see catch-up.)
    const forged = await Voucher.sign(privateKeyToAccount(chain.payers[1]!.privateKey), {
      chainId: chain.chainId,
      escrow: chain.escrowAddress,
      channelId,
      cumulativeAmount: 300n,
    })
    const r = await Channels.acceptVoucher(sql, {
      channelId,
      cumulativeAmount: 300n,
      signature: forged,
      minDelta: 1n,
    })
    expect(r.status).toBe('accepted')
    await accept(channelId, 500n)
    await spend(channelId, 400n)

    const entries: Entry[] = []
    const w = worker({ thresholdAmount: 1n, delayMs: 0, intervalMs: 50, log: logger(entries) })
    const [tx] = await until(
      () => recorded(channelId),
      (rows) => rows.length > 0 && rows[0]!.status !== 'pending',
    )
    expect(tx).toMatchObject({
      kind: 'settle',
      cumulativeAmount: 300n,
      status: 'reverted',
      errorName: 'TransactionRevertedError',
      attempts: 1,
    })
    expect(tx!.errorMessage).toContain('InvalidSignature')
    expect((await inDb(channelId)).settled).toBe(0n)
    expect(entries.some((e) => e.msg === 'settle reverted')).toBe(true)

    // The loop survived: a channel due afterwards is settled by the same worker.
    const next = await openChannel()
    await accept(next, 70n)
    await spend(next, 70n)
    await until(
      () => onChain(next),
      (c) => c.settled === 70n,
    )
    const rows = await recorded(channelId)
    expect(rows).toHaveLength(1)
    expect(rows[0]!.attempts).toBe(1)
    await w.stop()
  })

  test('error: settleNow reports the revert as a TransactionRevertedError', async () => {
    const channelId = await openChannel()
    await accept(channelId, 300n)
    await spend(channelId, 300n)
    const { client } = payer()
    await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    await Escrow.withdraw(client, { escrow: chain.escrowAddress, channelId })
    const result = await worker().settleNow(channelId)
    expect(result.status).toBe('reverted')
    const error = (result as { error: unknown }).error
    expect(error).toBeInstanceOf(TransactionRevertedError)
    expect((error as TransactionRevertedError).errorName).toBe('ChannelFinalized')
  })

  test('property: with requests spending concurrently, what is settled is an accepted voucher ≤ spent, on-chain as in the database', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ voucher: fc.bigInt(1n, 200n), cost: fc.bigInt(1n, 150n) }), {
          minLength: 1,
          maxLength: 8,
        }),
        async (steps) => {
          const channelId = await openChannel()
          const w = worker({ thresholdAmount: 1n })
          const amounts: bigint[] = []
          const work: Promise<unknown>[] = []
          for (const step of steps) {
            amounts.push((amounts.at(-1) ?? 0n) + step.voucher)
            await accept(channelId, amounts.at(-1)!)
            work.push(trySpend(channelId, step.cost), w.tick())
          }
          await Promise.all(work)
          await ticked(w)
          const c = await inDb(channelId)
          expect(c.settled <= c.spent).toBe(true)
          expect((await onChain(channelId)).settled).toBe(c.settled)
          // Everything settleable is settled: the highest voucher at or below spent.
          expect(c.settled).toBe(amounts.filter((a) => a <= c.spent).at(-1) ?? 0n)
        },
      ),
      { numRuns: 6 },
    )
  })
})

describe('start', () => {
  test('behavior: warns when a pass (which reads back a forced close the watch missed) would not come well inside the grace period of the escrow', () => {
    const warned = (gracePeriod?: bigint) => {
      const entries: Entry[] = []
      worker({ idleMs: never, intervalMs: 200_000, gracePeriod, log: logger(entries) }).stop()
      return entries.some(
        (e) => e.level === 'warn' && e.msg.includes('a quarter of the close grace period'),
      )
    }
    // 200 s: inside a quarter of our escrow's 15 minutes, not of a 10-minute escrow's (the
    // cover of a forced close is settled by the first pass after half of it).
    expect(warned()).toBe(false)
    expect(warned(15n * 60n)).toBe(false)
    expect(warned(10n * 60n)).toBe(true)
  })

  test('behavior: two workers on one database settle a channel once', async () => {
    const channelId = await openChannel()
    await accept(channelId, 500n)
    await spend(channelId, 500n)
    const before = await balance(chain.payee.address)
    const a = worker({ thresholdAmount: 1n })
    const b = worker({ thresholdAmount: 1n })
    const ticks = await Promise.all([a.tick(), b.tick(), a.tick(), b.tick()])
    const results = ticks.flatMap((t) => (t.locked ? mine(t.results, channelId) : []))
    expect(results).toHaveLength(1)
    expect(results[0]).toMatchObject({ status: 'confirmed', cumulativeAmount: 500n })
    expect(await recorded(channelId)).toMatchObject([{ status: 'confirmed', attempts: 1 }])
    expect(await balance(chain.payee.address)).toBe(before + 500n)
  })

  // With the embedded PGlite the pool has one connection: the lock held here would leave
  // the worker waiting for that connection instead of finding the lock taken.
  test.skipIf(!process.env.DATABASE_URL)(
    'behavior: a worker does not settle while another session holds the lock',
    async () => {
      const channelId = await openChannel()
      await accept(channelId, 500n)
      await spend(channelId, 500n)
      const w = worker({ thresholdAmount: 1n })
      const held = await Settlements.withLock(sql, async () => w.tick())
      expect(held).toEqual({ locked: true, value: { locked: false } })
      const busy = await Settlements.withLock(sql, async () =>
        worker({ lockWaitMs: 100 }).settleNow(channelId),
      )
      expect(busy).toEqual({ locked: true, value: { status: 'busy', channelId } })
      expect(await recorded(channelId)).toEqual([])
      expect(mine(await ticked(w), channelId)).toHaveLength(1)
    },
  )

  test('behavior: a CloseRequested event is settled at once, without waiting for the interval', async () => {
    const channelId = await openChannel()
    await accept(channelId, 200n, 400n)
    await spend(channelId, 250n)
    worker({ watch: true })
    const { client, address } = payer()
    const requested = await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
    const c = await until(
      () => onChain(channelId),
      (c) => c.settled === 200n,
    )
    // Settled well inside the grace period (no time was moved forward).
    const block = await chain.payeeClient.request({
      method: 'eth_getBlockByNumber',
      params: ['latest', false],
    })
    expect(BigInt(block!.timestamp)).toBeLessThan(c.closeRequestedAt + Escrow.closeGracePeriod)
    expect(requested.receipt.status).toBe('success')
    expect((await inDb(channelId)).closeRequestedAt).not.toBeNull()
    // The chain can show the settlement a moment before the worker records its receipt.
    const records = await until(
      () => recorded(channelId),
      (r) => r[0]?.status === 'confirmed',
    )
    expect(records).toMatchObject([{ kind: 'settle', cumulativeAmount: 200n, status: 'confirmed' }])
    // The payer can only withdraw the rest.
    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    const before = await balance(address)
    await Escrow.withdraw(client, { escrow: chain.escrowAddress, channelId })
    expect(await balance(address)).toBe(before + deposit - 200n)
  })

  test('behavior: a forced close half its grace period old, nothing held on the channel, is settled with the lowest voucher that covers what was spent, spent raised to it; one cancelled by a top-up before then is not', async () => {
    // A grace period of 60 s as the worker reads it: the cover comes 30 s of chain time after
    // the payer's request (the escrow's own grace period stays 15 minutes).
    const w = worker({ gracePeriod: 60n })
    const { client, address } = payer()
    const forced = await openChannel()
    await accept(forced, 200n, 300n, 400n)
    await spend(forced, 250n)
    await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId: forced })
    expect(await w.closeRequested(forced)).toMatchObject({
      status: 'confirmed',
      cumulativeAmount: 200n,
    })
    // Within the payer's time to cancel it: nothing more.
    expect(mine(await ticked(w), forced)).toEqual([])
    await chain.increaseTime(31)
    expect(mine(await ticked(w), forced)).toMatchObject([
      { status: 'confirmed', kind: 'settle', cumulativeAmount: 300n },
    ])
    expect(await inDb(forced)).toMatchObject({ spent: 300n, settled: 300n })
    expect(mine(await ticked(w), forced)).toEqual([])
    /** A channel forced to close, settled at or below spent at once, then topped up (which
     * cancels the close on chain). */
    const cancelledOnChain = async () => {
      const channelId = await openChannel()
      await accept(channelId, 200n, 300n)
      await spend(channelId, 250n)
      await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
      expect(await w.closeRequested(channelId)).toMatchObject({ cumulativeAmount: 200n })
      await Escrow.topUp(client, {
        escrow: chain.escrowAddress,
        channelId,
        token: chain.currencyAddress,
        amount: 1n,
      })
      return channelId
    }
    // Cancelled by a top-up within the time to cancel: what was signed ahead is not taken.
    const cancelled = await cancelledOnChain()
    const toppedUpAt = await Channels.clock(sql)
    await Channels.observe(
      sql,
      ChainEscrow.onChain(await onChain(cancelled), {
        channelId: cancelled,
        chainId: chain.chainId,
        escrow: chain.escrowAddress,
      }),
      { toppedUpAt },
    )
    // One cancelled on chain by a top-up the gateway has not heard of: the chain says so.
    const unheard = await cancelledOnChain()
    await chain.increaseTime(31)
    expect(mine(await ticked(w), cancelled)).toEqual([])
    expect(mine(await ticked(w), unheard)).toEqual([])
    expect(await inDb(unheard)).toMatchObject({ spent: 250n, settled: 200n })
    expect(await inDb(cancelled)).toMatchObject({
      spent: 250n,
      settled: 200n,
      closeRequestedAt: null,
    })
    // The forced one ends: the payer withdraws what is left.
    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    const before = await balance(address)
    await Escrow.withdraw(client, { escrow: chain.escrowAddress, channelId: forced })
    expect(await balance(address)).toBe(before + deposit - 300n)
  })

  test('behavior: on a chain that mines only on transactions (anvil), a forced close half its grace period old by the clock is settled with its cover though no block was mined since', async () => {
    const w = worker({ gracePeriod: 60n })
    const forced = await openChannel()
    await accept(forced, 200n, 300n)
    await spend(forced, 250n)
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId: forced })
    expect(await w.closeRequested(forced)).toMatchObject({ cumulativeAmount: 200n })
    // Half the grace period goes by with no transaction: the latest block keeps its time, the
    // next one (what a settle sent now is mined in) has the clock's.
    await chain.payeeClient.request({ method: 'evm_increaseTime', params: [31] } as never)
    expect(mine(await ticked(w), forced)).toMatchObject([
      { status: 'confirmed', kind: 'settle', cumulativeAmount: 300n },
    ])
    expect(await inDb(forced)).toMatchObject({ spent: 300n, settled: 300n })
  })

  test('error: a database error while the recent settles are looked at again ends that look and the pass: no other is asked of the node, and the failure is said as the look failing', async () => {
    const w = worker({})
    const { first, second } = await settledThenDropped(w)
    // The database refuses to record a settle as reorganized out (a trigger of the test's):
    // the first one found dropped fails the look.
    await sql.unsafe(`
      create function refuse_test() returns trigger language plpgsql as
        $$ begin raise exception 'refused by the test'; end $$;
      create trigger refuse_test before update on chain_transactions
        for each row execute function refuse_test()`)
    const asked: string[] = []
    const front = rpcFront((call) => {
      if (call.method === 'eth_getTransactionReceipt')
        asked.push(String(call.params?.[0]).toLowerCase())
      return undefined
    })
    try {
      const entries: Entry[] = []
      const fronted = worker({ client: front.client, log: logger(entries) })
      expect(await fronted.tick().catch((e: unknown) => e)).toBeInstanceOf(Error)
      // The look ended with the database's error at the first settle found dropped (this
      // test's first, or one before it that the reorganization dropped too): this test's
      // second, recorded after them, was not asked about.
      expect(asked.length).toBeGreaterThan(0)
      expect(asked).not.toContain(second.hash.toLowerCase())
      expect(entries.map((e) => e.msg)).toContain(
        'looking again at the recent settles and closes failed',
      )
      expect(entries.map((e) => e.msg)).not.toContain(
        'settle: whether a reorganization dropped it could not be read',
      )
    } finally {
      front.server.stop(true)
      await sql.unsafe(
        'drop trigger refuse_test on chain_transactions; drop function refuse_test()',
      )
    }
    // A pass the database answers sends both again.
    const results = await ticked(w)
    expect(mine(results, first.channelId)).toMatchObject([{ status: 'confirmed' }])
    expect(mine(results, second.channelId)).toMatchObject([{ status: 'confirmed' }])
  }, 60_000)
  test('error: a forced close stays one through a cooperative close refused meanwhile (its requests under way past drainMs): the mark is not taken back, and the cover is settled in time', async () => {
    const w = worker({ gracePeriod: 60n })
    const channelId = await openChannel()
    // Signed far ahead: no voucher at or below what is spent.
    await accept(channelId, 1_000n)
    await spend(channelId, 40n)
    const { reservation } = await admitted(channelId, 10n)
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId })
    await w.closeRequested(channelId)
    const refused = await closedAt40(channelId)
    expect(refused).toBeInstanceOf(ChannelBusyError)
    expect((await inDb(channelId)).closeRequestedAt).not.toBeNull()
    await reservation!.settle(ended(0n))
    await chain.increaseTime(31)
    expect(mine(await ticked(w), channelId)).toMatchObject([
      { status: 'confirmed', kind: 'settle', cumulativeAmount: 1_000n },
    ])
    expect(await inDb(channelId)).toMatchObject({ spent: 1_000n, settled: 1_000n })
  })

  test('behavior: a forced close read back by a pass after half its grace period (the gateway was down) is settled with the cover at once', async () => {
    const channelId = await forcedPastHalf()
    // No watch: the pass reads the close back, marks it and settles it.
    expect(mine(await ticked(worker({ gracePeriod: 60n })), channelId)).toMatchObject([
      { status: 'confirmed', kind: 'settle', cumulativeAmount: 300n },
    ])
    expect(await inDb(channelId)).toMatchObject({ spent: 300n, settled: 300n })
  })

  test('error: a forced close seen while a cooperative close was marked is not taken back when that close is refused', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    const store = Settlements.store(sql)
    const mark = await store.markClosing(channelId)
    expect(mark).toBeDefined()
    expect(await store.markCloseRequested(channelId)).toBeDefined()
    await store.reopen(channelId, mark!)
    expect((await inDb(channelId)).closeRequestedAt).not.toBeNull()
    expect((await admitted(channelId, 1n)).reservation).toBeUndefined()
  })

  test('error: with the RPC down the loop survives, records failures and catches up later', async () => {
    const channelId = await openChannel()
    await accept(channelId, 90n)
    await spend(channelId, 90n)
    const entries: Entry[] = []
    const down = downClient()
    const w = worker({
      client: down,
      thresholdAmount: 1n,
      delayMs: 0,
      intervalMs: 30,
      retry: { baseMs: 100, maxMs: 100 },
      watch: true,
      log: logger(entries),
    })
    const [tx] = await until(
      () => recorded(channelId),
      (rows) => rows[0]?.status === 'failed' && rows[0].attempts >= 2,
    )
    expect(tx!.errorMessage).not.toContain('secret-key')
    expect(tx!.hash).toBeUndefined()
    expect(entries.some((e) => e.msg === 'settle failed; will retry')).toBe(true)
    expect(await w.tick()).toMatchObject({ locked: true })
    await w.stop()

    // The RPC is back: the next worker retries the same intent and settles it.
    worker({ thresholdAmount: 1n, delayMs: 0, intervalMs: 30 })
    const rows = await until(
      () => recorded(channelId),
      (rows) => rows[0]?.status === 'confirmed',
    )
    expect(rows).toHaveLength(1)
    expect(rows[0]!.attempts).toBeGreaterThanOrEqual(3)
    expect((await onChain(channelId)).settled).toBe(90n)
  })
})

describe('settleNow', () => {
  test('behavior: a transaction that outlived its timeout is recorded with its hash and found mined later, not sent twice', async () => {
    const channelId = await openChannel()
    await accept(channelId, 120n)
    await spend(channelId, 120n)
    const before = await balance(chain.payee.address)
    const w = worker({ txTimeoutMs: 300 })
    const rpc = (method: string, params: unknown[] = []) =>
      chain.payeeClient.request({ method, params } as never)
    await rpc('evm_setAutomine', [false])
    let first: Settlement.Result
    try {
      first = await w.settleNow(channelId)
    } finally {
      await rpc('evm_setAutomine', [true])
    }
    expect(first).toMatchObject({ status: 'failed', cumulativeAmount: 120n })
    expect((first as { error: Error }).error.name).toBe('TransactionTimeoutError')
    const [pending] = await recorded(channelId)
    expect(pending).toMatchObject({ status: 'failed', errorName: 'TransactionTimeoutError' })
    expect(pending!.hash).toMatch(/^0x[0-9a-f]{64}$/)

    await rpc('evm_mine')
    const second = await w.settleNow(channelId)
    expect(second).toMatchObject({ status: 'confirmed', hash: pending!.hash })
    expect(await recorded(channelId)).toMatchObject([
      { status: 'confirmed', attempts: 2, hash: pending!.hash },
    ])
    expect(await balance(chain.payee.address)).toBe(before + 120n)
    expect(await inDb(channelId)).toMatchObject({ settled: 120n })
  })
})

describe('close', () => {
  test('behavior: a final voucher equal to spent pays the payee that, refunds the payer the rest, finalizes', async () => {
    const channelId = await openChannel()
    await accept(channelId, 200n, 500n)
    await spend(channelId, 450n)
    const w = worker()
    expect(await w.settleNow(channelId)).toMatchObject({
      status: 'confirmed',
      cumulativeAmount: 200n,
    })
    const payee = await balance(chain.payee.address)
    const refund = await balance(payer().address)
    const closed = await Settlement.close(chain.payeeClient, {
      store: Settlements.store(sql),
      escrow: chain.escrowAddress,
      channelId,
      cumulativeAmount: 450n,
      signature: await sign(channelId, 450n),
    })
    expect(closed).toMatchObject({ cumulativeAmount: 450n, forfeited: 0n })
    expect(await balance(chain.payee.address)).toBe(payee + 250n)
    expect(await balance(payer().address)).toBe(refund + deposit - 450n)
    expect((await onChain(channelId)).finalized).toBe(true)
    expect(await inDb(channelId)).toMatchObject({ settled: 450n, finalized: true })
    const rows = await recorded(channelId)
    expect(rows.map((r) => [r.kind, r.cumulativeAmount, r.status])).toEqual([
      ['settle', 200n, 'confirmed'],
      ['close', 450n, 'confirmed'],
    ])
    expect(rows[1]!.hash).toBe(closed.hash)
    // A retried close returns the close that went through and sends nothing.
    const again = await Settlement.close(chain.payeeClient, {
      store: Settlements.store(sql),
      escrow: chain.escrowAddress,
      channelId,
      cumulativeAmount: 450n,
      signature: await sign(channelId, 450n),
    })
    expect(again).toEqual(closed)
    expect(await recorded(channelId)).toHaveLength(2)
  })

  test('error: a final voucher below spent is refused (the draft MUST), nothing is sent, and one that covers spent closes', async () => {
    const channelId = await openChannel()
    await accept(channelId, 300n, 600n)
    await spend(channelId, 450n)
    const close = (amount: bigint) =>
      sign(channelId, amount).then((signature) =>
        worker().close({ channelId, cumulativeAmount: amount, signature }),
      )
    const refused = await close(300n).catch((e: unknown) => e)
    expect(refused).toBeInstanceOf(CloseBelowSpentError)
    expect((refused as CloseBelowSpentError).spent).toBe(450n)
    expect(await recorded(channelId)).toHaveLength(0)
    expect(await inDb(channelId)).toMatchObject({ finalized: false, settled: 0n })
    expect(await close(450n)).toMatchObject({ cumulativeAmount: 450n, forfeited: 0n })
  })

  test('behavior: a close waits for the requests under way on the channel to be charged; past drainMs it is a ChannelBusyError', async () => {
    const channelId = await openChannel()
    await accept(channelId, 600n)
    const { reservation } = await admitted(channelId, 200n)
    expect(reservation).toBeDefined()
    const closeWith = async (drainMs: number) =>
      Settlement.close(chain.payeeClient, {
        store: Settlements.store(sql),
        escrow: chain.escrowAddress,
        channelId,
        cumulativeAmount: 150n,
        signature: await sign(channelId, 150n),
        drainMs,
      })
    expect(await closeWith(100).catch((e: unknown) => e)).toBeInstanceOf(ChannelBusyError)
    // The request in flight ends, charged 150, while the close waits; the close then takes it.
    const closing = closeWith(10_000)
    await Bun.sleep(200)
    await reservation!.settle(ended(150n))
    expect(await closing).toMatchObject({ cumulativeAmount: 150n, forfeited: 0n })
    expect(await inDb(channelId)).toMatchObject({ spent: 150n, settled: 150n, finalized: true })
  })

  test('error: over HTTP, a close kept waiting is a 503 channel_busy with Retry-After, a voucher below spent a 402 payment-insufficient naming it', () => {
    const id = `0x${'11'.repeat(32)}` as Hex
    const busy = ChainEscrow.problem(new ChannelBusyError(), id) as GatewayError
    expect([busy.status, busy.type, busy.headers['retry-after']]).toEqual([
      503,
      'channel_busy',
      '5',
    ])
    const low = ChainEscrow.problem(new CloseBelowSpentError(450n), id) as {
      status: number
      toProblem(): Record<string, unknown>
    }
    expect(low.status).toBe(402)
    expect(low.toProblem()).toMatchObject({ requiredCumulative: '450', channelId: id })
    expect(String(low.toProblem().type)).toContain('payment-insufficient')
  })

  test('behavior: a close does not wait for a request whose instance died: it is swept, charged what it delivered, then the close goes on', async () => {
    const channelId = await openChannel()
    await accept(channelId, 600n)
    const { id, reservation } = await admitted(channelId, 300n, { stream: true })
    expect(reservation).toBeDefined()
    // It had sent 100 worth when its instance died; its lease has run out since.
    await sql`update reservations set delivered = 100, expires_at = now() - interval '1 second' where id = ${id}`
    const started = Date.now()
    const closed = await Settlement.close(chain.payeeClient, {
      store: Settlements.store(sql),
      escrow: chain.escrowAddress,
      channelId,
      cumulativeAmount: 100n,
      signature: await sign(channelId, 100n),
      drainMs: 5_000,
    })
    expect(Date.now() - started).toBeLessThan(5_000)
    expect(closed).toMatchObject({ cumulativeAmount: 100n, forfeited: 0n })
    expect(await inDb(channelId)).toMatchObject({ spent: 100n, settled: 100n, reserved: 0n })
  })

  test('behavior: a final voucher above spent closes with the lowest voucher that covers spent, the final one or one accepted before, spent raised to it (the highest at or below spent would give the rest away)', async () => {
    const channelId = await openChannel()
    await accept(channelId, 300n, 500n, 600n)
    await spend(channelId, 450n)
    const payee = await balance(chain.payee.address)
    const closed = await worker().close({
      channelId,
      cumulativeAmount: 600n,
      signature: await sign(channelId, 600n),
    })
    expect(closed).toMatchObject({ cumulativeAmount: 500n, forfeited: 0n })
    expect(await balance(chain.payee.address)).toBe(payee + 500n)
    expect(await inDb(channelId)).toMatchObject({ spent: 500n, settled: 500n, finalized: true })
    // With no voucher accepted between spent and the final one, the final one.
    const other = await openChannel()
    await accept(other, 300n)
    await spend(other, 250n)
    const final = { channelId: other, cumulativeAmount: 280n, signature: await sign(other, 280n) }
    expect(await worker().close(final)).toMatchObject({ cumulativeAmount: 280n, forfeited: 0n })
    expect(await inDb(other)).toMatchObject({ spent: 280n, settled: 280n, finalized: true })
  })

  test('behavior: a final voucher the escrow rejects falls back to the accepted voucher that covers spent, spent raised to it once settled', async () => {
    const channelId = await openChannel()
    await accept(channelId, 300n, 600n)
    await spend(channelId, 450n)
    // Signed for another amount: the escrow's signature check fails.
    const closed = await worker().close({
      channelId,
      cumulativeAmount: 450n,
      signature: await sign(channelId, 449n),
    })
    expect(closed).toMatchObject({ cumulativeAmount: 600n, forfeited: 0n })
    expect(
      (await recorded(channelId)).map((r) => [r.cumulativeAmount, r.status, r.errorName]),
    ).toEqual([
      [450n, 'reverted', 'TransactionRevertedError'],
      [600n, 'confirmed', undefined],
    ])
    expect(await inDb(channelId)).toMatchObject({ spent: 600n, settled: 600n, finalized: true })
  })

  test('behavior: a pass while a cooperative close is marked settles no more than spent: the payer final voucher at spent then closes the channel', async () => {
    const channelId = await openChannel()
    // Signed far ahead: no voucher at or below what is spent.
    await accept(channelId, 1_000n)
    await spend(channelId, 40n)
    const store = Settlements.store(sql)
    const w = worker()
    expect(await store.markClosing(channelId)).toBeDefined()
    expect(mine(await ticked(w), channelId)).toEqual([])
    expect(await inDb(channelId)).toMatchObject({ spent: 40n, settled: 0n })
    const closed = await w.close({
      channelId,
      cumulativeAmount: 40n,
      signature: await sign(channelId, 40n),
    })
    expect(closed).toMatchObject({ cumulativeAmount: 40n, forfeited: 0n })
    expect(await inDb(channelId)).toMatchObject({ spent: 40n, settled: 40n, finalized: true })
  })

  test('error: an unknown channel is a ChannelStateError', async () => {
    const error = await worker()
      .close({ channelId: `0x${'ab'.repeat(32)}`, cumulativeAmount: 1n, signature: '0x' })
      .catch((e: unknown) => e)
    expect(error).toBeInstanceOf(ChannelStateError)
    expect((error as ChannelStateError).reason).toBe('unknown')
  })

  test('error: a forced close of a channel whose only voucher is far above what it spent (signed ahead at once) is settled with that voucher: the payer cannot take back what it spent', async () => {
    const channelId = await openChannel()
    await accept(channelId, 1_000n)
    await spend(channelId, 40n)
    // Half a grace period of 30 s of chain time, a pass every 50 ms.
    worker({ watch: true, gracePeriod: 60n, intervalMs: 50, delayMs: 0 })
    const { client, address } = payer()
    await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
    await chain.increaseTime(31)
    await until(
      () => onChain(channelId),
      (c) => c.settled === 1_000n,
    )
    // The chain shows the settle a moment before the worker records its receipt.
    await until(
      () => inDb(channelId),
      (c) => c.spent === 1_000n && c.settled === 1_000n,
    )
    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    const before = await balance(address)
    await Escrow.withdraw(client, { escrow: chain.escrowAddress, channelId })
    expect(await balance(address)).toBe(before + deposit - 1_000n)
  })

  test('behavior: a channel the payer withdrew with nothing the gateway could settle is recorded as finalized, not left closing', async () => {
    // Nothing was spent: there is nothing to settle.
    const channelId = await openChannel()
    await accept(channelId, 100n)
    worker({ watch: true })
    const { client, address } = payer()
    await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
    await until(
      () => inDb(channelId),
      (c) => c.closeRequestedAt !== null,
    )
    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    const before = await balance(address)
    await Escrow.withdraw(client, { escrow: chain.escrowAddress, channelId })
    expect(await balance(address)).toBe(before + deposit)
    const c = await until(
      () => inDb(channelId),
      (c) => c.finalized,
    )
    expect(c.settled).toBe(0n)
  })

  test('error: a channel the payer already withdrew is a ChannelStateError once the escrow says so', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await spend(channelId, 100n)
    const { client } = payer()
    await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    await Escrow.withdraw(client, { escrow: chain.escrowAddress, channelId })
    const w = worker()
    const final = { channelId, cumulativeAmount: 100n, signature: await sign(channelId, 100n) }
    // The first close reverts (ChannelFinalized) and teaches the database; the next is refused up front.
    expect(await w.close(final).catch((e: unknown) => e)).toBeInstanceOf(TransactionRevertedError)
    const error = await w.close(final).catch((e: unknown) => e)
    expect(error).toBeInstanceOf(ChannelStateError)
    expect((error as ChannelStateError).reason).toBe('finalized')
  })
})

describe('idle channels (draft: settle and close channels inactive for extended periods)', () => {
  const closedOf = (results: Settlement.IdleClosed[], channelId: Hex) =>
    results.filter((r) => r.channelId === channelId)

  test('behavior: a channel idle for closeIdleMs is closed with the lowest accepted voucher that covers spent: the payee gets that, the payer the rest; an unused one refunds its whole deposit; an active one stays open', async () => {
    const used = await openChannel()
    await accept(used, 100n, 250n, 400n)
    await spend(used, 300n)
    const unused = await openChannel()
    const w = worker({ closeIdleMs: 600 })
    // Not idle yet.
    expect(closedOf(await w.closeIdle(), used)).toEqual([])
    await Bun.sleep(700)
    const active = await openChannel()
    const payee = await balance(chain.payee.address)
    const refund = await balance(payer().address)
    const results = await w.closeIdle()
    expect(closedOf(results, used)).toMatchObject([
      { closed: { cumulativeAmount: 400n, forfeited: 0n } },
    ])
    expect(closedOf(results, unused)).toMatchObject([
      { closed: { cumulativeAmount: 0n, forfeited: 0n } },
    ])
    expect(closedOf(results, active)).toEqual([])
    expect(await balance(chain.payee.address)).toBe(payee + 400n)
    expect(await balance(payer().address)).toBe(refund + (deposit - 400n) + deposit)
    expect(await inDb(used)).toMatchObject({ spent: 400n, settled: 400n })
    for (const id of [used, unused]) {
      expect((await onChain(id)).finalized).toBe(true)
      expect(await inDb(id)).toMatchObject({ finalized: true })
    }
    expect((await onChain(active)).finalized).toBe(false)
    expect(await inDb(active)).toMatchObject({ finalized: false, closeRequestedAt: null })
    // Nothing left to close.
    expect(closedOf(await w.closeIdle(), used)).toEqual([])
  })

  test('behavior: a channel with a request under way is not idle, whatever its last update', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    const { reservation } = await admitted(channelId, 50n)
    const w = worker({ closeIdleMs: 300 })
    await Bun.sleep(400)
    expect(closedOf(await w.closeIdle(), channelId)).toEqual([])
    await reservation!.settle(ended(50n))
    expect(await inDb(channelId)).toMatchObject({ finalized: false, spent: 50n })
  })

  test('error: an idle close whose transaction failed (the RPC down) leaves the channel closing, and a later pass closes it once the backoff is over', async () => {
    const channelId = await openChannel()
    await accept(channelId, 80n)
    await spend(channelId, 80n)
    const down = downClient()
    const entries: Entry[] = []
    const failing = worker({
      client: down,
      closeIdleMs: 200,
      retry: { baseMs: 300, maxMs: 300 },
      log: logger(entries),
    })
    await Bun.sleep(300)
    const [failed] = closedOf(await failing.closeIdle(), channelId)
    expect(failed && 'error' in failed).toBe(true)
    expect(entries.some((e) => e.msg === 'closing an idle channel failed')).toBe(true)
    // Closing: no new requests meanwhile.
    expect((await inDb(channelId)).closeRequestedAt).not.toBeNull()
    expect((await admitted(channelId, 1n)).reservation).toBeUndefined()
    const [tx] = await recorded(channelId)
    expect(tx).toMatchObject({ kind: 'close', cumulativeAmount: 80n, status: 'failed' })
    // Within the backoff: not tried again.
    const w = worker({ closeIdleMs: 3_600_000 })
    expect(closedOf(await w.closeIdle(), channelId)).toEqual([])
    await Bun.sleep(350)
    expect(closedOf(await w.closeIdle(), channelId)).toMatchObject([
      { closed: { cumulativeAmount: 80n, forfeited: 0n } },
    ])
    expect((await onChain(channelId)).finalized).toBe(true)
    expect((await recorded(channelId)).map((r) => [r.kind, r.status])).toEqual([
      ['close', 'confirmed'],
    ])
  })

  test('behavior: a channel marked for an idle close only while it is still idle: not after a voucher or an admission came since the look, nor with a request under way', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await Bun.sleep(350)
    // Listed as idle, then a voucher came: not marked, not closing.
    await accept(channelId, 150n)
    expect(await Settlements.markIdle(sql, channelId, 300)).toBeUndefined()
    await Bun.sleep(350)
    // A request under way (its admission updated the row; held past the idleness, as a
    // stream waiting for its next voucher).
    const { reservation } = await admitted(channelId, 10n)
    await Bun.sleep(350)
    expect(await Settlements.markIdle(sql, channelId, 300)).toBeUndefined()
    expect((await inDb(channelId)).closeRequestedAt).toBeNull()
    await reservation!.settle(ended(10n))
    await Bun.sleep(350)
    expect(await Settlements.markIdle(sql, channelId, 300)).toBeDefined()
    expect((await inDb(channelId)).closeRequestedAt).not.toBeNull()
  })

  test('behavior: a payer cooperative close that failed is left to the payer: the idle look does not close it with another voucher', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await spend(channelId, 100n)
    const down = downClient()
    const failing = worker({ client: down, retry: { baseMs: 50, maxMs: 50 } })
    const final = { channelId, cumulativeAmount: 100n, signature: await sign(channelId, 100n) }
    expect(await failing.close(final).catch((e: unknown) => e)).toBeInstanceOf(Error)
    expect((await recorded(channelId)).map((r) => [r.kind, r.status])).toEqual([
      ['close', 'failed'],
    ])
    await Bun.sleep(400)
    const w = worker({ closeIdleMs: 300 })
    expect(closedOf(await w.closeIdle(), channelId)).toEqual([])
    expect((await onChain(channelId)).finalized).toBe(false)
    // The payer tries again, and its close goes through.
    expect(await w.close(final)).toMatchObject({ cumulativeAmount: 100n })
  })

  test('behavior: the loop looks for idle channels a tenth as often as the idleness it waits for (each look reads every open channel), not every pass', async () => {
    const store = Settlements.store(sql)
    let looks = 0
    let passes = 0
    worker({
      store: {
        ...store,
        idle: (q) => {
          looks++
          return store.idle(q)
        },
        withLock: (fn) => {
          passes++
          return store.withLock(fn)
        },
      },
      closeIdleMs: 2_000,
      delayMs: 0,
      intervalMs: 20,
    })
    await Bun.sleep(500)
    expect(passes).toBeGreaterThan(8)
    // At 0 ms and at 200 ms intervals after: three looks in 500 ms.
    expect(looks).toBeGreaterThanOrEqual(2)
    expect(looks).toBeLessThanOrEqual(4)
  })

  test('behavior: the loop closes idle channels', async () => {
    const channelId = await openChannel()
    await accept(channelId, 60n)
    await spend(channelId, 60n)
    worker({ closeIdleMs: 300, delayMs: 0, intervalMs: 50 })
    const c = await until(
      () => inDb(channelId),
      (c) => c.finalized,
    )
    expect(c.settled).toBe(60n)
    expect((await onChain(channelId)).finalized).toBe(true)
  })
})

describe('catch-up (a payer acting while no worker watched)', () => {
  const cursor = () =>
    Settlements.cursor(sql, { chainId: chain.chainId, escrow: chain.escrowAddress })
  const head = () => chain.payeeClient.request({ method: 'eth_blockNumber' }).then(BigInt)
  /** An eth_getLogs over more than 4 blocks (what the fronts below refuse). */
  const wideGetLogs = (call: { method: string; params?: unknown[] }) => {
    if (call.method !== 'eth_getLogs') return false
    const [filter] = call.params as [{ fromBlock: Hex; toBlock: Hex }]
    return BigInt(filter.toBlock) - BigInt(filter.fromBlock) + 1n > 4n
  }
  /**
   * A channel (100 spent) whose close is requested 10 blocks into 20, read by a worker through
   * `front`: settled all the same, the cursor at the head the pass began at, `refused()` ranges
   * refused and a log line containing `logged`. Stops the front.
   */
  async function settledThrough(
    front: ReturnType<typeof rpcFront>,
    refused: () => number,
    logged: string,
  ) {
    try {
      const channelId = await openChannel()
      await accept(channelId, 100n)
      await spend(channelId, 100n)
      const entries: Entry[] = []
      const w = worker({ client: front.client, log: logger(entries) })
      expect(mine(await ticked(w), channelId)).toEqual([])
      for (let i = 0; i < 10; i++) await chain.increaseTime(1)
      await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId })
      for (let i = 0; i < 10; i++) await chain.increaseTime(1)

      const before = await head()
      expect(mine(await ticked(w), channelId)).toMatchObject([
        { status: 'confirmed', cumulativeAmount: 100n },
      ])
      expect(refused()).toBeGreaterThan(0)
      expect(entries.some((e) => e.msg.includes(logged))).toBe(true)
      expect(await cursor()).toBe(before)
    } finally {
      front.server.stop(true)
    }
  }

  test('behavior: a forced close made between two passes is marked and settled by the next, under the threshold, with a watch that starts after it', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n, 300n, 600n)
    await spend(channelId, 350n)
    // A pass before the close (the gateway ran), then the gateway is down while the payer asks.
    expect(mine(await ticked(worker()), channelId)).toEqual([])
    expect(await cursor()).toBe(await head())
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId })
    expect((await inDb(channelId)).closeRequestedAt).toBeNull()

    // Restarted: its watch starts at the head and never sees the event; its pass does.
    const [result] = mine(await ticked(worker({ watch: true })), channelId)
    expect(result).toMatchObject({ status: 'confirmed', kind: 'settle', cumulativeAmount: 300n })
    expect((await onChain(channelId)).settled).toBe(300n)
    const c = await inDb(channelId)
    expect(c.closeRequestedAt).not.toBeNull()
    expect(c.settled).toBe(300n)
    // Closing: no more vouchers for it.
    const signature = await sign(channelId, 400n)
    const more = await Channels.acceptVoucher(sql, {
      channelId,
      cumulativeAmount: 400n,
      signature,
      minDelta: 1n,
    })
    expect(more.status).not.toBe('accepted')
  })

  test('behavior: a withdrawal made while no worker watched is recorded as finalized by the next pass', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await spend(channelId, 40n)
    expect(mine(await ticked(worker()), channelId)).toEqual([])
    const { client } = payer()
    await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    await Escrow.withdraw(client, { escrow: chain.escrowAddress, channelId })

    expect(mine(await ticked(worker()), channelId)).toEqual([])
    expect(await inDb(channelId)).toMatchObject({ finalized: true, settled: 0n })
  })

  test('behavior: events spread over many log ranges are all read, the cursor ends at the head', async () => {
    const first = await openChannel()
    await accept(first, 100n)
    await spend(first, 100n)
    const second = await openChannel()
    await accept(second, 200n)
    await spend(second, 200n)
    expect(mine(await ticked(worker()), first)).toEqual([])
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId: first })
    await chain.increaseTime(1)
    await chain.increaseTime(1)
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId: second })

    const before = await head()
    const results = await ticked(worker({ logRange: 1 }))
    expect(mine(results, first)).toMatchObject([{ status: 'confirmed', cumulativeAmount: 100n }])
    expect(mine(results, second)).toMatchObject([{ status: 'confirmed', cumulativeAmount: 200n }])
    // Read up to the head the pass began at (its settles came after).
    expect(await cursor()).toBe(before)
  })

  test('behavior: a node that refuses a wide eth_getLogs range gets smaller ones, and every event is still read', async () => {
    // The chain through a front that, as many hosted nodes, refuses a range over 4 blocks.
    let refused = 0
    const front = rpcFront((call) => {
      if (!wideGetLogs(call)) return undefined
      refused++
      return { code: -32602, message: 'block range is too wide: at most 4 blocks' }
    })
    await settledThrough(front, () => refused, 'refused an eth_getLogs range')
  })

  test('behavior: a node whose eth_getLogs answer for a wide range is over the size the client reads gets smaller ranges, and every event is still read', async () => {
    // A busy escrow: over 4 blocks, its logs pass the 10 MB viem reads of an answer.
    let refused = 0
    const front = rpcFront(
      () => undefined,
      (call) => {
        if (!wideGetLogs(call)) return undefined
        refused++
        return { result: ['0'.repeat(11 * 1024 * 1024)] }
      },
    )
    await settledThrough(front, () => refused, 'answer was too large')
  })

  test('property: closing logs of an open channel forged by the node, and garbled ones, neither settle, close nor mark it, nor fail the pass', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await spend(channelId, 40n)
    const events = Escrow.abi.filter(
      (item) =>
        item.type === 'event' &&
        [
          'CloseRequested',
          'CloseRequestCancelled',
          'Withdrawn',
          'ChannelClosed',
          'Settled',
        ].includes(item.name),
    ) as AbiEvent[]
    const word = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })
    const forged = fc.tuple(fc.constantFrom(...events), word, fc.nat(2)).map(([event, v, how]) => {
      const topics = encodeEventTopics({
        abi: [event],
        eventName: event.name,
        args: { channelId, payer: payer().account.address, payee: chain.payee.address },
      } as never) as Hex[]
      const unindexed = event.inputs.filter((i) => !i.indexed)
      const data = encodeAbiParameters(
        unindexed,
        unindexed.map(() => v),
      )
      // As the escrow would emit it; with a topic too many; with its data cut.
      return {
        address: chain.escrowAddress.toLowerCase(),
        topics: how === 1 ? [...topics, topics[1]] : topics,
        data: how === 2 ? data.slice(0, -2) : data,
        blockNumber: '0x1',
        blockHash: `0x${'11'.repeat(32)}`,
        transactionHash: `0x${'22'.repeat(32)}`,
        transactionIndex: '0x0',
        logIndex: '0x0',
        removed: false,
      } as unknown
    })
    const answer = fc.oneof(
      fc.array(forged, { minLength: 1, maxLength: 6 }),
      fc.array(fc.oneof(forged, fc.jsonValue({ maxDepth: 2 })), { minLength: 1, maxLength: 6 }),
      fc.jsonValue({ maxDepth: 2 }),
    )
    let logs: unknown = []
    const front = rpcFront(
      () => undefined,
      (call) => (call.method === 'eth_getLogs' ? { result: logs } : undefined),
    )
    try {
      const w = worker({ client: front.client })
      await fc.assert(
        fc.asyncProperty(answer, async (a) => {
          logs = a
          // Read from a cursor behind the head: the forged logs are in the range.
          await Settlements.advance(sql, {
            chainId: chain.chainId,
            escrow: chain.escrowAddress,
            block: 0n,
          })
          expect(mine(await ticked(w), channelId)).toEqual([])
          expect(await inDb(channelId)).toMatchObject({
            closeRequestedAt: null,
            finalized: false,
            settled: 0n,
            spent: 40n,
          })
          expect(await recorded(channelId)).toEqual([])
        }),
        { numRuns: 25, seed: 20261125 },
      )
      expect((await onChain(channelId)).settled).toBe(0n)
    } finally {
      front.server.stop(true)
    }
  }, 60_000)

  test('behavior: with no cursor, or one past the head (a chain started afresh), every open channel is read from the escrow', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await spend(channelId, 100n)
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId })
    await Settlements.advance(sql, {
      chainId: chain.chainId,
      escrow: chain.escrowAddress,
      block: (await head()) + 1_000n,
    })
    const before = await head()
    const [result] = mine(await ticked(worker()), channelId)
    expect(result).toMatchObject({ status: 'confirmed', cumulativeAmount: 100n })
    expect(await cursor()).toBe(before)

    await sql`delete from chain_cursors`
    const other = await openChannel()
    await accept(other, 50n)
    await spend(other, 50n)
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId: other })
    expect(mine(await ticked(worker()), other)).toMatchObject([
      { status: 'confirmed', cumulativeAmount: 50n },
    ])
  })

  test('behavior: a close the payer cancelled with a top-up before the pass is not marked', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await spend(channelId, 100n)
    expect(mine(await ticked(worker()), channelId)).toEqual([])
    const { client } = payer()
    await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
    await Escrow.topUp(client, {
      escrow: chain.escrowAddress,
      channelId,
      token: chain.currencyAddress,
      amount: 1n,
    })
    expect(mine(await ticked(worker()), channelId)).toEqual([])
    expect((await inDb(channelId)).closeRequestedAt).toBeNull()
  })
})

describe('a chain that reorganizes, a settle still pending, a top-up racing a mark', () => {
  const cursor = () =>
    Settlements.cursor(sql, { chainId: chain.chainId, escrow: chain.escrowAddress })
  const rpc = (method: string, params: unknown[] = []) =>
    chain.payeeClient.request({ method, params } as never)

  test('error: a forced close reorganized into the block the last pass read up to is still marked and settled', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await spend(channelId, 100n)
    // A pass reads up to the head: a block without the payer's close (the node's view then).
    await rpc('evm_mine')
    expect(mine(await ticked(worker()), channelId)).toEqual([])
    const read = await cursor()
    // The chain reorganizes that block: the canonical one holds the payer's requestClose.
    const { client, address } = payer()
    const request = await prepareTransactionRequest(client, {
      account: client.account,
      chain: client.chain,
      to: chain.escrowAddress,
      data: encodeFunctionData({
        abi: Escrow.abi,
        functionName: 'requestClose',
        args: [channelId],
      }),
      gas: 200_000n,
      nonce: await getTransactionCount(client, { address, blockTag: 'latest' }),
    })
    const raw = await signTransaction(client, request as never)
    await rpc('anvil_reorg', [1, [[raw, 0]]])
    client.account.nonceManager?.reset({ address, chainId: chain.chainId })
    expect((await onChain(channelId)).closeRequestedAt).not.toBe(0n)
    expect(BigInt((await rpc('eth_blockNumber')) as Hex)).toBe(read!)

    // The next pass, well inside the grace period, settles what was spent.
    await ticked(worker())
    expect((await inDb(channelId)).closeRequestedAt).not.toBeNull()
    expect((await onChain(channelId)).settled).toBe(100n)
  })

  test('error: a settle retried while its first transaction is still pending is not recorded as reverted; once that one is mined the pass records it settled', async () => {
    const channelId = await openChannel()
    await accept(channelId, 120n)
    await spend(channelId, 120n)
    const w = worker({ txTimeoutMs: 400, thresholdAmount: 1n, retry: { baseMs: 1, maxMs: 1 } })
    let first: Settlement.Recorded | undefined
    await rpc('evm_setAutomine', [false])
    try {
      // A slow chain: the settle is not mined within txTimeoutMs.
      expect(mine(await ticked(w), channelId)).toMatchObject([{ status: 'failed' }])
      ;[first] = await recorded(channelId)
      expect(first!.hash).toMatch(/^0x[0-9a-f]{64}$/)
      await Bun.sleep(5)
      // The next pass comes while it is still in the pool: it waits for it, sends none.
      expect(mine(await ticked(w), channelId)).toMatchObject([{ status: 'failed' }])
    } finally {
      await rpc('evm_setAutomine', [true])
    }
    // The first transaction is mined: the payee was paid 120.
    await rpc('evm_mine')
    expect((await onChain(channelId)).settled).toBe(120n)
    await ticked(w)
    expect((await inDb(channelId)).settled).toBe(120n)
    // One transaction only, never recorded as reverted (its intent is met on chain).
    const rows = await recorded(channelId)
    expect(rows).toHaveLength(1)
    expect(rows[0]!.hash).toBe(first!.hash)
    expect(rows[0]!.status).toBe('confirmed')
  }, 30_000)

  test('error: a top-up credential handled between the pass reading a forced close and marking it does not leave the channel closing', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await spend(channelId, 100n)
    // As the gateway makes it: on the embedded database (one connection) the pass holds no
    // reserved connection, which the credential's statements below would wait for.
    const base = Settlements.store(sql, { alone: db.max === 1 })
    expect(mine(await ticked(worker()), channelId)).toEqual([])
    const { client } = payer()
    await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
    let raced = false
    const store: Settlement.Store = {
      ...base,
      withLock: (fn) =>
        base.withLock((locked) =>
          fn({
            ...locked,
            async markCloseRequested(...args) {
              if (!raced) {
                raced = true
                // The payer changes its mind: a top-up, and its credential, as Server.ts handles it.
                await Escrow.topUp(client, {
                  escrow: chain.escrowAddress,
                  channelId,
                  token: chain.currencyAddress,
                  amount: 1n,
                })
                const toppedUpAt = await Channels.clock(sql)
                const c = await onChain(channelId)
                await Channels.observe(
                  sql,
                  ChainEscrow.onChain(c, {
                    channelId,
                    chainId: chain.chainId,
                    escrow: chain.escrowAddress,
                  }),
                  { toppedUpAt },
                )
              }
              return locked.markCloseRequested(...args)
            },
          }),
        ),
    }
    await ticked(worker({ store }))
    expect(raced).toBe(true)
    expect((await onChain(channelId)).closeRequestedAt).toBe(0n)
    // The chain has the channel open: the gateway too, and takes the payer next voucher.
    const more = await Channels.acceptVoucher(sql, {
      channelId,
      cumulativeAmount: 200n,
      signature: await sign(channelId, 200n),
      minDelta: 1n,
    })
    expect(more.status).toBe('accepted')
    expect((await inDb(channelId)).closeRequestedAt).toBeNull()
  })
})

describe('records that follow the chain (an attempt recorded failed, mined after all)', () => {
  const rpc = (method: string, params: unknown[] = []) =>
    chain.payeeClient.request({ method, params } as never)
  /** Runs `fn` on a chain that mines nothing until told (a receipt wait runs out of time). */
  async function stalled<T>(fn: () => Promise<T>): Promise<T> {
    await rpc('evm_setAutomine', [false])
    try {
      return await fn()
    } finally {
      await rpc('evm_setAutomine', [true])
    }
  }

  test('error: a settle recorded failed and mined later is recorded confirmed by the next pass, which its backoff no longer holds back', async () => {
    const channelId = await openChannel()
    await accept(channelId, 120n)
    await spend(channelId, 120n)
    // The default backoff (5 s): a failed row would hold the channel's next settle that long.
    const w = worker({ txTimeoutMs: 300, thresholdAmount: 1n })
    expect(mine(await stalled(() => ticked(w)), channelId)).toMatchObject([{ status: 'failed' }])
    const [failed] = await recorded(channelId)
    expect(failed).toMatchObject({ status: 'failed', errorName: 'TransactionTimeoutError' })
    expect(failed!.hash).toMatch(/^0x[0-9a-f]{64}$/)

    await rpc('evm_mine')
    expect((await onChain(channelId)).settled).toBe(120n)
    // The pass reads the Settled event and the receipt of the recorded hash: nothing to send.
    expect(mine(await ticked(w), channelId)).toEqual([])
    expect(await inDb(channelId)).toMatchObject({ settled: 120n })
    expect(await recorded(channelId)).toMatchObject([
      {
        kind: 'settle',
        cumulativeAmount: 120n,
        status: 'confirmed',
        hash: failed!.hash,
        attempts: 1,
        errorName: undefined,
        errorMessage: undefined,
      },
    ])
    // More is spent and covered: settled at once, not after the failed attempt's backoff.
    await accept(channelId, 200n)
    await spend(channelId, 80n)
    expect(mine(await ticked(w), channelId)).toMatchObject([
      { status: 'confirmed', cumulativeAmount: 200n },
    ])
  }, 30_000)

  test('error: a close recorded failed and mined later is recorded confirmed by the next pass; the client retrying it gets that close', async () => {
    const channelId = await openChannel()
    await accept(channelId, 300n)
    await spend(channelId, 300n)
    const final = { channelId, cumulativeAmount: 300n, signature: await sign(channelId, 300n) }
    const w = worker({ txTimeoutMs: 300 })
    const error = await stalled(() => w.close(final).catch((e: unknown) => e))
    expect(error).toBeInstanceOf(TransactionTimeoutError)
    const [failed] = await recorded(channelId)
    expect(failed).toMatchObject({ kind: 'close', cumulativeAmount: 300n, status: 'failed' })

    await rpc('evm_mine')
    expect((await onChain(channelId)).finalized).toBe(true)
    // No pass ran before (no cursor): this one reads every open channel from the escrow.
    expect(mine(await ticked(w), channelId)).toEqual([])
    expect(await inDb(channelId)).toMatchObject({ settled: 300n, finalized: true })
    expect(await recorded(channelId)).toMatchObject([
      { kind: 'close', cumulativeAmount: 300n, status: 'confirmed', hash: failed!.hash },
    ])
    // The close went through: a client sending it again gets it, not a finalized channel.
    expect(await w.close(final)).toEqual({
      hash: failed!.hash!,
      cumulativeAmount: 300n,
      forfeited: 0n,
    })
  }, 30_000)

  test('error: a settle recorded failed and mined reverted (the payer withdrew first) is recorded reverted', async () => {
    const channelId = await openChannel()
    await accept(channelId, 100n)
    await spend(channelId, 100n)
    const { client, address } = payer()
    await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    const w = worker({ txTimeoutMs: 300 })
    const [failed] = await stalled(async () => {
      expect(await w.settleNow(channelId)).toMatchObject({ status: 'failed' })
      // The payer withdraws in the same block, ahead of the settle (a higher tip).
      const request = await prepareTransactionRequest(client, {
        account: client.account,
        chain: client.chain,
        to: chain.escrowAddress,
        data: encodeFunctionData({ abi: Escrow.abi, functionName: 'withdraw', args: [channelId] }),
        gas: 200_000n,
        maxPriorityFeePerGas: 100_000_000_000n,
        maxFeePerGas: 200_000_000_000n,
        nonce: await getTransactionCount(client, { address, blockTag: 'pending' }),
      })
      await rpc('eth_sendRawTransaction', [await signTransaction(client, request as never)])
      return recorded(channelId)
    })
    client.account.nonceManager?.reset({ address, chainId: chain.chainId })
    expect(failed).toMatchObject({ status: 'failed', errorName: 'TransactionTimeoutError' })

    await rpc('evm_mine')
    expect(await onChain(channelId)).toMatchObject({ finalized: true, settled: 0n })
    const receipt = await chain.payeeClient.request({
      method: 'eth_getTransactionReceipt',
      params: [failed!.hash!],
    })
    expect(receipt?.status).toBe('0x0')
    // The pass reads the Withdrawn event and the receipt of the recorded hash.
    expect(mine(await ticked(w), channelId)).toEqual([])
    expect(await inDb(channelId)).toMatchObject({ finalized: true, settled: 0n })
    expect(await recorded(channelId)).toMatchObject([
      {
        kind: 'settle',
        cumulativeAmount: 100n,
        status: 'reverted',
        hash: failed!.hash,
        errorName: 'TransactionRevertedError',
      },
    ])
    // Its receipt is final: a later pass that reads the channel again (its Withdrawn event is
    // within the blocks each pass reads again) does not ask the node for it.
    const asked: unknown[] = []
    const front = rpcFront((call) => {
      if (call.method === 'eth_getTransactionReceipt') asked.push(call.params?.[0])
      return undefined
    })
    try {
      expect(mine(await ticked(worker({ client: front.client })), channelId)).toEqual([])
      expect(asked).not.toContain(failed!.hash)
      expect(await recorded(channelId)).toMatchObject([
        { status: 'reverted', hash: failed!.hash, errorName: 'TransactionRevertedError' },
      ])
    } finally {
      front.server.stop(true)
    }
  }, 30_000)

  test('behavior: a reverted attempt whose receipt was read is followed no more; a new attempt of the intent is followed again', async () => {
    const channelId = await openChannel()
    const intent = { channelId, kind: 'close' as const, cumulativeAmount: 10n, leaseMs: 1_000 }
    const hash = (s: string) => keccak256(toHex(`${s} ${crypto.randomUUID()}`))
    const reverted = { name: 'TransactionRevertedError', message: 'close reverted' }
    const first = (await Settlements.begin(sql, intent))!
    await Settlements.submitted(sql, first.id, hash('a'))
    // Reverted in a simulation only: it may have been mined since, so it is followed.
    await Settlements.finish(sql, first.id, { status: 'reverted', error: reverted })
    expect(await Settlements.unconfirmed(sql, channelId)).toHaveLength(1)
    // Its receipt read, mined and reverted: final.
    await Settlements.finish(sql, first.id, { status: 'reverted', error: reverted, mined: true })
    expect(await Settlements.unconfirmed(sql, channelId)).toEqual([])
    // A client sends the close again: the new attempt is followed, and so is its timeout.
    const again = (await Settlements.begin(sql, intent))!
    expect(again.id).toBe(first.id)
    const second = hash('b')
    await Settlements.submitted(sql, again.id, second)
    // Sent, no outcome yet (its worker may die here): followed.
    expect(await Settlements.unconfirmed(sql, channelId)).toMatchObject([
      { id: first.id, hash: second, status: 'pending' },
    ])
    await Settlements.finish(sql, again.id, {
      status: 'failed',
      error: { name: 'TransactionTimeoutError', message: 'no receipt in time' },
      retryAt: new Date(),
    })
    expect(await Settlements.unconfirmed(sql, channelId)).toMatchObject([
      { id: first.id, hash: second, status: 'failed' },
    ])
    // Found mined after all, and successful: followed no more either.
    await Settlements.finish(sql, again.id, { status: 'confirmed', hash: second })
    expect(await Settlements.unconfirmed(sql, channelId)).toEqual([])
  })

  test('error: a receipt the node will not give (an error, not null) keeps no pass from marking a forced close and settling it', async () => {
    const channelId = await openChannel()
    await accept(channelId, 50n, 100n)
    await spend(channelId, 100n)
    // An earlier settle recorded failed, its backoff over, whose transaction the node errors on
    // when asked for its receipt: geth rebuilding its transaction index answers so for the
    // transactions it has not indexed yet (the oldest), while it answers the rest.
    const old = keccak256(toHex(`an old settle ${crypto.randomUUID()}`))
    const begun = (await Settlements.begin(sql, {
      channelId,
      kind: 'settle',
      cumulativeAmount: 50n,
      leaseMs: 1_000,
    }))!
    await Settlements.submitted(sql, begun.id, old)
    await Settlements.finish(sql, begun.id, {
      status: 'failed',
      error: { name: 'TransactionTimeoutError', message: 'no receipt in time' },
      retryAt: new Date(Date.now() - 60_000),
    })
    const front = rpcFront((call) =>
      call.method === 'eth_getTransactionReceipt' && call.params?.[0] === old
        ? { code: -32000, message: 'transaction indexing is in progress' }
        : undefined,
    )
    try {
      const client = front.client
      // The payer starts a forced close: the pass must settle at once, whatever the threshold.
      await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId })
      const entries: Entry[] = []
      const w = worker({ client, log: logger(entries) })
      expect(mine(await ticked(w), channelId)).toMatchObject([
        { status: 'confirmed', kind: 'settle', cumulativeAmount: 100n },
      ])
      expect((await onChain(channelId)).settled).toBe(100n)
      // The old attempt stays as recorded, and the failure to follow it is said.
      expect((await recorded(channelId))[0]).toMatchObject({ status: 'failed', hash: old })
      expect(entries.some((e) => e.level === 'warn' && e.fields.hash === old)).toBe(true)
    } finally {
      front.server.stop(true)
    }
  }, 30_000)
})

describe('backoff', () => {
  test('behavior: doubles from the base and stops at the maximum', () => {
    const retry = { baseMs: 100, maxMs: 1_000 }
    expect([1, 2, 3, 4, 5, 50].map((a) => Settlement.backoff(a, retry))).toEqual([
      100, 200, 400, 800, 1_000, 1_000,
    ])
  })
})

describe('describe', () => {
  test('behavior: keeps the name, drops URLs from the message', () => {
    const e = new Error('fetch failed: https://rpc.example/v2/KEY123 refused')
    expect(ChainErrors.describe(e)).toEqual({
      name: 'Error',
      message: 'fetch failed: <url> refused',
    })
  })
})

describe('closing channels in the passes (audit)', () => {
  const dueNow = () =>
    Settlements.due(sql, {
      chainId: chain.chainId,
      escrow: chain.escrowAddress,
      payee: chain.payee.address,
      thresholdAmount: 10n ** 30n,
      idleMs: never,
      sweptWithinMs: 60_000,
      coverAfterMs: 30_000,
      limit: 100,
    })

  test('error: a payer cooperative close that failed is not due pass after pass once what is at or below spent is settled, and keeps no forced close out of a pass', async () => {
    // The payer closes cooperatively, its final voucher far above what it spent; the close
    // fails (the RPC down) and is left to the payer, who never comes back.
    const stuck = await openChannel()
    await accept(stuck, 100n, 300n)
    await spend(stuck, 250n)
    const failing = worker({ client: downClient(), retry: { baseMs: 50, maxMs: 50 } })
    const final = { channelId: stuck, cumulativeAmount: 300n, signature: await sign(stuck, 300n) }
    expect(await failing.close(final).catch((e: unknown) => e)).toBeInstanceOf(Error)
    await Bun.sleep(100)
    // One channel a pass: the passes settle what is at or below spent, once.
    const w = worker({ batch: 1 })
    expect(mine(await ticked(w), stuck)).toMatchObject([
      { status: 'confirmed', kind: 'settle', cumulativeAmount: 100n },
    ])
    expect((await dueNow()).map((d) => d.channelId)).not.toContain(stuck)
    // A payer forces a close on another channel: the next passes settle it.
    const forced = await openChannel()
    await accept(forced, 200n)
    await spend(forced, 200n)
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId: forced })
    await ticked(w)
    await ticked(w)
    expect((await onChain(forced)).settled).toBe(200n)
    expect(await inDb(stuck)).toMatchObject({ spent: 250n, settled: 100n, finalized: false })
  }, 30_000)
  test('error: forced closes waiting for their half grace period (what is at or below spent settled) keep no channel the pass can act on out of it; their covers are still settled once the chain shows them old enough, its clock ahead of the database', async () => {
    // Two channels a pass; a grace period of 60 s as the worker reads it (covers after 30 s).
    const w = worker({ batch: 2, gracePeriod: 60n, thresholdAmount: 100n })
    const waiting: Hex[] = []
    for (let i = 0; i < 3; i++) {
      const channelId = await openChannel()
      await accept(channelId, 200n, 300n)
      await spend(channelId, 250n)
      await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId })
      expect(await w.closeRequested(channelId)).toMatchObject({
        status: 'confirmed',
        cumulativeAmount: 200n,
      })
      waiting.push(channelId)
    }
    // Their covers (300) are above settled: all three are due, and older than any other.
    const due = (await dueNow()).map((d) => d.channelId)
    for (const channelId of waiting) expect(due).toContain(channelId)
    // Another channel reaches the threshold: the next pass settles it.
    const over = await openChannel()
    await accept(over, 150n)
    await spend(over, 150n)
    expect(mine(await ticked(w), over)).toMatchObject([
      { status: 'confirmed', kind: 'settle', cumulativeAmount: 150n },
    ])
    for (const channelId of waiting) expect((await onChain(channelId)).settled).toBe(200n)
    // The chain's clock past half the grace period, the database's not: the passes settle
    // every cover, two a pass.
    await chain.increaseTime(31)
    const first = (await ticked(w)).filter((r) => r.status === 'confirmed')
    expect(first).toHaveLength(2)
    await ticked(w)
    for (const channelId of waiting) {
      expect((await onChain(channelId)).settled).toBe(300n)
      expect(await inDb(channelId)).toMatchObject({ spent: 300n, settled: 300n })
    }
  }, 60_000)
  test('error: a forced close the payer cancelled on chain with a top-up the gateway did not hear of is open again after the next pass, not read pass after pass nor refused for good', async () => {
    const w = worker()
    const { client } = payer()
    const topUp = (channelId: Hex) =>
      Escrow.topUp(client, {
        escrow: chain.escrowAddress,
        channelId,
        token: chain.currencyAddress,
        amount: 1n,
      })
    // Spent between two vouchers: its cover is due while the close stands.
    const covered = await openChannel()
    await accept(covered, 200n, 300n)
    await spend(covered, 250n)
    // Nothing spent: nothing due.
    const unused = await openChannel()
    await accept(unused, 100n)
    for (const channelId of [covered, unused]) {
      await Escrow.requestClose(client, { escrow: chain.escrowAddress, channelId })
      await w.closeRequested(channelId)
      expect((await inDb(channelId)).closeRequestedAt).not.toBeNull()
      await topUp(channelId)
    }
    expect(mine(await ticked(w), covered)).toEqual([])
    for (const channelId of [covered, unused]) {
      expect(await inDb(channelId)).toMatchObject({
        closeRequestedAt: null,
        deposit: deposit + 1n,
      })
      expect((await dueNow()).map((d) => d.channelId)).not.toContain(channelId)
      // The payer's channel serves again.
      expect((await admitted(channelId, 10n)).reservation).toBeDefined()
    }
    expect(await inDb(covered)).toMatchObject({ spent: 250n, settled: 200n })
  }, 30_000)
  test('error: a forced close whose cover reverts in a pass (the gateway back after half the grace period) is settled by the next pass with what is at or below spent, then left alone', async () => {
    const channelId = await openChannel()
    await accept(channelId, 200n)
    // The cover does not verify on chain (signed by another key: a contract signer that no
    // longer answers for it would do the same).
    const forged = await Voucher.sign(privateKeyToAccount(chain.payers[1]!.privateKey), {
      chainId: chain.chainId,
      escrow: chain.escrowAddress,
      channelId,
      cumulativeAmount: 300n,
    })
    expect(
      (
        await Channels.acceptVoucher(sql, {
          channelId,
          cumulativeAmount: 300n,
          signature: forged,
          minDelta: 1n,
        })
      ).status,
    ).toBe('accepted')
    await spend(channelId, 250n)
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId })
    await chain.increaseTime(31)
    const w = worker({ gracePeriod: 60n })
    expect(mine(await ticked(w), channelId)).toMatchObject([
      { status: 'reverted', kind: 'settle', cumulativeAmount: 300n },
    ])
    expect(mine(await ticked(w), channelId)).toMatchObject([
      { status: 'confirmed', kind: 'settle', cumulativeAmount: 200n },
    ])
    expect((await onChain(channelId)).settled).toBe(200n)
    expect(await inDb(channelId)).toMatchObject({ spent: 250n, settled: 200n })
    expect(mine(await ticked(w), channelId)).toEqual([])
    expect((await dueNow()).map((d) => d.channelId)).not.toContain(channelId)
  }, 30_000)
  test('error: a cover settle recorded confirmed, then reorganized out of the chain (its block replaced by one without it), is sent again by the next pass: spent raised to it stays paid', async () => {
    const channelId = await forcedPastHalf()
    const w = worker({ gracePeriod: 60n })
    const [first] = mine(await ticked(w), channelId)
    expect(first).toMatchObject({ status: 'confirmed', kind: 'settle', cumulativeAmount: 300n })
    expect(await inDb(channelId)).toMatchObject({ spent: 300n, settled: 300n })
    // The block that held it is replaced by one without it (a node that does not put the
    // transactions of a dropped block back in its pool).
    await chain.payeeClient.request({ method: 'anvil_reorg', params: [1, []] } as never)
    expect((await onChain(channelId)).settled).toBe(0n)
    const [again] = mine(await ticked(w), channelId)
    expect(again).toMatchObject({ status: 'confirmed', kind: 'settle', cumulativeAmount: 300n })
    expect((await onChain(channelId)).settled).toBe(300n)
    expect(await recorded(channelId)).toMatchObject([
      { kind: 'settle', cumulativeAmount: 300n, status: 'confirmed', attempts: 2 },
    ])
    // Mined again and read back: nothing more.
    expect(mine(await ticked(w), channelId)).toEqual([])
    // Later settles go through (no nonce left unused by the dropped one).
    const next = await openChannel()
    await accept(next, 50n)
    await spend(next, 50n)
    expect(await w.settleNow(next)).toMatchObject({ status: 'confirmed', cumulativeAmount: 50n })
  }, 30_000)
  test('error: a settle recorded confirmed is not taken for reorganized out when the node asked lags a block behind the one that gave its receipt (a load-balanced RPC)', async () => {
    // A front to anvil that, lagging, answers as a node one block behind: the head below,
    // no such block, and neither a receipt nor a transaction for the hash it has not seen.
    let lagging: { hash: Hex; block: bigint } | undefined
    const front = rpcFront(
      () => undefined,
      (call) => {
        if (!lagging) return undefined
        const first = String(call.params?.[0] ?? '').toLowerCase()
        if (call.method === 'eth_blockNumber') return { result: toHex(lagging.block - 1n) }
        if (
          (call.method === 'eth_getTransactionReceipt' ||
            call.method === 'eth_getTransactionByHash') &&
          first === lagging.hash.toLowerCase()
        )
          return { result: null }
        if (
          call.method === 'eth_getBlockByNumber' &&
          first.startsWith('0x') &&
          BigInt(first) >= lagging.block
        )
          return { result: null }
        return undefined
      },
    )
    const { server, client } = front
    try {
      const w = worker({ client })
      const channelId = await openChannel()
      await accept(channelId, 200n)
      await spend(channelId, 200n)
      const settled = await w.settleNow(channelId)
      expect(settled).toMatchObject({ status: 'confirmed', cumulativeAmount: 200n })
      const hash = (settled as { hash: Hex }).hash
      const { blockNumber } = await chain.payeeClient.request({
        method: 'eth_getTransactionReceipt',
        params: [hash],
      } as never)
      lagging = { hash, block: BigInt(blockNumber as Hex) }
      // Mined, and still in its block: nothing to send again, the record stays as it is.
      expect(mine(await ticked(w), channelId)).toEqual([])
      expect(await recorded(channelId)).toMatchObject([
        { kind: 'settle', cumulativeAmount: 200n, status: 'confirmed', attempts: 1 },
      ])
      lagging = undefined
      expect(mine(await ticked(w), channelId)).toEqual([])
      expect(await recorded(channelId)).toMatchObject([
        { kind: 'settle', cumulativeAmount: 200n, status: 'confirmed', attempts: 1 },
      ])
    } finally {
      server.stop(true)
    }
  }, 30_000)
  test('error: a settle whose state on chain the node will not give keeps no other settle reorganized out from being sent again in the same pass, and is said apart from reading the events', async () => {
    const w = worker({})
    const { first, second } = await settledThenDropped(w)
    expect((await onChain(first.channelId)).settled).toBe(0n)
    expect((await onChain(second.channelId)).settled).toBe(0n)
    // The node errs when asked for the first one (looked at first: recorded first).
    const front = rpcFront((call) =>
      call.method === 'eth_getTransactionByHash' &&
      String(call.params?.[0]).toLowerCase() === first.hash.toLowerCase()
        ? { code: -32000, message: 'transaction indexing is in progress' }
        : undefined,
    )
    try {
      const entries: Entry[] = []
      const fronted = worker({ client: front.client, log: logger(entries) })
      expect(mine(await ticked(fronted), second.channelId)).toMatchObject([
        { status: 'confirmed', kind: 'settle', cumulativeAmount: 200n },
      ])
      expect((await onChain(second.channelId)).settled).toBe(200n)
      expect(mine(await ticked(fronted), first.channelId)).toEqual([])
      expect(entries.some((e) => e.level === 'warn' && e.fields.hash === first.hash)).toBe(true)
      expect(entries.map((e) => e.msg)).not.toContain('reading the escrow events failed')
    } finally {
      front.server.stop(true)
    }
    // The node answers again: the first is sent again by the next pass.
    expect(mine(await ticked(w), first.channelId)).toMatchObject([
      { status: 'confirmed', kind: 'settle', cumulativeAmount: 100n },
    ])
    expect((await onChain(first.channelId)).settled).toBe(100n)
    expect(await inDb(first.channelId)).toMatchObject({ spent: 100n, settled: 100n })
  }, 60_000)
  test('error: a forced close stays one through a cooperative close refused meanwhile, its event out of the blocks the passes read again: the cover is settled in time', async () => {
    const w = worker({ gracePeriod: 60n })
    // A cursor: the passes read the events after it, and the last 64 blocks again.
    await ticked(w)
    const channelId = await openChannel()
    // Signed far ahead: no voucher at or below what is spent.
    await accept(channelId, 1_000n)
    await spend(channelId, 40n)
    const { reservation } = await admitted(channelId, 10n)
    await Escrow.requestClose(payer().client, { escrow: chain.escrowAddress, channelId })
    expect(await w.closeRequested(channelId)).toMatchObject({ status: 'nothing' })
    // Blocks go by (the real 7.5 minutes to the cover are over 64 blocks on most chains), and a
    // pass reads up to the head: its CloseRequested event is behind the blocks read again.
    await chain.payeeClient.request({ method: 'anvil_mine', params: ['0x50'] } as never)
    expect(mine(await ticked(w), channelId)).toEqual([])
    // The payer closes cooperatively too, with a request still under way: refused.
    const refused = await closedAt40(channelId)
    expect(refused).toBeInstanceOf(ChannelBusyError)
    await reservation!.settle(ended(0n))
    await chain.increaseTime(31)
    expect(mine(await ticked(w), channelId)).toMatchObject([
      { status: 'confirmed', kind: 'settle', cumulativeAmount: 1_000n },
    ])
    expect((await onChain(channelId)).settled).toBe(1_000n)
  }, 30_000)
})
