/**
 * draft-evm-session-00, "Error Responses": when a server-submitted transaction reverts, the
 * server MUST report the failure using the most specific applicable problem type, falling back
 * to transaction-reverted when none is more specific ("Insufficient on-chain balance / token
 * pull failed" → insufficient-balance). An EIP-3009 open from a wallet without the deposit is
 * `session/insufficient-balance`, not `session/transaction-reverted`.
 */
import { afterAll, expect, test } from 'bun:test'
import { generatePrivateKey, privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789' },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })

test('an EIP-3009 open from a wallet that lacks the deposit is 402 insufficient-balance', async () => {
  const res = await fetch(url, {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
  })
  const broke = privateKeyToAccount(generatePrivateKey())
  const session = new PayingSession({
    account: broke,
    challenge: challengeOf(res.headers.get('www-authenticate'))!,
    tokenDomain,
  })
  const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 0n })
  const refused = await fetch(url, { method: 'POST', headers: { authorization: open } })
  const problem = (await refused.json()) as { type: string; status: number }
  expect({ status: refused.status, type: problem.type }).toEqual({
    status: 402,
    type: 'https://paymentauth.org/problems/session/insufficient-balance',
  })
  expect(refused.headers.get('www-authenticate')).toContain('Payment ')
  expect(await Channels.get(gw.sql, session.channelId!)).toBeUndefined()
  expect(
    await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: session.channelId!,
    }),
  ).toBeUndefined()
}, 30_000)
