/**
 * The OpenAI chat-completions wire format: the request clients send, and the chunks and
 * completions upstreams return. Unknown fields pass through untouched.
 */
import { z } from 'zod'

const TextPart = z.object({ type: z.literal('text'), text: z.string() }).loose()

export const Message = z
  .object({
    role: z.enum(['system', 'developer', 'user', 'assistant'], {
      error: 'role must be one of system, developer, user, assistant',
    }),
    content: z.union([z.string(), z.array(TextPart)], {
      error: 'content must be a string or an array of text parts',
    }),
    name: z.string().optional(),
  })
  .loose()
export type Message = z.output<typeof Message>

export const Request = z
  .object({
    model: z.string({ error: 'model is required' }).min(1, 'model is required'),
    messages: z
      .array(Message, { error: 'messages must be an array of messages' })
      .min(1, 'messages must hold at least one message'),
    stream: z.boolean().default(false),
    temperature: z.number().min(0).max(2).optional(),
    top_p: z.number().min(0).max(1).optional(),
    max_tokens: z.number().int().positive().optional(),
    max_completion_tokens: z.number().int().positive().optional(),
    stop: z.union([z.string(), z.array(z.string()).max(4)]).nullish(),
    n: z.literal(1, { error: 'n must be 1' }).optional(),
    stream_options: z.object({ include_usage: z.boolean().optional() }).loose().nullish(),
  })
  .loose()
export type Request = z.output<typeof Request>

/** The text of a message's content. */
export function text(content: Message['content']): string {
  return typeof content === 'string' ? content : content.map((p) => p.text).join('')
}

export const Usage = z
  .object({
    prompt_tokens: z.number().int().nonnegative(),
    completion_tokens: z.number().int().nonnegative(),
    total_tokens: z.number().int().nonnegative().optional(),
  })
  .loose()
export type Usage = z.output<typeof Usage>

const ToolCallDelta = z
  .object({
    function: z
      .object({ name: z.string().nullish(), arguments: z.string().nullish() })
      .loose()
      .optional(),
  })
  .loose()

const Delta = z
  .object({
    role: z.string().optional(),
    content: z.string().nullish(),
    reasoning_content: z.string().nullish(),
    reasoning: z.string().nullish(),
    tool_calls: z.array(ToolCallDelta).nullish(),
  })
  .loose()

export const Chunk = z
  .object({
    id: z.string().optional(),
    object: z.string().optional(),
    created: z.number().optional(),
    model: z.string().optional(),
    choices: z
      .array(
        z
          .object({
            index: z.number(),
            delta: Delta.default({}),
            finish_reason: z.string().nullish(),
          })
          .loose(),
      )
      .default([]),
    usage: Usage.nullish(),
  })
  .loose()
export type Chunk = z.output<typeof Chunk>

export const Completion = z
  .object({
    id: z.string().optional(),
    object: z.string().optional(),
    created: z.number().optional(),
    model: z.string().optional(),
    choices: z.array(
      z
        .object({
          index: z.number(),
          message: Delta.extend({ role: z.string() }),
          finish_reason: z.string().nullish(),
        })
        .loose(),
    ),
    usage: Usage.nullish(),
  })
  .loose()
export type Completion = z.output<typeof Completion>

/** The generated text of a delta or message, every kind that is billed as output. */
export function generated(d: z.output<typeof Delta>): string {
  let s = (d.content ?? '') + (d.reasoning_content ?? d.reasoning ?? '')
  for (const t of d.tool_calls ?? []) s += (t.function?.name ?? '') + (t.function?.arguments ?? '')
  return s
}
