/**
 * OpenAI's legacy function calling (`functions` in the request, `function_call` in the
 * answer) and an audio answer's `transcript` are generated output: metered, held to the
 * credits and charged as text and tool calls are.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

const ARGS = JSON.stringify({
  city: 'San Francisco',
  details: 'a long argument '.repeat(200),
})
const pieces: string[] = []
for (let i = 0; i < ARGS.length; i += 8) pieces.push(ARGS.slice(i, i + 8))
// No usage anywhere: the gateway counts what it sent.
const url = Scripted.serve((body) =>
  body.stream
    ? Scripted.events([
        Scripted.chunk({
          role: 'assistant',
          content: null,
          function_call: { name: 'get_weather', arguments: '' },
        }),
        ...pieces.map((p) => Scripted.chunk({ function_call: { arguments: p } })),
        Scripted.chunk({}, 'function_call'),
      ])
    : Response.json(
        Scripted.completion({
          content: null,
          function_call: { name: 'get_weather', arguments: ARGS },
        }),
      ),
)
const gw = await Scripted.gateway(url, ['fn'])
const messages = [{ role: 'user' as const, content: 'weather?' }]
const functions = [{ name: 'get_weather', parameters: { type: 'object', properties: {} } }]
const prompt = Tokenizer.prompt(messages)
// With the function definitions, which are prompt too (the upstream reads them).
const fnPrompt = Tokenizer.prompt([...messages, { content: JSON.stringify(functions) }])
const argTokens = pieces.reduce((n, p) => n + Tokenizer.count(p), 0)

async function post(key: string, stream: boolean) {
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'fn', messages, functions, stream }),
  })
  expect(res.status).toBe(200)
  return res.text()
}

/** The function call arguments a stream's body carried. */
function argumentsSent(body: string): string {
  let sent = ''
  for (const block of body.split('\n\n')) {
    if (!block.startsWith('data: {')) continue
    const d = JSON.parse(block.slice(6)) as {
      choices?: { delta?: { function_call?: { arguments?: string } } }[]
    }
    sent += d.choices?.[0]?.delta?.function_call?.arguments ?? ''
  }
  return sent
}

test('behavior: a streamed legacy function_call is charged the tokens it sent', async () => {
  const { id, key } = await gw.account()
  const body = await post(key, true)
  const sent = argumentsSent(body)
  expect(sent).toBe(ARGS)
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  // At least the tokens of the arguments as one text (a count per piece is higher).
  expect(1_000_000n - l.balance).toBeGreaterThanOrEqual(
    BigInt(fnPrompt + 2 * Tokenizer.count(ARGS)),
  )
  expect(1_000_000n - l.balance).toBeLessThanOrEqual(BigInt(fnPrompt + 2 * (argTokens + 4)))
})

test('behavior: a streamed legacy function_call is cut where the credits end', async () => {
  // Enough for the prompt and 20 tokens: not the whole function call.
  const { id, key } = await gw.account({ credits: BigInt(fnPrompt + 2 * 20) })
  const body = await post(key, true)
  const sent = argumentsSent(body)
  await Batch.settled(gw.sql)
  expect(Tokenizer.count(sent)).toBeLessThanOrEqual(20)
  // Charged at least what it sent (counted as one text), within its credits.
  const paid = BigInt(fnPrompt + 2 * 20) - (await Gateway.ledger(gw.sql, id)).balance
  expect(paid).toBeGreaterThanOrEqual(BigInt(fnPrompt + 2 * Tokenizer.count(sent)))
})

test('behavior: a whole legacy function_call without usage is charged its tokens', async () => {
  const { id, key } = await gw.account()
  await post(key, false)
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  expect(1_000_000n - l.balance).toBeGreaterThanOrEqual(
    BigInt(fnPrompt + 2 * Tokenizer.count(ARGS)),
  )
})

test('behavior: a streamed audio transcript without usage is charged the tokens it sent', async () => {
  const TRANSCRIPT = 'This is a spoken answer that goes on for a while. '.repeat(20)
  const parts: string[] = []
  for (let i = 0; i < TRANSCRIPT.length; i += 10) parts.push(TRANSCRIPT.slice(i, i + 10))
  const url2 = Scripted.serve(() =>
    Scripted.events([
      Scripted.chunk({ role: 'assistant', content: null, audio: { id: 'a', transcript: '' } }),
      ...parts.map((p) => Scripted.chunk({ audio: { transcript: p, data: 'AAAA' } })),
      Scripted.chunk({}, 'stop'),
    ]),
  )
  const gw2 = await Scripted.gateway(url2, ['audio'])
  const { id, key } = await gw2.account()
  const res = await fetch(`${gw2.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'audio', messages, stream: true, modalities: ['text', 'audio'] }),
  })
  const body = await res.text()
  expect(body).toContain('"transcript":"This is a "')
  await Batch.settled(gw2.sql)
  const l = await Gateway.ledger(gw2.sql, id)
  expect(1_000_000n - l.balance).toBeGreaterThanOrEqual(
    BigInt(prompt + 2 * Tokenizer.count(TRANSCRIPT)),
  )
})
