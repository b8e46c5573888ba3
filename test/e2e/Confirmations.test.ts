/**
 * draft-evm-session-00, "Chain Reorganization": servers SHOULD wait for enough confirmations
 * before they accept an open or a top-up. With `payments.confirmations: 3` an open counts only
 * once two more blocks are on top of its own, whether the payer broadcast it (`hash`) or the
 * gateway sent it for the payer (`authorization`).
 */
import { afterAll, expect, test } from 'bun:test'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { PayingSession } from '../../src/client/Session.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', confirmations: 3 },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })

/** Sends `authorization` (HEAD); whether it was answered within `ms`, and its status. */
async function answeredWithin(pending: Promise<Response>, ms: number) {
  return Promise.race([pending.then((r) => r.status), Bun.sleep(ms).then(() => undefined)])
}

/** Mines `n` empty blocks on the development chain. */
async function mine(n: number) {
  for (let i = 0; i < n; i++) await chain.payeeClient.request({ method: 'evm_mine' } as never)
}

test('behavior: an open the payer broadcast counts once it has 3 confirmations, not at its first', async () => {
  const payerClient = chain.payerClient(1)
  const session = new PayingSession({
    account: payerClient.account as never,
    challenge: await Paid.challenge(url),
    tokenDomain,
  })
  const opened = await Paid.broadcastOpen(chain, payerClient, 100_000n)
  const header = await session.openWithHash({ ...opened, initial: 10n })
  const pending = fetch(url, { method: 'HEAD', headers: { authorization: header } })
  expect(await answeredWithin(pending, 1_000)).toBeUndefined()
  await mine(2)
  expect(await answeredWithin(pending, 10_000)).toBe(200)
}, 30_000)

test('behavior: an open the gateway sends for the payer (EIP-3009) counts once it has 3 confirmations', async () => {
  const session = new PayingSession({
    account: privateKeyToAccount(chain.payers[2]!.privateKey),
    challenge: await Paid.challenge(url),
    tokenDomain,
  })
  const header = await session.openWithAuthorization({ deposit: 100_000n, initial: 10n })
  const pending = fetch(url, { method: 'HEAD', headers: { authorization: header } })
  expect(await answeredWithin(pending, 1_000)).toBeUndefined()
  // Mined (the development chain mines each transaction at once), one block deep only.
  expect(
    await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: session.channelId!,
    }),
  ).toBeDefined()
  await mine(2)
  expect(await answeredWithin(pending, 10_000)).toBe(200)
}, 30_000)
