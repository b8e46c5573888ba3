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

/** Tokens in a piece of text. */
export function count(text: string): number {
  if (text.length === 0) return 0
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

/** Tokens of a chat prompt: each message's content plus its framing. */
export function prompt(messages: readonly { content: string }[]): number {
  let n = REPLY_PRIMER
  for (const m of messages) n += PER_MESSAGE + count(m.content)
  return n
}
