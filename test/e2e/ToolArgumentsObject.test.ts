/**
 * Tool calls whose `arguments` are a JSON object rather than the JSON string OpenAI sends, as
 * llama.cpp's server (with `--tool-args-object`, and by default for a while) and Hugging
 * Face's TGI answer: a valid answer, passed on as sent, its arguments billed as their JSON.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

const ARGS = { location: 'Paris, France', unit: 'celsius', days: [1, 2, 3] }
const call = { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: ARGS } }
const usage = { prompt_tokens: 40, completion_tokens: 20, total_tokens: 60 }

const url = Scripted.serve((body) => {
  const model = body.model as string
  // `…-counted`: no usage, so the gateway counts what it sent.
  const withUsage = !model.endsWith('-counted')
  if (body.stream)
    return Scripted.events([
      Scripted.chunk({ role: 'assistant', content: null }, null, model),
      Scripted.chunk({ tool_calls: [{ index: 0, ...call }] }, null, model),
      { ...Scripted.chunk({}, 'tool_calls', model), ...(withUsage ? { usage } : {}) },
    ])
  return Response.json({
    ...Scripted.completion({ content: null, tool_calls: [call] }, withUsage ? usage : undefined),
    model,
  })
})
const gw = await Scripted.gateway(url, ['llamacpp', 'llamacpp-counted'])
const messages = [{ role: 'user' as const, content: 'weather in Paris?' }]
const prompt = Tokenizer.prompt(messages)
const counted = Tokenizer.count(`get_weather${JSON.stringify(ARGS)}`)

test('behavior: a whole completion with object arguments is served as sent and charged the upstream usage', async () => {
  const { key } = await gw.account()
  const res = await gw.complete(key, { model: 'llamacpp', messages })
  expect(res.status).toBe(200)
  const body = (await res.json()) as {
    choices: { message: { tool_calls: unknown[] } }[]
    usage: Record<string, unknown>
  }
  expect(body.choices[0]!.message.tool_calls).toEqual([call])
  expect(body.usage).toMatchObject({ ...usage, cost: String(40 + 2 * 20) })
})

test('behavior: without usage, a whole completion with object arguments is charged their JSON', async () => {
  const { id, key } = await gw.account()
  const res = await gw.complete(key, { model: 'llamacpp-counted', messages })
  expect(res.status).toBe(200)
  const body = (await res.json()) as { usage: Record<string, unknown> }
  expect(body.usage).toMatchObject({ prompt_tokens: prompt, completion_tokens: counted })
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  expect(l.balance).toBe(1_000_000n - BigInt(prompt + 2 * counted))
})

test('behavior: without usage, a streamed call with object arguments is served and charged their JSON', async () => {
  const { id, key } = await gw.account()
  const res = await gw.complete(key, { model: 'llamacpp-counted', stream: true, messages })
  expect(res.status).toBe(200)
  const raw = await res.text()
  expect(raw).toContain(JSON.stringify(ARGS))
  expect(raw).not.toContain('"error"')
  await Batch.settled(gw.sql)
  const l = await Gateway.ledger(gw.sql, id)
  expect(l.balance).toBe(1_000_000n - BigInt(prompt + 2 * counted))
})
