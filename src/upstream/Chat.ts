/**
 * The OpenAI chat-completions wire format: the request clients send, and the chunks and
 * completions upstreams return. Unknown fields pass through untouched.
 */
import { z } from 'zod'
import { UpstreamError } from '../Errors.ts'
import { STRATEGIES } from './Router.ts'

const TextPart = z.object({ type: z.literal('text'), text: z.string() }).loose()
/** An assistant's refusal, as a history carries it back (OpenAI's `refusal` content part). */
const RefusalPart = z.object({ type: z.literal('refusal'), refusal: z.string() }).loose()
/**
 * Any other part (`image_url`, `input_audio`, `file`, and kinds to come): passed on as sent,
 * and counted for the reservation as an estimate (see `mediaParts`), not read.
 */
const MediaPart = z
  .object({
    type: z
      .string()
      .refine((t) => t !== 'text' && t !== 'refusal', 'a text or refusal part needs its text'),
  })
  .loose()
const Part = z.union([TextPart, RefusalPart, MediaPart], {
  error: 'each content part must be an object with a type (a text part with its text)',
})

/** A tool call an assistant made, as a history carries it back (only what is counted). */
const ToolCall = z
  .object({
    // As upstreams write them back: arguments are a JSON string, though some send the object.
    function: z.object({ name: z.string().nullish(), arguments: z.unknown() }).loose().nullish(),
    // A call of a custom tool (OpenAI's `type: "custom"`): its input is free text.
    custom: z.object({ name: z.string().nullish(), input: z.unknown() }).loose().nullish(),
  })
  .loose()

export const Message = z
  .object({
    // `tool` carries a tool's result back to the model (`function`: the deprecated form), so a
    // conversation with tool calls goes on through the gateway.
    role: z.enum(['system', 'developer', 'user', 'assistant', 'tool', 'function'], {
      error: 'role must be one of system, developer, user, assistant, tool, function',
    }),
    // An assistant's may be null or left out (as OpenAI's SDKs write it beside tool calls in
    // a history: "required unless tool_calls or function_call is specified").
    content: z
      .union(
        [
          z.string(),
          // As OpenAI refuses it: a list of no parts is no content (null says that).
          z.array(Part).min(1, 'content must not be an empty array; send at least one part'),
          z.null(),
        ],
        { error: 'content must be a string or an array of content parts' },
      )
      .optional(),
    name: z.string().optional(),
    // Null as some upstreams answer it, and clients send their answers back as they came.
    tool_calls: z.array(ToolCall, { error: 'tool_calls must be an array' }).nullish(),
  })
  .loose()
  .refine((m) => (m.content !== null && m.content !== undefined) || m.role === 'assistant', {
    message:
      'content must be a string or an array of content parts (null or left out only for an assistant)',
    path: ['content'],
  })
export type Message = z.output<typeof Message>

/** The longest `timeout_ms` a request may ask for: an hour. */
export const MAX_TIMEOUT_MS = 3_600_000

/** A price ceiling: base units per 1M tokens, a whole number, as a JSON number or a string of digits. */
const Ceiling = z
  .union(
    [z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER), z.string().regex(/^\d{1,78}$/)],
    {
      error:
        'a price ceiling must be base units per 1M tokens: a whole number, as a JSON number or a string of digits',
    },
  )
  .transform((v) => BigInt(v))

/**
 * OpenAI's optional parameters that it takes as null for "not given" (the openai SDKs type them
 * `number | null`): a null one is left out, as the client meant.
 */
const NULLABLE = ['temperature', 'top_p', 'max_tokens', 'max_completion_tokens', 'n', 'stream']
function withoutNulls(body: unknown): unknown {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return body
  const o = body as Record<string, unknown>
  if (!NULLABLE.some((k) => o[k] === null)) return body
  const out = { ...o }
  for (const k of NULLABLE) if (out[k] === null) delete out[k]
  return out
}

const RequestObject = z
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
    // The gateway's own parameters (never sent upstream; see `upstreamBody`).
    routing_strategy: z
      .enum(STRATEGIES, { error: `routing_strategy must be one of ${STRATEGIES.join(', ')}` })
      .optional(),
    timeout_ms: z
      .number({ error: 'timeout_ms must be a number of milliseconds' })
      .int('timeout_ms must be a whole number of milliseconds')
      .positive('timeout_ms must be positive')
      .max(MAX_TIMEOUT_MS, `timeout_ms must be at most ${MAX_TIMEOUT_MS}`)
      .optional(),
    max_input_price_per_million: Ceiling.optional(),
    max_output_price_per_million: Ceiling.optional(),
    allow_external: z.boolean({ error: 'allow_external must be true or false' }).optional(),
  })
  .loose()
  .superRefine((r, ctx) => {
    // As OpenAI answers it: options of a stream on a request for a whole completion are a
    // mistake (null is "not given", as for the other nullable parameters).
    if (r.stream_options != null && !r.stream)
      ctx.addIssue({
        code: 'custom',
        path: ['stream_options'],
        message: "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
      })
    // As the references have it: a ceiling on one price alone is a mistake, not a wish.
    const given = r.max_input_price_per_million !== undefined
    if (given !== (r.max_output_price_per_million !== undefined))
      ctx.addIssue({
        code: 'custom',
        path: [given ? 'max_output_price_per_million' : 'max_input_price_per_million'],
        message:
          'set both max_input_price_per_million and max_output_price_per_million, or neither',
      })
  })
export const Request = z.preprocess(withoutNulls, RequestObject)
export type Request = z.output<typeof Request>

/**
 * The body an upstream gets: the client's request with the upstream's model name, without
 * the gateway's own parameters (routing and limits; the upstream is asked for usage its own
 * way, whatever `stream_options.include_usage` said).
 */
export function upstreamBody(req: Request, upstreamModel: string): Record<string, unknown> {
  const {
    stream_options: options,
    routing_strategy: _strategy,
    timeout_ms: _timeout,
    max_input_price_per_million: _input,
    max_output_price_per_million: _output,
    allow_external: _external,
    ...body
  } = req
  // The client's other stream options (`include_obfuscation`) go on with a stream.
  const { include_usage: _usage, ...streamOptions } = options ?? {}
  return {
    ...body,
    ...(req.stream && Object.keys(streamOptions).length > 0
      ? { stream_options: streamOptions }
      : {}),
    model: upstreamModel,
  }
}

/** The text of a message's content. */
export function text(content: Message['content']): string {
  if (content === null || content === undefined) return ''
  if (typeof content === 'string') return content
  let s = ''
  for (const p of content)
    if (p.type === 'text') s += (p as { text: string }).text
    else if (p.type === 'refusal') s += (p as { refusal: string }).refusal
  return s
}

/** How many parts of a request's messages are neither text nor refusal (images, audio, files). */
export function mediaParts(req: Pick<Request, 'messages'>): number {
  let n = 0
  for (const m of req.messages)
    if (Array.isArray(m.content))
      for (const p of m.content) if (p.type !== 'text' && p.type !== 'refusal') n++
  return n
}

/**
 * What of a request the model reads as its prompt, as texts to count: each message's content
 * with the names and arguments (a custom tool's input) of the tool calls it carries, and what
 * upstreams put into the prompt beside the messages: the tool definitions (`tools`, and the
 * legacy `functions`) and a structured output's schema (`response_format`), so that a
 * request's reservation and its context check cover them too.
 */
export function promptTexts(
  req: Pick<Request, 'messages'> & {
    tools?: unknown
    functions?: unknown
    response_format?: unknown
  },
): string[] {
  const json = (v: unknown) => (typeof v === 'string' ? v : (JSON.stringify(v) ?? ''))
  const texts = req.messages.map((m) => {
    let t = text(m.content)
    for (const call of m.tool_calls ?? []) {
      if (call.function) t += `\n${call.function.name ?? ''}\n${json(call.function.arguments)}`
      if (call.custom) t += `\n${call.custom.name ?? ''}\n${json(call.custom.input)}`
    }
    return t
  })
  for (const v of [req.tools, req.functions, req.response_format])
    if (v !== undefined && v !== null) texts.push(JSON.stringify(v))
  return texts
}

/**
 * The most tokens a usage count may say: what the usage table's integer columns hold. No
 * request comes near it; an upstream that says more is malformed (counted, it failed the
 * charge and left the request's credits held until the lease sweep).
 */
export const MAX_TOKENS = 2_147_483_647

const Count = z.number().int().nonnegative().max(MAX_TOKENS)

export const Usage = z
  .object({
    prompt_tokens: Count,
    completion_tokens: Count,
    total_tokens: z.number().int().nonnegative().optional(),
  })
  .loose()
export type Usage = z.output<typeof Usage>

/**
 * The output tokens an upstream's usage says it generated: its `completion_tokens`, which in
 * OpenAI's usage include the reasoning tokens (`total_tokens` = prompt + completion), and the
 * reasoning tokens too where it reports them apart: xAI ("counted separately from
 * completion_tokens, but counted in the total_tokens") and Gemini's thoughts as OpenAI-compatible
 * proxies map them, whose `total_tokens` holds prompt + completion + reasoning.
 *
 * Apart when the total holds exactly the reasoning beside prompt and completion, or (without a
 * total, or with one holding more, as Gemini's tool-use prompt tokens make it) when there is
 * more reasoning than completion tokens: then it cannot be among them. A total that holds more
 * than the reasoning beside fewer reasoning than completion tokens is OpenAI's usage with other
 * tokens in its total (cache reads and writes that Bedrock and proxies of Anthropic's models
 * leave out of prompt_tokens): taken as apart, the reasoning the completion tokens already
 * count would be charged twice.
 */
export function outputTokens(u: Usage): number {
  const details = (u as { completion_tokens_details?: unknown }).completion_tokens_details
  const reasoning = isObject(details) ? details.reasoning_tokens : undefined
  if (typeof reasoning !== 'number' || !Number.isSafeInteger(reasoning) || reasoning <= 0)
    return u.completion_tokens
  const beside =
    u.total_tokens === undefined
      ? undefined
      : u.total_tokens - u.prompt_tokens - u.completion_tokens
  const apart =
    beside === reasoning ||
    ((beside === undefined || beside > reasoning) && reasoning > u.completion_tokens)
  return apart ? Math.min(u.completion_tokens + reasoning, MAX_TOKENS) : u.completion_tokens
}

const ToolCallDelta = z
  .object({
    // Arguments are a JSON string; some upstreams (llama.cpp's server, TGI) answer the object,
    // billed as its JSON (see `generated`).
    function: z
      .object({
        name: z.string().nullish(),
        arguments: z.union([z.string(), z.record(z.string(), z.unknown())]).nullish(),
      })
      .loose()
      .optional(),
    // A custom tool's call (OpenAI's `type: "custom"`): its input is generated text.
    custom: z.object({ name: z.string().nullish(), input: z.string().nullish() }).loose().nullish(),
  })
  .loose()

const Delta = z
  .object({
    // Null as some upstreams write it on every delta after the first (Cloudflare's).
    role: z.string().nullish(),
    // Or an array of parts, as Mistral's reasoning models answer (`thinking` parts, then
    // `text` parts): passed on as sent, their text billed (see `partsText`).
    content: z.union([z.string(), z.array(z.unknown())]).nullish(),
    // OpenAI's refusal: generated text, in place of the content.
    refusal: z.string().nullish(),
    reasoning_content: z.string().nullish(),
    reasoning: z.string().nullish(),
    tool_calls: z.array(ToolCallDelta).nullish(),
    // OpenAI's legacy function calling (`functions` in the request), and an audio answer's
    // transcript: generated output, billed as such.
    function_call: z
      .object({ name: z.string().nullish(), arguments: z.string().nullish() })
      .loose()
      .nullish(),
    audio: z.object({ transcript: z.string().nullish() }).loose().nullish(),
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
            // Left out by some upstreams of one choice (GetInference's stream): choice 0.
            index: z.number().default(0),
            // Null as some upstreams write it on the finishing chunk (Azure's): no delta.
            delta: Delta.nullish().transform((d) => d ?? {}),
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
          index: z.number().default(0),
          message: Delta.extend({ role: z.string() }),
          finish_reason: z.string().nullish(),
        })
        .loose(),
    ),
    usage: Usage.nullish(),
  })
  .loose()
export type Completion = z.output<typeof Completion>

/**
 * The chunks of a stream once it has started: read until one carries text, a finish reason or
 * the usage, and handed back whole, what was read first included (a stream that ends before
 * one does is an UpstreamError). An
 * upstream that fails (or times out) before its first token so fails here, before the
 * gateway has answered: the client gets an error status, not a 200 with an error event.
 */
export async function started(
  chunks: AsyncIterable<Received[]>,
): Promise<AsyncIterable<Received[]>> {
  const it = chunks[Symbol.asyncIterator]()
  const held: Received[][] = []
  try {
    while (true) {
      const next = await it.next()
      // Ended without text, a finish reason or usage: the upstream broke off before it
      // answered (an empty body, or a role chunk and nothing after), a failure before the
      // first token, not an empty answer.
      if (next.done)
        throw new UpstreamError(
          'The upstream ended its stream before it answered.',
          'upstream_stream_error',
        )
      held.push(next.value)
      if (next.value.some(begun)) break
    }
  } catch (e) {
    await it.return?.()
    throw e
  }
  let i = 0
  const resumed: AsyncIterator<Received[]> = {
    next: () => (i < held.length ? Promise.resolve({ value: held[i++]!, done: false }) : it.next()),
    return: (value?: unknown) =>
      it.return ? it.return(value) : Promise.resolve({ value: undefined, done: true }),
  }
  return { [Symbol.asyncIterator]: () => resumed }
}

/** Whether a chunk shows the answer has begun: text, a finish reason or the usage. */
function begun(r: Received): boolean {
  if (r.text !== undefined) return r.text.length > 0
  const { chunk } = r
  if (chunk.usage) return true
  return chunk.choices.some((c) => c.finish_reason || generated(c.delta).length > 0)
}

/** The generated text of a delta or message, every kind that is billed as output. */
export function generated(d: z.output<typeof Delta>): string {
  const reasoning = d.reasoning_content || d.reasoning
  const content = typeof d.content === 'string' ? d.content : partsText(d.content)
  // The common delta, text alone, without building a new string (a stream's hot path).
  if (!reasoning && !d.tool_calls && !d.refusal && !d.function_call && !d.audio) return content
  let s = content + (d.refusal ?? '') + (reasoning ?? '')
  for (const t of d.tool_calls ?? [])
    s +=
      (t.function?.name ?? '') +
      argumentsText(t.function?.arguments) +
      (t.custom?.name ?? '') +
      (t.custom?.input ?? '')
  if (d.function_call) s += (d.function_call.name ?? '') + (d.function_call.arguments ?? '')
  if (d.audio) s += d.audio.transcript ?? ''
  return s
}

/** A tool call's arguments as text: the JSON string, or an object's JSON. */
const argumentsText = (a: string | Record<string, unknown> | null | undefined): string =>
  typeof a === 'string' ? a : a ? (JSON.stringify(a) ?? '') : ''

/**
 * The text of an answer's content parts (none: ''): each part's `text` and `refusal`, and a
 * `thinking` part's thinking (Mistral's: itself an array of text parts, or a string). Parts
 * of other kinds (an image an upstream generated, a citation) are passed on and left to the
 * upstream's usage: their data is no text whose bytes bound its tokens.
 */
function partsText(parts: unknown, nested = false): string {
  if (typeof parts === 'string') return parts
  if (!Array.isArray(parts)) return ''
  let s = ''
  for (const p of parts) {
    if (!isObject(p)) continue
    if (typeof p.text === 'string') s += p.text
    if (typeof p.refusal === 'string') s += p.refusal
    // One level: a thinking part's own parts (no recursion an upstream's nesting could exhaust).
    if (!nested && p.thinking !== undefined) s += partsText(p.thinking, true)
  }
  return s
}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v)
/** A number zod's `z.number()` takes: finite (JSON.parse reads `1e400` as Infinity). */
const isNumber = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v)
const optional = (v: unknown, type: 'string' | 'number') =>
  v === undefined || v === null || (type === 'number' ? isNumber(v) : typeof v === type)

/**
 * A chunk as an upstream sent it: parsed, and, when the parsed chunk is exactly the JSON
 * text (no default was filled in), that text, so a stream can forward it without
 * serializing it again.
 */
export type Received = {
  readonly chunk: Chunk
  json?: string | undefined
  /**
   * Set by a template read (see `template`): the chunk is one choice with this generated
   * text, no finish reason and no usage, and `model`, `id` and `created` are its; `chunk`
   * itself is built only if asked for, which the common path never does.
   */
  text?: string | undefined
  model?: unknown
  id?: unknown
  created?: unknown
}

/*
 * The fast paths below (`asChunk`, `asCompletion`, `asRequest`) check the common shapes by
 * hand: in the gateway each zod parse of a request or a completion cost about 12 us, against
 * 1.0-1.5 us in a loop of its own (measured against the commit before them: the gateway's CPU
 * 156 against 176 us a request). Each returns the value as its schema would (defaults filled
 * in), or undefined for anything else, which the schema then parses: the schema stays the one
 * definition, and a property test checks each fast path against it. Only JSON that
 * `fastPathFor` allows takes them.
 */

/**
 * How deep an upstream's JSON may nest: far beyond any answer (a tool call's arguments object
 * nests a few levels), far below where JSON.stringify overflows the stack (about 100,000 levels
 * in Bun, in a megabyte of text that JSON.parse takes).
 */
export const MAX_DEPTH = 512

/**
 * Whether JSON `text` nests at most MAX_DEPTH deep (its brackets outside strings). Deeper, the
 * gateway's JSON.stringify of what JSON.parse made of it (tool-call arguments billed as their
 * JSON, a chunk or completion re-serialized to the client) throws: a completion failed as the
 * gateway's bug after it was charged, or left its credits held until the lease sweep. Text too
 * short to nest that deep is not scanned (a stream's chunks, most of them); strings are
 * skipped with `indexOf` (a completion's text costs a small part of its JSON.parse).
 */
export function shallow(text: string): boolean {
  if (text.length <= 2 * MAX_DEPTH) return true
  let depth = 0
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c === 0x22) {
      // To the closing quote: the next one after an even run of backslashes.
      while (true) {
        i = text.indexOf('"', i + 1)
        if (i < 0) return true // not JSON: JSON.parse says so
        let b = i - 1
        while (text.charCodeAt(b) === 0x5c) b--
        if ((i - 1 - b) % 2 === 0) break
      }
    } else if (c === 0x7b || c === 0x5b) {
      if (++depth > MAX_DEPTH) return false
    } else if (c === 0x7d || c === 0x5d) depth--
  }
  return true
}

/**
 * Whether JSON `text` may take a fast path: zod gives a `__proto__` key special treatment (its
 * copy of the object gets that prototype), so JSON with one goes to the schema.
 */
export const fastPathFor = (text: string): boolean => !text.includes('__proto__')

/** A delta or message of the common shape: text fields only (no tool calls or audio). */
function plainDelta(d: Record<string, unknown>): boolean {
  return (
    d.tool_calls === undefined &&
    d.function_call === undefined &&
    d.audio === undefined &&
    optional(d.content, 'string') &&
    optional(d.refusal, 'string') &&
    optional(d.reasoning_content, 'string') &&
    optional(d.reasoning, 'string') &&
    (d.role === undefined || d.role === null || typeof d.role === 'string')
  )
}

/** Whether `u` is what `Usage.nullish()` takes. */
function plainUsage(u: unknown): boolean {
  if (u === undefined || u === null) return true
  if (!isObject(u)) return false
  const valid = (n: unknown) => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0
  const count = (n: unknown) => valid(n) && (n as number) <= MAX_TOKENS
  return (
    count(u.prompt_tokens) &&
    count(u.completion_tokens) &&
    (u.total_tokens === undefined || valid(u.total_tokens))
  )
}

/** Whether a chunk's or completion's `id`, `object`, `model` and `created` are as typed. */
function plainHeader(json: Record<string, unknown>): boolean {
  for (const k of ['id', 'object', 'model'] as const)
    if (json[k] !== undefined && typeof json[k] !== 'string') return false
  return json.created === undefined || isNumber(json.created)
}

/**
 * The common chunk shape, checked without zod (the hot path of a stream): `choices` of
 * `{ index?, delta: { role?, content?, reasoning_content?, reasoning? }, finish_reason? }`
 * and an optional `usage`. Returns the chunk with `Chunk`'s defaults, or undefined for
 * anything else (tool calls, odd fields), which `Chunk` then parses. `o.filled` is set when a
 * default was filled in (the chunk then differs from its JSON text).
 */
export function asChunk(json: unknown, o?: { filled: boolean }): Chunk | undefined {
  if (!isObject(json)) return undefined
  const choices = json.choices === undefined ? [] : json.choices
  if (!Array.isArray(choices)) return undefined
  for (const c of choices) {
    if (!isObject(c) || !optional(c.finish_reason, 'string')) return undefined
    if (c.index !== undefined && !isNumber(c.index)) return undefined
    const d = c.delta === undefined || c.delta === null ? {} : c.delta
    if (!isObject(d) || !plainDelta(d)) return undefined
    if (c.index === undefined) {
      c.index = 0
      if (o) o.filled = true
    }
    if (c.delta === undefined || c.delta === null) {
      c.delta = {}
      if (o) o.filled = true
    }
  }
  if (!plainUsage(json.usage) || !plainHeader(json)) return undefined
  if (json.choices === undefined) {
    json.choices = choices
    if (o) o.filled = true
  }
  return json as Chunk
}

/**
 * The common completion shape, checked without zod: `choices` of `{ index, message: { role,
 * content?, refusal?, reasoning_content?, reasoning? }, finish_reason? }` and an optional
 * `usage`. Returns the completion as `Completion` would, or undefined for anything else (tool
 * calls, odd fields), which `Completion` then parses.
 */
export function asCompletion(json: unknown): Completion | undefined {
  if (!isObject(json) || !Array.isArray(json.choices)) return undefined
  for (const c of json.choices) {
    if (!isObject(c) || !isNumber(c.index) || !optional(c.finish_reason, 'string')) return undefined
    const m = c.message
    if (!isObject(m) || typeof m.role !== 'string' || !plainDelta(m)) return undefined
  }
  if (!plainUsage(json.usage) || !plainHeader(json)) return undefined
  return json as Completion
}

const ROLES: ReadonlySet<unknown> = new Set(Message.shape.role.options)

/**
 * The common request shape, checked without zod: messages whose content is text, OpenAI's
 * sampling parameters in range, none of them null, `stream_options` only on a stream, and
 * none of the gateway's own parameters
 * (routing, timeout, price ceilings). Returns the request as `Request` would (`stream`
 * filled in), or undefined for anything else, which `Request` then parses and, if it is
 * wrong, names what is wrong.
 */
export function asRequest(r: unknown): Request | undefined {
  if (!isObject(r)) return undefined
  if (typeof r.model !== 'string' || r.model.length === 0) return undefined
  if (!Array.isArray(r.messages) || r.messages.length === 0) return undefined
  for (const m of r.messages)
    if (
      !isObject(m) ||
      !ROLES.has(m.role) ||
      typeof m.content !== 'string' ||
      (m.name !== undefined && typeof m.name !== 'string') ||
      (m.tool_calls !== undefined && m.tool_calls !== null)
    )
      return undefined
  const within = (v: unknown, most: number) =>
    v === undefined || (isNumber(v) && v >= 0 && v <= most)
  const count = (v: unknown) =>
    v === undefined || (typeof v === 'number' && Number.isSafeInteger(v) && v > 0)
  if (
    !within(r.temperature, 2) ||
    !within(r.top_p, 1) ||
    !count(r.max_tokens) ||
    !count(r.max_completion_tokens) ||
    (r.n !== undefined && r.n !== 1) ||
    (r.stream !== undefined && typeof r.stream !== 'boolean')
  )
    return undefined
  const stop = r.stop
  if (
    stop !== undefined &&
    stop !== null &&
    typeof stop !== 'string' &&
    !(Array.isArray(stop) && stop.length <= 4 && stop.every((s) => typeof s === 'string'))
  )
    return undefined
  const o = r.stream_options
  if (
    o !== undefined &&
    o !== null &&
    (r.stream !== true ||
      !(isObject(o) && (o.include_usage === undefined || typeof o.include_usage === 'boolean')))
  )
    return undefined
  if (
    r.routing_strategy !== undefined ||
    r.timeout_ms !== undefined ||
    r.max_input_price_per_million !== undefined ||
    r.max_output_price_per_million !== undefined ||
    r.allow_external !== undefined
  )
    return undefined
  if (r.stream === undefined) r.stream = false
  return r as Request
}

const CONTENT = '"content":"'
const primitive = (v: unknown) => v === null || (typeof v !== 'object' && v !== undefined)
const flat = (o: Record<string, unknown>, except: string) => {
  for (const k in o) if (k !== except && !primitive(o[k])) return false
  return true
}

/**
 * Reads a stream's chunks by template: an upstream wraps each token's text in the same JSON
 * (`{"id":"x",…,"choices":[{"index":0,"delta":{"content":"<text>"},"finish_reason":null}]}`),
 * so once one such chunk was parsed in full and `learn`ed, `read` takes a chunk that differs
 * from it only inside the content string without JSON.parse (which was a fifth of a
 * stream's CPU). Only a flat shape is learned (one choice; the chunk, the choice and the
 * delta hold no other object or array), so a read chunk is built field by field and equals
 * what JSON.parse gives; anything else, or a string that is not valid JSON, reads as
 * undefined and takes the full path.
 */
export function template() {
  let t: Template | undefined
  /** Chunks learned since the last one read by template. */
  let misses = 0
  return {
    /**
     * Takes `data`, which parsed as `chunk` (checked, no default filled in), as the template.
     * A stream whose chunks keep differing outside the content (a per-chunk nonce, say) is
     * given up after a few: learning each would only add to the full path's cost.
     */
    learn(data: string, chunk: Chunk): void {
      if (misses >= learnAtMost) return
      misses++
      t = undefined
      const top = chunk as Record<string, unknown>
      const choice = chunk.choices[0] as Record<string, unknown> | undefined
      if (chunk.choices.length !== 1 || !choice || !flat(top, 'choices')) return
      // A chunk without them is completed by the stream (http/Sse.ts), from the chunk built.
      if (top.id === undefined || top.object === undefined || top.created === undefined) return
      const delta = choice.delta as Record<string, unknown>
      if (!flat(choice, 'delta') || !flat(delta, '') || typeof delta.content !== 'string') return
      if (choice.finish_reason !== null && choice.finish_reason !== undefined) return
      // Outside strings, a `"content":"` is a key; the shape has one, the delta's.
      const at = data.indexOf(CONTENT)
      if (at < 0 || data.indexOf(CONTENT, at + 1) >= 0) return
      const start = at + CONTENT.length
      let end = start
      while (end < data.length && data[end] !== '"') end += data[end] === '\\' ? 2 : 1
      if (end >= data.length) return
      // A refusal and reasoning text (string constants here) are billed with the content, in
      // the order `generated` takes them.
      const extra =
        ((delta.refusal ?? '') as string) +
        ((delta.reasoning_content || delta.reasoning || '') as string)
      t = { prefix: data.slice(0, start), suffix: data.slice(end), top, choice, delta, extra }
      // The literal found must be the content itself.
      if (match(data)?.chunk.choices[0]?.delta.content !== delta.content) t = undefined
    },
    /** The chunk `data` holds if it is the template with another content string. */
    read(data: string): Received | undefined {
      const r = match(data)
      if (r) misses = 0
      return r
    },
  }

  function match(data: string): Received | undefined {
    if (!t) return undefined
    const { prefix, suffix } = t
    if (
      data.length < prefix.length + suffix.length ||
      !data.startsWith(prefix) ||
      !data.endsWith(suffix)
    )
      return undefined
    let content = data.slice(prefix.length, data.length - suffix.length)
    let plain = true
    for (let i = 0; i < content.length; i++) {
      const c = content.charCodeAt(i)
      if (c < 0x20) return undefined // not JSON: the full path says so
      if (c === 0x22 || c === 0x5c) plain = false
    }
    if (!plain) {
      // Escapes (or a quote that would end the string early): JSON.parse of the literal
      // alone succeeds exactly when it is one valid string.
      try {
        content = JSON.parse(`"${content}"`) as string
      } catch {
        return undefined
      }
    }
    return new Templated(t, content, data)
  }
}

/** Chunks `template` learns in a row, none of them read by the one before, before it gives up. */
const learnAtMost = 8

type Template = {
  prefix: string
  suffix: string
  top: Record<string, unknown>
  choice: Record<string, unknown>
  delta: Record<string, unknown>
  extra: string
}

/** A template read: the chunk is built from the template when first asked for. */
class Templated implements Received {
  readonly text: string
  readonly model: unknown
  readonly id: unknown
  readonly created: unknown
  private built: Chunk | undefined
  constructor(
    private readonly t: Template,
    private readonly content: string,
    readonly json: string,
  ) {
    this.text = t.extra ? content + t.extra : content
    this.model = t.top.model
    this.id = t.top.id
    this.created = t.top.created
  }
  get chunk(): Chunk {
    this.built ??= {
      ...this.t.top,
      choices: [{ ...this.t.choice, delta: { ...this.t.delta, content: this.content } }],
    } as Chunk
    return this.built
  }
}
