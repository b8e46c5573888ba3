import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import { countTokens } from 'gpt-tokenizer/encoding/o200k_base'
import * as Meter from '../../src/metering/Meter.ts'
import * as Pricing from '../../src/metering/Pricing.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import type { Chunk, Received } from '../../src/upstream/Chat.ts'

const PLAIN = { disallowedSpecial: new Set<string>() }
const price: Pricing.Price = { input: 1_000_000n, output: 2_000_000n }
const PROMPT = 10

/** A reservation against a balance, as the ledger keeps one, recording what it was asked. */
function reservation(balance: bigint, held: bigint) {
  const r = {
    id: 'r',
    held,
    extensions: 0,
    outcome: undefined as Meter.Outcome | undefined,
    async extend(amount: bigint): Promise<boolean> {
      r.extensions++
      if (amount > balance) return false
      balance -= amount
      r.held += amount
      return true
    },
    async settle(o: Meter.Outcome) {
      r.outcome = o
      return { charged: o.cost < r.held ? o.cost : r.held }
    },
  }
  return r
}

const chunk = (content: string): Chunk => ({
  id: 'c',
  choices: [{ index: 0, delta: { content }, finish_reason: null }],
})

/** The upstream's chunks; `templated`, as template reads (their text known, see Chat.template). */
async function* batches(
  texts: string[][],
  usage?: number,
  templated = false,
): AsyncGenerator<Received[]> {
  for (const batch of texts)
    yield batch.map((t) => (templated ? { chunk: chunk(t), text: t } : { chunk: chunk(t) }))
  if (usage !== undefined)
    yield [{ chunk: { choices: [], usage: { prompt_tokens: PROMPT, completion_tokens: usage } } }]
}

/** Runs a stream to its end; the tokens sent (each choice's text counted whole), the held
 * amount at each send, and the end. */
async function run(o: {
  texts: string[][]
  usage?: number
  balance: bigint
  held: bigint
  blockTokens?: number
  renewMs?: number
  reservation?: ReturnType<typeof reservation>
  templated?: boolean
  startedAt?: number
  chunks?: AsyncIterable<Received[]>
}) {
  const r = o.reservation ?? reservation(o.balance, o.held)
  const sends: { tokens: number; held: bigint }[] = []
  const sent = new Map<number, string>()
  let tokens = 0
  let end: Extract<Meter.Frame, { kind: 'end' }> | undefined
  for await (const frame of Meter.stream({
    price,
    promptTokens: PROMPT,
    blockTokens: o.blockTokens ?? 4,
    reservation: r,
    chunks: o.chunks ?? batches(o.texts, o.usage, o.templated),
    signal: new AbortController().signal,
    startedAt: o.startedAt ?? performance.now(),
    ...(o.renewMs !== undefined ? { renewMs: o.renewMs } : {}),
  })) {
    if (frame.kind === 'chunks') {
      for (const { chunk } of frame.chunks)
        for (const c of chunk.choices)
          sent.set(c.index, (sent.get(c.index) ?? '') + (c.delta.content ?? ''))
      tokens = 0
      for (const t of sent.values()) tokens += t.length === 0 ? 0 : countTokens(t, PLAIN)
      sends.push({ tokens, held: r.held })
    }
    if (frame.kind === 'end') end = frame
  }
  return { r, sends, tokens, end: end! }
}

/**
 * Runs a stream the upstream gives no usage for, holding at first what `blockTokens` (at
 * most 4) cost, and checks the money rules: no chunk is sent before the reservation covers
 * it, and the charge is the exact count of what was sent; with `tailSlack`, at most a token
 * more per 32 characters sent (a run without a place a pre-token starts, cut at
 * Tokenizer.TAIL: README, "at most a token more per 32 characters of such a run").
 */
async function meteredExactly(o: {
  texts: string[][]
  balance: bigint
  blockTokens: number
  templated?: boolean
  tailSlack?: boolean
}) {
  const result = await run({ ...o, held: Pricing.cost(price, PROMPT, Math.min(o.blockTokens, 4)) })
  for (const s of result.sends)
    expect(Pricing.cost(price, PROMPT, s.tokens)).toBeLessThanOrEqual(s.held)
  const slack = o.tailSlack ? Math.floor(o.texts.flat().join('').length / 32) : 0
  for (const charged of [result.r.outcome!.completionTokens, result.end.usage.completion_tokens]) {
    expect(charged).toBeGreaterThanOrEqual(result.tokens)
    expect(charged).toBeLessThanOrEqual(result.tokens + slack)
  }
  return result
}

// Text of every kind: ASCII words, any Unicode, lone surrogates, special-token spellings.
const text = fc.oneof(
  fc.string({ maxLength: 12 }),
  fc.string({ unit: 'grapheme', maxLength: 12 }),
  fc.string({ unit: 'binary', maxLength: 12 }),
  fc.constantFrom(' w', ' the', '<|endoftext|>', '\ud800', '😀', '日本語', '\n\n', ''),
)

describe('Tokenizer.bound', () => {
  test('property: never below the exact count', () => {
    fc.assert(
      fc.property(
        fc.oneof(text, fc.string({ unit: 'binary', maxLength: 400 })),
        (t) => Tokenizer.bound(t) >= Tokenizer.count(t),
      ),
      { numRuns: 5000 },
    )
  })

  test('property: a count from the cache of short texts is the count of the tokenizer', () => {
    fc.assert(
      fc.property(text, (t) => {
        const first = Tokenizer.count(t)
        expect(Tokenizer.count(t)).toBe(first)
        expect(first).toBe(t.length === 0 ? 0 : countTokens(t, { disallowedSpecial: new Set() }))
      }),
      { numRuns: 3000 },
    )
  })

  test('behavior: text that spells a special token is counted as plain text', () => {
    expect(Tokenizer.count('a <|endoftext|> b')).toBeGreaterThan(3)
  })
})

describe('stream', () => {
  test('property: no chunk is sent before the reservation covers it; a cut stream is charged the tokens sent', async () => {
    await fc.assert(
      fc.asyncProperty(
        // At most 1,008 characters: within one window, so the count is exact but for runs
        // without a place a pre-token starts (binary strings, astral characters), cut at 64.
        fc.array(fc.array(text, { maxLength: 6 }), { maxLength: 14 }),
        fc.bigInt({ min: 0n, max: 400n }),
        fc.integer({ min: 1, max: 40 }),
        fc.boolean(),
        async (texts, balance, blockTokens, templated) => {
          const { r, end } = await meteredExactly({
            texts,
            balance,
            blockTokens,
            templated,
            tailSlack: true,
          })
          if (r.outcome!.status === 'insufficient_funds') expect(end.error).toBeDefined()
          else expect(r.outcome!.status).toBe('ok')
        },
      ),
      { numRuns: 500 },
    )
  })

  test('behavior: a stream without usage sent a character a chunk is charged the tokens of its text, not a token a chunk', async () => {
    const sentence = 'The quick brown fox jumps over the lazy dog, and then it naps in the sun.'
    const whole = countTokens(sentence, PLAIN)
    for (const templated of [false, true]) {
      const { r, end } = await run({
        texts: [...sentence].map((ch) => [ch]),
        balance: 10_000n,
        held: 100n,
        templated,
      })
      expect(r.outcome).toMatchObject({ status: 'ok', completionTokens: whole })
      expect(end.usage.completion_tokens).toBe(whole)
    }
    // Cut by the credits: charged the tokens of the text that went out, as a whole.
    const cut = await run({
      texts: [...sentence].map((ch) => [ch]),
      balance: 0n,
      held: Pricing.cost(price, PROMPT, 6),
    })
    expect(cut.r.outcome!.status).toBe('insufficient_funds')
    expect(cut.r.outcome!.completionTokens).toBe(cut.tokens)
    expect(cut.tokens).toBeLessThanOrEqual(6)
    expect(cut.tokens).toBeGreaterThanOrEqual(5)
  })

  test('behavior: a run without spaces sent a character a chunk is metered in time linear in its length, as prose is', async () => {
    // Random characters (the BPE caches what it has seen): CJK, emoji, letters, and Chinese
    // prose (phrases between commas), a character a chunk, reservations of the default block.
    let seed = 1
    const next = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2147483648
      return Math.floor((seed / 2147483648) * n)
    }
    const runs: Record<string, () => string> = {
      cjk: () => String.fromCharCode(0x4e00 + next(2000)),
      emoji: () => String.fromCodePoint(0x1f600 + next(60)),
      letters: () => String.fromCharCode(97 + next(26)),
      prose: () => (next(10) === 0 ? '\uff0c' : String.fromCharCode(0x4e00 + next(3000))),
    }
    for (const [kind, char] of Object.entries(runs)) {
      const chars = Array.from({ length: 10_000 }, char)
      const r = reservation(10n ** 15n, 0n)
      const started = performance.now()
      for await (const _ of Meter.stream({
        price,
        promptTokens: PROMPT,
        blockTokens: 64,
        reservation: r,
        chunks: batches(chars.map((c) => [c])),
        signal: new AbortController().signal,
        startedAt: performance.now(),
      })) {
      }
      const ms = performance.now() - started
      // Counting the whole run again each chunk took seconds (CJK 10,000: 17.5 s).
      expect({ kind, slow: ms > 1_000 }).toEqual({ kind, slow: false })
      expect(r.outcome).toMatchObject({ status: 'ok' })
      expect(r.outcome!.completionTokens).toBeLessThanOrEqual(Tokenizer.bound(chars.join('')))
    }
  }, 120_000)

  test('property: runs without a word boundary (CJK, emoji, one letter), a character a chunk, under tight balances: every send covered, a cut stream charged the tokens sent', async () => {
    const char = fc.oneof(
      fc.integer({ min: 0x4e00, max: 0x4fff }).map((c) => String.fromCharCode(c)),
      fc.integer({ min: 0x1f600, max: 0x1f64f }).map((c) => String.fromCodePoint(c)),
      fc.constantFrom('a', 'z', '，', ' '),
    )
    await fc.assert(
      fc.asyncProperty(
        fc.array(char, { minLength: 1, maxLength: 300, size: 'max' }),
        fc.bigInt({ min: 0n, max: 1_500n }),
        fc.integer({ min: 1, max: 64 }),
        async (chars, balance, blockTokens) => {
          const { r, tokens } = await meteredExactly({
            texts: chars.map((c) => [c]),
            balance,
            blockTokens,
          })
          if (r.outcome!.status !== 'insufficient_funds') {
            expect(r.outcome!.status).toBe('ok')
            // A run past 64 characters without a place a pre-token starts is cut (Tokenizer.TAIL).
            const whole = countTokens(chars.join(''), PLAIN)
            expect(Math.abs(tokens - whole)).toBeLessThanOrEqual(Math.ceil(chars.length / 32))
          }
        },
      ),
      { numRuns: 200 },
    )
  }, 60_000)

  test('behavior: a stream that ends with usage is charged the upstream count', async () => {
    const texts = [Array.from({ length: 50 }, () => ' w')]
    const { r } = await run({ texts, usage: 55, balance: 10_000n, held: 100n })
    expect(r.outcome).toMatchObject({ status: 'ok', completionTokens: 55 })
    expect(r.outcome!.cost).toBe(Pricing.cost(price, PROMPT, 55))
  })

  test('behavior: a usage that text came after is no final count; the last usage with nothing after it is', async () => {
    const usage = (completion: number): Received => ({
      chunk: { choices: [], usage: { prompt_tokens: PROMPT, completion_tokens: completion } },
    })
    const words = (n: number): Received[] =>
      Array.from({ length: n }, () => ({ chunk: chunk(' w') }))
    // Usage first, then 40 tokens of text and no usage after: charged what was sent.
    const early = await run({
      texts: [],
      balance: 10_000n,
      held: 1_000n,
      chunks: (async function* () {
        yield [usage(0)]
        yield words(40)
      })(),
    })
    expect(early.r.outcome).toMatchObject({ status: 'ok', completionTokens: 40 })
    // Usage with every chunk (a running count): the last one counts.
    const running = await run({
      texts: [],
      balance: 10_000n,
      held: 1_000n,
      chunks: (async function* () {
        for (let i = 1; i <= 3; i++) yield [...words(10), usage(10 * i + 1)]
      })(),
    })
    expect(running.r.outcome).toMatchObject({ status: 'ok', completionTokens: 31 })
  })

  test('behavior: the extension block grows, so a long stream extends a few times, not once a block', async () => {
    const texts = Array.from({ length: 100 }, () => Array.from({ length: 10 }, () => ' w'))
    const { r, tokens } = await run({
      texts,
      usage: 1000,
      balance: 1_000_000n,
      held: Pricing.cost(price, PROMPT, 16),
      blockTokens: 16,
    })
    expect(tokens).toBe(1000)
    // 16-token blocks would take 62 extensions; doubling up to 16 blocks takes 8.
    expect(r.extensions).toBeLessThanOrEqual(8)
    // What it holds beyond what it sent stays under the largest block.
    expect(r.held - Pricing.cost(price, PROMPT, 1000)).toBeLessThan(Pricing.cost(price, 0, 16 * 16))
  })

  test('behavior: a refused large block falls back to what the chunk needs, then ends cleanly', async () => {
    const texts = [Array.from({ length: 40 }, () => ' w')]
    const held = Pricing.cost(price, PROMPT, 16)
    // Pays for 20 more tokens: a block of 16, then (the doubled block refused) 4 one at a time.
    const { r, tokens, end } = await run({ texts, balance: 40n, held, blockTokens: 16 })
    expect(tokens).toBe(36)
    expect(r.outcome).toMatchObject({ status: 'insufficient_funds', completionTokens: 36 })
    expect(end.finishReason).toBe('length')
  })

  test('behavior: a stream with nothing to extend still renews its reservation, recording what it sent; a refused renewal ends it', async () => {
    const texts = Array.from({ length: 5 }, () => [' w', ' w'])
    const r = reservation(0n, 1_000n)
    const asked: Meter.Delivered[] = []
    const extend = r.extend
    r.extend = async (amount: bigint, delivered?: Meter.Delivered) => {
      asked.push(delivered!)
      return extend(amount)
    }
    await run({ texts, balance: 0n, held: 0n, renewMs: 0, reservation: r })
    // Renewed before each batch, each time with what was sent so far: its cost and its tokens.
    expect(asked).toEqual(
      [0, 2, 4, 6, 8].map((n) => ({
        cost: Pricing.cost(price, PROMPT, n),
        promptTokens: PROMPT,
        completionTokens: n,
      })),
    )

    const gone = reservation(0n, 1_000n)
    gone.extend = async () => false
    const { tokens, r: ended } = await run({
      texts,
      balance: 0n,
      held: 0n,
      renewMs: 0,
      reservation: gone,
    })
    expect(tokens).toBe(0)
    expect(ended.outcome!.status).toBe('insufficient_funds')
  })

  test('behavior: a first token that comes a lease-renewal period after admission renews before it is sent; a lease gone by then sends nothing', async () => {
    const texts = [[' w', ' w']]
    const gone = reservation(0n, 1_000n)
    gone.extend = async () => false
    const late = await run({
      texts,
      balance: 0n,
      held: 0n,
      renewMs: 5_000,
      startedAt: performance.now() - 10_000,
      reservation: gone,
    })
    expect(late.tokens).toBe(0)
    expect(late.r.outcome!.status).toBe('insufficient_funds')
    // Within the period, nothing to renew: sent at once.
    const soon = await run({ texts, balance: 0n, held: 1_000n, renewMs: 5_000 })
    expect(soon.tokens).toBe(2)
    expect(soon.r.extensions).toBe(0)
  })
})
