/**
 * A stream that goes quiet (an upstream thinking between words, sending only its own SSE
 * comments, which the gateway does not forward) writes keep-alive comments of its own, so
 * that a proxy or client that cuts an idle connection keeps it; SSE readers skip them, and
 * the answer is whole.
 */
import { expect, test } from 'bun:test'
import * as Scripted from '../helpers/Scripted.ts'
import * as Sse from '../helpers/Sse.ts'

const PAUSE_MS = 3_000
const enc = new TextEncoder()
const event = (v: unknown) => enc.encode(`data: ${JSON.stringify(v)}\n\n`)
const url = Scripted.serve(
  () =>
    new Response(
      new ReadableStream({
        async start(c) {
          c.enqueue(event(Scripted.chunk({ role: 'assistant', content: 'hi' }, null, 'thinker')))
          // Quiet but for the upstream's own comments (its timeoutMs is not reached).
          for (let t = 0; t < PAUSE_MS; t += 250) {
            await Bun.sleep(250)
            c.enqueue(enc.encode(': upstream thinking\n\n'))
          }
          c.enqueue(event(Scripted.chunk({ content: ' there' }, 'stop', 'thinker')))
          c.enqueue(enc.encode('data: [DONE]\n\n'))
          c.close()
        },
      }),
      { headers: { 'content-type': 'text/event-stream' } },
    ),
)
// Quiet for half a second, a stream writes a keep-alive (the heartbeat looks each second).
const gw = await Scripted.gateway(url, ['thinker'], {}, { metering: { keepAliveSeconds: 0.5 } })

test('behavior: a quiet stream writes keep-alive comments; the client never waits the whole pause, and the answer is whole', async () => {
  const { key } = await gw.account()
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model: 'thinker',
      stream: true,
      messages: [{ role: 'user', content: 'hi' }],
    }),
  })
  const reader = res.body!.getReader()
  let last = performance.now()
  let longest = 0
  let text = ''
  for (let r = await reader.read(); !r.done; r = await reader.read()) {
    const now = performance.now()
    longest = Math.max(longest, now - last)
    last = now
    text += new TextDecoder().decode(r.value)
  }
  expect(text).toContain(': keep-alive\n\n')
  // The upstream's own comments are not forwarded; its pause is broken by the gateway's.
  expect(text).not.toContain('upstream thinking')
  expect(longest).toBeLessThan(PAUSE_MS - 1_000)
  expect(Sse.text(Sse.events(text))).toBe('hi there')
  expect(text.trimEnd().endsWith('data: [DONE]')).toBe(true)
})
