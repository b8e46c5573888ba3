/**
 * The metered stream path alone, in one process: an upstream's SSE body (1000 one-token
 * chunks, sent at once) through the OpenAI-compatible provider, the metering and the SSE
 * renderer to the response bytes, against a reservation in memory. No database, no client
 * sockets: the CPU a token costs in the code this path runs (plus the local upstream's
 * share, which is small), steadier than the whole-system numbers of streams.ts.
 *
 *   bun bench/meter.ts   → prints µs of CPU per token; BENCH_STREAMS (300) streams, 10 at once
 */
import { Hono } from 'hono'
import * as Sse from '../src/http/Sse.ts'
import * as Meter from '../src/metering/Meter.ts'
import * as OpenAICompatible from '../src/upstream/OpenAICompatible.ts'
import * as Harness from './Harness.ts'

const tokens = 1000
const streams = Number(process.env.BENCH_STREAMS ?? 300)

const chunk = Harness.tokenChunk
const usage = Harness.usageChunk(tokens)
const body = new TextEncoder().encode(
  `${`data: ${chunk}\n\n`.repeat(tokens)}data: ${usage}\n\ndata: [DONE]\n\n`,
)
const upstream = Bun.serve({
  port: 0,
  hostname: '127.0.0.1',
  fetch: () => new Response(body, { headers: { 'content-type': 'text/event-stream' } }),
})
const provider = OpenAICompatible.create({
  name: 'bench',
  baseUrl: `http://127.0.0.1:${upstream.port}/v1`,
  timeoutMs: 5000,
})

const app = new Hono()
app.get('/', async (c) => {
  let held = 1_000_000_000n
  const reservation: Meter.Reservation = {
    id: 'bench',
    get held() {
      return held
    },
    async extend(amount) {
      held += amount
      return true
    },
    async settle() {
      return { charged: 0n }
    },
  }
  const signal = new AbortController().signal
  const frames = Meter.stream({
    price: { input: 1n, output: 2n },
    promptTokens: 9,
    blockTokens: 64,
    reservation,
    chunks: await provider.stream({ model: 'bench', messages: [] }, signal),
    signal,
    startedAt: performance.now(),
  })
  return Sse.response(c, { frames, model: 'bench', includeUsage: false, abort() {}, done() {} })
})

const drain = async () => (await (await app.request('/')).arrayBuffer()).byteLength
for (let i = 0; i < 30; i++) await drain() // warm up
const cpu = process.cpuUsage()
const started = performance.now()
await Promise.all(
  Array.from({ length: 10 }, async () => {
    for (let i = 0; i < streams / 10; i++) await drain()
  }),
)
const used = process.cpuUsage(cpu)
const count = streams * tokens
console.log(
  `${((used.user + used.system) / count).toFixed(2)} µs CPU a token, ${Math.round(count / ((performance.now() - started) / 1000))} tokens/s (${streams} streams of ${tokens} tokens)`,
)
upstream.stop(true)
