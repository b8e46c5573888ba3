/**
 * An agent's turns: each request sends the whole conversation so far, as chat clients and
 * agents do, so most of a request's text is messages the gateway has seen before. Agents
 * (BENCH_AGENTS, 8) each hold a conversation of their own: a system prompt of about 6 KB,
 * then turns that add an assistant reply (about 1 KB) and a user message or tool output
 * (about 2 KB); past BENCH_CONVERSATION_KB (100) it starts over with new text. Each agent sends
 * its next turn when the last is answered (closed loop), non-streaming, through an API key
 * with credits and plan limits on, to a local upstream that answers at once; the same turns
 * go to the upstream directly. Overhead = the gateway's latency percentile minus the
 * upstream's.
 *
 *   bun bench/conversations.ts   → prints a table, writes bench/results/conversations.{json,md}
 */
import * as Harness from './Harness.ts'

const agents = Number(process.env.BENCH_AGENTS ?? 8)
const conversationBytes = Number(process.env.BENCH_CONVERSATION_KB ?? 100) * 1024
const seconds = Number(process.env.BENCH_SECONDS ?? 10)
/** The seconds are spread over rounds in which the two targets take turns (the box drifts). */
const rounds = Number(process.env.BENCH_ROUNDS ?? 5)

type Message = { role: 'system' | 'user' | 'assistant'; content: string }

/** Pseudo-English words, the same on every run (a linear congruential generator). */
function words(seed: number, bytes: number): string {
  const syllables = ['ka', 'lo', 'mer', 'tin', 'as', 'ro', 'ble', 'quo', 'ze', 'ful', 'ing', 'st']
  let x = seed >>> 0
  const next = () => {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    return x
  }
  let out = ''
  while (out.length < bytes) {
    let w = ''
    for (let n = 1 + (next() % 3); n > 0; n--) w += syllables[next() % syllables.length]
    out += next() % 11 === 0 ? `${w}. ` : `${w} `
  }
  return out
}

/** One agent's conversation: its messages so far, grown a turn at a time. */
class Conversation {
  messages: Message[] = []
  private bytes = 0
  private turns = 0
  constructor(
    private readonly agent: number,
    private conversation = 0,
  ) {
    this.restart()
  }
  private seed() {
    return this.agent * 1_000_003 + this.conversation * 10_007 + this.turns
  }
  private restart() {
    this.conversation++
    this.turns = 0
    this.messages = [{ role: 'system', content: words(this.seed(), 6 * 1024) }]
    this.messages.push({ role: 'user', content: words(this.seed() + 1, 2 * 1024) })
    this.bytes = 8 * 1024
  }
  /** The turn after an answer: the reply and the next message, or a new conversation. */
  next() {
    this.turns++
    if (this.bytes > conversationBytes) return this.restart()
    this.messages.push({ role: 'assistant', content: words(this.seed(), 1024) })
    this.messages.push({ role: 'user', content: words(this.seed() + 1, 2 * 1024) })
    this.bytes += 3 * 1024
  }
}

type Target = { url: string; headers: Record<string, string>; pid: number }
type Sample = { latencies: number[]; errors: number; bytes: number; elapsed: number; cpu: number }

/** Every agent taking turns against `t` for `forSeconds`. */
async function drive(t: Target, all: Conversation[], forSeconds: number): Promise<Sample> {
  const latencies: number[] = []
  let errors = 0
  let bytes = 0
  const cpu0 = Harness.cpuSeconds(t.pid)
  const started = performance.now()
  const end = started + forSeconds * 1000
  await Promise.all(
    all.map(async (c) => {
      while (performance.now() < end) {
        const body = JSON.stringify({ model: 'bench', max_tokens: 16, messages: c.messages })
        const at = performance.now()
        const res = await fetch(t.url, { method: 'POST', headers: t.headers, body })
        await res.arrayBuffer()
        if (res.status !== 200) errors++
        else latencies.push(performance.now() - at)
        bytes += body.length
        c.next()
      }
    }),
  )
  const elapsed = (performance.now() - started) / 1000
  return { latencies, errors, bytes, elapsed, cpu: Harness.cpuSeconds(t.pid) - cpu0 }
}

export async function run() {
  const children: { proc: ReturnType<typeof Bun.spawn> }[] = []
  try {
    const servers = await Harness.upstreamAndProxy()
    children.push(...servers.children)
    const model = Harness.benchModel(servers.upstream)
    // Room for the whole conversation (about 4 characters a token).
    model.models[0]!.contextLength = conversationBytes
    const gateway = await Harness.gateway('tollway_bench_conversations', model)
    children.push(gateway.server)
    const { databaseUrl, key } = gateway
    const json = { 'content-type': 'application/json' }
    const targets: Record<string, Target> = {
      direct: {
        url: `${servers.upstream}/chat/completions`,
        headers: json,
        pid: servers.children[0]!.proc.pid,
      },
      gateway: {
        url: `${gateway.url}/v1/chat/completions`,
        headers: { ...json, authorization: `Bearer ${key}` },
        pid: gateway.server.proc.pid,
      },
    }
    // Each target its own agents, so that the gateway sees each conversation's turns in order.
    const conversations = Object.fromEntries(
      Object.keys(targets).map((name) => [
        name,
        Array.from({ length: agents }, (_, i) => new Conversation(i)),
      ]),
    )
    // Warm-up (JIT, connections, the database's statements).
    for (const [name, t] of Object.entries(targets)) await drive(t, conversations[name]!, 2)
    const samples: Record<string, Sample[]> = { direct: [], gateway: [] }
    for (let r = 0; r < rounds; r++)
      for (const [name, t] of Object.entries(targets))
        samples[name]!.push(await drive(t, conversations[name]!, seconds / rounds))
    const results = Object.fromEntries(
      Object.entries(samples).map(([name, all]) => {
        const latencies = all.flatMap((s) => s.latencies).sort((a, b) => a - b)
        const n = latencies.length
        const elapsed = all.reduce((a, s) => a + s.elapsed, 0)
        return [
          name,
          {
            rps: n / elapsed,
            p50: Harness.quantile(latencies, 0.5),
            p99: Harness.quantile(latencies, 0.99),
            errors: all.reduce((a, s) => a + s.errors, 0),
            kilobytes: all.reduce((a, s) => a + s.bytes, 0) / (n || 1) / 1024,
            cpuMs: (all.reduce((a, s) => a + s.cpu, 0) * 1000) / (n || 1),
          },
        ]
      }),
    )
    return {
      database: databaseUrl ? 'postgresql' : 'pglite',
      agents,
      conversationKilobytes: conversationBytes / 1024,
      seconds,
      rounds,
      results,
    }
  } finally {
    for (const c of children) c.proc.kill()
  }
}

export function table(r: Awaited<ReturnType<typeof run>>): string {
  const direct = r.results.direct!
  const lines = [
    '| target | requests/s | KB a request | p50 ms | p99 ms | overhead p50 ms | overhead p99 ms | CPU ms/request (target) | errors |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for (const [name, s] of Object.entries(r.results)) {
    const over = Harness.overhead(name, s, direct)
    lines.push(
      `| ${name} | ${Math.round(s.rps)} | ${s.kilobytes.toFixed(1)} | ${s.p50.toFixed(3)} | ${s.p99.toFixed(3)} | ${over[0]} | ${over[1]} | ${s.cpuMs.toFixed(3)} | ${s.errors} |`,
    )
  }
  lines.push(
    '',
    `${r.agents} agents, each resending its conversation (up to ${r.conversationKilobytes} KB) every turn; database: ${r.database}.`,
  )
  return lines.join('\n')
}

if (import.meta.main) {
  const r = await run()
  Harness.report('conversations', r, table(r))
}
