/**
 * Faults of MPP session payments end to end (real anvil, real PostgreSQL, the fake upstream):
 * a gateway instance dying mid-stream, and a payer's forced close (draft-evm-session-00,
 * "Settlement Procedure": the payee settles inside the grace period).
 */
import { afterAll, describe, expect, test } from 'bun:test'
import type { Hex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import type * as Db from '../../src/ledger/Db.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'
import * as Postgres from '../helpers/Postgres.ts'
import * as Sse from '../helpers/Sse.ts'
import * as Upstream from '../helpers/Upstream.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const overrides = {
  chain: Gateway.chainOf(chain),
  payments: {
    challengeSecret: 'test-challenge-secret-0123456789',
    voucherTimeoutMs: 3_000,
    // Only a close request makes the worker settle in these tests: the threshold is out of
    // reach and channels are never idle long enough.
    settlement: { thresholdAmount: '1000000000000', idleSeconds: 3_600, intervalSeconds: 1 },
  },
}
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const balance = (owner: Hex) =>
  Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner })

const words = Array.from({ length: 80 }, (_, i) => `w${i}`).join(' ')
const body = (stream: boolean, content = words, extra: Record<string, unknown> = {}) =>
  JSON.stringify({ model: 'fake', stream, messages: [{ role: 'user', content }], ...extra })
/** The output price is 2 base units a token; a metering block is 16 tokens. */
const blockCost = 32n

const challenge = (url: string) => Paid.challenge(url, body(true))

const bytes = (id: Hex) => Buffer.from(id.slice(2), 'hex')

async function vouchers(sql: Gateway.TestGateway['sql'], channelId: Hex) {
  const rows = await sql`
    select cumulative_amount from vouchers where channel_id = ${bytes(channelId)}
    order by cumulative_amount`
  return rows.map((r) => BigInt(r.cumulative_amount))
}

/**
 * A connection to the database that can be cut, as a crashed process loses its own: every
 * query after `sever()` fails, so the instance can no longer reconcile what it served.
 */
function severable(sql: Db.Sql) {
  let severed = false
  const dead = () => Promise.reject(new Error('the connection to the database was cut'))
  const proxy = new Proxy(sql, {
    apply: (target, self, args) => (severed ? dead() : Reflect.apply(target, self, args)),
    get(target, prop) {
      const value = Reflect.get(target, prop, target)
      // `typed` and `json` build parameters, not queries; every other method talks to the server.
      if (!severed || prop === 'typed' || prop === 'json' || typeof value !== 'function')
        return value
      return dead
    },
  })
  return { sql: proxy, sever: () => (severed = true) }
}

/** The content of the completion chunks in SSE text. */
const delivered = (sse: string) => Sse.text(Sse.events(sse))

describe('a gateway instance dying mid-stream', () => {
  for (const death of ['stopped', 'crashed'] as const)
    test(`behavior: ${death} — accepted vouchers survive, the sweep returns the reservation, the loss is at most one block, the channel works on another instance`, async () => {
      // A crashed instance writes nothing more: its connection to the database is cut before it
      // stops, so only the sweep can reconcile its request. A stopped one reconciles its own.
      const db = await Postgres.fresh()
      const cut = severable(db.sql)
      const first = await Gateway.create(overrides, {
        db: { ...db, sql: cut.sql },
        upstream: Upstream.start(),
      })
      const url = `${first.url}/v1/chat/completions`
      const payer = privateKeyToAccount(chain.payers[0]!.privateKey)
      const session = new PayingSession({
        account: payer,
        challenge: await challenge(url),
        tokenDomain,
      })
      const prompt = BigInt(Tokenizer.prompt([{ content: words }]))
      const open = await session.openWithAuthorization({
        deposit: 1_000_000n,
        initial: prompt + blockCost,
      })
      const res = await fetch(url, {
        method: 'POST',
        headers: { authorization: open },
        body: body(true),
      })
      expect(res.status).toBe(200)

      // Read the stream; answer the first need with a voucher, and die at the second.
      const reader = res.body!.getReader()
      const decoder = new TextDecoder()
      let sse = ''
      let needs = 0
      let voucher = 0n
      let stopped: Promise<void> | undefined
      try {
        while (true) {
          const { value, done } = await reader.read()
          if (done) break
          sse += decoder.decode(value, { stream: true })
          const needed = [...sse.matchAll(/^event: payment-need-voucher\ndata: (.*)$/gm)]
          if (needed.length > needs) {
            needs = needed.length
            const need = JSON.parse(needed.at(-1)![1]!) as { requiredCumulative: string }
            if (needs === 1) {
              voucher = BigInt(need.requiredCumulative)
              const r = await fetch(url, {
                method: 'HEAD',
                headers: { authorization: await session.voucher(voucher) },
              })
              expect(r.status).toBe(200)
            } else if (!stopped) {
              if (death === 'crashed') cut.sever()
              stopped = first.stop()
            }
          }
        }
      } catch {
        // The connection dies with the instance.
      }
      await stopped
      expect(needs).toBe(2)
      // A stopped instance ends the stream as a stream (an error event saying so, [DONE]); a
      // crashed one just goes.
      if (death === 'stopped') {
        expect(sse).toContain('"code":"gateway_stopping"')
        expect(sse).toContain('[DONE]')
      } else expect(sse).not.toContain('[DONE]')

      // Another instance on the same database; the dead one's lease runs out and is swept.
      const second = await Gateway.create(overrides, { db, upstream: first.upstream })
      await second.sql`
      update reservations set expires_at = now() - interval '1 second'
      where channel_id = ${bytes(session.channelId!)}`
      await Reservations.sweep(second.sql)

      const channel = (await Channels.get(second.sql, session.channelId!))!
      expect(channel.acceptedCumulative).toBe(voucher)
      expect(await vouchers(second.sql, session.channelId!)).toEqual([prompt + blockCost, voucher])
      expect(channel.reserved).toBe(0n)
      const [left] = await second.sql`
      select count(*)::int as n from reservations where channel_id = ${bytes(session.channelId!)}`
      expect(left!.n).toBe(0)
      // What the payer received against what the channel was charged: at most a block apart.
      const text = delivered(sse)
      expect(text.length).toBeGreaterThan(0)
      const tokens = text
        .split(' ')
        .filter(Boolean)
        .map((w, i) => Tokenizer.count(i ? ` ${w}` : w))
        .reduce((a, b) => a + b, 0)
      const received = prompt + 2n * BigInt(tokens)
      expect(channel.spent).toBeLessThanOrEqual(channel.acceptedCumulative)
      expect(channel.spent - received).toBeLessThanOrEqual(blockCost)
      expect(received - channel.spent).toBeLessThanOrEqual(blockCost)

      // The channel goes on with the new instance.
      const more = await fetch(`${second.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: await session.voucher(voucher + 10_000n) },
        body: body(false, 'short one'),
      })
      expect(more.status).toBe(200)
      const cost = BigInt(((await more.json()) as { usage: { cost: string } }).usage.cost)
      expect(cost).toBeGreaterThan(0n)
      const after = (await Channels.get(second.sql, session.channelId!))!
      expect(after.spent).toBe(channel.spent + cost)
      expect(after.acceptedCumulative).toBe(voucher + 10_000n)
      expect(after.reserved).toBe(0n)
      await second.stop()
    }, 30_000)
})

describe('a forced close', () => {
  const payer = privateKeyToAccount(chain.payers[1]!.privateKey)
  const content = 'pay for exactly this'
  const deposit = 100_000n

  /** A channel on `gw` whose only voucher is exactly what its one request spent. */
  async function spentExactly(gw: Gateway.TestGateway) {
    const url = `${gw.url}/v1/chat/completions`
    // What the request costs (the fake upstream echoes), learnt on a throwaway channel.
    const learn = new PayingSession({
      account: payer,
      challenge: await challenge(url),
      tokenDomain,
    })
    const learnt = await fetch(url, {
      method: 'POST',
      headers: {
        authorization: await learn.openWithAuthorization({ deposit: 100_000n, initial: 50_000n }),
      },
      body: body(false, content, { max_tokens: 4096 }),
    })
    expect(learnt.status).toBe(200)
    const usage = ((await learnt.json()) as { usage: { cost: string; completion_tokens: number } })
      .usage
    const spend = BigInt(usage.cost)
    const payerBefore = await balance(payer.address)
    const payeeBefore = await balance(chain.payee.address)
    const session = new PayingSession({
      account: payer,
      challenge: await challenge(url),
      tokenDomain,
    })
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.openWithAuthorization({ deposit, initial: spend }) },
      body: body(false, content, { max_tokens: usage.completion_tokens }),
    })
    expect(res.status).toBe(200)
    const channelId = session.channelId!
    const channel = (await Channels.get(gw.sql, channelId))!
    expect(channel.spent).toBe(spend)
    expect(channel.settled).toBe(0n)
    return { url, session, channelId, spend, payerBefore, payeeBefore }
  }

  /** Waits for the escrow, then the database, to show `spend` settled on the channel. */
  async function settledOnChain(sql: Gateway.TestGateway['sql'], channelId: Hex, spend: bigint) {
    const deadline = Date.now() + 15_000
    const read = () =>
      Escrow.getChannel(chain.payeeClient, { escrow: chain.escrowAddress, channelId })
    let onChain = await read()
    while (onChain!.settled < spend && Date.now() < deadline) {
      await Bun.sleep(200)
      onChain = await read()
    }
    expect(onChain!.settled).toBe(spend)
    expect(onChain!.closeRequestedAt).toBeGreaterThan(0n)
    // The worker records the settlement after the chain shows it: wait for the record too.
    let recorded = (await Channels.get(sql, channelId))!
    while (recorded.settled < spend && Date.now() < deadline) {
      await Bun.sleep(100)
      recorded = (await Channels.get(sql, channelId))!
    }
    expect(recorded.settled).toBe(spend)
    expect(recorded.closeRequestedAt).not.toBeNull()
  }

  /** A channel of `spentExactly`, its payer's forced close, and the worker's settle of it. */
  async function forcedClose(gw: Gateway.TestGateway) {
    const spent = await spentExactly(gw)
    await Escrow.requestClose(chain.payerClient(1), {
      escrow: chain.escrowAddress,
      channelId: spent.channelId,
    })
    await settledOnChain(gw.sql, spent.channelId, spent.spend)
    return spent
  }

  test('behavior: the worker settles exactly spent on CloseRequested; after the grace period the payer withdraws the rest', async () => {
    const gw = await Gateway.create(overrides)
    const { url, session, channelId, spend, payerBefore, payeeBefore } = await forcedClose(gw)
    // No more vouchers on a closing channel.
    const late = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(spend + 1_000n) },
    })
    expect(late.status).toBe(410)

    // Too early to withdraw; after the grace period the payer takes back the rest.
    await expect(
      Escrow.withdraw(chain.payerClient(1), { escrow: chain.escrowAddress, channelId }),
    ).rejects.toThrow()
    await chain.increaseTime(Number(Escrow.closeGracePeriod) + 1)
    await Escrow.withdraw(chain.payerClient(1), { escrow: chain.escrowAddress, channelId })
    expect(await balance(chain.payee.address)).toBe(payeeBefore + spend)
    expect(await balance(payer.address)).toBe(payerBefore - spend)
    const closed = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(closed!.finalized).toBe(true)
    await gw.stop()
  }, 30_000)

  test('behavior: with a forced close pending, a cooperative close whose final voucher is above what was accepted closes the channel at once', async () => {
    const gw = await Gateway.create(overrides)
    const { url, session, channelId, spend, payerBefore, payeeBefore } = await forcedClose(gw)

    // The payer would rather not wait out the grace period: it closes, signing ahead.
    const closed = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.close(spend + 1_000n) },
    })
    expect(closed.status).toBe(200)
    expect(closed.headers.get('payment-receipt')).toBeString()
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(onChain!.finalized).toBe(true)
    expect(await balance(chain.payee.address)).toBe(payeeBefore + spend)
    expect(await balance(payer.address)).toBe(payerBefore - spend)
    expect((await Channels.get(gw.sql, channelId))!).toMatchObject({
      finalized: true,
      settled: spend,
    })
    await gw.stop()
  }, 30_000)

  test('behavior: a forced close made while the gateway was down is settled by the gateway that starts next, and its vouchers refused', async () => {
    const gw = await Gateway.create(overrides)
    const { session, channelId, spend } = await spentExactly(gw)
    // A settlement pass after the channel's request (one a second): the next reads from there.
    await Bun.sleep(1_500)
    await gw.stop()
    await Escrow.requestClose(chain.payerClient(1), { escrow: chain.escrowAddress, channelId })

    // Its event watch starts at the chain's head, past the close.
    const next = await Gateway.create(overrides, { db: gw.db, upstream: gw.upstream })
    await settledOnChain(next.sql, channelId, spend)
    const late = await fetch(`${next.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: await session.voucher(spend + 1_000n) },
    })
    expect(late.status).toBe(410)
    await next.stop()
  }, 30_000)
})
