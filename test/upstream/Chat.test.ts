import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Chat from '../../src/upstream/Chat.ts'

const messageLike = fc.record(
  {
    role: fc.constantFrom('system', 'developer', 'user', 'assistant', 'tool', 'function', 'bot'),
    content: fc.oneof(
      fc.string(),
      fc.constant(null),
      fc.array(fc.record({ type: fc.constant('text'), text: fc.string() })),
      fc.integer(),
    ),
    name: fc.oneof(fc.string(), fc.integer()),
    tool_calls: fc.oneof(
      fc.constant(null),
      fc.array(fc.record({ function: fc.record({ name: fc.string(), arguments: fc.string() }) })),
    ),
    extra: fc.jsonValue(),
  },
  { requiredKeys: ['role'] },
)

const requestLike = fc.record(
  {
    model: fc.oneof(fc.string(), fc.integer()),
    messages: fc.oneof(fc.array(messageLike, { maxLength: 3 }), fc.jsonValue()),
    stream: fc.oneof(fc.boolean(), fc.constant(null), fc.string()),
    temperature: fc.oneof(fc.double({ min: -1, max: 3, noNaN: true }), fc.constant(null)),
    top_p: fc.oneof(fc.double({ min: -1, max: 2, noNaN: true }), fc.constant(null)),
    max_tokens: fc.oneof(fc.integer({ min: -2, max: 100_000 }), fc.double(), fc.constant(null)),
    max_completion_tokens: fc.oneof(fc.integer({ min: -2, max: 100_000 }), fc.constant(null)),
    stop: fc.oneof(
      fc.string(),
      fc.constant(null),
      fc.array(fc.string(), { maxLength: 6 }),
      fc.array(fc.jsonValue(), { maxLength: 2 }),
    ),
    n: fc.oneof(fc.constant(1), fc.integer(), fc.constant(null)),
    stream_options: fc.oneof(
      fc.constant(null),
      fc.record({ include_usage: fc.oneof(fc.boolean(), fc.string()) }, { requiredKeys: [] }),
      fc.jsonValue(),
    ),
    routing_strategy: fc.constantFrom('price', 'latency', 'fastest'),
    timeout_ms: fc.integer(),
    max_input_price_per_million: fc.oneof(fc.nat(), fc.string()),
    max_output_price_per_million: fc.oneof(fc.nat(), fc.string()),
    tools: fc.jsonValue(),
    user: fc.string(),
  },
  { requiredKeys: [] },
)

/**
 * A stream's chunk (`part` "delta") or a whole completion (`part` "message") near the common
 * shape: some fields of the wrong type, tool calls, audio, odd usage counts. Weighted to the
 * right types, so that the fast path is taken often enough to be tested: a completion needs
 * every field of every choice right.
 */
const answerLike = (object: string, part: 'delta' | 'message') =>
  fc.record(
    {
      id: fc.oneof(fc.string(), fc.integer()),
      object: fc.constant(object),
      created: fc.oneof(fc.integer(), fc.string()),
      model: fc.string(),
      choices: fc.oneof(
        {
          weight: 3,
          arbitrary: fc.array(
            fc.record(
              {
                index: fc.oneof({ weight: 3, arbitrary: fc.nat() }, fc.string()),
                [part]: fc.oneof(
                  {
                    weight: 3,
                    arbitrary: fc.record(
                      {
                        role: fc.oneof(
                          { weight: 3, arbitrary: fc.constant('assistant') },
                          fc.integer(),
                        ),
                        content: fc.oneof(fc.string(), fc.constant(null), fc.integer()),
                        refusal: fc.oneof(fc.string(), fc.constant(null)),
                        reasoning_content: fc.oneof(fc.string(), fc.constant(null)),
                        reasoning: fc.oneof(fc.string(), fc.constant(null), fc.nat()),
                        tool_calls: fc.array(
                          fc.record({ function: fc.record({ arguments: fc.string() }) }),
                        ),
                        audio: fc.record({ transcript: fc.string() }),
                      },
                      { requiredKeys: [] },
                    ),
                  },
                  fc.jsonValue(),
                ),
                finish_reason: fc.oneof(
                  fc.constantFrom('stop', 'length'),
                  fc.constant(null),
                  fc.integer(),
                ),
                logprobs: fc.jsonValue(),
              },
              { requiredKeys: [] },
            ),
            { maxLength: 3 },
          ),
        },
        fc.jsonValue(),
      ),
      usage: fc.oneof(
        fc.constant(null),
        fc.record(
          {
            prompt_tokens: fc.oneof(fc.nat(), fc.double(), fc.constant(2 ** 31)),
            completion_tokens: fc.nat(),
            total_tokens: fc.integer(),
            prompt_tokens_details: fc.jsonValue(),
          },
          { requiredKeys: [] },
        ),
      ),
    },
    { requiredKeys: [] },
  )

/**
 * A fast path against its schema: on whatever it accepts, the schema accepts too and gives an
 * equal value. The values are what JSON.parse returns (the fast paths' only input).
 */
function agrees<T>(
  arbitrary: fc.Arbitrary<unknown>,
  fast: (json: unknown) => T | undefined,
  schema: { safeParse(v: unknown): { success: boolean; data?: unknown } },
) {
  let taken = 0
  fc.assert(
    fc.property(fc.oneof({ weight: 3, arbitrary }, fc.jsonValue()), (value) => {
      const text = JSON.stringify(value)
      if (text === undefined || !Chat.fastPathFor(text)) return // the callers' rule
      const got = fast(JSON.parse(text))
      if (got === undefined) return
      taken++
      const parsed = schema.safeParse(JSON.parse(text))
      expect(parsed.success).toBe(true)
      expect(got as unknown).toEqual(parsed.data)
    }),
    { numRuns: 5000 },
  )
  // Not a fast path that declines everything. A completion, the rarest, takes it in about 2.8% of
  // runs (measured over 100,000): 138 of 5,000 on average, 50 is 7 standard deviations below.
  // Before the weights it was 1.3% (62 on average), and one CI run in about 16 fell under 50.
  expect(taken).toBeGreaterThan(50)
}

describe('asChunk', () => {
  test('property: the hand-written fast path accepts only what the Chunk schema accepts, with the same result', () => {
    agrees(answerLike('chat.completion.chunk', 'delta'), (json) => Chat.asChunk(json), Chat.Chunk)
  })

  test('behavior: the common chunk takes the fast path; tool calls and odd shapes do not', () => {
    expect(
      Chat.asChunk({ choices: [{ index: 0, delta: { content: 'hi' }, finish_reason: null }] }),
    ).toBeDefined()
    expect(
      Chat.asChunk({ choices: [], usage: { prompt_tokens: 1, completion_tokens: 2 } }),
    ).toBeDefined()
    expect(Chat.asChunk({ choices: [{ index: 0, delta: { tool_calls: [] } }] })).toBeUndefined()
    expect(Chat.asChunk({ choices: 'x' })).toBeUndefined()
    expect(Chat.asChunk([])).toBeUndefined()
  })

  test('behavior: a choice without an index is choice 0, filled in (the chunk then differs from its text)', () => {
    const filled = { filled: false }
    const chunk = Chat.asChunk({ choices: [{ delta: { content: 'Once' } }] }, filled)
    expect(chunk?.choices[0]?.index).toBe(0)
    expect(filled.filled).toBe(true)
    expect(Chat.Chunk.parse({ choices: [{ delta: { content: 'Once' } }] }).choices[0]!.index).toBe(
      0,
    )
  })
})

describe('asCompletion', () => {
  test('property: the hand-written fast path accepts only what the Completion schema accepts, with the same result', () => {
    agrees(answerLike('chat.completion', 'message'), Chat.asCompletion, Chat.Completion)
  })

  test('behavior: the common completion takes the fast path; tool calls and odd shapes do not', () => {
    const message = { role: 'assistant', content: 'hi' }
    const usage = { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 }
    expect(
      Chat.asCompletion({
        id: 'x',
        choices: [{ index: 0, message, finish_reason: 'stop' }],
        usage,
      }),
    ).toBeDefined()
    expect(
      Chat.asCompletion({ choices: [{ index: 0, message: { ...message, tool_calls: [] } }] }),
    ).toBeUndefined()
    expect(
      Chat.asCompletion({ choices: [{ index: 0, message: { content: 'hi' } }] }),
    ).toBeUndefined()
    expect(
      Chat.asCompletion({ choices: [{ index: 0, message }], usage: { prompt_tokens: 1 } }),
    ).toBeUndefined()
    // JSON.parse reads 1e400 as Infinity, which z.number() refuses.
    expect(
      Chat.asCompletion(
        JSON.parse(`{"choices":[{"index":1e400,"message":${JSON.stringify(message)}}]}`),
      ),
    ).toBeUndefined()
    expect(Chat.asCompletion({ usage })).toBeUndefined()
  })
})

/** A request of the common shape with at most one field changed to anything. */
const nearRequest = fc
  .tuple(
    fc.record(
      {
        model: fc.string({ minLength: 1 }),
        messages: fc.array(
          fc.record({
            role: fc.constantFrom('system', 'user', 'assistant'),
            content: fc.string(),
          }),
          { minLength: 1, maxLength: 3 },
        ),
        stream: fc.boolean(),
        temperature: fc.double({ min: 0, max: 2, noNaN: true }),
        max_tokens: fc.integer({ min: 1, max: 100_000 }),
        stop: fc.oneof(fc.string(), fc.array(fc.string(), { maxLength: 4 })),
        stream_options: fc.record({ include_usage: fc.boolean() }),
        user: fc.string(),
      },
      { requiredKeys: ['model', 'messages'] },
    ),
    fc.option(
      fc.tuple(
        fc.constantFrom(
          'model',
          'messages',
          'temperature',
          'top_p',
          'max_tokens',
          'max_completion_tokens',
          'n',
          'stream',
          'stop',
          'stream_options',
          'timeout_ms',
          'tools',
        ),
        fc.oneof(
          fc.jsonValue(),
          fc.integer({ min: -3, max: 3 }),
          fc.double({ min: -1, max: 3, noNaN: true }),
        ),
      ),
    ),
  )
  .map(([r, change]) => (change ? { ...r, [change[0]]: change[1] } : r))

describe('asRequest', () => {
  test('property: the hand-written fast path accepts only what the Request schema accepts, with the same result', () => {
    agrees(fc.oneof(nearRequest, requestLike), Chat.asRequest, Chat.Request)
  })

  test('behavior: the common request takes the fast path with its stream default; others go to the schema', () => {
    const messages = [{ role: 'user' as const, content: 'ping' }]
    expect(Chat.asRequest({ model: 'm', messages, max_tokens: 16 })).toEqual({
      model: 'm',
      messages,
      max_tokens: 16,
      stream: false,
    })
    // Null parameters, multimodal content and the gateway's own parameters take the schema.
    expect(Chat.asRequest({ model: 'm', messages, temperature: null })).toBeUndefined()
    expect(
      Chat.asRequest({
        model: 'm',
        messages: [{ role: 'user', content: [{ type: 'text', text: 'x' }] }],
      }),
    ).toBeUndefined()
    expect(Chat.asRequest({ model: 'm', messages, timeout_ms: 5 })).toBeUndefined()
    // JSON with a `__proto__` key takes no fast path at all.
    expect(Chat.fastPathFor('{"model":"m","__proto__":{"x":1}}')).toBe(false)
    expect(Chat.fastPathFor('{"model":"m"}')).toBe(true)
    // What the schema refuses, the fast path never takes.
    expect(
      Chat.asRequest({ model: 'm', messages: [{ role: 'bot', content: 'x' }] }),
    ).toBeUndefined()
    expect(Chat.asRequest({ model: '', messages })).toBeUndefined()
    expect(Chat.asRequest({ model: 'm', messages, max_tokens: 0 })).toBeUndefined()
    expect(
      Chat.asRequest({ model: 'm', messages, stop: ['a', 'b', 'c', 'd', 'e'] }),
    ).toBeUndefined()
  })

  test('error: stream_options without stream enabled is refused, naming stream_options (null is not given)', () => {
    const messages = [{ role: 'user' as const, content: 'ping' }]
    const options = { include_usage: true }
    for (const body of [
      { model: 'm', messages, stream_options: options },
      { model: 'm', messages, stream: false, stream_options: options },
      { model: 'm', messages, stream: null, stream_options: {} },
    ]) {
      expect(Chat.asRequest(structuredClone(body))).toBeUndefined()
      const r = Chat.Request.safeParse(body)
      expect(r.success).toBe(false)
      expect(r.error!.issues[0]!.path).toEqual(['stream_options'])
      expect(r.error!.issues[0]!.message).toBe(
        "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
      )
    }
    expect(Chat.asRequest({ model: 'm', messages, stream: true, stream_options: options })).toEqual(
      { model: 'm', messages, stream: true, stream_options: options },
    )
    expect(Chat.Request.safeParse({ model: 'm', messages, stream_options: null }).success).toBe(
      true,
    )
  })
})

describe('template', () => {
  // A chunk of the common flat shape, serialized by JSON.stringify or with every character
  // of its strings escaped (upstreams differ).
  const flatChunk = fc.record(
    {
      id: fc.string(),
      object: fc.constant('chat.completion.chunk'),
      created: fc.integer(),
      model: fc.string(),
      system_fingerprint: fc.oneof(fc.string(), fc.constant(null)),
      choices: fc.tuple(
        fc.record(
          {
            index: fc.nat(),
            delta: fc.record(
              {
                role: fc.constant('assistant'),
                content: fc.string({ unit: 'binary' }),
                reasoning_content: fc.oneof(fc.constant(null), fc.string()),
              },
              { requiredKeys: ['content'] },
            ),
            finish_reason: fc.constant(null),
            logprobs: fc.constant(null),
          },
          { requiredKeys: ['index', 'delta'] },
        ),
      ),
    },
    // A chunk without its id, object or created is not learned (see the test of other shapes).
    { requiredKeys: ['id', 'object', 'created', 'choices'] },
  )
  const escaped = (s: string) =>
    `"${[...s].map((c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`).join('')}"`
  const contentText = fc.oneof(
    fc.string({ unit: 'binary' }).map((s) => JSON.stringify(s).slice(1, -1)),
    fc.string({ maxLength: 8 }).map((s) => escaped(s).slice(1, -1)),
    // Not always valid: raw quotes, lone backslashes, control characters, JSON fragments.
    fc.string({ unit: fc.constantFrom('"', '\\', 'a', '\n', '\u0001', '}', ',', ':', 'u', '0') }),
  )

  test('property: a read chunk is exactly what JSON.parse gives; what is not JSON reads as undefined', () => {
    fc.assert(
      fc.property(flatChunk, fc.array(contentText, { maxLength: 8 }), (chunk, texts) => {
        const data = JSON.stringify(chunk)
        const parsed = Chat.asChunk(JSON.parse(data))!
        const t = Chat.template()
        t.learn(data, parsed)
        expect(t.read(data)?.chunk).toEqual(JSON.parse(data))
        const literal = JSON.stringify(chunk.choices[0].delta.content)
        const at = data.indexOf(`"content":${literal}`) + '"content":'.length
        for (const text of texts) {
          const other = `${data.slice(0, at)}"${text}"${data.slice(at + literal.length)}`
          let expected: unknown
          try {
            expected = JSON.parse(other)
          } catch {
            expected = undefined
          }
          const read = t.read(other)
          // One JSON string in the content's place: the same shape, read by template. Other
          // text may still be JSON of another shape (`","":"` adds a key): read or not, a read
          // chunk is what JSON.parse gives, and what is not JSON is never read.
          let one = true
          try {
            JSON.parse(`"${text}"`)
          } catch {
            one = false
          }
          if (one || read) expect(read?.chunk).toEqual(expected as never)
          if (expected === undefined) expect(read).toBeUndefined()
          // What the hot path reads without building the chunk agrees with it.
          if (read) {
            expect(read.json).toBe(other)
            expect(read.text).toBe(Chat.generated(read.chunk.choices[0]!.delta))
            expect(read.model).toBe(read.chunk.model)
          }
        }
      }),
      { numRuns: 2000 },
    )
  })

  test('property: any string reads as undefined or as exactly what JSON.parse gives', () => {
    const t = Chat.template()
    const data =
      '{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" w"},"finish_reason":null}]}'
    t.learn(data, Chat.asChunk(JSON.parse(data))!)
    // Learned: the template reads its own text, and another content (else every read below
    // is undefined and the property holds for nothing).
    expect(t.read(data)?.chunk).toEqual(JSON.parse(data))
    expect(t.read(data.replace('" w"', '" x"'))?.text).toBe(' x')
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), fc.nat(), fc.string(), (s, cut, insert) => {
        for (const other of [
          s,
          data.slice(0, cut % data.length) + insert + data.slice(cut % data.length),
        ]) {
          const read = t.read(other)
          if (read !== undefined) expect(read.chunk).toEqual(JSON.parse(other))
        }
      }),
      { numRuns: 5000 },
    )
  })

  test('behavior: a stream whose chunks never repeat outside the content is given up after 8; one that repeats keeps learning', () => {
    const chunk = (nonce: number, content = ' w') =>
      `{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","obfuscation":"${nonce}","choices":[{"index":0,"delta":{"content":"${content}"},"finish_reason":null}]}`
    // What the provider does with each chunk: read it by template, else parse it and learn it.
    const take = (t: ReturnType<typeof Chat.template>, data: string) => {
      const read = t.read(data)
      if (!read) t.learn(data, Chat.asChunk(JSON.parse(data))!)
      return read
    }
    const t = Chat.template()
    for (let n = 0; n < 8; n++) expect(take(t, chunk(n))).toBeUndefined()
    // Given up: a ninth shape is not learned, so its next chunk is not read by template.
    expect(take(t, chunk(100))).toBeUndefined()
    expect(take(t, chunk(100, ' x'))).toBeUndefined()

    // A stream that repeats its shape: every read resets the count.
    const u = Chat.template()
    for (let n = 0; n < 20; n++) {
      expect(take(u, chunk(n))).toBeUndefined()
      expect(take(u, chunk(n, ' x'))?.text).toBe(' x')
    }
  })

  test('behavior: other shapes are not learned (tool calls, two choices, usage, a finish reason, a repeated content key, no id, object or created)', () => {
    const header = '{"id":"x","object":"chat.completion.chunk","created":1,'
    for (const data of [
      `${header}"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}]}`,
      `${header}"choices":[{"index":0,"delta":{"tool_calls":[{"function":{"arguments":"x"}}]}}]}`,
      `${header}"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}`,
      `${header}"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}`,
      `${header}"choices":[{"index":0,"delta":{"content":"a","cont\\u0065nt":"b"}}]}`,
      `${header}"choices":[{"index":0,"delta":{"content":"a"}}],"x":{"content":"y"}}`,
      // The stream completes such a chunk (http/Sse.ts), which a template read would skip.
      '{"choices":[{"index":0,"delta":{"content":"a"}}]}',
    ]) {
      const t = Chat.template()
      t.learn(data, Chat.Chunk.parse(JSON.parse(data)))
      expect(t.read(data)).toBeUndefined()
    }
  })
})

describe('Message', () => {
  const call = { id: 'call_1', type: 'function', function: { name: 'weather', arguments: '{}' } }

  test('behavior: a conversation with tool calls parses: the call, then the tool result', () => {
    const r = Chat.Request.safeParse({
      model: 'm',
      messages: [
        { role: 'user', content: 'weather in Paris?' },
        { role: 'assistant', content: null, tool_calls: [call] },
        { role: 'tool', tool_call_id: 'call_1', content: 'sunny' },
        { role: 'function', name: 'weather', content: 'sunny' },
      ],
    })
    expect(r.success).toBe(true)
    // Unknown fields pass through to the upstream.
    expect((r.data!.messages[2] as Record<string, unknown>).tool_call_id).toBe('call_1')
  })

  test('behavior: an answer sent back as it came: tool_calls null, arguments an object or null', () => {
    for (const m of [
      { role: 'assistant', content: 'hello', tool_calls: null },
      {
        role: 'assistant',
        content: null,
        tool_calls: [{ function: { name: 'f', arguments: {} } }],
      },
      { role: 'assistant', content: null, tool_calls: [{ function: { arguments: null } }] },
      { role: 'assistant', content: null, tool_calls: [{ function: null }] },
    ])
      expect(Chat.Request.safeParse({ model: 'm', messages: [m] }).success).toBe(true)
    const args = { city: 'Paris' }
    expect(
      Chat.promptTexts({
        messages: [
          {
            role: 'assistant',
            content: null,
            tool_calls: [{ function: { name: 'f', arguments: args } }],
          },
        ],
      }),
    ).toEqual([`\nf\n${JSON.stringify(args)}`])
  })

  test('error: a tool message without content, an unknown role, tool_calls that are not a list', () => {
    const bad = [
      { role: 'tool', tool_call_id: 'call_1', content: null },
      { role: 'wizard', content: 'x' },
      { role: 'assistant', content: null, tool_calls: call },
    ]
    for (const m of bad)
      expect(Chat.Request.safeParse({ model: 'm', messages: [m] }).success).toBe(false)
  })
})

describe('promptTexts', () => {
  test('behavior: the content, the tool calls a message carries and the tool definitions', () => {
    const tools = [{ type: 'function', function: { name: 'weather', parameters: {} } }]
    const texts = Chat.promptTexts({
      messages: [
        { role: 'user', content: [{ type: 'text', text: 'weather' }] },
        {
          role: 'assistant',
          content: 'let me look',
          tool_calls: [{ function: { name: 'weather', arguments: '{"city":"Paris"}' } }],
        },
        { role: 'tool', content: 'sunny' },
      ],
      tools,
    })
    expect(texts).toEqual([
      'weather',
      'let me look\nweather\n{"city":"Paris"}',
      'sunny',
      JSON.stringify(tools),
    ])
  })

  test('behavior: without tools, one text a message', () => {
    expect(Chat.promptTexts({ messages: [{ role: 'user', content: 'hi' }] })).toEqual(['hi'])
  })
})

describe('outputTokens', () => {
  const usage = (completion: number, reasoning: number | undefined, total?: number) => ({
    prompt_tokens: 10,
    completion_tokens: completion,
    ...(total === undefined ? {} : { total_tokens: total }),
    ...(reasoning === undefined
      ? {}
      : { completion_tokens_details: { reasoning_tokens: reasoning } }),
  })

  test('behavior: an empty reasoning_content beside a reasoning text bills the reasoning text', () => {
    expect(Chat.generated({ content: 'Hi', reasoning_content: '', reasoning: 'Think.' })).toBe(
      'HiThink.',
    )
    // The same text in both (OpenRouter and others send both) is billed once.
    expect(Chat.generated({ reasoning_content: 'Think.', reasoning: 'Think.' })).toBe('Think.')
  })

  test('behavior: reasoning among the completion tokens (OpenAI) is not counted twice', () => {
    expect(Chat.outputTokens(usage(105, 100, 115))).toBe(105)
    expect(Chat.outputTokens(usage(105, 100))).toBe(105)
    expect(Chat.outputTokens(usage(100, 100, 110))).toBe(100)
  })

  test('behavior: a total holding more than the reasoning beside the completion tokens (cache tokens left out of prompt_tokens) does not make reasoning among them apart', () => {
    // 10 prompt, 50 completion of which 40 reasoning, 1000 cache tokens in the total only.
    expect(Chat.outputTokens(usage(50, 40, 1060))).toBe(50)
    expect(Chat.outputTokens(usage(50, 50, 1060))).toBe(50)
  })

  test('behavior: reasoning apart from the completion tokens (xAI, Gemini proxies) is added', () => {
    expect(Chat.outputTokens(usage(5, 100, 115))).toBe(105)
    expect(Chat.outputTokens(usage(0, 60, 70))).toBe(60)
    expect(Chat.outputTokens(usage(5, 100))).toBe(105)
    // A total above even that (Gemini's tool-use prompt tokens): still apart.
    expect(Chat.outputTokens(usage(5, 100, 130))).toBe(105)
  })

  test('behavior: no reasoning, or reasoning that is no count, leaves the completion tokens', () => {
    expect(Chat.outputTokens(usage(7, undefined, 17))).toBe(7)
    expect(Chat.outputTokens(usage(7, 0, 17))).toBe(7)
    expect(
      Chat.outputTokens({
        ...usage(7, undefined, 17),
        completion_tokens_details: { reasoning_tokens: 'x' },
      }),
    ).toBe(7)
    expect(Chat.outputTokens({ ...usage(7, undefined, 17), completion_tokens_details: null })).toBe(
      7,
    )
    expect(Chat.outputTokens(usage(7, 1.5, 17))).toBe(7)
  })

  test('behavior: the sum is capped at what a count may say', () => {
    expect(Chat.outputTokens(usage(Chat.MAX_TOKENS, Chat.MAX_TOKENS))).toBe(Chat.MAX_TOKENS)
  })
})

describe('shallow', () => {
  /** How deep a JSON value nests (a scalar: 0). */
  const depth = (v: unknown): number =>
    typeof v === 'object' && v !== null
      ? 1 + Math.max(0, ...Object.values(v as Record<string, unknown>).map(depth))
      : 0

  test('property: says whether JSON text nests at most MAX_DEPTH deep, whatever its strings hold', () => {
    // Strings full of what the scan must skip: quotes, backslashes, brackets.
    const tricky = fc.string({
      unit: fc.constantFrom('"', '\\', '[', ']', '{', '}', 'a', '\u00e9'),
    })
    const value = fc.jsonValue({ maxDepth: 3, stringUnit: 'grapheme' })
    fc.assert(
      fc.property(
        fc.integer({ min: Chat.MAX_DEPTH - 6, max: Chat.MAX_DEPTH + 3 }),
        fc.oneof(value, tricky),
        fc.boolean(),
        tricky,
        (levels, inner, objects, key) => {
          let v: unknown = inner
          for (let i = 0; i < levels; i++) v = objects ? { [key]: v } : [v]
          const text = JSON.stringify(v)
          expect(Chat.shallow(text)).toBe(depth(v) <= Chat.MAX_DEPTH)
        },
      ),
      { numRuns: 2000 },
    )
  })

  test('behavior: brackets inside strings are not nesting', () => {
    const text = JSON.stringify({ a: '['.repeat(5000), b: '\\"{'.repeat(2000) })
    expect(Chat.shallow(text)).toBe(true)
  })

  test('behavior: what JSON.parse takes and JSON.stringify overflows on is deep', () => {
    const levels = 200_000
    const text = `${'{"a":'.repeat(levels)}1${'}'.repeat(levels)}`
    expect(Chat.shallow(text)).toBe(false)
  })
})
