/**
 * OpenAI takes null for its optional parameters ("not given"), and the openai SDK's own types
 * allow it (`temperature?: number | null`, `max_tokens?: number | null`, `n?: number | null`,
 * `stream?: boolean | null`, ...): such a request must be served, not refused with a 400.
 */
import { expect, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()
const messages = [{ role: 'user' as const, content: 'the quick brown fox' }]

test('behavior: parameters sent as null (as the SDK types allow) are served as if left out', async () => {
  const { key } = await gw.account()
  const openai = gw.openai(key)
  for (const param of [
    'temperature',
    'top_p',
    'max_tokens',
    'max_completion_tokens',
    'n',
    'stream',
  ]) {
    const before = gw.upstream.received.length
    const r = await openai.chat.completions
      .create({ model: 'fake', messages, [param]: null } as never)
      .catch((e: Error) => e)
    expect({ param, error: r instanceof Error ? r.message : undefined }).toEqual({
      param,
      error: undefined,
    })
    expect((r as { choices: { message: { content: string } }[] }).choices[0]!.message.content).toBe(
      'the quick brown fox',
    )
    expect(gw.upstream.received.length).toBe(before + 1)
  }
})

test('behavior: a stream with the other parameters null is still a stream, metered', async () => {
  const { key } = await gw.account()
  const stream = await gw.openai(key).chat.completions.create({
    model: 'fake',
    messages,
    stream: true,
    temperature: null,
    top_p: null,
    max_tokens: null,
    n: null,
  })
  let text = ''
  let cost: string | undefined
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta.content ?? ''
    if (chunk.usage) cost = (chunk.usage as unknown as { cost: string }).cost
  }
  expect(text).toBe('the quick brown fox')
  expect(cost).toBeDefined()
})
