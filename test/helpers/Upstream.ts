/**
 * A fake OpenAI-compatible upstream: a real HTTP server on a random loopback port. It
 * answers with the last user message, word by word (cut at max_tokens), with usage counted by the gateway's
 * tokenizer. The upstream model name picks a behaviour:
 *   fake            answers at once
 *   fake-slow       waits `slowMs` before each word
 *   fake-fail-mid   breaks the connection after 3 words
 *   fake-no-usage   sends no usage chunk
 *   fake-500        answers 500 before the first byte
 *   fake-hang       sends the first (empty) chunk, then nothing (whole: never answers)
 *   fake-stall      sends the first word, then nothing
 *   fake-400        rejects the request with an OpenAI error
 *   fake-429        answers 429 (rate limited), asking for a wait of 300 ms (retry-after-ms)
 *   fake-liar       answers as `fake`, and says its answer was 1000 completion tokens
 */
import { afterAll } from 'bun:test'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Chat from '../../src/upstream/Chat.ts'

export type Received = { model: string; body: Record<string, unknown>; aborted: boolean }

export type FakeUpstream = {
  url: string
  received: Received[]
  /** Requests whose client (the gateway) went away before the answer ended. */
  aborted(): number
  stop(): void
}

export function start(options: { slowMs?: number } = {}): FakeUpstream {
  const slowMs = options.slowMs ?? 50
  const received: Received[] = []
  const server = Bun.serve({
    port: 0,
    hostname: '127.0.0.1',
    idleTimeout: 0,
    async fetch(req) {
      const parsed: unknown = await req.json().catch(() => undefined)
      const body = (
        typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed) ? parsed : {}
      ) as Record<string, unknown>
      // A body it cannot use is a 400, as a real upstream answers, never a throw (thrown in a
      // server of a test file, it surfaces as an unhandled error between tests and breaks the
      // run's later files), and is not recorded among the requests tests count: seen in CI,
      // JSON-RPC posts of an earlier file's chain client still polling an anvil whose port
      // this server got, which a test counting its upstream calls then saw as two more.
      if (!Array.isArray(body.messages)) {
        const came = `keys ${Object.keys(body).join(', ')}`
        console.error(`fake upstream: ${req.method} ${new URL(req.url).pathname} with ${came}`)
        return Response.json(
          { error: { message: `fake upstream: a body with messages is needed (${came})` } },
          { status: 400 },
        )
      }
      const model = String(body.model)
      const record: Received = { model, body, aborted: false }
      received.push(record)
      req.signal.addEventListener('abort', () => {
        record.aborted = true
      })
      if (model === 'fake-500') return new Response('{"error":{"message":"boom"}}', { status: 500 })
      if (model === 'fake-429')
        return Response.json(
          {
            error: { message: 'Rate limit reached', type: 'requests', code: 'rate_limit_exceeded' },
          },
          { status: 429, headers: { 'retry-after-ms': '300', 'retry-after': '1' } },
        )
      if (model === 'fake-400')
        return Response.json(
          { error: { message: 'unsupported parameter: frobnicate' } },
          { status: 400 },
        )
      const messages = (body.messages as Chat.Message[]).map((m) => ({
        role: m.role,
        content: Chat.text(m.content),
      }))
      const last = messages.filter((m) => m.role === 'user').at(-1)?.content ?? ''
      const source = last.split(/\s+/).filter(Boolean)
      const max = body.max_tokens as number | undefined
      const words: string[] = []
      let tokens = 0
      for (let i = 0; i < source.length; i++) {
        const w = (i === 0 ? '' : ' ') + source[i]
        const n = Tokenizer.count(w)
        if (max !== undefined && tokens + n > max) break
        words.push(w)
        tokens += n
      }
      const said = model === 'fake-liar' ? 1000 : tokens
      const usage = {
        prompt_tokens: Tokenizer.prompt(messages),
        completion_tokens: said,
        total_tokens: Tokenizer.prompt(messages) + said,
      }
      const id = 'chatcmpl-fake'
      // A whole completion that never comes: answered only once the gateway gives up.
      if (!body.stream && model === 'fake-hang')
        await new Promise((resolve) => req.signal.addEventListener('abort', resolve))
      if (!body.stream)
        return Response.json({
          id,
          object: 'chat.completion',
          created: 1,
          model,
          choices: [
            {
              index: 0,
              message: { role: 'assistant', content: words.join('') },
              finish_reason: 'stop',
            },
          ],
          ...(model === 'fake-no-usage' ? {} : { usage }),
        })
      const enc = new TextEncoder()
      const event = (v: unknown) => enc.encode(`data: ${JSON.stringify(v)}\n\n`)
      const chunk = (delta: object, finish: string | null = null) =>
        event({
          id,
          object: 'chat.completion.chunk',
          created: 1,
          model,
          choices: [{ index: 0, delta, finish_reason: finish }],
        })
      const stream = new ReadableStream<Uint8Array>({
        async start(controller) {
          try {
            controller.enqueue(chunk({ role: 'assistant', content: '' }))
            if (model === 'fake-hang') return
            for (const [i, w] of words.entries()) {
              if (model === 'fake-slow') await Bun.sleep(slowMs)
              if (req.signal.aborted) return
              if (model === 'fake-fail-mid' && i === 3) {
                await Bun.sleep(20) // let what was sent leave first
                controller.error(new Error('upstream died'))
                return
              }
              controller.enqueue(chunk({ content: w }))
              if (model === 'fake-stall') return
            }
            controller.enqueue(chunk({}, 'stop'))
            if (model !== 'fake-no-usage')
              controller.enqueue(
                event({
                  id,
                  object: 'chat.completion.chunk',
                  created: 1,
                  model,
                  choices: [],
                  usage,
                }),
              )
            controller.enqueue(enc.encode('data: [DONE]\n\n'))
            controller.close()
          } catch {}
        },
      })
      return new Response(stream, { headers: { 'content-type': 'text/event-stream' } })
    },
  })
  const fake: FakeUpstream = {
    url: `http://127.0.0.1:${server.port}/v1`,
    received,
    aborted: () => received.filter((r) => r.aborted).length,
    stop: () => server.stop(true),
  }
  afterAll(() => fake.stop())
  return fake
}
