/**
 * User content parts other than text, as the openai SDK types them (image_url, input_audio,
 * file): a vision or audio request through the gateway; content of no parts is refused.
 */
import { expect, test } from 'bun:test'
import type OpenAI from 'openai'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()

test('behavior: a user message with an image part reaches the upstream', async () => {
  const { key } = await gw.account()
  const before = gw.upstream.received.length
  const content: OpenAI.ChatCompletionContentPart[] = [
    { type: 'text', text: 'what is in this picture' },
    { type: 'image_url', image_url: { url: 'https://example.com/cat.png', detail: 'low' } },
  ]
  const r = await gw
    .openai(key)
    .chat.completions.create({ model: 'fake', messages: [{ role: 'user', content }] })
    .catch((e: Error) => e)
  expect(r instanceof Error ? r.message : 'ok').toBe('ok')
  expect(gw.upstream.received.length).toBe(before + 1)
  expect(
    (gw.upstream.received[before]!.body.messages as { content: unknown }[])[0]!.content,
  ).toEqual(content)
})

test('behavior: input_audio and file parts are taken too', async () => {
  const { key } = await gw.account()
  const parts: OpenAI.ChatCompletionContentPart[] = [
    { type: 'input_audio', input_audio: { data: 'UklGRg==', format: 'wav' } },
    { type: 'file', file: { file_id: 'file-abc' } },
  ]
  for (const part of parts) {
    const r = await gw
      .openai(key)
      .chat.completions.create({
        model: 'fake',
        messages: [{ role: 'user', content: [{ type: 'text', text: 'describe it' }, part] }],
      })
      .catch((e: Error) => e)
    expect({ part: part.type, result: r instanceof Error ? r.message : 'ok' }).toEqual({
      part: part.type,
      result: 'ok',
    })
  }
})

test('behavior: a part other than text is reserved and checked against the context as mediaPartTokens; the upstream usage settles the charge', async () => {
  const small = await Gateway.create({
    models: [
      {
        id: 'small',
        upstream: 'fake',
        upstreamModel: 'fake',
        pricing: { input: '1000000', output: '2000000' },
        contextLength: 1_500,
      },
    ],
    metering: { blockTokens: 16, mediaPartTokens: 600 },
  })
  const { id, key } = await small.account()
  const image = { type: 'image_url' as const, image_url: { url: 'https://example.com/a.png' } }
  const ask = (images: number) =>
    fetch(`${small.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
      body: JSON.stringify({
        model: 'small',
        messages: [
          {
            role: 'user',
            content: [{ type: 'text', text: 'compare these' }, ...Array(images).fill(image)],
          },
        ],
      }),
    })
  // Two images (1,200 tokens) and the text fit 1,500; three do not.
  const ok = await ask(2)
  expect(ok.status).toBe(200)
  const body = (await ok.json()) as { usage: { prompt_tokens: number; cost: string } }
  // The fake upstream counts the text alone: its count is what is charged.
  expect(body.usage.prompt_tokens).toBeLessThan(600)
  const l = await Gateway.ledger(small.sql, id)
  expect(1_000_000n - l.balance).toBe(BigInt(body.usage.cost))
  expect(l.reserved).toBe(0n)
  const over = await ask(3)
  expect(over.status).toBe(400)
  expect(((await over.json()) as { error: { code: string } }).error.code).toBe(
    'context_length_exceeded',
  )
})

test('error: a content part without a type, or a text part without its text, is a 400 naming the message', async () => {
  const { key } = await gw.account()
  for (const part of [{ image_url: { url: 'x' } }, { type: 'text' }, 'plain']) {
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
      body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: [part] }] }),
    })
    expect(res.status).toBe(400)
    expect(((await res.json()) as { error: { param: string } }).error.param).toStartWith(
      'messages.0.content',
    )
  }
})

test('error: content that is an empty array is a 400 naming that message content, as OpenAI answers; nothing sent upstream', async () => {
  const { key } = await gw.account()
  const before = gw.upstream.received.length
  for (const [messages, param] of [
    [[{ role: 'user', content: [] }], 'messages.0.content'],
    // An assistant's too: its content may be null or left out, not a list of no parts.
    [
      [
        { role: 'user', content: 'hi' },
        { role: 'assistant', content: [] },
        { role: 'user', content: 'go on' },
      ],
      'messages.1.content',
    ],
  ] as const) {
    const res = await gw.complete(key, { model: 'fake', messages })
    expect(res.status).toBe(400)
    expect(((await res.json()) as { error: unknown }).error).toMatchObject({
      type: 'invalid_request_error',
      code: 'invalid_value',
      param,
    })
  }
  expect(gw.upstream.received.length).toBe(before)
})
