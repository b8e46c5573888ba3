/** Prices: base units per 1,000,000 tokens, for prompt and completion tokens separately. */

export type Price = { input: bigint; output: bigint }

const MILLION = 1_000_000n

/** What a request costs: `ceil((prompt*input + completion*output) / 1e6)` base units. */
export function cost(price: Price, promptTokens: number, completionTokens: number): bigint {
  const total = BigInt(promptTokens) * price.input + BigInt(completionTokens) * price.output
  return (total + MILLION - 1n) / MILLION
}

/** The most completion tokens `budget` pays for after the prompt (capped at `max`). */
export function affordable(
  price: Price,
  promptTokens: number,
  budget: bigint,
  max: number,
): number {
  const left = budget * MILLION - BigInt(promptTokens) * price.input
  if (left < 0n) return 0
  if (price.output === 0n) return max
  const n = left / price.output
  return n > BigInt(max) ? max : Number(n)
}
