/**
 * Answers whose JSON nests deeper than any answer does (a tool call's arguments as an object,
 * a content part's data, 200,000 levels in about a megabyte): JSON.parse takes them, and the
 * gateway's own JSON.stringify of what it made of them (a tool call's arguments billed as their
 * JSON, the answer re-serialized to the client) overflowed the stack, after the charge or
 * before the release. A malformed answer: refused as such, nothing charged, nothing held.
 */
import { expect, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

const LEVELS = 200_000
const deep = `${'{"a":'.repeat(LEVELS)}1${'}'.repeat(LEVELS)}`
const usage = '{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}'
/** Per model: the choice's message (whole) or delta (streamed), as JSON text. */
const answers: Record<string, string> = {
  arguments: `{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":${deep}}}]}`,
  parts: `{"role":"assistant","content":[{"type":"text","text":"hi"},{"type":"image","data":${deep}}]}`,
}

const url = Scripted.serve((body) => {
  const model = body.model as string
  const [kind, counted] = model.split('-') as [string, string | undefined]
  const message = answers[kind]!
  const tail = counted ? '' : `,"usage":${usage}`
  if (body.stream)
    return new Response(
      [
        '{"choices":[{"index":0,"delta":{"content":"Hello"}}]}',
        `{"choices":[{"index":0,"delta":${message}}]}`,
        `{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]${tail}}`,
        '[DONE]',
      ]
        .map((e) => `data: ${e}\n\n`)
        .join(''),
      { headers: { 'content-type': 'text/event-stream' } },
    )
  return new Response(
    `{"id":"c","object":"chat.completion","created":1,"model":"${model}","choices":[{"index":0,"message":${message},"finish_reason":"stop"}]${tail}}`,
    { headers: { 'content-type': 'application/json' } },
  )
})
const models = ['arguments', 'arguments-counted', 'parts', 'parts-counted']
const gw = await Scripted.gateway(url, models)
const messages = [{ role: 'user' as const, content: 'hi' }]

for (const model of models) {
  test(`error: a whole completion nested too deep (${model}) is a malformed answer, nothing charged or held`, async () => {
    const { id, key } = await gw.account()
    const res = await gw.complete(key, { model, messages })
    expect(res.status).toBe(502)
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe(
      'bad_upstream_response',
    )
    const l = await Gateway.ledger(gw.sql, id)
    expect(l.balance).toBe(1_000_000n)
    expect(l.reserved).toBe(0n)
    expect(l.open_reservations).toBe(0n)
  }, 30_000)

  test(`error: a stream nested too deep (${model}) ends with a malformed answer, charged what was sent`, async () => {
    const { id, key } = await gw.account()
    const res = await gw.complete(key, { model, stream: true, messages })
    expect(res.status).toBe(200)
    const text = await res.text()
    expect(text).toContain('"code":"bad_upstream_response"')
    expect(text).not.toContain('internal_error')
    const l = await Gateway.released(gw.sql, id)
    expect(l.reserved).toBe(0n)
    expect(l.open_reservations).toBe(0n)
    // The prompt and "Hello", sent before: at most a few tokens.
    expect(1_000_000n - l.balance).toBeLessThan(40n)
  }, 30_000)
}
