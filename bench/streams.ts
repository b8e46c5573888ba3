/**
 * Streaming throughput: many concurrent streams of 100 tokens each (BENCH_TOKENS), in a
 * closed loop, to a local upstream that streams at once — through a bare Hono pass-through
 * proxy (the ceiling), through the gateway with an API key, and through the gateway paid from
 * channels (one channel per concurrent stream: a channel carries one stream at a time).
 * Reports tokens/s, time to first token and the target process's CPU.
 *
 *   bun bench/streams.ts   → prints a table, writes bench/results/streams.{json,md}
 *
 * Knobs: BENCH_SECONDS (per run, 5), BENCH_STREAMS (levels, "100,1000"), BENCH_PAID_STREAMS
 * (100), BENCH_TARGETS (which of "proxy,key,paid" to run), BENCH_TOKENS (per stream, 100),
 * BENCH_BLOCK_TOKENS (the gateway's metering.blockTokens), BENCH_PROFILE_DIR (runs the
 * gateway with `--cpu-prof` into it; the profile is written as the gateway stops).
 */
import { privateKeyToAccount } from 'viem/accounts'
import * as Client from '../src/chain/Client.ts'
import * as DevChain from '../src/chain/DevChain.ts'
import * as Token from '../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../src/client/Session.ts'
import * as Harness from './Harness.ts'

const seconds = Number(process.env.BENCH_SECONDS ?? 5)
const levels = (process.env.BENCH_STREAMS ?? '100,1000').split(',').map(Number)
const paidLevels = (process.env.BENCH_PAID_STREAMS ?? '100,1000').split(',').map(Number)
const paidLevel = Math.max(...paidLevels)
const targets = new Set((process.env.BENCH_TARGETS ?? 'proxy,key,paid').split(','))
const blockTokens = process.env.BENCH_BLOCK_TOKENS
const profileDir = process.env.BENCH_PROFILE_DIR
const tokens = Number(process.env.BENCH_TOKENS ?? 100)

type Stats = {
  streams: number
  tokensPerSecond: number
  ttftP50: number
  ttftP99: number
  cpuPerSecond: number
  /** The load generator's own CPU (this process): it must not be the bottleneck. */
  clientCpuPerSecond: number
  errors: number
}

async function load(
  url: string,
  headers: (i: number) => Record<string, string>,
  streams: number,
  pid: number,
): Promise<Stats> {
  const body = JSON.stringify({
    model: 'bench',
    stream: true,
    max_tokens: tokens,
    messages: [{ role: 'user', content: 'go' }],
  })
  let received = 0
  let errors = 0
  const ttft: number[] = []
  const end = performance.now() + seconds * 1000
  const cpu0 = Harness.cpuSeconds(pid)
  const client0 = process.cpuUsage()
  const started = performance.now()
  await Promise.all(
    Array.from({ length: streams }, async (_, i) => {
      while (performance.now() < end) {
        const t = performance.now()
        const res = await fetch(url, {
          method: 'POST',
          headers: { 'content-type': 'application/json', ...headers(i) },
          body,
        })
        if (res.status !== 200) {
          errors++
          await res.arrayBuffer()
          continue
        }
        const reader = res.body!.getReader()
        let first = true
        while (true) {
          const { value, done } = await reader.read()
          if (done) break
          if (first) {
            ttft.push(performance.now() - t)
            first = false
          }
          // One `"content":" w"` per token, whatever the chunking.
          const text = new TextDecoder().decode(value)
          received += text.split('"content":" w"').length - 1
        }
      }
    }),
  )
  const elapsed = (performance.now() - started) / 1000
  ttft.sort((a, b) => a - b)
  const at = (q: number) => Harness.quantile(ttft, q)
  return {
    streams,
    tokensPerSecond: received / elapsed,
    ttftP50: at(0.5),
    ttftP99: at(0.99),
    cpuPerSecond: (Harness.cpuSeconds(pid) - cpu0) / elapsed,
    clientCpuPerSecond: (() => {
      const c = process.cpuUsage(client0)
      return (c.user + c.system) / 1e6 / elapsed
    })(),
    errors,
  }
}

export async function run() {
  const children: { proc: { kill(): void; exited: Promise<number> } }[] = []
  const chain = await DevChain.start({ accounts: paidLevel + 1 })
  try {
    const servers = await Harness.upstreamAndProxy()
    children.push(...servers.children)
    const { upstream, proxyPort, proxy } = servers
    const databaseUrl = await Harness.freshDatabase('tollway_bench_streams')
    const { dir, config } = Harness.dataDir({
      logLevel: 'warn',
      ...Harness.benchModel(upstream),
      plans: {
        bench: { tier: 0, requestsPerMinute: null, maxConcurrent: null, tokensPerMonth: null },
      },
      defaultPlan: 'bench',
      payments: { voucherRatePerSecond: 1e9 },
      ...(blockTokens ? { metering: { blockTokens: Number(blockTokens) } } : {}),
    })
    const port = await Harness.freePort()
    const adminToken = 'bench-admin-token-0123456789'
    const gateway = await Harness.spawn(
      [...(profileDir ? ['--cpu-prof', `--cpu-prof-dir=${profileDir}`] : []), 'src/main.ts'],
      {
        TOLLWAY_CONFIG: config,
        TOLLWAY_DATA_DIR: dir,
        PORT: String(port),
        ADMIN_TOKEN: adminToken,
        DATABASE_URL: databaseUrl,
        ...Harness.chainEnv(chain),
      },
      'serving at',
    )
    children.push(gateway)
    const base = `http://127.0.0.1:${port}`
    const key = await Harness.apiKey(base, adminToken)

    // One channel per paid stream, each with a voucher covering the whole run.
    const url = `${base}/v1/chat/completions`
    const first = await fetch(url, {
      method: 'POST',
      body: '{"model":"bench","messages":[{"role":"user","content":"x"}]}',
    })
    const challenge = challengeOf(first.headers.get('www-authenticate'))!
    const tokenDomain = await Token.domain(
      Client.from({ rpcUrl: chain.rpcUrl, chainId: chain.chainId }),
      { token: chain.currencyAddress },
    )
    const paid = await Promise.all(
      chain.payers.slice(0, targets.has('paid') ? paidLevel : 0).map(async (p) => {
        const s = new PayingSession({
          account: privateKeyToAccount(p.privateKey),
          challenge,
          tokenDomain,
        })
        const header = await s.openWithAuthorization({
          deposit: 100_000_000_000n,
          initial: 100_000_000_000n,
        })
        const r = await fetch(url, { method: 'HEAD', headers: { authorization: header } })
        if (r.status !== 200) throw new Error(`open: ${r.status}`)
        return s.voucher(100_000_000_000n) // a replay: the balance is already there
      }),
    )

    const results: Record<string, Stats[]> = { proxy: [], key: [], paid: [] }
    const pid = (c: { proc: unknown }) => (c.proc as { pid: number }).pid
    for (const n of levels) {
      if (targets.has('proxy'))
        results.proxy!.push(
          await load(
            `http://127.0.0.1:${proxyPort}/v1/chat/completions`,
            () => ({}),
            n,
            pid(proxy),
          ),
        )
      if (targets.has('key'))
        results.key!.push(
          await load(url, () => ({ authorization: `Bearer ${key}` }), n, pid(gateway)),
        )
    }
    // Each concurrent stream pays from its own channel (a channel carries one stream at a time).
    if (targets.has('paid'))
      for (const n of paidLevels)
        results.paid!.push(
          await load(url, (i) => ({ authorization: paid[i % n]! }), n, pid(gateway)),
        )
    return {
      database: databaseUrl ? 'postgresql' : 'pglite',
      seconds,
      tokensPerStream: tokens,
      results,
    }
  } finally {
    // Wait for the exits: a profiled gateway writes its profile as it stops.
    for (const c of children) c.proc.kill()
    await Promise.all(children.map((c) => c.proc.exited))
    await chain.stop()
  }
}

export function table(r: Awaited<ReturnType<typeof run>>): string {
  const lines = [
    '| target | concurrent streams | tokens/s | TTFT p50 ms | TTFT p99 ms | CPU (cores) | client CPU | errors |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for (const [name, list] of Object.entries(r.results))
    for (const s of list)
      lines.push(
        `| ${name} | ${s.streams} | ${Math.round(s.tokensPerSecond)} | ${s.ttftP50.toFixed(1)} | ${s.ttftP99.toFixed(1)} | ${s.cpuPerSecond.toFixed(2)} | ${s.clientCpuPerSecond.toFixed(2)} | ${s.errors} |`,
      )
  return lines.join('\n')
}

if (import.meta.main) {
  const r = await run()
  Harness.report('streams', r, table(r))
}
