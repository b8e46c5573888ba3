import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Encoding from '../../src/payment/Encoding.ts'
import { PaymentParseError } from '../../src/payment/Errors.ts'
import * as Session from '../../src/payment/evm/Session.ts'
import * as Receipt from '../../src/payment/Receipt.ts'

const channelId = '0x6d0f4fdf1f2f6a1f6c1b0fbd6a7d5c2c0a8d3d7b1f6a9c1b3e2d4a5b6c7d8e9f'
const session = Session.receipt({
  challengeId: 'kM9xPqWvT2nJrHsY4aDfEb',
  channelId,
  acceptedCumulative: 250000n,
  spent: 250000n,
  chainId: 196,
  txHash: '0x1a2b3c4d5e6f7890abcdef1234567890abcdef1234567890abcdef1234567890',
  timestamp: new Date('2026-04-01T12:10:00Z'),
})

describe('serialize', () => {
  test('behavior: base64url of the JCS JSON, amounts as decimal strings', () => {
    const value = Receipt.serialize(session)
    expect(Encoding.decodeJson(value, { canonical: true })).toEqual({
      method: 'evm',
      intent: 'session',
      status: 'success',
      timestamp: '2026-04-01T12:10:00Z',
      challengeId: 'kM9xPqWvT2nJrHsY4aDfEb',
      reference: channelId,
      channelId,
      chainId: 196,
      acceptedCumulative: '250000',
      spent: '250000',
      txHash: '0x1a2b3c4d5e6f7890abcdef1234567890abcdef1234567890abcdef1234567890',
    })
    expect(Receipt.headers(session)['Cache-Control']).toBe('private')
  })
})

describe('deserialize', () => {
  test('behavior: the draft core example receipt', () => {
    // The Payment-Receipt value of draft-httpauth-payment-00, "One-Time Charge".
    expect(
      Receipt.deserialize(
        'eyJzdGF0dXMiOiJzdWNjZXNzIiwibWV0aG9kIjoiaW52b2ljZSIsInRpbWVzdGFtcCI6IjIwMjUtMDEtMTVUMTI6MDA6MDBaIiwicmVmZXJlbmNlIjoiaW52XzEyMzQ1In0',
      ),
    ).toEqual({
      status: 'success',
      method: 'invoice',
      timestamp: '2025-01-15T12:00:00Z',
      reference: 'inv_12345',
    })
  })

  test('behavior: typed by the session schema, round trip', () => {
    expect(Receipt.deserialize(Receipt.serialize(session), { schema: Session.Receipt })).toEqual(
      session,
    )
  })

  test('error: a failed status, missing fields, padding, session fields of the wrong type', () => {
    for (const value of [
      Encoding.encodeJson({
        status: 'failed',
        method: 'evm',
        timestamp: '2026-04-01T12:10:00Z',
        reference: 'x',
      }),
      Encoding.encodeJson({ status: 'success', method: 'evm' }),
      `${Receipt.serialize(session)}=`,
      'not a receipt',
    ])
      expect(() => Receipt.deserialize(value)).toThrow(PaymentParseError)
    expect(() =>
      Receipt.deserialize(Receipt.serialize({ ...session, spent: -1n }), {
        schema: Session.Receipt,
      }),
    ).toThrow(PaymentParseError)
  })

  test('behavior: any input yields a receipt or a PaymentParseError (5000 runs)', () => {
    const wire = Encoding.toWire(session) as Record<string, unknown>
    fc.assert(
      fc.property(
        fc.oneof(
          fc.string({ unit: 'binary' }),
          fc.jsonValue().map((j) => Encoding.base64urlEncode(JSON.stringify(j) ?? '')),
          fc
            .dictionary(fc.constantFrom(...Object.keys(wire)), fc.jsonValue({ maxDepth: 1 }), {
              maxKeys: 3,
            })
            .map((changes) => Encoding.encodeJson({ ...wire, ...changes })),
        ),
        (value) => {
          try {
            Receipt.deserialize(value, { schema: Session.Receipt })
          } catch (error) {
            expect(error).toBeInstanceOf(PaymentParseError)
          }
        },
      ),
      { numRuns: 5000 },
    )
  })
})
