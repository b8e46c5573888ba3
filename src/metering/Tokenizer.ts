/**
 * Token counting with the o200k_base BPE (gpt-tokenizer): the same counts for admission,
 * metering and the built-in echo model. Real upstreams report their own exact usage, which
 * wins at reconciliation.
 */
import { countTokens } from 'gpt-tokenizer/encoding/o200k_base'
import { Lru } from '../Lru.ts'

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

/**
 * Counts of long texts, remembered by a SHA-256 of the text (never the text itself) for the
 * texts of later requests of the same payer. An agent sends its whole conversation again with
 * every turn, and its earlier messages are the same texts: counting 100,000 characters costs
 * the event loop about 12 ms, hashing them under 0.1 ms (measured, README). Remembered per
 * payer (`scope`: what only the payer holds, its key or its channel): a count remembered for
 * anyone would answer measurably sooner, and tell a stranger who sends a guessed document
 * whether someone else sent it, as shared prompt caches do. Texts from this long: below it a
 * count costs little more than the hash. The digest is of the UTF-8 text, so only well-formed
 * text (no lone surrogate, which UTF-8 would make U+FFFD) is remembered.
 */
const REMEMBERED_FROM = 256
const remembered = new Lru<string, number>(16_384)

/** Characters of text `count` ran through the BPE, and those whose count it remembered
 * instead, since the process started (read by the metrics). */
export const counted = { tokenized: 0, remembered: 0 }

/**
 * Tokens in a piece of text; past `most`, the count may stop early (a number above `most`).
 * With `scope` (the payer's, see `remembered`), a long text's count is remembered for it.
 */
export function count(text: string, most = Number.POSITIVE_INFINITY, scope?: string): number {
  if (text.length === 0) return 0
  if (scope !== undefined && text.length >= REMEMBERED_FROM && text.isWellFormed()) {
    const digest = new Bun.CryptoHasher('sha256')
      .update(scope)
      .update('\u0000')
      .update(text)
      .digest('base64')
    const known = remembered.get(digest)
    if (known !== undefined) {
      counted.remembered += text.length
      return known
    }
    const n = tokenized(text, most)
    // Only a whole count (one past `most` may have stopped early).
    if (n <= most) remembered.set(digest, n)
    return n
  }
  if (text.length > SHORT) return tokenized(text, most)
  let n = cache.get(text)
  if (n === undefined) {
    n = tokenized(text, most)
    if (cache.size >= CACHED) cache.clear()
    cache.set(text, n)
  }
  return n
}

/** The text's count by the BPE, a window at a time when it is long. */
function tokenized(text: string, most: number): number {
  counted.tokenized += text.length
  return text.length > WINDOW ? windowed(text, most) : countTokens(text, PLAIN)
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
 * Where a window from `at` ends, at most at `end`: at the last place a pre-token starts
 * whatever follows (`startsAt`: before " word", or before punctuation after a word; the
 * pre-tokenizer cuts there too, so the count is the whole text's), else before the last
 * whitespace, else at `end` (moved back off the second half of a surrogate pair).
 */
function cut(text: string, at: number, end: number): number {
  for (let i = end - 1; i > at; i--) if (startsAt(text, i)) return i
  for (let i = end - 1; i > at; i--) if (WHITESPACE.test(text[i]!)) return i
  const c = text.charCodeAt(end)
  return c >= 0xdc00 && c <= 0xdfff ? end - 1 : end
}

/**
 * The last place in `text` after `at` where a pre-token starts whatever comes after, or `at`:
 * before " word" (a space between a letter or digit and a letter, the rule of `cut`), or
 * before punctuation that follows a letter or digit (a word or number ends there; not an
 * ASCII apostrophe, which may go on as "'s"). The text before it counts the same whatever
 * comes after.
 */
function lastStart(text: string, at: number): number {
  for (let i = text.length - 1; i > at; i--) if (startsAt(text, i)) return i
  return at
}

/** Whether a pre-token starts at `i` of `text` whatever comes after (see `lastStart`). */
function startsAt(text: string, i: number): boolean {
  return startsBefore(text.charCodeAt(i - 1), text.charCodeAt(i), text.charCodeAt(i + 1))
}

/**
 * Whether a pre-token starts at a character `c` that follows `before` and precedes `after`
 * (NaN when unknown): before " word" (a space between a letter or digit and a letter), or
 * before punctuation after a letter or digit.
 */
function startsBefore(before: number, c: number, after: number): boolean {
  if (!wordEnd(before)) return false
  if (c === 0x20) return !Number.isNaN(after) && wordStart(after)
  return punctuation(c)
}

/**
 * The longest tail `Running` keeps: one without such a place (a run of CJK, emoji, a letter
 * repeated) is cut shorter, at whitespace or between characters (a token split there counts
 * twice: at most one token more a TAIL / 2 characters of such a run). A tail is counted again
 * with every fold, and its bound (bytes) runs ahead of its count.
 */
const TAIL = 64

/** Pieces kept uncounted by `Running` until they pass this many UTF-16 units. */
const PIECES = 16_384

/**
 * The count of a text that arrives in pieces (a stream's output, a chunk at a time), as the
 * whole text counts: pieces are not counted one by one, which counts a token split across
 * two pieces twice (a sentence sent a character a chunk: a token a character). The text
 * before the last place a pre-token starts whatever follows (`lastStart`; in a long run
 * without one, see `TAIL`) is counted for good; what follows, the tail, is counted again with
 * the pieces after it. Pieces are kept uncounted until asked.
 */
export class Running {
  /** Tokens of the text before `tail`. */
  private counted = 0
  private tail = ''
  private tailTokens = 0
  private pieces: string[] = []
  private piecesLength = 0
  private piecesBound = 0
  /** The split `tokensWith` made of the tail and a piece: the fold after that piece reuses it
   * (a stream short of its reservation asks for each chunk, then sends it). */
  private peeked: { piece: string; split: Split } | undefined

  /** Adds a piece of text, uncounted. */
  push(piece: string): void {
    if (piece.length === 0) return
    this.pieces.push(piece)
    this.piecesLength += piece.length
    this.piecesBound += bound(piece)
    // Bounds what is kept: counted now, the tail stays a window at most.
    if (this.piecesLength > PIECES) this.fold()
  }

  /** Whether any text was added. */
  get empty(): boolean {
    return this.counted === 0 && this.tail.length === 0 && this.pieces.length === 0
  }

  /** An upper bound of `tokens()`, without counting. */
  bound(): number {
    return this.counted + bound(this.tail) + this.piecesBound
  }

  /** The tokens of the text so far. */
  tokens(): number {
    this.fold()
    return this.counted + this.tailTokens
  }

  /** The tokens the text would have with `piece` added (it is not added). */
  tokensWith(piece: string): number {
    this.fold()
    const r = joined(this.tail, [piece])
    this.peeked = { piece, split: r }
    return this.counted + r.counted + r.tailTokens
  }

  private fold() {
    if (this.pieces.length === 0) return
    const peeked = this.peeked
    this.peeked = undefined
    const r =
      peeked !== undefined && this.pieces.length === 1 && peeked.piece === this.pieces[0]
        ? peeked.split
        : joined(this.tail, this.pieces)
    this.counted += r.counted
    this.tail = r.tail
    this.tailTokens = r.tailTokens
    this.pieces = []
    this.piecesLength = 0
    this.piecesBound = 0
  }
}

type Split = { counted: number; tail: string; tailTokens: number }

/**
 * `tail` and then `pieces` as one text, split as `split` does. A piece that starts where a
 * pre-token starts whatever follows (most of a stream's chunks: " word") ends what came before
 * it, which is counted on its own (a short text from the cache): the BPE runs only over text
 * whose pieces run into one another.
 */
function joined(tail: string, pieces: readonly string[]): Split {
  let counted = 0
  let text = tail
  for (let k = 0; k < pieces.length; k++) {
    const p = pieces[k]!
    if (text.length > 0 && startsBetween(text, p, pieces[k + 1])) {
      counted += count(text)
      text = p
    } else text += p
  }
  const r = split(text)
  return { ...r, counted: counted + r.counted }
}

/** Whether a pre-token starts at the start of `piece`, after `text` (`startsBefore`); `next`,
 * the piece after it, if any. */
function startsBetween(text: string, piece: string, next: string | undefined): boolean {
  if (piece.length === 0) return false
  const after = piece.length > 1 ? piece.charCodeAt(1) : (next?.charCodeAt(0) ?? Number.NaN)
  return startsBefore(text.charCodeAt(text.length - 1), piece.charCodeAt(0), after)
}

/** `text` as a part counted for good (windows, then up to `lastStart`) and a tail. */
function split(text: string): Split {
  let counted = 0
  let at = 0
  while (text.length - at > WINDOW) {
    const end = cut(text, at, at + WINDOW)
    counted += countTokens(text.slice(at, end), PLAIN)
    at = end
  }
  const start = lastStart(text, at)
  if (start > at) {
    counted += count(text.slice(at, start))
    at = start
  }
  if (text.length - at > TAIL) {
    const end = cut(text, at, text.length - TAIL / 2)
    counted += count(text.slice(at, end))
    at = end
  }
  const tail = text.slice(at)
  return { counted, tail, tailTokens: count(tail) }
}

const WORD_END = /[\p{L}\p{N}]/u
const WORD_START = /\p{L}/u
const WHITESPACE = /\s/
const PUNCTUATION = /[^\s\p{L}\p{N}\p{M}]/u

// The classes above for one UTF-16 unit, ASCII without a regular expression (a stream's
// every chunk is looked at). A surrogate half is none of letter, digit or mark: it ends no
// word and starts no pre-token here (a cut is only ever missed, never made wrongly).
const isLetter = (c: number) => (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a)
const isDigit = (c: number) => c >= 0x30 && c <= 0x39
function wordEnd(c: number): boolean {
  if (c < 0x80) return isLetter(c) || isDigit(c)
  return c < 0xd800 || c > 0xdfff ? WORD_END.test(String.fromCharCode(c)) : false
}
function wordStart(c: number): boolean {
  if (c < 0x80) return isLetter(c)
  return c < 0xd800 || c > 0xdfff ? WORD_START.test(String.fromCharCode(c)) : false
}
/** Punctuation that ends a word before it (not an ASCII apostrophe: "'s" goes on the word). */
function punctuation(c: number): boolean {
  if (c < 0x80) return c > 0x20 && c < 0x7f && c !== 0x27 && !isLetter(c) && !isDigit(c)
  return PUNCTUATION.test(String.fromCharCode(c))
}

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
 * The most text one o200k token stands for, in UTF-16 units: a run of 128 spaces
 * (test/metering/Tokenizer.test.ts reads the whole vocabulary). A token stands for at most
 * as many units as bytes, so this bounds a token of any text.
 */
export const LONGEST_TOKEN = 128

/**
 * A lower bound of `prompt(messages)`, at no cost: each message's content takes at least a
 * token per LONGEST_TOKEN units. What is known to be unaffordable by it is refused without
 * counting (see the insufficient-credits check in routes/Chat.ts).
 */
export function leastPrompt(messages: readonly { content: string }[]): number {
  let n = REPLY_PRIMER
  for (const m of messages) n += PER_MESSAGE + Math.ceil(m.content.length / LONGEST_TOKEN)
  return n
}

/**
 * Tokens of a chat prompt: each message's content plus its framing. Past `most` (a model's
 * context), the count may stop early: a number above `most`, not the whole count. `scope`:
 * the payer's, for whom long messages' counts are remembered (see `count`).
 */
export function prompt(
  messages: readonly { content: string }[],
  most = Number.POSITIVE_INFINITY,
  scope?: string,
): number {
  let n = REPLY_PRIMER
  for (const m of messages) {
    if (n > most) break
    n += PER_MESSAGE + count(m.content, most - n, scope)
  }
  return n
}
