/**
 * A refusal is output the model generated (OpenAI's `message.refusal`, streamed as
 * `delta.refusal`): metered like content. With an upstream that reports no usage, the gateway
 * counts what it sent, and a refusal it sent must be in that count.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

const REFUSAL =
  "I'm sorry, but I cannot help with that request in any way, shape or form whatsoever. " +
  'Asking again, or asking in other words, will not change the answer, which is that I will not ' +
  'do it, today or on any other day, for you or for anyone else who might ask me the same thing.'

const words = REFUSAL.split(' ').map((w, i) => (i === 0 ? w : ` ${w}`))
// No usage anywhere: the gateway counts what it sent.
const url = Scripted.serve((body) =>
  body.stream
    ? Scripted.events([
        Scripted.chunk({ role: 'assistant', content: null, refusal: '' }),
        ...words.map((w) => Scripted.chunk({ refusal: w })),
        Scripted.chunk({}, 'stop'),
      ])
    : Response.json(Scripted.completion({ content: null, refusal: REFUSAL })),
)
const gw = await Scripted.gateway(url, ['refuser'])
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
