import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import { countTokens } from 'gpt-tokenizer/encoding/o200k_base'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'

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

  test('behavior: past its limit the count stops early, with a number above the limit', () => {
    const text = 'word '.repeat(200_000)
    const n = Tokenizer.count(text, 4_096)
    expect(n).toBeGreaterThan(4_096)
    expect(n).toBeLessThan(Tokenizer.count(text))
    const prompt = Tokenizer.prompt(
      [{ content: 'hi' }, { content: text }, { content: text }],
      4_096,
    )
    expect(prompt).toBeGreaterThan(4_096)
    expect(prompt).toBeLessThan(Tokenizer.count(text))
    // Below the limit: the whole count.
    expect(Tokenizer.prompt([{ content: 'hi there' }], 4_096)).toBe(
      Tokenizer.prompt([{ content: 'hi there' }]),
    )
  })
})
