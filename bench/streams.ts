/**
 * Streaming throughput: many concurrent streams of 100 tokens each (BENCH_TOKENS), in a
 * closed loop, through a bare Hono pass-through proxy (the ceiling), through the gateway with
 * an API key, and through the gateway paid from channels (one channel per concurrent stream:
 * a channel carries one stream at a time). Two modes, one gateway serving both:
 *   instant  the upstream writes a whole stream at once (model `bench`): per-request costs
 *            dominate and the streams queue in a closed loop
 *   paced    the upstream writes one event per token at a model's pace, like an inference
 *            server, for each of BENCH_PACED_RATE's tokens/s per stream (model
 *            `bench-paced-<rate>`): the target holds every stream open for seconds; a run
 *            lasts at least 3 stream durations and counts the tokens that arrive within it
 * Reports tokens/s, time to first token, the target process's CPU (cores, and per 1,000
 * tokens) and the load generator's own CPU; for the paced runs, what metering costs: the
 * tokens/s the gateway loses against the proxy, as a share of the proxy's.
 *
 *   bun bench/streams.ts   → prints the tables, writes bench/results/streams.{json,md}
 *
 * Knobs: BENCH_SECONDS (per run, 5), BENCH_STREAMS (levels, "100,1000"), BENCH_PAID_STREAMS
 * ("100,1000"), BENCH_TARGETS (which of "proxy,key,paid" to run), BENCH_TOKENS (per stream,
 * 100), BENCH_PACED_RATE (tokens/s per stream, "50,100,200"), BENCH_PACED_STREAMS (levels, "1000"),
 * BENCH_PACED_TARGETS ("proxy,key,paid"; empty skips the paced runs), BENCH_BLOCK_TOKENS
 * (the gateway's metering.blockTokens), BENCH_PROFILE_DIR (runs the gateway with `--cpu-prof`
 * into it; the profile is written as the gateway stops).
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
const targets = new Set((process.env.BENCH_TARGETS ?? 'proxy,key,paid').split(','))
const blockTokens = process.env.BENCH_BLOCK_TOKENS
const profileDir = process.env.BENCH_PROFILE_DIR
const tokens = Number(process.env.BENCH_TOKENS ?? 100)
const pacedRates = (process.env.BENCH_PACED_RATE ?? '50,100,200').split(',').map(Number)
const pacedLevels = (process.env.BENCH_PACED_STREAMS ?? '1000').split(',').map(Number)
const pacedTargets = new Set((process.env.BENCH_PACED_TARGETS ?? 'proxy,key,paid').split(','))
const paced = ['proxy', 'key', 'paid'].some((t) => pacedTargets.has(t))
/** Long enough for every stream to complete a few times over. */
const pacedSeconds = (rate: number) => Math.max(seconds, (3 * tokens) / rate)
/** Channels to open: one per concurrent paid stream, in either mode. */
const channels = Math.max(
  ...(targets.has('paid') ? paidLevels : [0]),
  ...(pacedTargets.has('paid') ? pacedLevels : [0]),
)

type Stats = {
  streams: number
  tokensPerSecond: number
  ttftP50: number
  ttftP99: number
  cpuPerSecond: number
  /** The target's CPU milliseconds per 1,000 tokens: the per-token cost at equal throughputs. */
  cpuMsPer1kTokens: number
  /** The load generator's own CPU (this process): it must not be the bottleneck. */
  clientCpuPerSecond: number
  errors: number
}

/**
 * Runs `streams` closed-loop streams of `model` for `seconds`. `window`: count only what
 * arrives within the run (paced streams still open at the end are drained, uncounted: the
 * tail would be half idle); otherwise count until the last stream ends.
 */
async function load(opts: {
  url: string
  headers: (i: number) => Record<string, string>
  streams: number
  pid: number
  model: string
  seconds: number
  window: boolean
}): Promise<Stats> {
  const { url, headers, streams, pid } = opts
  const body = JSON.stringify({
    model: opts.model,
    stream: true,
    max_tokens: tokens,
    messages: [{ role: 'user', content: 'go' }],
  })
  let received = 0
  let errors = 0
  const ttft: number[] = []
  const end = performance.now() + opts.seconds * 1000
  const started = performance.now()
  const cpu0 = Harness.cpuSeconds(pid)
  const client0 = process.cpuUsage()
  const sample = () => {
    const c = process.cpuUsage(client0)
    return {
      received,
      elapsed: (performance.now() - started) / 1000,
      cpu: Harness.cpuSeconds(pid) - cpu0,
      client: (c.user + c.system) / 1e6,
    }
  }
  let atEnd: ReturnType<typeof sample> | undefined
  const timer = opts.window ? setTimeout(() => (atEnd = sample()), opts.seconds * 1000) : null
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
  if (timer) clearTimeout(timer)
  const m = atEnd ?? sample()
  ttft.sort((a, b) => a - b)
  const at = (q: number) => Harness.quantile(ttft, q)
  return {
    streams,
    tokensPerSecond: m.received / m.elapsed,
    ttftP50: at(0.5),
    ttftP99: at(0.99),
    cpuPerSecond: m.cpu / m.elapsed,
    cpuMsPer1kTokens: (m.cpu * 1e6) / m.received,
    clientCpuPerSecond: m.client / m.elapsed,
    errors,
  }
}

export async function run() {
  const children: { proc: { kill(): void; exited: Promise<number> } }[] = []
  const chain = await DevChain.start({ accounts: channels + 1 })
  try {
    const servers = await Harness.upstreamAndProxy()
    children.push(...servers.children)
    const { upstream, proxyPort, proxy } = servers
    const pacedServers = new Map<number, Awaited<ReturnType<typeof Harness.upstreamAndProxy>>>()
    for (const rate of paced ? pacedRates : []) {
      const servers = await Harness.upstreamAndProxy(rate)
      children.push(...servers.children)
      pacedServers.set(rate, servers)
    }
    const databaseUrl = await Harness.freshDatabase('tollway_bench_streams')
    const { dir, config } = Harness.dataDir({
      logLevel: 'warn',
      ...Harness.benchModels({
        bench: upstream,
        ...Object.fromEntries(
          [...pacedServers].map(([rate, servers]) => [`bench-paced-${rate}`, servers.upstream]),
        ),
      }),
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
        ...Harness.workersEnv(),
        TOLLWAY_DATA_DIR: dir,
        PORT: String(port),
        ADMIN_TOKEN: adminToken,
        DATABASE_URL: databaseUrl,
        ...DevChain.env(chain),
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
      chain.payers.slice(0, channels).map(async (p) => {
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

    const pid = (c: { proc: unknown }) => (c.proc as { pid: number }).pid
    const asKey = () => ({ authorization: `Bearer ${key}` })
    // Each concurrent stream pays from its own channel (a channel carries one stream at a time).
    const asPayer = (n: number) => (i: number) => ({ authorization: paid[i % n]! })
    const instant = { url, pid: pid(gateway), model: 'bench', seconds, window: false }

    const results: Record<string, Stats[]> = { proxy: [], key: [], paid: [] }
    for (const n of levels) {
      if (targets.has('proxy'))
        results.proxy!.push(
          await load({
            ...instant,
            url: `http://127.0.0.1:${proxyPort}/v1/chat/completions`,
            headers: () => ({}),
            streams: n,
            pid: pid(proxy),
          }),
        )
      if (targets.has('key'))
        results.key!.push(await load({ ...instant, headers: asKey, streams: n }))
    }
    if (targets.has('paid'))
      for (const n of paidLevels)
        results.paid!.push(await load({ ...instant, headers: asPayer(n), streams: n }))

    const pacedRuns: Paced[] = []
    for (const [rate, servers] of pacedServers) {
      const pacedResults: Record<string, Stats[]> = { proxy: [], key: [], paid: [] }
      const pacedRun = {
        ...instant,
        model: `bench-paced-${rate}`,
        seconds: pacedSeconds(rate),
        window: true,
      }
      for (const n of pacedLevels) {
        if (pacedTargets.has('proxy'))
          pacedResults.proxy!.push(
            await load({
              ...pacedRun,
              url: `http://127.0.0.1:${servers.proxyPort}/v1/chat/completions`,
              headers: () => ({}),
              streams: n,
              pid: pid(servers.proxy),
            }),
          )
        if (pacedTargets.has('key'))
          pacedResults.key!.push(await load({ ...pacedRun, headers: asKey, streams: n }))
        if (pacedTargets.has('paid'))
          pacedResults.paid!.push(await load({ ...pacedRun, headers: asPayer(n), streams: n }))
      }
      pacedRuns.push({
        tokensPerSecondPerStream: rate,
        seconds: pacedRun.seconds,
        results: pacedResults,
      })
    }
    return {
      database: databaseUrl ? 'postgresql' : 'pglite',
      seconds,
      tokensPerStream: tokens,
      results,
      paced: pacedRuns,
    }
  } finally {
    // Wait for the exits: a profiled gateway writes its profile as it stops.
    for (const c of children) c.proc.kill()
    await Promise.all(children.map((c) => c.proc.exited))
    await chain.stop()
  }
}

/** One markdown table of `results`. */
function rows(results: Record<string, Stats[]>): string {
  const lines = [
    '| target | concurrent streams | tokens/s | TTFT p50 ms | TTFT p99 ms | CPU (cores) | CPU ms / 1k tokens | client CPU | errors |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  for (const [name, list] of Object.entries(results))
    for (const s of list)
      lines.push(
        `| ${name} | ${s.streams} | ${Math.round(s.tokensPerSecond)} | ${s.ttftP50.toFixed(1)} | ${s.ttftP99.toFixed(1)} | ${s.cpuPerSecond.toFixed(2)} | ${s.cpuMsPer1kTokens.toFixed(2)} | ${s.clientCpuPerSecond.toFixed(2)} | ${s.errors} |`,
      )
  return lines.join('\n')
}

type Paced = {
  tokensPerSecondPerStream: number
  seconds: number
  results: Record<string, Stats[]>
}

/**
 * What metering costs in the paced runs: the tokens/s the key and paid streams lose against
 * the proxy at the same pace and concurrency, as a share of the proxy's.
 */
function costs(paced: Paced[]): string {
  const lines = [
    '| tokens/s per stream | concurrent streams | proxy tokens/s | metering cost, key | metering cost, paid |',
    '|---:|---:|---:|---:|---:|',
  ]
  for (const p of paced)
    p.results.proxy!.forEach((proxy, i) => {
      const cost = (s: Stats | undefined) =>
        s ? `${((1 - s.tokensPerSecond / proxy.tokensPerSecond) * 100).toFixed(1)}%` : ''
      lines.push(
        `| ${p.tokensPerSecondPerStream} | ${proxy.streams} | ${Math.round(proxy.tokensPerSecond)} | ${cost(p.results.key![i])} | ${cost(p.results.paid![i])} |`,
      )
    })
  return lines.join('\n')
}

/** The instant run, each paced run and the paced runs' metering costs as markdown tables. */
export function table(r: Awaited<ReturnType<typeof run>>): string {
  const tables = [`Instant upstream (${r.seconds} s runs):\n\n${rows(r.results)}`]
  const paced = r.paced.filter((p) => Object.values(p.results).some((l) => l.length))
  for (const p of paced)
    tables.push(
      `Paced upstream, ${p.tokensPerSecondPerStream} tokens/s per stream (${p.seconds} s runs):\n\n${rows(p.results)}`,
    )
  if (paced.some((p) => p.results.proxy!.length > 0))
    tables.push(
      `Metering cost in the paced runs (tokens/s lost against the proxy):\n\n${costs(paced)}`,
    )
  return tables.join('\n\n')
}

if (import.meta.main && !process.env.BUN_CONFIG_MAX_HTTP_REQUESTS) {
  // Bun's fetch keeps at most 256 requests in flight and queues the rest, a limit read once
  // at start: rerun with room for every stream, here and in the proxy and gateway (they
  // inherit the environment).
  const again = Bun.spawn([process.execPath, ...process.argv.slice(1)], {
    env: { ...process.env, BUN_CONFIG_MAX_HTTP_REQUESTS: '16384' },
    stdio: ['inherit', 'inherit', 'inherit'],
  })
  process.exit(await again.exited)
} else if (import.meta.main) {
  const r = await run()
  Harness.report('streams', r, table(r))
}
