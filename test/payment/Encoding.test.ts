import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Encoding from '../../src/payment/Encoding.ts'
import { PaymentParseError } from '../../src/payment/Errors.ts'
import * as Python from './Python.ts'

function typedOrValue(f: () => unknown) {
  try {
    f()
  } catch (error) {
    expect(error).toBeInstanceOf(PaymentParseError)
  }
}

describe('base64urlEncode', () => {
  test('behavior: RFC 4648 §10 vectors, without padding', () => {
    const vectors: [string, string][] = [
      ['', ''],
      ['f', 'Zg'],
      ['fo', 'Zm8'],
      ['foo', 'Zm9v'],
      ['foob', 'Zm9vYg'],
      ['fooba', 'Zm9vYmE'],
      ['foobar', 'Zm9vYmFy'],
    ]
    for (const [input, output] of vectors) expect(Encoding.base64urlEncode(input)).toBe(output)
    expect(Encoding.base64urlEncode(new Uint8Array([0xfb, 0xff]))).toBe('-_8')
  })

  test('behavior: equals python base64.urlsafe_b64encode(...).rstrip(b"=") on 3000 byte strings', () => {
    const inputs = fc.sample(fc.uint8Array({ maxLength: 200 }), 3000)
    const expected = Python.run(
      'import sys,base64\nfor l in sys.stdin:\n  print(base64.urlsafe_b64encode(bytes.fromhex(__import__("json").loads(l))).rstrip(b"=").decode())',
      inputs.map((b) => Buffer.from(b).toString('hex')),
    )
    expect(expected.length).toBe(inputs.length)
    inputs.forEach((bytes, i) => {
      expect(Encoding.base64urlEncode(bytes)).toBe(expected[i]!)
    })
  })
})

describe('base64urlDecode', () => {
  test('behavior: inverts encode on thousands of byte strings', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
        expect(Encoding.base64urlDecode(Encoding.base64urlEncode(bytes))).toEqual(bytes)
      }),
      { numRuns: 3000 },
    )
  })

  test('error: padding, standard alphabet, whitespace, impossible length, trailing bits', () => {
    for (const text of ['Zg==', 'Zm8=', '+/8', 'Zm 9v', 'Zm9v\n', 'Z', 'Zm9vY', 'Zh', 'Zm9'])
      expect(() => Encoding.base64urlDecode(text)).toThrow(PaymentParseError)
  })

  test('behavior: any string decodes to bytes or a PaymentParseError, never a crash', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string(), fc.string({ unit: 'binary' })), (text) => {
        typedOrValue(() => Encoding.base64urlDecode(text))
      }),
      { numRuns: 5000 },
    )
  })
})

// Keys free of astral characters: there, Python's code point order equals JCS's UTF-16 order.
const key = fc.string({
  unit: fc.integer({ min: 0, max: 0xd7ff }).map((c) => String.fromCharCode(c)),
})
const text = fc.string({ unit: 'binary' })
const json = fc.letrec((tie) => ({
  value: fc.oneof(
    { depthSize: 'small' },
    text,
    fc.integer({ min: -(2 ** 53) + 1, max: 2 ** 53 - 1 }),
    fc.boolean(),
    fc.constant(null),
    fc.array(tie('value'), { maxLength: 4 }),
    fc.dictionary(key, tie('value'), { maxKeys: 5 }),
  ),
})).value

describe('canonicalize', () => {
  test('behavior: RFC 8785 §3.2.3 ordering and number forms', () => {
    // Expected text from RFC 8785 §3.2.2 (numbers) and the obvious key order.
    expect(Encoding.canonicalize({ b: [1e21, 1e-7, -0, 0.1], a: { z: 'é', y: '\u000f' } })).toBe(
      '{"a":{"y":"\\u000f","z":"é"},"b":[1e+21,1e-7,0,0.1]}',
    )
    // RFC 8785 sorts by UTF-16 code units: U+10000 (\ud800\udc00) sorts before U+E000.
    expect(Encoding.canonicalize({ '\ue000': 1, '\u{10000}': 2 })).toBe(
      '{"\u{10000}":2,"\ue000":1}',
    )
  })

  test('behavior: equals python json.dumps(sort_keys, compact, ensure_ascii=False) on 3000 values', () => {
    const inputs = fc.sample(json, 3000)
    const expected = Python.run(
      'import sys,json\nfor l in sys.stdin:\n  print(json.dumps(json.loads(l),sort_keys=True,separators=(",",":"),ensure_ascii=False))',
      inputs,
    )
    expect(expected.length).toBe(inputs.length)
    inputs.forEach((value, i) => {
      expect(Encoding.canonicalize(value)).toBe(expected[i]!)
    })
  })

  test('error: bigint, NaN, Infinity, lone surrogates, undefined', () => {
    for (const value of [
      1n,
      Number.NaN,
      Number.POSITIVE_INFINITY,
      '\ud800',
      { a: '\udfff' },
      undefined,
    ])
      expect(() => Encoding.canonicalize(value)).toThrow(PaymentParseError)
  })
})

describe('decodeJson', () => {
  test('behavior: inverts encodeJson, canonical', () => {
    fc.assert(
      fc.property(json, (value) => {
        expect(Encoding.decodeJson(Encoding.encodeJson(value), { canonical: true })).toEqual(value)
      }),
      { numRuns: 2000 },
    )
  })

  test('error: non-canonical JSON when canonical is required', () => {
    const loose = Encoding.base64urlEncode('{"b":1, "a":2}')
    expect(Encoding.decodeJson(loose)).toEqual({ b: 1, a: 2 })
    expect(() => Encoding.decodeJson(loose, { canonical: true })).toThrow(PaymentParseError)
  })

  test('error: invalid UTF-8 and non-JSON', () => {
    expect(() => Encoding.decodeJson(Encoding.base64urlEncode(new Uint8Array([0xff])))).toThrow(
      PaymentParseError,
    )
    expect(() => Encoding.decodeJson(Encoding.base64urlEncode('{'))).toThrow(PaymentParseError)
  })

  test('behavior: any bytes decode to a value or a PaymentParseError, never a crash', () => {
    fc.assert(
      fc.property(
        fc.oneof(
          fc.uint8Array({ maxLength: 100 }).map((b) => Encoding.base64urlEncode(b)),
          fc.string({ unit: 'binary' }).map((s) => Encoding.base64urlEncode(s)),
          fc.string(),
        ),
        fc.boolean(),
        (text, canonical) => {
          typedOrValue(() => Encoding.decodeJson(text, { canonical }))
        },
      ),
      { numRuns: 5000 },
    )
  })
})
