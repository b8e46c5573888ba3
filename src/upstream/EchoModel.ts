/**
 * `tollway-echo`: the built-in development model. It streams the last user message back
 * word by word (cycling through it until `max_tokens` when asked for more), honours `stop`,
 * and reports exact usage counted by the gateway's own tokenizer (handed in: token counting
 * belongs to metering/, a layer above), so every path through the gateway is metered without
 * a real upstream.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import { UpstreamError } from '../Errors.ts'
import {
  type Chunk,
  type Completion,
  type Message,
  promptTexts,
  type Received,
  text,
} from './Chat.ts'
import type { Body, Limits, Provider } from './Provider.ts'

export const id = 'tollway-echo'

/** The gateway's token counts (metering's Tokenizer), which the echo model reports. */
export type Tokens = {
  count(text: string): number
  prompt(messages: readonly { content: string }[]): number
}

/** Creates the provider; `tokenDelayMs` paces the stream like a real model. */
export function create(options: { tokenDelayMs: number; tokens: Tokens }): Provider {
  const { tokens } = options
  return {
    name: 'echo',
    async stream(body, signal, limits, timing) {
      return batches(stream(tokens, body, signal, options.tokenDelayMs, limits, timing?.gapMs))
    },
    async complete(body, signal, limits) {
      const reply = generate(tokens, body, limits)
      const created = Math.floor(Date.now() / 1000)
      signal.throwIfAborted()
      return {
        id: `chatcmpl-${crypto.randomUUID()}`,
        object: 'chat.completion',
        created,
        model: body.model,
        choices: [
          {
            index: 0,
            message: { role: 'assistant', content: reply.words.join('') },
            finish_reason: reply.finish,
          },
        ],
        usage: usage(tokens, body, reply.tokens),
      } satisfies Completion
    },
  }
}

type Reply = { words: string[]; tokens: number; finish: 'stop' | 'length' }

/**
 * The reply: the message's words, cycled while the client's `max_tokens` asks for more, and
 * cut at it or at the gateway's limit, whichever comes first.
 */
function generate(tokenizer: Tokens, body: Body, limits?: Limits): Reply {
  const messages = body.messages as Message[]
  const last = [...messages].reverse().find((m) => m.role === 'user')
  const source = last ? text(last.content).split(/\s+/).filter(Boolean) : []
  const asked = (body.max_tokens ?? body.max_completion_tokens) as number | undefined
  const max =
    limits === undefined
      ? asked
      : asked === undefined
        ? limits.maxTokens
        : Math.min(asked, limits.maxTokens)
  const stops = typeof body.stop === 'string' ? [body.stop] : ((body.stop as string[] | null) ?? [])
  const longest = Math.max(0, ...stops.map((s) => s.length))
  const words: string[] = []
  let tokens = 0
  let said = ''
  if (source.length === 0) return { words, tokens, finish: 'stop' }
  // Only what the client asked makes it cycle; the gateway's limit only cuts.
  for (let i = 0; asked !== undefined || i < source.length; i++) {
    const word = (i === 0 ? '' : ' ') + source[i % source.length]
    const n = tokenizer.count(word)
    if (max !== undefined && tokens + n > max) return { words, tokens, finish: 'length' }
    // Only a match ending in this word is new: keep and look at the tail that can hold one
    // (the whole text said, searched again after every word, is quadratic in max_tokens).
    said = (said + word).slice(-(longest + word.length))
    if (stops.some((s) => s && said.includes(s))) return { words, tokens, finish: 'stop' }
    words.push(word)
    tokens += n
  }
  return { words, tokens, finish: 'stop' }
}

function usage(tokens: Tokens, body: Body, completion: number) {
  const prompt = tokens.prompt(
    promptTexts(body as { messages: Message[]; tools?: unknown }).map((content) => ({ content })),
  )
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }
}

/**
 * Waits `ms` between two words, or until `signal` aborts; a pause longer than `gapMs` (the
 * client's timeout_ms) times out there, as an upstream's would.
 */
async function pause(ms: number, gapMs: number | undefined, signal: AbortSignal): Promise<void> {
  const wait = gapMs === undefined ? ms : Math.min(ms, gapMs)
  await sleep(wait, undefined, { signal }).catch(() => {})
  signal.throwIfAborted()
  if (wait < ms) throw new UpstreamError('Upstream echo timed out.', 'upstream_timeout')
}

/** Each chunk a batch of its own: the echo model makes them one at a time. */
async function* batches(chunks: AsyncIterable<Chunk>): AsyncGenerator<Received[]> {
  for await (const chunk of chunks) yield [{ chunk }]
}

async function* stream(
  tokens: Tokens,
  body: Body,
  signal: AbortSignal,
  delayMs: number,
  limits?: Limits,
  gapMs?: number,
): AsyncGenerator<Chunk> {
  const reply = generate(tokens, body, limits)
  const base = {
    id: `chatcmpl-${crypto.randomUUID()}`,
    object: 'chat.completion.chunk',
    created: Math.floor(Date.now() / 1000),
    model: body.model,
  }
  const chunk = (
    delta: Chunk['choices'][number]['delta'],
    finish: string | null = null,
  ): Chunk => ({
    ...base,
    choices: [{ index: 0, delta, finish_reason: finish }],
  })
  yield chunk({ role: 'assistant', content: '' })
  for (const word of reply.words) {
    if (delayMs > 0) await pause(delayMs, gapMs, signal)
    signal.throwIfAborted()
    yield chunk({ content: word })
  }
  yield chunk({}, reply.finish)
  yield { ...base, choices: [], usage: usage(tokens, body, reply.tokens) }
}
