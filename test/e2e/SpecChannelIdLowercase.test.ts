/**
 * draft-evm-session-00, "Hexadecimal Values": implementations MUST use lowercase hex for
 * channelId. The fresh challenge of a refusal names the credential's channel in
 * `methodDetails.channelId`; it must be lowercase even when the client sent it in capitals.
 */
import { afterAll, expect, test } from 'bun:test'
import { keccak256, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789' },
})
const url = `${gw.url}/v1/chat/completions`

test('the fresh challenge of a refused credential names its channel in lowercase hex', async () => {
  const res = await fetch(url, {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
  })
  const session = new PayingSession({
    account: privateKeyToAccount(chain.payers[0]!.privateKey),
    challenge: challengeOf(res.headers.get('www-authenticate'))!,
  })
  const channelId = keccak256(toHex('a channel named in capitals'))
  session.channelId = `0x${channelId.slice(2).toUpperCase()}`
  // A forged challenge (another amount under the same id): refused with a fresh challenge.
  session.renew({ ...session.challenge, request: { ...session.challenge.request, amount: '1' } })
  const refused = await fetch(url, {
    method: 'POST',
    headers: { authorization: await session.voucher(5_000n) },
  })
  expect(refused.status).toBe(402)
  const fresh = challengeOf(refused.headers.get('www-authenticate'))!
  const named = (fresh.request as { methodDetails: { channelId?: string } }).methodDetails.channelId
  expect(named).toBe(channelId)
}, 30_000)
