/**
 * What an upstream's answer is charged when its usage disagrees with what it sent (the
 * counts are capped by the model's context and the output limit, never by the account's
 * whole balance), and output in OpenAI's legacy shapes (`function_call`, an audio answer's
 * `transcript`), metered as any other generated text.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

const WORDS = ['Hello', ' there', ',', ' friend', '.']
const url = Scripted.serve((body) => {
  const model = body.model as string
  const usage =
    model === 'liar-completion'
      ? { prompt_tokens: 10, completion_tokens: 100_000, total_tokens: 100_010 }
      : model === 'liar-prompt'
        ? { prompt_tokens: 100_000, completion_tokens: 5, total_tokens: 100_005 }
        : { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 }
  if (body.stream)
    return Scripted.events([
      Scripted.chunk({ role: 'assistant', content: '' }, null, model),
      ...WORDS.map((w) => Scripted.chunk({ content: w }, null, model)),
      Scripted.chunk({}, 'stop', model),
      { id: 'c', object: 'chat.completion.chunk', created: 1, model, choices: [], usage },
    ])
  return Response.json(Scripted.completion({ content: WORDS.join('') }, usage, model))
})
const gw = await Scripted.gateway(url, ['liar-completion', 'liar-prompt'])
const messages = [{ role: 'user' as const, content: 'say hello' }]
const prompt = Tokenizer.prompt(messages)
const delivered = WORDS.reduce((n, w) => n + Tokenizer.count(w), 0)
const CREDITS = 1_000_000n

async function run(key: string, model: string, stream: boolean) {
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model, messages, stream }),
  })
  expect(res.status).toBe(200)
  return res.text()
}

test('behavior: a stream without max_tokens is charged no more completion tokens than its context leaves, whatever the upstream claims', async () => {
  const { id, key } = await gw.account({ credits: CREDITS })
  await run(key, 'liar-completion', true)
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  const charged = CREDITS - l.balance
  // 5 tokens were delivered; the model cannot have written more than its context (4096).
  expect(charged).toBeLessThanOrEqual(BigInt(prompt + 2 * 4096))
})

test('behavior: a stream is charged no more prompt tokens than the context holds, whatever the upstream claims', async () => {
  const { id, key } = await gw.account({ credits: CREDITS })
  await run(key, 'liar-prompt', true)
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  const charged = CREDITS - l.balance
  expect(charged).toBeLessThanOrEqual(BigInt(4096 + 2 * delivered))
})

test('behavior: a whole completion is charged no more prompt tokens than the context holds, whatever the upstream claims', async () => {
  const { id, key } = await gw.account({ credits: CREDITS })
  await run(key, 'liar-prompt', false)
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  const charged = CREDITS - l.balance
  expect(charged).toBeLessThanOrEqual(BigInt(4096 + 2 * delivered))
})

// An upstream that ignores max_tokens (or takes another parameter for it): its answer, all of
// it delivered, is charged; one that claims more than it sent is charged what it sent.
const LONG = Array.from({ length: 100 }, (_, i) => ` w${i}`)
const longCount = Tokenizer.count(LONG.join(''))
const unlimited = Scripted.serve((body) => {
  const model = body.model as string
  const usage = (n: number) => ({ prompt_tokens: 10, completion_tokens: n, total_tokens: 10 + n })
  const claimed = model === 'overclaims' ? 100_000 : longCount
  if (body.stream)
    return Scripted.events([
      ...LONG.map((w) => Scripted.chunk({ content: w }, null, model)),
      Scripted.chunk({}, 'length', model),
      {
        id: 'c',
        object: 'chat.completion.chunk',
        created: 1,
        model,
        choices: [],
        usage: usage(claimed),
      },
    ])
  return Response.json(Scripted.completion({ content: LONG.join('') }, usage(claimed), model))
})
const ignoring = await Scripted.gateway(unlimited, ['ignores-max', 'overclaims'])

test('behavior: an upstream that ignores max_tokens is charged what it delivered, streamed or whole; one that also claims more, what it delivered', async () => {
  for (const model of ['ignores-max', 'overclaims'])
    for (const stream of [true, false]) {
      const { id, key } = await ignoring.account({ credits: CREDITS })
      const res = await fetch(`${ignoring.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model, messages, stream, max_tokens: 5 }),
      })
      expect(res.status).toBe(200)
      await res.text()
      await Batch.settled(ignoring.sql)
      const [usage] = await ignoring.sql<{ completion_tokens: number }[]>`
        select completion_tokens from usage where account_id = ${id}`
      expect([model, stream, usage!.completion_tokens]).toEqual([model, stream, longCount])
      const l = await Gateway.ledger(ignoring.sql, id)
      expect(l.reserved).toBe(0n)
      // The prompt as the upstream counts it (10), the completion as delivered.
      expect(CREDITS - l.balance).toBe(BigInt(10 + 2 * longCount))
    }
})
