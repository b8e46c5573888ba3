/**
 * What the model reads and writes beside messages and text is metered as prompt and output:
 * OpenAI's custom tools (`type: "custom"`, whose calls carry free-text `input`), legacy
 * `functions` and a structured output's `response_format` schema. Each was forwarded
 * unmetered: a custom call's input streamed past the credits (and without the upstream's usage
 * was not charged at all), and the other parts were left out of the reservation.
 */
import { describe, expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

/** 400 one-token words of a custom tool's input, in 40 chunks. */
const INPUT = Array.from({ length: 40 }, (_, i) =>
  Array.from({ length: 10 }, (_, j) => ` w${i * 10 + j}`).join(''),
)
const inputTokens = Tokenizer.count(INPUT.join(''))
const call = (delta: object) => ({ tool_calls: [{ index: 0, ...delta }] })
/** A large definition: 1,500 words of description. */
const description = Array.from({ length: 1500 }, (_, i) => `word${i}`).join(' ')

const url = Scripted.serve((body) => {
  const model = body.model as string
  if (model === 'echo-usage') {
    // Counts, as OpenAI does, everything it reads as its prompt.
    const prompt = Tokenizer.count(
      JSON.stringify([body.messages, body.functions, body.tools, body.response_format]),
    )
    return Scripted.events([
      Scripted.chunk({ content: 'ok' }, null, model),
      Scripted.chunk({}, 'stop', model),
      {
        ...Scripted.chunk({}, null, model),
        choices: [],
        usage: { prompt_tokens: prompt, completion_tokens: 1 },
      },
    ])
  }
  const usage =
    model === 'custom-usage' ? { prompt_tokens: 8, completion_tokens: inputTokens + 2 } : undefined
  if (body.stream)
    return Scripted.events([
      Scripted.chunk(
        {
          role: 'assistant',
          ...call({ id: 'call_1', type: 'custom', custom: { name: 'shell', input: '' } }),
        },
        null,
        model,
      ),
      ...INPUT.map((piece) => Scripted.chunk(call({ custom: { input: piece } }), null, model)),
      Scripted.chunk({}, 'tool_calls', model),
      ...(usage ? [{ ...Scripted.chunk({}, null, model), choices: [], usage }] : []),
    ])
  return Response.json(
    Scripted.completion(
      {
        content: null,
        tool_calls: [
          { id: 'call_1', type: 'custom', custom: { name: 'shell', input: INPUT.join('') } },
        ],
      },
      usage,
      model,
    ),
  )
})
const gw = await Scripted.gateway(url, ['custom-usage', 'custom-no-usage', 'echo-usage'])
const messages = [{ role: 'user' as const, content: 'list the files' }]
const tools = [{ type: 'custom', custom: { name: 'shell', description: 'runs a shell command' } }]

async function run(key: string, body: Record<string, unknown>) {
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ messages, tools, ...body }),
  })
  const text = await res.text()
  await Batch.settled(gw.sql)
  return { status: res.status, text }
}

const usageOf = async (account: string) => {
  const [u] = await gw.sql`
    select status, prompt_tokens, completion_tokens, cost from usage where account_id = ${account}`
  return u as { status: string; prompt_tokens: number; completion_tokens: number; cost: bigint }
}

describe('custom tool calls are output', () => {
  test('behavior: a stream of a custom call input stops where the credits do, and what was sent is paid for', async () => {
    const prompt = Tokenizer.prompt([...messages, { content: JSON.stringify(tools) }])
    // The prompt and about 40 tokens of output: a tenth of the input.
    const credits = BigInt(prompt + 2 * 40)
    const { id, key } = await gw.account({ credits })
    const { status, text } = await run(key, { model: 'custom-usage', stream: true })
    expect(status).toBe(200)
    expect(text).toContain('insufficient_credits')
    expect(text).not.toContain(' w399')
    const sent = text
      .split('\n')
      .filter((l) => l.startsWith('data: {'))
      .map(
        (l) =>
          JSON.parse(l.slice(6)) as {
            choices: { delta: { tool_calls?: { custom?: { input?: string } }[] } }[]
          },
      )
      .flatMap((c) => (c.choices ?? []).flatMap((ch) => ch.delta.tool_calls ?? []))
      .map((t) => t.custom?.input ?? '')
      .join('')
    expect(sent.length).toBeGreaterThan(0)
    const l = await Gateway.ledger(gw.sql, id)
    expect(l.balance).toBeGreaterThanOrEqual(0n)
    expect(l.reserved).toBe(0n)
    // What reached the client is paid for: the charge covers the prompt and the input sent.
    const u = await usageOf(id)
    expect(u.cost).toBeGreaterThanOrEqual(BigInt(prompt + 2 * Tokenizer.count(sent)))
    expect(u.cost).toBeLessThanOrEqual(credits)
  })

  test('behavior: without the upstream usage, a custom call input is counted and charged, streamed or whole', async () => {
    for (const stream of [true, false]) {
      const { id, key } = await gw.account({ credits: 1_000_000n })
      const { status, text } = await run(key, { model: 'custom-no-usage', stream })
      expect(status).toBe(200)
      expect(text).toContain(' w399')
      const u = await usageOf(id)
      // The name and the 400 words of input (the count of a stream is by chunk).
      expect({ stream, atLeast: u.completion_tokens >= inputTokens }).toEqual({
        stream,
        atLeast: true,
      })
      expect(u.cost).toBe(BigInt(u.prompt_tokens + 2 * u.completion_tokens))
    }
  })
})

describe('what the upstream reads beside the messages is prompt', () => {
  const fn = { name: 'lookup', description, parameters: { type: 'object', properties: {} } }
  const schema = { type: 'object', description, properties: { a: { type: 'string' } } }
  for (const [name, body] of [
    ['tool definitions', { tools: [{ type: 'function', function: fn }] }],
    ['legacy functions', { tools: undefined, functions: [fn] }],
    [
      'a response_format schema',
      {
        tools: undefined,
        response_format: { type: 'json_schema', json_schema: { name: 's', schema } },
      },
    ],
    [
      'a custom call in the history',
      {
        tools: undefined,
        messages: [
          { role: 'user', content: 'hi' },
          {
            role: 'assistant',
            content: null,
            tool_calls: [
              { id: 'c1', type: 'custom', custom: { name: 'shell', input: description } },
            ],
          },
          { role: 'tool', tool_call_id: 'c1', content: 'done' },
        ],
      },
    ],
  ] as const)
    test(`error: ${name} counted at admission: credits short of them → 402 before the upstream, nothing charged`, async () => {
      // About a fifth of what the 1,500 words cost.
      const credits = 500n
      const { id, key } = await gw.account({ credits })
      const r = await run(key, { model: 'echo-usage', stream: true, ...body })
      expect(r.status).toBe(402)
      expect(r.text).toContain('insufficient_credits')
      expect((await Gateway.ledger(gw.sql, id)).balance).toBe(credits)
      // With the credits, served; the reservation held them.
      const rich = await gw.account({ credits: 1_000_000n })
      expect((await run(rich.key, { model: 'echo-usage', stream: true, ...body })).status).toBe(200)
    })
})
