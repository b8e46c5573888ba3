import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Encoding from '../../src/payment/Encoding.ts'
import { PaymentProblem } from '../../src/payment/Problem.ts'

const challenge = Challenge.from({
  secret: 'tollway-test-secret',
  realm: 'api.example.com',
  method: 'example',
  intent: 'charge',
  request: { amount: '1000', currency: 'usd', recipient: 'acct_123' },
  expires: '2099-01-01T00:00:00Z',
})

function malformed(f: () => unknown) {
  try {
    f()
  } catch (error) {
    expect(error).toBeInstanceOf(PaymentProblem)
    expect((error as PaymentProblem).kind).toBe('malformed-credential')
    expect((error as PaymentProblem).status).toBe(402)
    return
  }
  throw new Error('expected malformed-credential')
}

describe('isPayment', () => {
  test('behavior: the Payment scheme, case-insensitive; not Bearer or a prefix', () => {
    expect(Credential.isPayment('Payment abc')).toBe(true)
    expect(Credential.isPayment('payment')).toBe(true)
    for (const value of ['Bearer sk-abc', 'Payments abc', '', null, undefined])
      expect(Credential.isPayment(value)).toBe(false)
  })
})

describe('deserialize', () => {
  test('behavior: the draft example credential', () => {
    // The Authorization value of draft-httpauth-payment-00, "Example Credential".
    const value =
      'Payment eyJjaGFsbGVuZ2UiOnsiaWQiOiJ4N1RnMnBMcVI5bUt2TndZM2hCY1phIiwicmVhbG0iOiJhcGkuZXhhbXBsZS5jb20iLCJtZXRob2QiOiJleGFtcGxlIiwiaW50ZW50IjoiY2hhcmdlIiwicmVxdWVzdCI6ImV5SmhiVzkxYm5RaU9pSXhNREF3SWl3aVkzVnljbVZ1WTNraU9pSlZVMFFpTENKeVpXTnBjR2xsYm5RaU9pSmhZMk4wWHpFeU15SjkiLCJleHBpcmVzIjoiMjAyNS0wMS0xNVQxMjowNTowMFoifSwicGF5bG9hZCI6eyJwcm9vZiI6IjB4YWJjMTIzLi4uIn19'
    expect(Credential.deserialize(value)).toEqual({
      challenge: {
        id: 'x7Tg2pLqR9mKvNwY3hBcZa',
        realm: 'api.example.com',
        method: 'example',
        intent: 'charge',
        request: 'eyJhbW91bnQiOiIxMDAwIiwiY3VycmVuY3kiOiJVU0QiLCJyZWNpcGllbnQiOiJhY2N0XzEyMyJ9',
        expires: '2025-01-15T12:05:00Z',
      },
      payload: { proof: '0xabc123...' },
    })
  })

  test('behavior: round-trips serialize, with bigints as decimal strings', () => {
    const credential = Credential.from({
      challenge,
      source: 'did:pkh:eip155:196:0xaabbccddee11223344556677889900aabbccddee',
      payload: { amount: 10n ** 30n, nested: [1n] },
    })
    const back = Credential.deserialize(Credential.serialize(credential))
    expect(back.payload).toEqual({ amount: (10n ** 30n).toString(), nested: ['1'] })
    expect(back.source).toBe(credential.source)
    expect(Credential.challengeOf(back)).toEqual(challenge)
    expect(Challenge.verify(Credential.challengeOf(back), 'tollway-test-secret')).toEqual({
      valid: true,
    })
  })

  test('behavior: scheme is case-insensitive; several spaces are allowed', () => {
    const value = Credential.serialize(Credential.from({ challenge, payload: {} }))
    expect(Credential.deserialize(value.replace('Payment ', 'payment   ')).challenge.id).toBe(
      challenge.id,
    )
  })

  test('error: other schemes, padding, bad JSON, missing members, oversized', () => {
    const good = Encoding.encodeJson({ challenge: Challenge.toEcho(challenge), payload: {} })
    for (const value of [
      `Bearer ${good}`,
      `Payment ${good}=`,
      `Payment`,
      `Payment ${Encoding.base64urlEncode('{')}`,
      `Payment ${Encoding.encodeJson([])}`,
      `Payment ${Encoding.encodeJson({ challenge: Challenge.toEcho(challenge) })}`,
      `Payment ${Encoding.encodeJson({ challenge: Challenge.toEcho(challenge), payload: [] })}`,
      `Payment ${Encoding.encodeJson({ challenge: { ...Challenge.toEcho(challenge), id: '' }, payload: {} })}`,
      `Payment ${Encoding.encodeJson({ challenge: { ...Challenge.toEcho(challenge), method: 'EVM' }, payload: {} })}`,
    ])
      malformed(() => Credential.deserialize(value))
    // Two credentials (two Authorization headers joined): 400, as the draft says.
    try {
      Credential.deserialize(`Payment ${good}, Payment ${good}`)
      throw new Error('expected a problem')
    } catch (error) {
      expect((error as PaymentProblem).status).toBe(400)
    }
    malformed(() => Credential.deserialize(`Payment ${good}`, { maxBytes: 50 }))
  })

  test('error: an echoed request that is not canonical JSON', () => {
    const echo = {
      ...Challenge.toEcho(challenge),
      request: Encoding.base64urlEncode('{"b":1, "a":2}'),
    }
    const credential = Credential.deserialize(
      `Payment ${Encoding.encodeJson({ challenge: echo, payload: {} })}`,
    )
    malformed(() => Credential.challengeOf(credential))
  })

  test('behavior: any string, bytes or JSON yields a credential or malformed-credential (5000 runs)', () => {
    const echo = Challenge.toEcho(challenge)
    const jsonish = fc.oneof(
      fc.jsonValue(),
      fc.record(
        {
          challenge: fc.oneof(
            fc.constant(echo as unknown),
            fc.jsonValue(),
            fc.record({
              id: fc.string(),
              realm: fc.string(),
              method: fc.string(),
              intent: fc.string(),
              request: fc.string(),
            }),
          ),
          payload: fc.oneof(fc.jsonValue(), fc.dictionary(fc.string(), fc.jsonValue())),
          source: fc.oneof(fc.string(), fc.jsonValue()),
        },
        { requiredKeys: [] },
      ),
    )
    fc.assert(
      fc.property(
        fc.oneof(
          fc.string({ unit: 'binary' }),
          fc.string().map((s) => `Payment ${s}`),
          fc.uint8Array({ maxLength: 200 }).map((b) => `Payment ${Encoding.base64urlEncode(b)}`),
          jsonish.map((j) => `Payment ${Encoding.base64urlEncode(JSON.stringify(j) ?? '')}`),
        ),
        (value) => {
          try {
            const credential = Credential.deserialize(value)
            expect(Credential.Schema.safeParse(credential).success).toBe(true)
            try {
              Credential.challengeOf(credential)
            } catch (error) {
              expect(error).toBeInstanceOf(PaymentProblem)
            }
          } catch (error) {
            expect(error).toBeInstanceOf(PaymentProblem)
            expect((error as PaymentProblem).kind).toBe('malformed-credential')
          }
        },
      ),
      { numRuns: 5000 },
    )
  })
})
