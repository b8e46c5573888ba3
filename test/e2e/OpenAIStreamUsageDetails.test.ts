/**
 * The usage details an upstream reports (prompt_tokens_details.cached_tokens,
 * completion_tokens_details.reasoning_tokens): a whole completion passes them on; a stream's
 * final usage chunk must too (the openai SDK's finalChatCompletion() reads them from it).
 */
import { expect, test } from 'bun:test'
import * as Scripted from '../helpers/Scripted.ts'

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
const url = Scripted.serve((body) =>
  body.stream
    ? Scripted.events([
        Scripted.chunk({ role: 'assistant', content: '' }),
        Scripted.chunk({ content: 'hi' }),
        Scripted.chunk({ content: ' there' }),
        Scripted.chunk({}, 'stop'),
        { ...Scripted.chunk({}), choices: [], usage },
      ])
    : Response.json(Scripted.completion({ content: 'hi there' }, usage)),
)
const gw = await Scripted.gateway(url, ['reasoner'])
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
