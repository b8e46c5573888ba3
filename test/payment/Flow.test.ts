/**
 * The whole wire round trip of an evm session, as the routes will drive it: the server issues a
 * challenge, the client reads it and answers with a signed voucher, the server parses, verifies
 * and answers with a receipt. Pure: vouchers are signed and verified locally (src/chain/Voucher.ts).
 */
import { describe, expect, test } from 'bun:test'
import { privateKeyToAccount } from 'viem/accounts'
import * as Voucher from '../../src/chain/Voucher.ts'
import * as AcceptPayment from '../../src/payment/AcceptPayment.ts'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Session from '../../src/payment/evm/Session.ts'
import * as Problem from '../../src/payment/Problem.ts'
import * as Receipt from '../../src/payment/Receipt.ts'

const secret = 'server-secret'
// anvil's first development key
const payer = privateKeyToAccount(
  '0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80',
)
const escrow = '0x1111111111111111111111111111111111111111'
const channelId = '0x6d0f4fdf1f2f6a1f6c1b0fbd6a7d5c2c0a8d3d7b1f6a9c1b3e2d4a5b6c7d8e9f'
const now = new Date('2026-04-01T12:00:00Z')

function issue() {
  const request = Session.request({
    amount: 100n,
    unitType: 'llm_token',
    currency: '0x74b7f16337b8972027f6196a17a631ac6de26d22',
    recipient: '0x742d35cc6634c0532925a3b844bc9e7595f8fe00',
    methodDetails: { chainId: 31337, escrowContract: escrow, channelId, minVoucherDelta: 1000n },
  })
  return Challenge.from({
    secret,
    realm: 'tollway',
    method: 'evm',
    intent: 'session',
    request,
    expires: Challenge.timestamp(new Date(now.getTime() + 5 * 60_000)),
  })
}

describe('evm session wire flow', () => {
  test('behavior: challenge → voucher credential → verified → receipt', async () => {
    // Server: 402 with the challenge.
    const offers = AcceptPayment.rank([{ method: 'evm', intent: 'session' }], 'evm/session')
    expect(offers).toHaveLength(1)
    const header = Challenge.serializeAll([issue()])
    const problem = Problem.paymentRequired('Payment required for access.').withChallenge(header)
    expect(problem.status).toBe(402)

    // Client: read the challenge, sign a voucher, send the credential.
    const [challenge] = Challenge.deserialize(`Bearer realm="tollway", ${problem.challenge}`)
    const request = Session.requestOf(challenge!)
    const signature = await Voucher.sign(payer, {
      chainId: request.methodDetails.chainId,
      escrow: request.methodDetails.escrowContract,
      channelId,
      cumulativeAmount: 250_000n,
    })
    const authorization = Credential.serialize(
      Credential.from({
        challenge: challenge!,
        payload: { action: 'voucher', channelId, cumulativeAmount: 250_000n, signature },
      }),
    )

    // Server: parse, check the binding, type the payload, verify the voucher.
    const credential = Credential.deserialize(authorization)
    const echoed = Credential.challengeOf(credential)
    Challenge.assert(echoed, secret, now)
    const parsed = Session.fromCredential(credential)
    Session.check(parsed, Session.requestOf(echoed))
    const { payload } = parsed
    if (payload.action !== 'voucher') throw new Error('expected a voucher')
    const verifier = Voucher.createVerifier({ chainId: 31337, escrow })
    verifier.verify({ ...payload, signer: payer.address })

    // Server: 200 with a receipt; the client reads it.
    const receipt = Session.receipt({
      challengeId: echoed.id,
      channelId: payload.channelId,
      acceptedCumulative: payload.cumulativeAmount,
      spent: 100_000n,
      chainId: 31337,
      units: 1000,
      timestamp: now,
    })
    const headers = Receipt.headers(receipt)
    expect(Receipt.deserialize(headers['Payment-Receipt']!, { schema: Session.Receipt })).toEqual(
      receipt,
    )
  })

  test('error: an expired or tampered echo is the invalid-challenge problem', () => {
    const challenge = issue()
    const later = new Date(now.getTime() + 10 * 60_000)
    expect(() => Challenge.assert(challenge, secret, later)).toThrow(Problem.PaymentProblem)
    const tampered = { ...challenge, request: { ...challenge.request, amount: '1' } }
    expect(() => Challenge.assert(tampered, secret, now)).toThrow(Problem.PaymentProblem)
  })

  test('behavior: parsing a voucher credential and checking its binding is cheap', () => {
    const challenge = issue()
    const value = Credential.serialize(
      Credential.from({
        challenge,
        payload: {
          action: 'voucher',
          channelId,
          cumulativeAmount: 250_000n,
          signature: `0x${'ab'.repeat(64)}1b`,
        },
      }),
    )
    const n = 5000
    const start = performance.now()
    for (let i = 0; i < n; i++) {
      const credential = Credential.deserialize(value)
      Challenge.assert(Credential.challengeOf(credential), secret, now)
      Session.fromCredential(credential)
    }
    const perOp = (performance.now() - start) / n
    console.log(`credential parse + HMAC check + payload typing: ${(perOp * 1000).toFixed(1)} µs`)
    // A generous bound: the hot path must stay far below a voucher verification (~100 µs).
    expect(perOp).toBeLessThan(1)
  })
})
