/**
 * draft-evm-session-00, "Common Verification": 4. Verify all fields in credential.challenge
 * exactly match the stored challenge parameters. tollway never issues a `description`, so a
 * credential whose echoed challenge carries one does not match the challenge it was given.
 */
import { afterAll, expect, test } from 'bun:test'
import { privateKeyToAccount } from 'viem/accounts'
import * as Token from '../../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Credential from '../../src/payment/Credential.ts'
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

test('a credential echoing a challenge with a description the server never issued is refused', async () => {
  const res = await fetch(url, {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
  })
  const issued = challengeOf(res.headers.get('www-authenticate'))!
  expect(issued.description).toBeUndefined()
  const session = new PayingSession({
    account: privateKeyToAccount(chain.payers[0]!.privateKey),
    challenge: issued,
    tokenDomain,
  })
  const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 0n })
  expect((await fetch(url, { method: 'HEAD', headers: { authorization: open } })).status).toBe(200)
  const voucher = Credential.deserialize(await session.voucher(1_000n))
  const altered = Credential.serialize({
    ...voucher,
    challenge: { ...voucher.challenge, description: 'Pay 0.0001 USDC per token' },
  })
  const res2 = await fetch(url, { method: 'POST', headers: { authorization: altered } })
  expect(res2.status).toBe(402)
  expect(((await res2.json()) as { type: string }).type).toBe(
    'https://paymentauth.org/problems/session/challenge-not-found',
  )
}, 30_000)
