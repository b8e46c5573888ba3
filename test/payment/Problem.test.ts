import { describe, expect, test } from 'bun:test'
import { GatewayError } from '../../src/Errors.ts'
import * as Problem from '../../src/payment/Problem.ts'

describe('toProblem', () => {
  test('behavior: the RFC 9457 body of the evm session draft example', () => {
    // Expected body from draft-evm-session-00, "Error Responses" (example error response).
    const p = Problem.invalidSignature('Voucher signature could not be verified', {
      channelId: '0x6d0f4fdf...',
    })
    expect(p.toProblem()).toEqual({
      type: 'https://paymentauth.org/problems/session/invalid-signature',
      title: 'Invalid Signature',
      status: 402,
      detail: 'Voucher signature could not be verified',
      channelId: '0x6d0f4fdf...',
    })
  })

  test('behavior: bigint extensions become decimal strings; standard members are not shadowed', () => {
    const p = Problem.insufficientBalance('Sign a voucher for more.', {
      requiredCumulative: 250025n,
      status: 200,
      skipped: undefined,
    })
    expect(p.toProblem()).toEqual({
      type: 'https://paymentauth.org/problems/session/insufficient-balance',
      title: 'Insufficient Balance',
      status: 402,
      detail: 'Sign a voucher for more.',
      requiredCumulative: '250025',
    })
  })

  test('behavior: every kind has the draft status; channel gone is 410, reverted is 409', () => {
    expect(Problem.methodUnsupported().status).toBe(400)
    expect(Problem.channelNotFound().status).toBe(410)
    expect(Problem.channelFinalized().status).toBe(410)
    expect(Problem.transactionReverted().status).toBe(409)
    for (const kind of Object.keys(Problem.kinds) as Problem.Kind[]) {
      const p = Problem.create(kind)
      expect(p.problemType).toBe(`https://paymentauth.org/problems/${kind}`)
      expect(p.toProblem().status).toBe(Problem.kinds[kind].status)
    }
  })
})

describe('withChallenge', () => {
  test('behavior: attaches WWW-Authenticate and no-store, keeps the GatewayError envelope', () => {
    const p = Problem.verificationFailed('Invalid payment proof.').withChallenge('Payment id="x"')
    expect(p).toBeInstanceOf(GatewayError)
    expect(p.challenge).toBe('Payment id="x"')
    expect(p.headers).toEqual({ 'WWW-Authenticate': 'Payment id="x"', 'Cache-Control': 'no-store' })
    expect(p.toJSON()).toEqual({
      error: {
        type: 'verification-failed',
        message: 'Invalid payment proof.',
        code: 'verification-failed',
        param: null,
      },
    })
  })
})
