import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import { PaymentParseError } from '../../src/payment/Errors.ts'
import * as Events from '../../src/payment/Events.ts'
import * as Session from '../../src/payment/evm/Session.ts'

const channelId = '0x6d0f4fdf1f2f6a1f6c1b0fbd6a7d5c2c0a8d3d7b1f6a9c1b3e2d4a5b6c7d8e9f'

describe('needVoucher', () => {
  test('behavior: the draft event with decimal strings', () => {
    // Data of draft-evm-session-00, "Insufficient Balance During Streaming".
    const e = Events.needVoucher({
      channelId,
      requiredCumulative: 250025n,
      acceptedCumulative: 250000n,
      deposit: 500000n,
    })
    expect(e).toEqual({
      event: 'payment-need-voucher',
      data: {
        channelId,
        requiredCumulative: '250025',
        acceptedCumulative: '250000',
        deposit: '500000',
      },
    })
    expect(Events.deserialize(e.event, JSON.stringify(e.data))).toEqual({
      event: 'payment-need-voucher',
      data: {
        channelId,
        requiredCumulative: 250025n,
        acceptedCumulative: 250000n,
        deposit: 500000n,
      },
    })
  })
})

describe('receipt', () => {
  test('behavior: the receipt as the last event, amounts as strings', () => {
    const r = Session.receipt({
      challengeId: 'c',
      channelId,
      acceptedCumulative: 10n,
      spent: 7n,
      chainId: 196,
      units: 3,
      timestamp: new Date('2026-04-01T12:08:30Z'),
    })
    const e = Events.receipt(r)
    expect(e.event).toBe('payment-receipt')
    expect(e.data.spent).toBe('7')
    const back = Events.deserialize(e.event, JSON.stringify(e.data))
    expect(back?.event).toBe('payment-receipt')
    expect(Session.Receipt.parse(back?.data)).toEqual(r)
  })
})

describe('deserialize', () => {
  test('behavior: other events are not ours', () => {
    expect(Events.deserialize('message', '{}')).toBeUndefined()
  })

  test('error: bad JSON or shape', () => {
    for (const data of ['{', '{}', JSON.stringify({ channelId, requiredCumulative: 1 })])
      expect(() => Events.deserialize('payment-need-voucher', data)).toThrow(PaymentParseError)
  })

  test('behavior: any data yields an event or a PaymentParseError (3000 runs)', () => {
    fc.assert(
      fc.property(
        fc.constantFrom('payment-need-voucher', 'payment-receipt', 'other'),
        fc.oneof(
          fc.string(),
          fc.jsonValue().map((j) => JSON.stringify(j) ?? ''),
        ),
        (event, data) => {
          try {
            Events.deserialize(event, data)
          } catch (error) {
            expect(error).toBeInstanceOf(PaymentParseError)
          }
        },
      ),
      { numRuns: 3000 },
    )
  })
})
