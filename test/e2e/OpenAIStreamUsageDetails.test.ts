/**
 * The usage details an upstream reports (prompt_tokens_details.cached_tokens,
 * completion_tokens_details.reasoning_tokens): a whole completion passes them on; a stream's
 * final usage chunk must too (the openai SDK's finalChatCompletion() reads them from it).
 */
import { afterAll, expect, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'

const usage = {
  prompt_tokens: 20,
  completion_tokens: 40,
  total_tokens: 60,
  prompt_tokens_details: { cached_tokens: 16, audio_tokens: 0 },
  completion_tokens_details: {
    reasoning_tokens: 38,
    audio_tokens: 0,
    accepted_prediction_tokens: 0,
    rejected_prediction_tokens: 0,
  },
}
const chunk = (delta: Record<string, unknown>, finish: string | null = null) => ({
  id: 'c',
  object: 'chat.completion.chunk',
  created: 1,
  model: 'o',
  choices: [{ index: 0, delta, finish_reason: finish }],
})
const server = Bun.serve({
  port: 0,
  hostname: '127.0.0.1',
  async fetch(req) {
    const body = (await req.json()) as { stream?: boolean }
    if (!body.stream)
      return Response.json({
        id: 'c',
        object: 'chat.completion',
        created: 1,
        model: 'o',
        choices: [
          { index: 0, message: { role: 'assistant', content: 'hi there' }, finish_reason: 'stop' },
        ],
        usage,
      })
    const events = [
      chunk({ role: 'assistant', content: '' }),
      chunk({ content: 'hi' }),
      chunk({ content: ' there' }),
      chunk({}, 'stop'),
      { id: 'c', object: 'chat.completion.chunk', created: 1, model: 'o', choices: [], usage },
    ]
    const text = `${events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join('')}data: [DONE]\n\n`
    return new Response(text, { headers: { 'content-type': 'text/event-stream' } })
  },
})
afterAll(() => server.stop(true))

const gw = await Gateway.create({
  upstreams: [
    { name: 'reasoner', baseUrl: `http://127.0.0.1:${server.port}/v1`, timeoutMs: 2_000 },
  ],
  models: [
    {
      id: 'reasoner',
      upstream: 'reasoner',
      upstreamModel: 'o',
      pricing: { input: '1000000', output: '2000000' },
      contextLength: 4096,
    },
  ],
})
const messages = [{ role: 'user' as const, content: 'hi' }]

test('behavior: a whole completion carries the upstream usage details', async () => {
  const { key } = await gw.account()
  const r = await gw.openai(key).chat.completions.create({ model: 'reasoner', messages })
  expect(r.usage).toMatchObject(usage)
})

test('behavior: a stream final usage chunk carries the upstream usage details, with include_usage or without', async () => {
  const { key } = await gw.account()
  for (const include of [true, false]) {
    const stream = gw.openai(key).chat.completions.stream({
      model: 'reasoner',
      messages,
      ...(include ? { stream_options: { include_usage: true } } : {}),
    })
    const final = await stream.finalChatCompletion()
    expect(final.choices[0]!.message.content).toBe('hi there')
    expect({ include, usage: final.usage }).toMatchObject({ include, usage })
  }
})
