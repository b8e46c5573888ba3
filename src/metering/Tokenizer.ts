/**
 * Token counting with the o200k_base BPE (gpt-tokenizer): the same counts for admission,
 * metering and the built-in echo model. Real upstreams report their own exact usage, which
 * wins at reconciliation.
 */
import { countTokens } from 'gpt-tokenizer/encoding/o200k_base'

// Text that spells a special token (`<|endoftext|>`) is counted as the plain text it is:
// by default gpt-tokenizer throws on it, and prompts and replies may hold any text.
const PLAIN = { disallowedSpecial: new Set<string>() }

// Counts of short texts, the pieces a stream is made of (a word or two a chunk, drawn from a
// small vocabulary): a lookup instead of a BPE run, which costs as much as the rest of a
// chunk's metering. Held in memory only, and dropped whole when full.
const SHORT = 16
const CACHED = 8192
const cache = new Map<string, number>()

/** Texts longer than this are counted a window at a time (see `windowed`). */
const WINDOW = 1024

/** Tokens in a piece of text; past `most`, the count may stop early (a number above `most`). */
export function count(text: string, most = Number.POSITIVE_INFINITY): number {
  if (text.length === 0) return 0
  if (text.length > WINDOW) return windowed(text, most)
  if (text.length > SHORT) return countTokens(text, PLAIN)
  let n = cache.get(text)
  if (n === undefined) {
    n = countTokens(text, PLAIN)
    if (cache.size >= CACHED) cache.clear()
    cache.set(text, n)
  }
  return n
}

/**
 * The BPE's merging costs time quadratic in the length of one pre-tokenized piece, a run
 * without whitespace (measured: 160,000 CJK characters took 7 minutes, 60,000 letters
 * seconds), and it runs on the event loop: a long text is counted a window at a time (see
 * `cut`), prose exactly as whole, a long run without a word boundary within a token or so a
 * window. Stops once the count passes `most`.
 */
function windowed(text: string, most: number): number {
  let n = 0
  for (let at = 0; at < text.length && n <= most; ) {
    const end = text.length - at <= WINDOW ? text.length : cut(text, at, at + WINDOW)
    n += countTokens(text.slice(at, end), PLAIN)
    at = end
  }
  return n
}

/**
 * Where a window from `at` ends, at most at `end`: before the last space that follows a
 * letter or digit and precedes a letter (" word": the pre-tokenizer cuts there too, so the
 * count is the whole text's), else before the last whitespace, else at `end` (moved back
 * off the second half of a surrogate pair).
 */
function cut(text: string, at: number, end: number): number {
  for (let i = end - 1; i > at; i--)
    if (
      text.charCodeAt(i) === 0x20 &&
      WORD_END.test(text[i - 1]!) &&
      i + 1 < text.length &&
      WORD_START.test(text[i + 1]!)
    )
      return i
  for (let i = end - 1; i > at; i--) if (WHITESPACE.test(text[i]!)) return i
  const c = text.charCodeAt(end)
  return c >= 0xdc00 && c <= 0xdfff ? end - 1 : end
}

const WORD_END = /[\p{L}\p{N}]/u
const WORD_START = /\p{L}/u
const WHITESPACE = /\s/

/**
 * An upper bound of `count(text)`, at a tenth of its cost: the text's UTF-8 bytes, as
 * every o200k token stands for at least one byte. Counted per UTF-16 unit: up to U+007F
 * one byte, up to U+07FF two, anything else three (a surrogate half is three: a pair is
 * four bytes, a lone half is encoded as U+FFFD, three).
 */
export function bound(text: string): number {
  let n = text.length
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c >= 0x80) n += c >= 0x800 ? 2 : 1
  }
  return n
}

/** Per-message framing tokens (role and separators), as OpenAI counts chat prompts. */
const PER_MESSAGE = 3
/** Tokens that prime the assistant's reply. */
const REPLY_PRIMER = 3

/**
 * Tokens of a chat prompt: each message's content plus its framing. Past `most` (a model's
 * context), the count may stop early: a number above `most`, not the whole count.
 */
export function prompt(
  messages: readonly { content: string }[],
  most = Number.POSITIVE_INFINITY,
): number {
  let n = REPLY_PRIMER
  for (const m of messages) {
    if (n > most) break
    n += PER_MESSAGE + count(m.content, most - n)
  }
  return n
}
