/**
 * draft-httpauth-payment-00, "Idempotency and Side Effects": servers MUST NOT perform side
 * effects (database writes, ...) for requests that have not been paid. draft-evm-session-00,
 * "Open Verification" (type="hash"): 5. verify the initial voucher signature, 6. initialize
 * server-side accounting state. A hash open whose voucher is not the payer's is refused and
 * must leave no channel in the database.
 */
import { afterAll, expect, test } from 'bun:test'
import { keccak256, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Voucher from '../../src/chain/Voucher.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
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

test('a hash open whose initial voucher is not signed by the payer is refused and stores nothing', async () => {
  const payerClient = chain.payerClient(1)
  const res = await fetch(url, {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
  })
  const session = new PayingSession({
    account: payerClient.account as never,
    challenge: challengeOf(res.headers.get('www-authenticate'))!,
  })
  const salt = keccak256(toHex(`hash-open-${Date.now()}`))
  const opened = await Escrow.open(payerClient, {
    escrow: chain.escrowAddress,
    payee: chain.payee.address,
    token: chain.currencyAddress,
    deposit: 500_000n,
    salt,
  })
  const header = await session.openWithHash({
    channelId: opened.channelId,
    salt,
    hash: opened.hash,
    initial: 0n,
  })
  const thief = privateKeyToAccount(keccak256(toHex('thief')))
  const forged = await Voucher.sign(thief, {
    chainId: chain.chainId,
    escrow: chain.escrowAddress,
    channelId: opened.channelId,
    cumulativeAmount: 0n,
  })
  const credential = Credential.deserialize(header)
  const bad = Credential.serialize({
    ...credential,
    payload: { ...credential.payload, signature: forged },
  })
  const refused = await fetch(url, { method: 'POST', headers: { authorization: bad } })
  expect(refused.status).toBe(402)
  expect(((await refused.json()) as { type: string }).type).toBe(
    'https://paymentauth.org/problems/session/signer-mismatch',
  )
  expect(await Channels.get(gw.sql, opened.channelId)).toBeUndefined()
}, 30_000)
