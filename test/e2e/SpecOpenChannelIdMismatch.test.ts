/**
 * An EIP-3009 open (type="authorization") whose payload channelId is not the channel its
 * parameters create (keccak256(abi.encode(payer, payee, token, salt, authorizedSigner,
 * escrow, chainId)), "Channel State") must be refused before the gateway submits
 * openWithAuthorization: otherwise the payer's deposit is locked in a channel the gateway
 * neither serves nor records, and the answer is a 410.
 */
import { afterAll, expect, test } from 'bun:test'
import { type Hex, keccak256, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Token from '../../src/chain/Token.ts'
import * as Voucher from '../../src/chain/Voucher.ts'
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

test('an authorization open naming another channelId than its parameters create moves no funds', async () => {
  const payer = privateKeyToAccount(chain.payers[0]!.privateKey)
  const res = await fetch(url, {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
  })
  const session = new PayingSession({
    account: payer,
    challenge: challengeOf(res.headers.get('www-authenticate'))!,
    tokenDomain,
  })
  const held = () =>
    Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner: payer.address })
  const before = await held()
  const open = Credential.deserialize(
    await session.openWithAuthorization({ deposit: 100_000n, initial: 0n }),
  )
  const named = keccak256(toHex('a channelId computed wrongly')) as Hex
  const voucherSignature = await Voucher.sign(payer, {
    chainId: chain.chainId,
    escrow: chain.escrowAddress,
    channelId: named,
    cumulativeAmount: 0n,
  })
  const refused = await fetch(url, {
    method: 'POST',
    headers: {
      authorization: Credential.serialize({
        ...open,
        payload: { ...open.payload, channelId: named, voucherSignature },
      }),
    },
  })
  await refused.body?.cancel()
  expect(refused.status).not.toBe(200)
  expect(await held()).toBe(before)
}, 30_000)
