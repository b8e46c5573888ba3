import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as AcceptPayment from '../../src/payment/AcceptPayment.ts'
import { PaymentParseError } from '../../src/payment/Errors.ts'

const offers = [
  { method: 'tempo', intent: 'charge' },
  { method: 'tempo', intent: 'session' },
  { method: 'stripe', intent: 'charge' },
  { method: 'solana', intent: 'charge' },
]
const names = (list: { method: string; intent: string }[]) =>
  list.map((o) => `${o.method}/${o.intent}`)

describe('deserialize', () => {
  test('behavior: ranges with q, wildcards and whitespace', () => {
    expect(AcceptPayment.deserialize('tempo/*, solana/*;q=0.6 , */session ; q=0.3,')).toEqual([
      { method: 'tempo', intent: '*', q: 1 },
      { method: 'solana', intent: '*', q: 0.6 },
      { method: '*', intent: 'session', q: 0.3 },
    ])
  })

  test('error: uppercase method, bad q, other parameters, missing slash', () => {
    for (const value of [
      'Tempo/charge',
      'tempo/charge;q=2',
      'tempo/charge;q=0.1234',
      'tempo/charge;x=1',
      'tempo',
    ])
      expect(() => AcceptPayment.deserialize(value)).toThrow(PaymentParseError)
  })

  test('behavior: any string parses or throws PaymentParseError; serialize round-trips (5000 runs)', () => {
    fc.assert(
      fc.property(
        fc.oneof(
          fc.string({ unit: 'binary' }),
          fc
            .array(fc.constantFrom('tempo', '/', '*', ',', ';', 'q=', '0.5', '1', ' ', 'charge'), {
              maxLength: 20,
            })
            .map((a) => a.join('')),
        ),
        (value) => {
          try {
            const ranges = AcceptPayment.deserialize(value)
            expect(AcceptPayment.deserialize(AcceptPayment.serialize(ranges))).toEqual(ranges)
          } catch (error) {
            expect(error).toBeInstanceOf(PaymentParseError)
          }
        },
      ),
      { numRuns: 5000 },
    )
  })
})

describe('rank', () => {
  test('behavior: the draft examples', () => {
    // The four "Challenge Negotiation with Accept-Payment" examples of draft-httpauth-payment-00.
    expect(
      names(
        AcceptPayment.rank(
          offers,
          'tempo/charge, tempo/session, stripe/charge;q=0.5, solana/charge;q=0.3',
        ),
      ),
    ).toEqual(['tempo/charge', 'tempo/session', 'stripe/charge', 'solana/charge'])
    expect(names(AcceptPayment.rank(offers, 'tempo/charge, solana/charge'))).toEqual([
      'tempo/charge',
      'solana/charge',
    ])
    expect(
      names(AcceptPayment.rank(offers, 'tempo/*, solana/*;q=0.6, stripe/charge;q=0.2')),
    ).toEqual(['tempo/charge', 'tempo/session', 'solana/charge', 'stripe/charge'])
    expect(
      names(
        AcceptPayment.rank(
          offers,
          'tempo/charge, tempo/session;q=0, solana/charge;q=0.8, stripe/charge;q=0.4',
        ),
      ),
    ).toEqual(['tempo/charge', 'solana/charge', 'stripe/charge'])
  })

  test('behavior: the most specific range wins, even with q=0', () => {
    expect(
      names(AcceptPayment.rank(offers, '*/*;q=0.5, tempo/session;q=0, stripe/*;q=0.9')),
    ).toEqual(['stripe/charge', 'tempo/charge', 'solana/charge'])
  })

  test('behavior: absent, malformed or unsatisfiable headers leave the server order', () => {
    for (const header of [undefined, null, 'bogus', 'evm/session'])
      expect(AcceptPayment.rank(offers, header)).toEqual(offers)
  })

  test('behavior: ranking is a stable filter of the offers (3000 runs)', () => {
    const offer = fc.record({
      method: fc.constantFrom('evm', 'tempo', 'x'),
      intent: fc.constantFrom('session', 'charge'),
    })
    fc.assert(
      fc.property(fc.array(offer, { maxLength: 6 }), fc.string(), (list, header) => {
        const ranked = AcceptPayment.rank(list, header)
        for (const o of ranked) expect(list).toContain(o)
        expect(ranked.length).toBeLessThanOrEqual(list.length)
      }),
      { numRuns: 3000 },
    )
  })
})
