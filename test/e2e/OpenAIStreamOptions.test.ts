/**
 * `stream_options` besides include_usage (OpenAI's `include_obfuscation: false`, which turns
 * off the random padding field OpenAI adds to every chunk, to save bandwidth) reach the
 * upstream; the gateway only adds include_usage for its own metering. Without `stream`,
 * they are a 400, as OpenAI's.
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

test('error: stream_options on a whole completion → 400 naming stream_options, as OpenAI answers; nothing sent upstream', async () => {
  const { key } = await gw.account()
  const before = gw.upstream.received.length
  for (const stream of [undefined, false]) {
    const res = await gw.complete(key, {
      model: 'fake',
      messages: [{ role: 'user', content: 'hello there' }],
      ...(stream === undefined ? {} : { stream }),
      stream_options: { include_usage: true, include_obfuscation: false },
    })
    expect(res.status).toBe(400)
    expect(((await res.json()) as { error: unknown }).error).toMatchObject({
      type: 'invalid_request_error',
      param: 'stream_options',
      message:
        "stream_options: The 'stream_options' parameter is only allowed when 'stream' is enabled.",
    })
  }
  // The openai SDK reads it as a BadRequestError naming the field.
  const refused = await gw
    .openai(key)
    .chat.completions.create({
      model: 'fake',
      messages: [{ role: 'user', content: 'hello there' }],
      stream_options: { include_usage: true },
    } as never)
    .catch((e: unknown) => e)
  expect(refused).toMatchObject({ status: 400, param: 'stream_options' })
  expect(gw.upstream.received.length).toBe(before)
  // A null one is not given: the completion is answered.
  const res = await gw.complete(key, {
    model: 'fake',
    messages: [{ role: 'user', content: 'hello there' }],
    stream_options: null,
  })
  expect(res.status).toBe(200)
  expect(gw.upstream.received[before]!.body.stream_options).toBeUndefined()
})
