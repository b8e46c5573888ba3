/**
 * A top-up credential carries no voucher: by hash it names a transaction anyone can read on
 * chain, so it proves nothing about who sends it. It adds to the deposit and pays for no
 * request (the draft's requests are paid by vouchers).
 */
import { afterAll, expect, test } from 'bun:test'
import { generatePrivateKey, privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Session from '../../src/payment/evm/Session.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Paid from '../helpers/Paid.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 2_000 },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const payer = privateKeyToAccount(chain.payers[0]!.privateKey)
const body = JSON.stringify({
  model: 'fake',
  messages: [{ role: 'user', content: 'one two three' }],
})

test('error: a stranger showing the payer top-up transaction gets no request served from the payer channel', async () => {
  const session = await Paid.opened(url, {
    account: payer,
    tokenDomain,
    deposit: 100_000n,
    initial: 10n,
  })
  const channelId = session.channelId!
  // The payer authorized well ahead of what was spent (as createFetch does by its margin).
  const ahead = await fetch(url, {
    method: 'HEAD',
    headers: { authorization: await session.voucher(50_000n) },
  })
  expect(ahead.status).toBe(200)
  const sent = await Escrow.topUp(chain.payerClient(0), {
    escrow: chain.escrowAddress,
    channelId,
    token: chain.currencyAddress,
    amount: 1_000n,
  })
  const stranger = privateKeyToAccount(generatePrivateKey())
  const topUpByHash = async () =>
    Credential.serialize(
      Credential.from({
        challenge: await Paid.challenge(url),
        payload: {
          action: 'topUp',
          type: 'hash',
          channelId,
          hash: sent.hash,
          additionalDeposit: '1000',
        },
        source: Session.source({ chainId: chain.chainId, address: stranger.address }),
      }),
    )
  const before = await Ledger.channelState(gw.db.sql, channelId)
  const res = await fetch(url, {
    method: 'POST',
    headers: { authorization: await topUpByHash(), 'content-type': 'application/json' },
    body,
  })
  // Asked for a voucher instead, with a fresh challenge; the top-up itself was recorded.
  expect(res.status).toBe(402)
  expect(res.headers.get('www-authenticate')).toContain('Payment id=')
  const problem = (await res.json()) as { type: string; requiredCumulative: string }
  expect(problem.type).toBe('https://paymentauth.org/problems/session/insufficient-balance')
  expect(BigInt(problem.requiredCumulative)).toBeGreaterThan(before.spent)
  const after = await Ledger.channelState(gw.db.sql, channelId)
  expect(after.spent).toBe(before.spent)
  // The same credential without a request still records the top-up.
  const managed = await fetch(url, {
    method: 'HEAD',
    headers: { authorization: await topUpByHash() },
  })
  expect(managed.status).toBe(200)
  expect((await Ledger.channelState(gw.db.sql, channelId)).deposit).toBe(101_000n)
}, 30_000)
