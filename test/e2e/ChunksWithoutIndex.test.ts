/**
 * A stream whose chunks carry no choice `index`, as GetInference documents its stream output
 * (references/002: `data: {"choices":[{"delta":{"content":"Once"}}]}`, no id, no model, no
 * finish_reason, then `[DONE]`): a valid answer of one choice, served and metered as choice 0,
 * with what OpenAI's SDKs read and the upstream left out (`id`, `object`, `created`, the role)
 * filled in.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'
import * as Sse from '../helpers/Sse.ts'

const WORDS = ['Once', ' upon', ' a', ' time']
const url = Scripted.serve((body) =>
  body.stream
    ? Scripted.events(WORDS.map((w) => `{"choices":[{"delta":{"content":${JSON.stringify(w)}}}]}`))
    : Response.json({
        choices: [
          { message: { role: 'assistant', content: WORDS.join('') }, finish_reason: 'stop' },
        ],
      }),
)
const gw = await Scripted.gateway(url, ['getinference'])
const messages = [{ role: 'user' as const, content: 'Write a poem' }]

test('behavior: chunks without a choice index are served, each as choice 0, and charged what was sent', async () => {
  const { id, key } = await gw.account()
  const res = await gw.complete(key, { model: 'getinference', stream: true, messages })
  expect(res.status).toBe(200)
  const raw = await res.text()
  const events = Sse.events(raw)
  expect(Sse.text(events)).toBe(WORDS.join(''))
  const chunks = Sse.json(raw)
  for (const c of chunks)
    for (const choice of c.choices as { index?: unknown }[]) expect(choice.index).toBe(0)
  const completion = Tokenizer.count(WORDS.join(''))
  const prompt = Tokenizer.prompt(messages)
  expect(chunks.at(-1)!.usage).toMatchObject({
    prompt_tokens: prompt,
    completion_tokens: completion,
    cost: String(prompt + 2 * completion),
  })
  expect(events.at(-1)!.data).toBe('[DONE]')
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  expect(l.balance).toBe(1_000_000n - BigInt(prompt + 2 * completion))
})

test('behavior: the openai SDK iterates such a stream as choice 0', async () => {
  const { key } = await gw.account()
  const stream = await gw
    .openai(key)
    .chat.completions.create({ model: 'getinference', messages, stream: true })
  let text = ''
  for await (const c of stream) {
    expect(c.choices.map((choice) => choice.index)).toEqual([0])
    text += c.choices[0]!.delta.content ?? ''
  }
  expect(text).toBe(WORDS.join(''))
})

test('behavior: such chunks reach the client with an id, object and created, and the choice its role', async () => {
  const { key } = await gw.account()
  const res = await gw.complete(key, { model: 'getinference', stream: true, messages })
  const chunks = Sse.json(await res.text())
  // One id and time for the stream, as OpenAI's chunks share theirs.
  expect(new Set(chunks.map((c) => c.id)).size).toBe(1)
  expect(new Set(chunks.map((c) => c.created)).size).toBe(1)
  for (const c of chunks) {
    expect(c.id).toStartWith('chatcmpl-')
    expect(c.object).toBe('chat.completion.chunk')
    expect(typeof c.created).toBe('number')
    expect(c.model).toBe('getinference')
  }
  const first = chunks[0]!.choices as { delta: { role?: string } }[]
  expect(first[0]!.delta.role).toBe('assistant')
})

test('behavior: a whole completion without an id, object or created reaches the client with them', async () => {
  const { key } = await gw.account()
  const completion = await gw
    .openai(key)
    .chat.completions.create({ model: 'getinference', messages })
  expect(completion).toMatchObject({
    id: expect.stringMatching(/^chatcmpl-/),
    object: 'chat.completion',
    created: expect.any(Number),
    model: 'getinference',
  })
  expect(completion.choices[0]!.message.content).toBe(WORDS.join(''))
})

test('behavior: such a stream, ended by [DONE] with no finish_reason, finishes its choice with stop; the openai SDK stream helper takes it', async () => {
  const { key } = await gw.account()
  const plain = Sse.json(
    await (await gw.complete(key, { model: 'getinference', stream: true, messages })).text(),
  )
  expect(plain.at(-1)!.choices).toEqual([{ index: 0, delta: {}, finish_reason: 'stop' }])
  const withUsage = Sse.json(
    await (
      await gw.complete(key, {
        model: 'getinference',
        stream: true,
        stream_options: { include_usage: true },
        messages,
      })
    ).text(),
  )
  expect(withUsage.at(-2)!.choices).toEqual([{ index: 0, delta: {}, finish_reason: 'stop' }])
  expect(withUsage.at(-1)!.choices).toEqual([])
  // The SDK's helper fails a choice that never had a finish_reason ("missing finish_reason for
  // choice 0"), as it fails one that never had a role.
  const completion = await gw
    .openai(key)
    .chat.completions.stream({ model: 'getinference', messages })
    .finalChatCompletion()
  expect(completion.choices[0]!).toMatchObject({
    finish_reason: 'stop',
    message: { role: 'assistant', content: WORDS.join('') },
  })
})
