import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import { InvalidRequestError } from '../../src/Errors.ts'
import * as Parse from '../../src/http/Parse.ts'

/** `value` inside `n` arrays and objects, alternating. */
function nest(n: number, value: unknown = 1): unknown {
  let v = value
  for (let i = 0; i < n; i++) v = i % 2 === 0 ? [v] : { k: v }
  return v
}

describe('json', () => {
  test('property: deeper tells nesting beyond the limit, whatever the values inside', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 300 }),
        fc.integer({ min: 1, max: 200 }),
        fc.jsonValue({ maxDepth: 0 }),
        (n, max, leaf) => expect(Parse.deeper(nest(n, leaf), max)).toBe(n > max),
      ),
    )
  })

  test('error: a body nesting deeper than the limit is a 400 invalid_json; at the limit it parses', () => {
    const at = JSON.stringify(nest(Parse.MAX_DEPTH))
    expect(Parse.json(at)).toEqual(nest(Parse.MAX_DEPTH))
    // Written out by hand: serializing 60,000 levels overflows the stack (the gateway's
    // reason to refuse them before it forwards a body).
    for (const n of [Parse.MAX_DEPTH + 1, 60_000]) {
      let error: unknown
      try {
        Parse.json(`${'['.repeat(n)}1${']'.repeat(n)}`)
      } catch (e) {
        error = e
      }
      expect(error).toBeInstanceOf(InvalidRequestError)
      expect((error as InvalidRequestError).code).toBe('invalid_json')
    }
  })

  test('property: a number of a literal field is its text as written, exactly; other numbers are numbers', () => {
    const literal = new Set(['amount'])
    fc.assert(
      fc.property(
        fc.oneof(
          fc.bigInt({ min: -(10n ** 80n), max: 10n ** 80n }).map(String),
          fc.double({ noNaN: true, noDefaultInfinity: true }).map(String),
          fc.constantFrom('1.0000000000000001', '1e3', '-0', '0.1E+1', '4503599627370496.5'),
        ),
        fc.integer(),
        (written, other) => {
          const text = `{"amount":${written},"other":${other},"nested":{"amount":${written}}}`
          expect(Parse.json(text, literal)).toEqual({
            amount: written,
            other,
            nested: { amount: written },
          })
        },
      ),
    )
  })
})
