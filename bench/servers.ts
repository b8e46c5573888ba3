/**
 * The servers the gateway benchmark measures against, each run as its own process:
 *   bun bench/servers.ts upstream <port>        an OpenAI-compatible upstream that answers at once
 *                                               (streams: max_tokens one-word chunks, then usage)
 *   bun bench/servers.ts proxy <port> <target>  a bare Hono pass-through proxy (the ceiling)
 */
import { Hono } from 'hono'

const [kind, port, target] = process.argv.slice(2)

if (kind === 'upstream') {
  const body = JSON.stringify({
    id: 'chatcmpl-bench',
    object: 'chat.completion',
    created: 1,
    model: 'bench',
    choices: [{ index: 0, message: { role: 'assistant', content: 'pong' }, finish_reason: 'stop' }],
    usage: { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 },
  })
  Bun.serve({
    port: Number(port),
    hostname: '127.0.0.1',
    async fetch(req) {
      const request = (await req.json()) as { stream?: boolean; max_tokens?: number }
      if (!request.stream)
        return new Response(body, { headers: { 'content-type': 'application/json' } })
      const n = request.max_tokens ?? 100
      const head =
        '{"id":"c","object":"chat.completion.chunk","created":1,"model":"bench","choices":[{"index":0,"delta":{"content":" w"},"finish_reason":null}]}'
      const usage = `{"id":"c","object":"chat.completion.chunk","created":1,"model":"bench","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":${n},"total_tokens":${n + 9}}}`
      const text = `${`data: ${head}\n\n`.repeat(n)}data: ${usage}\n\ndata: [DONE]\n\n`
      return new Response(text, { headers: { 'content-type': 'text/event-stream' } })
    },
  })
} else if (kind === 'proxy') {
  const app = new Hono()
  app.post('/v1/chat/completions', async (c) => {
    const res = await fetch(`${target}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: await c.req.arrayBuffer(),
    })
    return new Response(res.body, {
      status: res.status,
      headers: { 'content-type': 'application/json' },
    })
  })
  Bun.serve({ port: Number(port), hostname: '127.0.0.1', fetch: app.fetch })
} else {
  console.error('usage: bun bench/servers.ts upstream <port> | proxy <port> <target>')
  process.exit(2)
}
console.log('ready')
