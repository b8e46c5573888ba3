/**
 * A refusal is output the model generated (OpenAI's `message.refusal`, streamed as
 * `delta.refusal`): metered like content. With an upstream that reports no usage, the gateway
 * counts what it sent, and a refusal it sent must be in that count.
 */
import { afterAll, expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'

const REFUSAL =
  "I'm sorry, but I cannot help with that request in any way, shape or form whatsoever. " +
  'Asking again, or asking in other words, will not change the answer, which is that I will not ' +
  'do it, today or on any other day, for you or for anyone else who might ask me the same thing.'

const words = REFUSAL.split(' ').map((w, i) => (i === 0 ? w : ` ${w}`))
const chunk = (delta: Record<string, unknown>, finish: string | null = null) => ({
  id: 'c',
  object: 'chat.completion.chunk',
  created: 1,
  model: 'r',
  choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
})
// No usage anywhere: the gateway counts what it sent.
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
        model: 'r',
        choices: [
          {
            index: 0,
            message: { role: 'assistant', content: null, refusal: REFUSAL },
            finish_reason: 'stop',
          },
        ],
      })
    const events = [
      chunk({ role: 'assistant', content: null, refusal: '' }),
      ...words.map((w) => chunk({ refusal: w })),
      chunk({}, 'stop'),
    ]
    const text = `${events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join('')}data: [DONE]\n\n`
    return new Response(text, { headers: { 'content-type': 'text/event-stream' } })
  },
})
afterAll(() => server.stop(true))

const gw = await Gateway.create({
  upstreams: [{ name: 'refuser', baseUrl: `http://127.0.0.1:${server.port}/v1`, timeoutMs: 2_000 }],
  models: [
    {
      id: 'refuser',
      upstream: 'refuser',
      upstreamModel: 'r',
      pricing: { input: '1000000', output: '2000000' },
      contextLength: 4096,
    },
  ],
})
const messages = [{ role: 'user' as const, content: 'do something bad' }]
const refusalTokens = words.reduce((n, w) => n + Tokenizer.count(w), 0)

test('behavior: a whole completion that is a refusal is charged its refusal tokens', async () => {
  const { key } = await gw.account()
  const r = await gw.openai(key).chat.completions.create({ model: 'refuser', messages })
  expect(r.choices[0]!.message.refusal).toBe(REFUSAL)
  expect(r.usage!.completion_tokens).toBe(Tokenizer.count(REFUSAL))
})

test('behavior: a streamed refusal is charged the refusal tokens it sent', async () => {
  const { id, key } = await gw.account()
  const stream = await gw.openai(key).chat.completions.create({
    model: 'refuser',
    messages,
    stream: true,
    stream_options: { include_usage: true },
  })
  let refusal = ''
  let completion: number | undefined
  for await (const c of stream) {
    refusal += (c.choices[0]?.delta as { refusal?: string } | undefined)?.refusal ?? ''
    if (c.usage) completion = c.usage.completion_tokens
  }
  expect(refusal).toBe(REFUSAL)
  expect(completion).toBe(refusalTokens)
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  const prompt = Tokenizer.prompt(messages)
  expect(l.balance).toBe(1_000_000n - BigInt(prompt + 2 * refusalTokens))
})

test('behavior: a streamed refusal is cut where the credits end, as content is', async () => {
  // Enough for the prompt and 20 tokens (admission holds a block of 16): not the whole refusal.
  const prompt = Tokenizer.prompt(messages)
  expect(refusalTokens).toBeGreaterThan(40)
  const { id, key } = await gw.account({ credits: BigInt(prompt + 2 * 20) })
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}` },
    body: JSON.stringify({ model: 'refuser', messages, stream: true }),
  })
  expect(res.status).toBe(200)
  const body = await res.text()
  let sent = ''
  for (const block of body.split('\n\n')) {
    if (!block.startsWith('data: {')) continue
    const d = JSON.parse(block.slice(6)) as { choices?: { delta?: { refusal?: string } }[] }
    sent += d.choices?.[0]?.delta?.refusal ?? ''
  }
  expect(sent.length).toBeLessThan(REFUSAL.length)
  expect(body).toContain('insufficient_credits')
  const l = await Gateway.ledger(gw.sql, id)
  expect(l.balance).toBeGreaterThanOrEqual(0n)
  expect(l.reserved).toBe(0n)
})
