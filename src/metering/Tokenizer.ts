/**
 * Token counting with the o200k_base BPE (gpt-tokenizer): the same counts for admission,
 * metering and the built-in echo model. Real upstreams report their own exact usage, which
 * wins at reconciliation.
 */
import { countTokens } from 'gpt-tokenizer/encoding/o200k_base'

/** Tokens in a piece of text. */
export function count(text: string): number {
  return text.length === 0 ? 0 : countTokens(text)
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
