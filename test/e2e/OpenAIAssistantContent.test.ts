/**
 * An assistant message in a history, as the openai SDK types it:
 * `content?: string | Array<ChatCompletionContentPartText | ChatCompletionContentPartRefusal> | null`
 * ("Required unless tool_calls or function_call is specified"): left out beside tool calls, or
 * given as refusal parts, it is a valid request.
 */
import { expect, test } from 'bun:test'
import type OpenAI from 'openai'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()
const call = {
  id: 'call_1',
  type: 'function' as const,
  function: { name: 'weather', arguments: '{"city":"Paris"}' },
}

test('behavior: an assistant message with tool calls and no content key is taken and forwarded as sent', async () => {
  const { key } = await gw.account()
  const before = gw.upstream.received.length
  const messages: OpenAI.ChatCompletionMessageParam[] = [
    { role: 'user', content: 'weather in Paris?' },
    { role: 'assistant', tool_calls: [call] },
    { role: 'tool', tool_call_id: 'call_1', content: 'sunny' },
    { role: 'user', content: 'thanks then' },
  ]
  const r = await gw
    .openai(key)
    .chat.completions.create({ model: 'fake', messages })
    .catch((e: Error) => e)
  expect(r instanceof Error ? r.message : 'ok').toBe('ok')
  expect(gw.upstream.received.length).toBe(before + 1)
  const sent = gw.upstream.received[before]!.body.messages as Record<string, unknown>[]
  expect(sent[1]!.tool_calls).toEqual([call])
})

test('behavior: an assistant message whose content is a refusal part is taken', async () => {
  const { key } = await gw.account()
  const messages: OpenAI.ChatCompletionMessageParam[] = [
    { role: 'user', content: 'something odd' },
    { role: 'assistant', content: [{ type: 'refusal', refusal: 'I cannot help with that.' }] },
    { role: 'user', content: 'something else then' },
  ]
  const r = await gw
    .openai(key)
    .chat.completions.create({ model: 'fake', messages })
    .catch((e: Error) => e)
  expect(r instanceof Error ? r.message : 'ok').toBe('ok')
})

test('error: a user message still needs its content, an assistant one may not be a number', async () => {
  const { key } = await gw.account()
  for (const m of [
    { role: 'user' },
    { role: 'tool', tool_call_id: 'x' },
    { role: 'assistant', content: 5 },
  ]) {
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}` },
      body: JSON.stringify({ model: 'fake', messages: [m] }),
    })
    expect(res.status).toBe(400)
    expect(((await res.json()) as { error: { param: string } }).error.param).toBe(
      'messages.0.content',
    )
  }
})
