/**
 * A deposit or top-up the gateway sends and pays the gas of (EIP-3009, `authorization`) must
 * be at least `payments.minGasPaidDeposit` (the evm session draft, "Denial of Service": many
 * tiny authorizations would each cost the gateway a transaction's gas). A payer that
 * broadcasts its own transaction (`hash`) pays its own gas and is not held to it.
 */
import { afterAll, expect, test } from 'bun:test'
import OpenAI from 'openai'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { PaymentFailedError, Store } from '../../src/client/index.ts'
import { PayingSession } from '../../src/client/Session.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Paid from '../helpers/Paid.ts'
import * as Payer from '../helpers/Payer.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: {
    challengeSecret: 'test-challenge-secret-0123456789',
    minGasPaidDeposit: '100000',
  },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })

const freshChallenge = () => Paid.challenge(url)

const head = (authorization: string) => fetch(url, { method: 'HEAD', headers: { authorization } })

/** How many transactions the gateway sent for the payer. */
async function sent() {
  const [row] = await gw.sql`select count(*)::int as n from chain_transactions`
  return row!.n as number
}

test('error: an open below the least deposit the gateway pays the gas of is refused before any transaction; at it, it opens', async () => {
  const session = new PayingSession({
    account: privateKeyToAccount(chain.payers[0]!.privateKey),
    challenge: await freshChallenge(),
    tokenDomain,
  })
  const before = await sent()
  const small = await head(await session.openWithAuthorization({ deposit: 99_999n, initial: 10n }))
  expect(small.status).toBe(402)
  expect(await sent()).toBe(before)
  // No channel on chain: the gateway sent nothing.
  expect(
    await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: session.channelId!,
    }),
  ).toBeUndefined()
  const res = await fetch(url, {
    method: 'POST',
    headers: {
      authorization: await session.openWithAuthorization({ deposit: 99_999n, initial: 10n }),
    },
  })
  const problem = (await res.json()) as { type: string; detail: string; minimum: string }
  expect(problem.type).toBe('https://paymentauth.org/problems/payment-insufficient')
  expect(problem.detail).toContain('at least 100000')
  expect(problem.minimum).toBe('100000')

  const fresh = new PayingSession({
    account: privateKeyToAccount(chain.payers[0]!.privateKey),
    challenge: await freshChallenge(),
    tokenDomain,
  })
  expect(
    (await head(await fresh.openWithAuthorization({ deposit: 100_000n, initial: 10n }))).status,
  ).toBe(200)
  expect(await sent()).toBe(before + 1)
}, 60_000)

test('error: a top-up below the least is refused before any transaction; at it, it goes through', async () => {
  const session = new PayingSession({
    account: privateKeyToAccount(chain.payers[1]!.privateKey),
    challenge: await freshChallenge(),
    tokenDomain,
  })
  expect(
    (await head(await session.openWithAuthorization({ deposit: 100_000n, initial: 10n }))).status,
  ).toBe(200)
  const before = await sent()
  expect((await head(await session.topUp(1n))).status).toBe(402)
  expect(await sent()).toBe(before)
  expect((await head(await session.topUp(100_000n))).status).toBe(200)
  expect(await sent()).toBe(before + 1)
  expect((await Ledger.channelState(gw.sql, session.channelId!)).deposit).toBe(200_000n)
}, 60_000)

test('behavior: a payer that broadcasts its own open (type hash) pays its own gas: any deposit', async () => {
  const payerClient = chain.payerClient(2)
  const session = new PayingSession({
    account: payerClient.account as never,
    challenge: await freshChallenge(),
    tokenDomain,
  })
  const opened = await Paid.broadcastOpen(chain, payerClient, 500n)
  const header = await session.openWithHash({ ...opened, initial: 10n })
  expect((await head(header)).status).toBe(200)
}, 60_000)

test('error: the paying client with a deposit below the least: the refusal says why (the server detail), no channel is kept, and a larger deposit then opens', async () => {
  const store = Store.memory()
  const small = Payer.client(chain, gw.url, 3, {
    limits: { maxDeposit: 5_000n, maxTotal: 1_000_000n },
    store,
  })
  const e = await small.openai.chat.completions
    .create({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] })
    .catch((e) => e)
  expect(e).toBeInstanceOf(OpenAI.APIConnectionError)
  expect(e.cause).toBeInstanceOf(PaymentFailedError)
  expect((e.cause as Error).message).toContain('at least 100000')
  expect((e.cause as PaymentFailedError).problem?.minimum).toBe('100000')
  // Nothing was opened (the server refused it, the chain has none): nothing is kept, in use or
  // set apart (kept, with no RPC URL nothing could ever clear it).
  expect(await small.fetch.channel(gw.url)).toBeUndefined()
  expect(await small.fetch.setApart(gw.url)).toEqual({})
  expect(Object.keys(((await store.all!()) as { channels: object }).channels)).toEqual([])
  const enough = Payer.client(chain, gw.url, 3, {
    limits: { maxDeposit: 100_000n, maxTotal: 1_000_000n },
    store,
  })
  const res = await enough.openai.chat.completions.create({
    model: 'fake',
    messages: [{ role: 'user', content: 'hi' }],
  })
  expect(res.choices[0]!.message.content).toBeString()
  expect((await enough.fetch.channel(gw.url))?.deposit).toBe('100000')
}, 60_000)
