/**
 * `stream_options` besides include_usage (OpenAI's `include_obfuscation: false`, which turns
 * off the random padding field OpenAI adds to every chunk, to save bandwidth) reach the
 * upstream; the gateway only adds include_usage for its own metering.
 */
import { expect, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()

test('behavior: stream_options.include_obfuscation reaches the upstream beside include_usage', async () => {
  const { key } = await gw.account()
  const before = gw.upstream.received.length
  const stream = await gw.openai(key).chat.completions.create({
    model: 'fake',
    messages: [{ role: 'user', content: 'hello there' }],
    stream: true,
    stream_options: { include_obfuscation: false },
  })
  for await (const _ of stream);
  expect(gw.upstream.received[before]!.body.stream_options).toEqual({
    include_obfuscation: false,
    include_usage: true,
  })
})

test('behavior: a whole completion sends no stream_options upstream (OpenAI refuses them without stream)', async () => {
  const { key } = await gw.account()
  const before = gw.upstream.received.length
  await gw.openai(key).chat.completions.create({
    model: 'fake',
    messages: [{ role: 'user', content: 'hello there' }],
    stream_options: { include_usage: true, include_obfuscation: false },
  } as never)
  expect(gw.upstream.received[before]!.body.stream_options).toBeUndefined()
})
