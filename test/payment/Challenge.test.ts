import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Encoding from '../../src/payment/Encoding.ts'
import { PaymentParseError } from '../../src/payment/Errors.ts'
import { PaymentProblem } from '../../src/payment/Problem.ts'
import * as Python from './Python.ts'

const secret = 'tollway-test-secret'
const request = { amount: '1000', currency: 'usd', recipient: 'acct_123' }
const base = {
  realm: 'api.example.com',
  method: 'example',
  intent: 'charge',
  request,
} as const

// Fixed vectors. Expected ids produced independently with python3's hmac/hashlib:
//   req = base64.urlsafe_b64encode(json.dumps(request, sort_keys=True, separators=(",",":"))
//           .encode()).rstrip(b"=")
//   base64.urlsafe_b64encode(hmac.new(b"tollway-test-secret", "|".join([realm, method, intent,
//     req, expires or "", digest or "", opaque_b64 or ""]).encode(), hashlib.sha256).digest())
//     .rstrip(b"=")
const vectors = [
  {
    challenge: { ...base, expires: '2025-01-15T12:05:00Z' },
    id: 'AiS2TLdTxE7MvDP5zlgKRoKioQ2ThRxAgyQ7_hegPP4',
  },
  {
    challenge: {
      ...base,
      digest: 'sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:',
      opaque: { pi: 'pi_123' },
    },
    id: 'xpodibwFiBPhS9Th6YeIzV9nkPF6PhysSLouWXD40wQ',
  },
]

const future = '2099-01-01T00:00:00Z'

describe('expiresIn', () => {
  test('behavior: to the second, rounded up: a challenge lives at least the time asked, less than a second more', () => {
    const at = Date.parse('2025-01-15T12:00:00.900Z')
    expect(Challenge.expiresIn(1000, at)).toBe('2025-01-15T12:00:02Z')
    expect(Challenge.expiresIn(1000, Date.parse('2025-01-15T12:00:00Z'))).toBe(
      '2025-01-15T12:00:01Z',
    )
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 2 ** 42 }),
        fc.integer({ min: 0, max: 10 ** 9 }),
        (now, ms) => {
          const expires = Date.parse(Challenge.expiresIn(ms, now))
          expect(expires).toBeGreaterThanOrEqual(now + ms)
          expect(expires).toBeLessThan(now + ms + 1000)
        },
      ),
    )
  })
})

describe('from', () => {
  test('behavior: the id is the draft HMAC-SHA256 over the seven slots (fixed vectors)', () => {
    for (const { challenge, id } of vectors) {
      expect(Challenge.from({ secret, ...challenge }).id).toBe(id)
    }
    // The request slot is the JCS text of the draft's own example request.
    expect(Encoding.encodeJson(request)).toBe(
      'eyJhbW91bnQiOiIxMDAwIiwiY3VycmVuY3kiOiJ1c2QiLCJyZWNpcGllbnQiOiJhY2N0XzEyMyJ9',
    )
  })

  test('behavior: equals python hmac over random parameters (1000 challenges)', () => {
    const arb = fc.record(
      {
        realm: fc.string({ unit: 'binary' }),
        method: fc.stringMatching(/^[a-z]{1,8}$/),
        intent: fc.stringMatching(/^[a-z0-9-]{1,8}$/),
        request: fc.dictionary(
          fc.string({ unit: fc.constantFrom('a', 'b', 'é', '1', '_') }),
          fc.oneof(fc.string({ unit: 'binary' }), fc.integer()),
        ),
        expires: fc.constantFrom(undefined, '2030-01-01T00:00:00Z', '2030-01-01T00:00:00.5+02:00'),
        digest: fc.option(fc.string({ unit: 'binary' }), { nil: undefined }),
        opaque: fc.option(fc.dictionary(fc.string(), fc.string()), { nil: undefined }),
      },
      { requiredKeys: ['realm', 'method', 'intent', 'request'] },
    )
    const inputs = fc.sample(arb, 1000)
    const expected = Python.run(
      `import sys,json,hmac,hashlib,base64
def b(x): return base64.urlsafe_b64encode(x).rstrip(b"=").decode()
def j(x): return b(json.dumps(x,sort_keys=True,separators=(",",":"),ensure_ascii=False).encode())
for l in sys.stdin:
  c=json.loads(l)
  s="|".join([c["realm"],c["method"],c["intent"],j(c["request"]),c.get("expires") or "",c.get("digest") or "",j(c["opaque"]) if "opaque" in c else ""])
  print(b(hmac.new(b"${secret}",s.encode(),hashlib.sha256).digest()))`,
      inputs,
    )
    inputs.forEach((input, i) => {
      expect(Challenge.from({ secret, ...input }).id).toBe(expected[i]!)
    })
  })

  test('error: uppercase method, bad intent, bad expires', () => {
    expect(() => Challenge.from({ secret, ...base, method: 'Evm' })).toThrow(PaymentParseError)
    expect(() => Challenge.from({ secret, ...base, intent: 'a b' })).toThrow(PaymentParseError)
    for (const expires of ['2025-01-15 12:05', '2030-02-30T00:00:00Z', '2030-01-01T23:59:60Z'])
      expect(() => Challenge.from({ secret, ...base, expires })).toThrow(PaymentParseError)
    // RFC 3339 allows lowercase t and z, offsets and fractions.
    for (const expires of ['2030-01-01t00:00:00z', '2030-01-01T00:00:00.123456789+05:30'])
      expect(Challenge.from({ secret, ...base, expires }).expires).toBe(expires)
  })
})

describe('verify', () => {
  const challenge = Challenge.from({ secret, ...base, expires: '2030-01-01T00:00:00Z' })
  const before = new Date('2029-12-31T23:59:59Z')

  test('behavior: a challenge we issued is valid before it expires', () => {
    expect(Challenge.verify(challenge, secret, before)).toEqual({ valid: true })
  })

  test('behavior: a previous secret still verifies during rotation', () => {
    expect(Challenge.verify(challenge, ['new-secret', secret], before)).toEqual({ valid: true })
  })

  test('error: expired at and after expires', () => {
    for (const now of ['2030-01-01T00:00:00Z', '2031-01-01T00:00:00Z'])
      expect(Challenge.verify(challenge, secret, new Date(now))).toEqual({
        valid: false,
        reason: 'expired',
      })
  })

  test('behavior: a challenge checked once is known after (one HMAC per session, not per voucher), and only under a secret still in use', () => {
    const c = Challenge.from({ secret, ...base, request: { ...request, n: '1' }, expires: future })
    // The secrets are walked, an HMAC each, only to check a challenge in full: count the walks.
    let walks = 0
    class Secrets extends Array<string> {
      override [Symbol.iterator]() {
        walks++
        return super[Symbol.iterator]()
      }
    }
    const secrets = Secrets.from([secret])
    expect(Challenge.verify(c, secrets)).toEqual({ valid: true })
    expect(walks).toBe(1)
    // Again, as an equal object parsed from the next voucher's header, and as the same object.
    expect(Challenge.verify(structuredClone(c), secrets)).toEqual({ valid: true })
    expect(Challenge.verify(Object.freeze(structuredClone(c)), secrets)).toEqual({ valid: true })
    expect(walks).toBe(1)
    // The secret it matched was rotated out: checked again, and refused.
    expect(Challenge.verify(c, ['new-secret'])).toEqual({ valid: false, reason: 'forged' })
    expect(Challenge.verify(c, ['new-secret', secret])).toEqual({ valid: true })
    // A known challenge still expires.
    expect(Challenge.verify(c, secret, new Date('2100-01-01T00:00:00Z'))).toEqual({
      valid: false,
      reason: 'expired',
    })
    // The same id with any other parameter is another challenge: checked in full.
    expect(Challenge.verify({ ...c, request: { ...c.request, n: '2' } }, secret)).toEqual({
      valid: false,
      reason: 'forged',
    })
  })

  test('error: forged when any bound parameter changes or the secret differs', () => {
    const tampered: Challenge.Challenge[] = [
      { ...challenge, realm: 'other' },
      { ...challenge, method: 'other' },
      { ...challenge, intent: 'session' },
      { ...challenge, request: { ...request, amount: '1' } },
      { ...challenge, expires: '2031-01-01T00:00:00Z' },
      { ...challenge, digest: 'sha-256=:AA==:' },
      { ...challenge, opaque: { a: 'b' } },
      { ...challenge, id: `${challenge.id.slice(0, -1)}${challenge.id.endsWith('A') ? 'B' : 'A'}` },
    ]
    for (const c of tampered)
      expect(Challenge.verify(c, secret, before)).toEqual({ valid: false, reason: 'forged' })
    expect(Challenge.verify(challenge, 'other', before)).toEqual({
      valid: false,
      reason: 'forged',
    })
  })

  test('error: assert throws the invalid-challenge problem', () => {
    expect(() => Challenge.assert({ ...challenge, realm: 'x' }, secret, before)).toThrow(
      PaymentProblem,
    )
  })
})

describe('serialize', () => {
  test('behavior: the header form of the draft, quoted and escaped', () => {
    const c = Challenge.from({
      secret,
      ...base,
      expires: '2025-01-15T12:05:00Z',
      description: 'a "quoted" \\ thing, with commas',
    })
    expect(Challenge.serialize(c)).toBe(
      `Payment id="${c.id}", realm="api.example.com", method="example", intent="charge", request="eyJhbW91bnQiOiIxMDAwIiwiY3VycmVuY3kiOiJ1c2QiLCJyZWNpcGllbnQiOiJhY2N0XzEyMyJ9", expires="2025-01-15T12:05:00Z", description="a \\"quoted\\" \\\\ thing, with commas"`,
    )
    expect(Challenge.deserialize(Challenge.serialize(c))).toEqual([c])
  })

  test('error: a control character or an oversized challenge', () => {
    const c = Challenge.from({ secret, ...base, description: 'line\r\nbreak' })
    expect(() => Challenge.serialize(c)).toThrow(PaymentParseError)
    const big = Challenge.from({ secret, ...base, request: { x: 'a'.repeat(9000) } })
    expect(() => Challenge.serialize(big)).toThrow(PaymentParseError)
  })
})

describe('deserialize', () => {
  const c = Challenge.from({ secret, ...base, expires: future })
  const header = Challenge.serialize(c)

  test('behavior: Payment challenges among other schemes, tokens and odd whitespace', () => {
    const values = [
      `Bearer realm="tollway", ${header}`,
      `${header}, Bearer realm="tollway", error="invalid_token"`,
      `Basic abc==, ${header} ,Negotiate`,
      `Newauth realm="apps", type=1, title="Login, to \\"apps\\"", ${header}`,
      `, ,${header},,`,
      `Negotiate oYH=, ${header}`,
      `Basic abc=,${header}, Negotiate xyz=`,
    ]
    for (const value of values) expect(Challenge.deserialize(value)).toEqual([c])
    const second = Challenge.from({ secret, ...base, intent: 'session' })
    expect(Challenge.deserialize(`${header}, ${Challenge.serialize(second)}`)).toEqual([c, second])
    // Case-insensitive scheme and names, token values, BWS around "=", unknown parameters ignored.
    expect(
      Challenge.deserialize(
        `payment ID = "${c.id}",realm=api.example.com , Method=example,intent="charge",request=${Encoding.encodeJson(request)},expires="${future}",x-new="ignored"`,
      ),
    ).toEqual([c])
  })

  test('behavior: no Payment challenge yields an empty list', () => {
    expect(Challenge.deserialize('Bearer realm="x"')).toEqual([])
    expect(Challenge.deserialize('')).toEqual([])
  })

  test('error: missing or empty id, missing request, duplicate parameter', () => {
    for (const value of [
      header.replace(/id="[^"]*"/, 'id=""'),
      header.replace(/id="[^"]*", /, ''),
      header.replace(/, request="[^"]*"/, ''),
      `${header}, realm="again"`,
    ])
      expect(() => Challenge.deserialize(value)).toThrow(PaymentParseError)
  })

  test('error: non-canonical request JSON, non-object request, non-string opaque values', () => {
    for (const wire of [
      Encoding.base64urlEncode('{"b":1,"a":2}'),
      Encoding.base64urlEncode('[1]'),
      `${Encoding.encodeJson(request)}=`,
    ])
      expect(() =>
        Challenge.deserialize(header.replace(/request="[^"]*"/, `request="${wire}"`)),
      ).toThrow(PaymentParseError)
    expect(() =>
      Challenge.deserialize(`${header}, opaque="${Encoding.encodeJson({ a: 1 })}"`),
    ).toThrow(PaymentParseError)
  })

  test('error: unterminated quote, bad escape, oversized value', () => {
    for (const value of [`Payment id="abc`, `Payment id="a\\`, 'Payment id="\u0001"'])
      expect(() => Challenge.deserialize(value)).toThrow(PaymentParseError)
    expect(() => Challenge.deserialize(header, { maxBytes: 100 })).toThrow(PaymentParseError)
  })

  test('behavior: round-trips any valid challenge (2000 runs)', () => {
    const latin1 = fc.string({
      unit: fc
        .integer({ min: 0x20, max: 0xff })
        .filter((c) => c !== 0x7f)
        .map((c) => String.fromCharCode(c)),
    })
    fc.assert(
      fc.property(
        fc.record(
          {
            realm: latin1,
            method: fc.stringMatching(/^[a-z]{1,8}$/),
            intent: fc.stringMatching(/^[A-Za-z0-9-]{1,8}$/),
            request: fc.dictionary(fc.string(), fc.jsonValue({ maxDepth: 2 })),
            expires: fc.constantFrom('2030-01-01T00:00:00Z', '2030-01-01T00:00:00.123-05:30'),
            digest: latin1,
            description: latin1,
            opaque: fc.dictionary(fc.string(), fc.string()),
          },
          { requiredKeys: ['realm', 'method', 'intent', 'request'] },
        ),
        (parameters) => {
          let c: Challenge.Challenge
          try {
            c = Challenge.from({ secret, ...parameters })
          } catch (error) {
            // -0 or other JSON that is not JCS-stable is refused; never anything untyped.
            expect(error).toBeInstanceOf(PaymentParseError)
            return
          }
          const [back] = Challenge.deserialize(`Bearer x=y, ${Challenge.serialize(c)}`)
          expect(Challenge.verify(back!, secret, new Date('2029-01-01T00:00:00Z'))).toEqual({
            valid: true,
          })
          expect(Challenge.toEcho(back!)).toEqual(Challenge.toEcho(c))
        },
      ),
      { numRuns: 2000 },
    )
  })

  test('behavior: any string yields challenges or a PaymentParseError, never a crash', () => {
    const pieces = fc.constantFrom(
      'Payment',
      'Bearer',
      ' ',
      ',',
      '=',
      '==',
      '"',
      '\\',
      'id',
      'realm',
      'request',
      '"x"',
      'abc',
      '\t',
      `id="${c.id}"`,
      `request="${Encoding.encodeJson(request)}"`,
    )
    fc.assert(
      fc.property(
        fc.oneof(
          fc.string({ unit: 'binary' }),
          fc.array(pieces, { maxLength: 30 }).map((p) => p.join('')),
          fc
            .tuple(fc.nat({ max: header.length }), fc.string())
            .map(([at, s]) => header.slice(0, at) + s + header.slice(at)),
        ),
        (value) => {
          try {
            for (const challenge of Challenge.deserialize(value))
              expect(Challenge.Schema.safeParse(challenge).success).toBe(true)
          } catch (error) {
            expect(error).toBeInstanceOf(PaymentParseError)
          }
        },
      ),
      { numRuns: 5000 },
    )
  })
})

describe('fromEcho', () => {
  test('behavior: a __proto__ member survives decoding, so the HMAC input is unchanged', () => {
    const request = JSON.parse('{"__proto__":{"x":1},"a":"b"}') as Record<string, unknown>
    const c = Challenge.from({ secret, ...base, request })
    const [back] = Challenge.deserialize(Challenge.serialize(c))
    expect(Encoding.canonicalize(back!.request)).toBe('{"__proto__":{"x":1},"a":"b"}')
    expect(Challenge.verify(back!, secret)).toEqual({ valid: true })
  })

  test('behavior: an echo seen before decodes to the same request, which no caller can change', () => {
    const c = Challenge.from({ secret, ...base, request: { ...request, nested: { a: '1' } } })
    const echo = Challenge.toEcho(c)
    const first = Challenge.fromEcho(echo)
    const again = Challenge.fromEcho(structuredClone(echo))
    expect(again.request).toEqual(first.request)
    expect(() => {
      ;(first.request as Record<string, unknown>).amount = '1'
    }).toThrow()
    expect(() => {
      ;((first.request as Record<string, unknown>).nested as Record<string, unknown>).a = '2'
    }).toThrow()
    expect(Challenge.fromEcho(echo).request).toEqual(c.request)
    expect(Challenge.verify(Challenge.fromEcho(echo), secret)).toEqual({ valid: true })
  })

  test('behavior: only the request of a challenge verified as ours is kept for its next echo; a forged one is decoded anew each time', () => {
    // A forged echo may carry a request of up to a credential's size (16 KiB): kept before its
    // id was checked, 10,000 of them held about 900 MB.
    const padded = { ...request, pad: 'x'.repeat(8000) }
    const forged = { ...Challenge.toEcho(Challenge.from({ secret, ...base, request: padded })) }
    forged.id = 'not-an-id-this-server-issued'
    const first = Challenge.fromEcho(forged)
    expect(Challenge.verify(first, secret)).toEqual({ valid: false, reason: 'forged' })
    // Compared as booleans: a failure prints no 8 KB request.
    expect(Challenge.fromEcho(structuredClone(forged)).request === first.request).toBe(false)

    const ours = Challenge.toEcho(
      Challenge.from({ secret, ...base, request: { ...padded, pad: 'y'.repeat(8000) } }),
    )
    const decoded = Challenge.fromEcho(ours)
    expect(Challenge.fromEcho(structuredClone(ours)).request === decoded.request).toBe(false)
    expect(Challenge.verify(decoded, secret)).toEqual({ valid: true })
    expect(Challenge.fromEcho(structuredClone(ours)).request === decoded.request).toBe(true)
  })

  test('error: a request that is not canonical is refused even after a canonical one was seen', () => {
    const c = Challenge.from({ secret, ...base })
    const echo = Challenge.toEcho(c)
    Challenge.fromEcho(echo)
    const loose = Encoding.base64urlEncode(
      JSON.stringify({ recipient: 'acct_123', amount: '1000', currency: 'usd' }),
    )
    expect(() => Challenge.fromEcho({ ...echo, request: loose })).toThrow(PaymentParseError)
  })
})
