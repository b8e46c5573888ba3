/**
 * Answers whose content is an array of parts, as Mistral's reasoning models (Magistral) send
 * it, streamed and whole: `{"content":[{"type":"thinking","thinking":[{"type":"text","text":
 * "…"}]}]}` deltas, then the reply as text parts (or strings). A valid answer, served, and its
 * text (the thinking too) metered as any other generated text.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

const THINKING = ['Okay', ', the user', ' says hello', ', so I should', ' greet them back.']
const REPLY = ['Hello', '! How', ' can I help', '?']
const thought = (t: string) => [{ type: 'thinking', thinking: [{ type: 'text', text: t }] }]
const usage = { prompt_tokens: 9, completion_tokens: 30, total_tokens: 39 }

const url = Scripted.serve((body) => {
  const model = body.model as string
  // `…-counted`: no usage, so the gateway counts what it sent.
  const withUsage = !model.endsWith('-counted')
  if (body.stream)
    return Scripted.events([
      Scripted.chunk({ role: 'assistant', content: '' }, null, model),
      ...THINKING.map((t) => Scripted.chunk({ content: thought(t) }, null, model)),
      ...REPLY.map((t, i) =>
        Scripted.chunk({ content: i % 2 ? t : [{ type: 'text', text: t }] }, null, model),
      ),
      { ...Scripted.chunk({}, 'stop', model), ...(withUsage ? { usage } : {}) },
    ])
  return Response.json(
    Scripted.completion(
      {
        content: [
          { type: 'thinking', thinking: [{ type: 'text', text: THINKING.join('') }] },
          { type: 'text', text: REPLY.join('') },
        ],
      },
      withUsage ? usage : undefined,
      model,
    ),
  )
})
const gw = await Scripted.gateway(url, ['magistral', 'magistral-counted'])
const messages = [{ role: 'user' as const, content: 'hello' }]
const prompt = Tokenizer.prompt(messages)
/** What the gateway counts of the answer: the thinking, then the reply, as one text. */
const counted = Tokenizer.count(THINKING.join('') + REPLY.join(''))

type Delta = { content?: unknown }
/** The content of each chunk a stream sent, as sent. */
async function streamed(model: string, key: string) {
  const res = await gw.complete(key, { model, stream: true, messages })
  expect(res.status).toBe(200)
  const contents: unknown[] = []
  let final: Record<string, unknown> | undefined
  for (const line of (await res.text()).split('\n\n')) {
    if (!line.startsWith('data: {')) continue
    const chunk = JSON.parse(line.slice(6)) as {
      choices: { delta: Delta }[]
      usage?: Record<string, unknown>
    }
    const content = chunk.choices[0]?.delta.content
    if (content !== undefined && content !== '') contents.push(content)
    if (chunk.usage) final = chunk.usage
  }
  return { contents, usage: final }
}

test('behavior: a stream of content parts is served as sent and charged the upstream usage', async () => {
  const { id, key } = await gw.account()
  const { contents, usage: final } = await streamed('magistral', key)
  expect(contents).toEqual([
    ...THINKING.map(thought),
    ...REPLY.map((t, i) => (i % 2 ? t : [{ type: 'text', text: t }])),
  ])
  expect(final).toMatchObject({ ...usage, cost: String(9 + 2 * 30) })
  const l = await Gateway.ledger(gw.sql, id)
  expect(l.balance).toBe(1_000_000n - BigInt(9 + 2 * 30))
})

test('behavior: without usage, a stream of content parts is charged its thinking and reply text', async () => {
  const { id, key } = await gw.account()
  const { usage: final } = await streamed('magistral-counted', key)
  expect(final).toMatchObject({ prompt_tokens: prompt, completion_tokens: counted })
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  expect(l.balance).toBe(1_000_000n - BigInt(prompt + 2 * counted))
})

test('behavior: a whole completion of content parts is served as sent and charged the upstream usage', async () => {
  const { key } = await gw.account()
  const res = await gw.complete(key, { model: 'magistral', messages })
  expect(res.status).toBe(200)
  const body = (await res.json()) as {
    choices: { message: { content: unknown } }[]
    usage: Record<string, unknown>
  }
  expect(body.choices[0]!.message.content).toEqual([
    { type: 'thinking', thinking: [{ type: 'text', text: THINKING.join('') }] },
    { type: 'text', text: REPLY.join('') },
  ])
  expect(body.usage).toMatchObject({ ...usage, cost: String(9 + 2 * 30) })
})

test('behavior: without usage, a whole completion of content parts is charged its thinking and reply text', async () => {
  const { key } = await gw.account()
  const res = await gw.complete(key, { model: 'magistral-counted', messages })
  expect(res.status).toBe(200)
  const body = (await res.json()) as { usage: Record<string, unknown> }
  expect(body.usage).toMatchObject({ prompt_tokens: prompt, completion_tokens: counted })
})
