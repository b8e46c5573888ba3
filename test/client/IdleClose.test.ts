/**
 * A channel the gateway closed for idleness (payments.settlement.closeIdleSeconds), against a
 * real gateway and anvil: the payer gets the rest of its deposit back without a forced close,
 * and the paying client that comes back opens a new channel and is served.
 */
import { afterAll, expect, test } from 'bun:test'
import OpenAI from 'openai'
import type { Hex } from 'viem'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { createFetch, Store } from '../../src/client/index.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: {
    challengeSecret: 'test-challenge-secret-0123456789',
    settlement: { intervalSeconds: 1, closeIdleSeconds: 2 },
  },
})

test('behavior: a channel idle past closeIdleSeconds is closed by the gateway, the payer refunded the rest; the client that comes back opens a new channel and is served', async () => {
  const payer = chain.payers[0]!
  const fetch = createFetch({
    account: payer.privateKey,
    rpcUrl: chain.rpcUrl,
    limits: { maxDeposit: 100_000n, maxTotal: 1_000_000n },
    allow: { escrows: [chain.escrowAddress], currencies: [chain.currencyAddress] },
    store: Store.memory(),
  })
  const openai = new OpenAI({ baseURL: `${gw.url}/v1`, apiKey: 'unused', fetch, maxRetries: 0 })
  const ask = () =>
    openai.chat.completions.create({
      model: 'fake',
      messages: [{ role: 'user', content: 'one two three' }],
      max_tokens: 5,
    })
  const first = await ask()
  const old = (await fetch.channel(gw.url))!.channelId as Hex
  const balance = () =>
    Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner: payer.address })
  const before = await balance()
  // The gateway's settlement loop closes it once it has been idle 2 s (a pass a second).
  const id = Buffer.from(old.slice(2), 'hex')
  let row: { finalized: boolean; spent: bigint; settled: bigint; deposit: bigint } | undefined
  for (let i = 0; i < 100 && !row?.finalized; i++) {
    await Bun.sleep(100)
    const rows =
      await gw.sql`select finalized, spent, settled, deposit from channels where channel_id = ${id}`
    row = rows[0] as typeof row
  }
  expect(row?.finalized).toBe(true)
  const onChain = await Escrow.getChannel(chain.payeeClient, {
    escrow: chain.escrowAddress,
    channelId: old,
  })
  // The payee took the lowest voucher that covers what was spent (the client's vouchers run
  // ahead of its spending, and one that leaves its channel to an idle close pays what it
  // signed), what was spent raised to it; the payer got the rest of its deposit back.
  const cost = BigInt((first.usage as unknown as { cost: string }).cost)
  const [cover] = await gw.sql`
    select min(cumulative_amount) as amount from vouchers
    where channel_id = ${id} and cumulative_amount >= ${cost}`
  expect(cover!.amount as bigint).toBeGreaterThan(cost)
  expect(row!.spent).toBe(cover!.amount as bigint)
  expect(row!.settled).toBe(cover!.amount as bigint)
  expect(onChain).toMatchObject({ finalized: true, settled: row!.settled })
  expect(await balance()).toBe(before + row!.deposit - row!.settled)
  // Back later: served on a new channel.
  const again = await ask()
  expect(again.choices[0]!.message.content).toContain('one')
  expect((await fetch.channel(gw.url))!.channelId).not.toBe(old)
}, 60_000)
