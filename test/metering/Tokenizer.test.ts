import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import { countTokens, decode } from 'gpt-tokenizer/encoding/o200k_base'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import { cutAt } from '../helpers/Cut.ts'

const PLAIN = { disallowedSpecial: new Set<string>() }

describe('Tokenizer.count', () => {
  test('property: long prose counts as the whole text does, however it is cut into windows', () => {
    const word = fc.stringMatching(/^[A-Za-z][a-z0-9']{0,11}[,.!?:;]?$/)
    const gap = fc.constantFrom(' ', ' ', ' ', '  ', '\n', '\n\n', '\t', ' \n')
    fc.assert(
      fc.property(fc.array(fc.tuple(word, gap), { minLength: 200, maxLength: 1500 }), (parts) => {
        const text = parts.map(([w, g]) => w + g).join('')
        expect(Tokenizer.count(text)).toBe(countTokens(text, PLAIN))
      }),
      { numRuns: 60, endOnFailure: true },
    )
  })

  test('property: any long text counts within a token a window of the whole count, and never above its bound', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'grapheme', minLength: 1_100, maxLength: 5_000 }), (text) => {
        const n = Tokenizer.count(text)
        expect(Math.abs(n - countTokens(text, PLAIN))).toBeLessThanOrEqual(
          Math.ceil(text.length / 512),
        )
        expect(n).toBeLessThanOrEqual(Tokenizer.bound(text))
      }),
      { numRuns: 100, endOnFailure: true },
    )
  })

  test('behavior: runs without whitespace (letters, CJK, emoji) are counted in windows, and the count finishes', () => {
    // Whole, such runs took the BPE minutes (160,000 CJK characters: 7 minutes), on the
    // event loop; in windows they finish within the test's time limit.
    const cjk = '漢字仮名交じり文'.repeat(20_000)
    expect(Tokenizer.count(cjk)).toBeGreaterThanOrEqual(cjk.length / 2)
    const letters = Array.from({ length: 100_000 }, (_, i) =>
      String.fromCharCode(97 + ((i * 7919) % 26)),
    ).join('')
    const n = Tokenizer.count(letters)
    expect(n).toBeGreaterThan(0)
    expect(n).toBeLessThanOrEqual(Tokenizer.bound(letters))
    // An emoji run cut at a window never splits a surrogate pair (a lone half would count
    // as a replacement character): the count is the same as for pairs counted one by one.
    const emoji = '😀'.repeat(5_000)
    expect(Tokenizer.count(emoji)).toBe(5_000 * countTokens('😀', PLAIN))
  })

  test('behavior: a long text counted again for the same payer is not tokenized again, and counts the same', () => {
    const text = `${crypto.randomUUID()} ${'an earlier message of a conversation, '.repeat(200)}`
    const before = Tokenizer.counted.tokenized
    const n = Tokenizer.count(text, Number.POSITIVE_INFINITY, 'payer-a')
    expect(Tokenizer.counted.tokenized - before).toBe(text.length)
    const remembered = Tokenizer.counted.remembered
    expect(Tokenizer.count(text, Number.POSITIVE_INFINITY, 'payer-a')).toBe(n)
    expect(Tokenizer.count(text, 10, 'payer-a')).toBe(n)
    expect(Tokenizer.counted.tokenized - before).toBe(text.length)
    expect(Tokenizer.counted.remembered - remembered).toBe(2 * text.length)
    expect(n).toBe(countTokens(text, PLAIN))
  })

  test('behavior: a count is remembered only for its payer: another payer, or none, has the text tokenized again', () => {
    const text = `${crypto.randomUUID()} ${'a document someone might guess, '.repeat(100)}`
    Tokenizer.count(text, Number.POSITIVE_INFINITY, 'payer-a')
    const before = Tokenizer.counted.tokenized
    const remembered = Tokenizer.counted.remembered
    expect(Tokenizer.count(text, Number.POSITIVE_INFINITY, 'payer-b')).toBe(
      countTokens(text, PLAIN),
    )
    Tokenizer.count(text)
    Tokenizer.count(text)
    expect(Tokenizer.counted.tokenized - before).toBe(3 * text.length)
    expect(Tokenizer.counted.remembered).toBe(remembered)
  })

  test('behavior: a count stopped early is not remembered, nor a text with a lone surrogate', () => {
    const text = `${crypto.randomUUID()} ${'word '.repeat(2_000)}`
    const early = Tokenizer.count(text, 100, 'payer-a')
    expect(early).toBeGreaterThan(100)
    expect(Tokenizer.count(text, Number.POSITIVE_INFINITY, 'payer-a')).toBe(
      countTokens(text, PLAIN),
    )
    // UTF-8 would make the lone half U+FFFD, the digest that of another text.
    const lone = `${crypto.randomUUID()} ${'x y '.repeat(100)}\ud800 end`
    const before = Tokenizer.counted.tokenized
    Tokenizer.count(lone, Number.POSITIVE_INFINITY, 'payer-a')
    Tokenizer.count(lone, Number.POSITIVE_INFINITY, 'payer-a')
    expect(Tokenizer.counted.tokenized - before).toBe(2 * lone.length)
  })

  test('property: texts that differ by a character keep their own counts, whichever is counted first', () => {
    const word = fc.stringMatching(/^[A-Za-z0-9,.!?' ]{1,12}$/)
    fc.assert(
      fc.property(
        fc.array(word, { minLength: 40, maxLength: 120 }),
        fc.nat(),
        fc.constantFrom('a', ' ', '.', '7', 'é', '漢'),
        (words, at, c) => {
          const a = `${crypto.randomUUID()} ${words.join(' ')}`
          const i = at % a.length
          const b = a.slice(0, i) + c + a.slice(i + 1)
          for (const t of [a, b, a, b])
            expect(Tokenizer.count(t, Number.POSITIVE_INFINITY, 'payer-a')).toBe(
              countTokens(t, PLAIN),
            )
        },
      ),
      { numRuns: 100, endOnFailure: true },
    )
  })

  test('behavior: past its limit the count stops early, with a number above the limit', () => {
    const text = 'word '.repeat(200_000)
    const n = Tokenizer.count(text, 4_096)
    expect(n).toBeGreaterThan(4_096)
    expect(n).toBeLessThan(Tokenizer.count(text))
    // A text not counted whole before (the whole count of one that was is remembered, and
    // is above the limit too).
    const other = `${text}other`
    const prompt = Tokenizer.prompt(
      [{ content: 'hi' }, { content: other }, { content: other }],
      4_096,
    )
    expect(prompt).toBeGreaterThan(4_096)
    expect(prompt).toBeLessThan(Tokenizer.count(other))
    expect(Tokenizer.prompt([{ content: text }], 4_096)).toBeGreaterThan(4_096)
    // Below the limit: the whole count.
    expect(Tokenizer.prompt([{ content: 'hi there' }], 4_096)).toBe(
      Tokenizer.prompt([{ content: 'hi there' }]),
    )
  })
})

/** `text` cut into pieces at the given points (a stream's chunks). */
const pieces = (text: string, cuts: number[]) =>
  cutAt(
    text,
    cuts.map((c) => c % (text.length + 1)),
  )

describe('Tokenizer.leastPrompt', () => {
  test('behavior: LONGEST_TOKEN is the most text any token of the vocabulary stands for, in UTF-16 units and in UTF-8 bytes', () => {
    let units = 0
    let bytes = 0
    const utf8 = new TextEncoder()
    // Every rank up to the special tokens (a rank not in the vocabulary throws).
    for (let rank = 0; rank < 200_019; rank++) {
      let text: string
      try {
        text = decode([rank])
      } catch {
        continue
      }
      units = Math.max(units, text.length)
      bytes = Math.max(bytes, utf8.encode(text).length)
    }
    expect(units).toBe(Tokenizer.LONGEST_TOKEN)
    expect(bytes).toBe(Tokenizer.LONGEST_TOKEN)
  })

  test('property: any prompt counts at least leastPrompt', () => {
    const content = fc.oneof(
      fc.string({ maxLength: 600 }),
      fc.string({ unit: 'grapheme', maxLength: 300 }),
      fc.string({ unit: fc.constantFrom(' ', '=', '-', 'a', '\n'), maxLength: 2_000 }),
    )
    fc.assert(
      fc.property(fc.array(fc.record({ content }), { maxLength: 4 }), (messages) => {
        expect(Tokenizer.prompt(messages)).toBeGreaterThanOrEqual(Tokenizer.leastPrompt(messages))
      }),
      { numRuns: 300 },
    )
    // Runs of one character, which merge into the longest tokens.
    for (const c of [' ', '=', '-', '\n', '0'])
      for (const n of [127, 128, 129, 1_000, 5_000]) {
        const messages = [{ content: c.repeat(n) }]
        expect(Tokenizer.prompt(messages)).toBeGreaterThanOrEqual(Tokenizer.leastPrompt(messages))
      }
  })
})

describe('Tokenizer.Running', () => {
  test('property: prose that arrives in pieces counts as the whole text does, wherever it is cut', () => {
    // Prose: words (ending in a letter or digit, then maybe a mark) mostly between single
    // spaces. A stretch of over 64 characters with no place a pre-token starts (words between
    // tabs or double spaces, ending in apostrophes) is cut there and counted within a token
    // (the next test).
    const word = fc.stringMatching(/^[A-Za-z][a-z0-9']{0,10}[a-z0-9][,.!?:;]?$/)
    const gap = fc.constantFrom(' ', ' ', ' ', ' ', ' ', '\n')
    fc.assert(
      fc.property(
        fc.array(fc.tuple(word, gap), { minLength: 1, maxLength: 900, size: 'max' }),
        fc.array(fc.nat(), { maxLength: 400, size: 'max' }),
        fc.integer({ min: 0, max: 3 }),
        (parts, cuts, asks) => {
          const text = parts.map(([w, g]) => w + g).join('')
          const r = new Tokenizer.Running()
          const ps = pieces(text, cuts)
          // Asked for its count now and then, as a stream is (extensions, renewals).
          ps.forEach((p, i) => {
            r.push(p)
            if (asks > 0 && i % (asks * 7) === 0) r.tokens()
          })
          expect(r.tokens()).toBe(countTokens(text, PLAIN))
          expect(r.bound()).toBeGreaterThanOrEqual(r.tokens())
        },
      ),
      { numRuns: 150, endOnFailure: true },
    )
  })

  test('property: CJK prose and mixed punctuation in pieces count as the whole text does', () => {
    const han = fc.integer({ min: 0x4e00, max: 0x4fff }).map((c) => String.fromCharCode(c))
    const phrase = fc.array(han, { minLength: 1, maxLength: 40 }).map((a) => a.join(''))
    const word = fc.stringMatching(/^[A-Za-z0-9]{1,10}$/)
    const mark = fc.constantFrom(
      '，',
      '。',
      '、',
      '！',
      '？',
      '：',
      ',',
      '.',
      ';',
      '-',
      '(',
      ')',
      '"',
      '…',
    )
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.oneof(phrase, word), mark), {
          minLength: 1,
          maxLength: 200,
          size: 'max',
        }),
        fc.array(fc.nat(), { maxLength: 300, size: 'max' }),
        (parts, cuts) => {
          const text = parts.map(([p, m]) => p + m).join('')
          const r = new Tokenizer.Running()
          for (const p of pieces(text, cuts)) r.push(p)
          expect(r.tokens()).toBe(countTokens(text, PLAIN))
        },
      ),
      { numRuns: 100, endOnFailure: true },
    )
  }, 60_000)

  test('property: any text in pieces counts within a token a run of 32 characters of the whole, never above its bound, and tokensWith is what push then tokens gives', () => {
    fc.assert(
      fc.property(
        fc.string({ unit: 'grapheme', maxLength: 3_000, size: 'max' }),
        fc.array(fc.nat(), { maxLength: 200, size: 'max' }),
        (text, cuts) => {
          const r = new Tokenizer.Running()
          const ps = pieces(text, cuts)
          let bound = 0
          for (const p of ps.slice(0, -1)) {
            r.push(p)
            bound += Tokenizer.bound(p)
          }
          const last = ps.at(-1)!
          const expected = r.tokensWith(last)
          expect(r.bound()).toBeLessThanOrEqual(bound)
          r.push(last)
          expect(r.tokens()).toBe(expected)
          expect(r.tokens()).toBeLessThanOrEqual(Tokenizer.bound(text))
          const whole = text.length === 0 ? 0 : countTokens(text, PLAIN)
          // A run without a place a pre-token starts is cut every 32 characters or more.
          expect(Math.abs(r.tokens() - whole)).toBeLessThanOrEqual(Math.ceil(text.length / 32))
          expect(r.empty).toBe(text.length === 0)
        },
      ),
      { numRuns: 300, endOnFailure: true },
    )
  }, 60_000)
})
