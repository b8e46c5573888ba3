import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Pricing from '../../src/metering/Pricing.ts'

const price = fc.record({ input: fc.bigInt(0n, 10n ** 12n), output: fc.bigInt(0n, 10n ** 12n) })
const tokens = fc.nat(2_000_000)

describe('cost', () => {
  test('behavior: rounds the exact price up to a whole base unit', () => {
    expect(Pricing.cost({ input: 1_000_000n, output: 2_000_000n }, 10, 4)).toBe(18n)
    expect(Pricing.cost({ input: 1n, output: 1n }, 1, 0)).toBe(1n)
    expect(Pricing.cost({ input: 1n, output: 1n }, 0, 0)).toBe(0n)
    expect(Pricing.cost({ input: 150_000n, output: 600_000n }, 1000, 1000)).toBe(750n)
  })

  test('property: cost = ceil((p*in + c*out) / 1e6), monotone in tokens', () => {
    fc.assert(
      fc.property(price, tokens, tokens, (pr, p, c) => {
        const exact = BigInt(p) * pr.input + BigInt(c) * pr.output
        const got = Pricing.cost(pr, p, c)
        expect(got * 1_000_000n >= exact).toBe(true)
        expect((got - 1n) * 1_000_000n < exact || got === 0n).toBe(true)
        expect(Pricing.cost(pr, p, c + 1) >= got).toBe(true)
      }),
      { numRuns: 5000 },
    )
  })
})

describe('affordable', () => {
  test('property: the largest completion (≤ max) whose cost fits the budget', () => {
    fc.assert(
      fc.property(
        price,
        fc.nat(100_000),
        fc.bigInt(0n, 10n ** 9n),
        fc.nat(1_000_000),
        (pr, p, budget, max) => {
          const n = Pricing.affordable(pr, p, budget, max)
          expect(n).toBeGreaterThanOrEqual(0)
          expect(n).toBeLessThanOrEqual(max)
          if (n > 0 || Pricing.cost(pr, p, 0) <= budget)
            expect(Pricing.cost(pr, p, n) <= budget).toBe(true)
          if (n < max && Pricing.cost(pr, p, 0) <= budget)
            expect(Pricing.cost(pr, p, n + 1) > budget).toBe(true)
        },
      ),
      { numRuns: 5000 },
    )
  })
})
