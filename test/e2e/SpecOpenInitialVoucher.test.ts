/**
 * draft-evm-session-00, "Open Verification" (type="authorization"): 2. call
 * openWithAuthorization, 3. verify channel state, 4. verify the initial voucher signature,
 * 5. initialize server-side accounting. minVoucherDelta is a rule of voucher updates (step 7
 * of "Voucher Verification"), not of the open. An open whose initial voucher is below
 * minVoucherDelta must not be refused after the gateway has already moved the payer's deposit
 * into the escrow.
 */
import { afterAll, expect, test } from 'bun:test'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', minVoucherDelta: '1000' },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })

test('an open whose initial voucher is below minVoucherDelta is not refused once its deposit is in the escrow', async () => {
  const res = await fetch(url, {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
  })
  const session = new PayingSession({
    account: privateKeyToAccount(chain.payers[0]!.privateKey),
    challenge: challengeOf(res.headers.get('www-authenticate'))!,
    tokenDomain,
  })
  const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 500n })
  const answer = await fetch(url, { method: 'POST', headers: { authorization: open } })
  const onChain = await Escrow.getChannel(chain.payeeClient, {
    escrow: chain.escrowAddress,
    channelId: session.channelId!,
  })
  // Refused or not, the deposit is what it is on chain: a refusal here strands it.
  expect({ status: answer.status, depositOnChain: onChain?.deposit }).toEqual({
    status: 200,
    depositOnChain: 100_000n,
  })
}, 30_000)
