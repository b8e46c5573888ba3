/** What the benchmarks share: a fresh database and a data dir with a config file. */
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import postgres from 'postgres'

/**
 * A fresh database `name` on the server at DATABASE_URL (its URL), or '' when unset: the
 * gateway then runs on the embedded PGlite.
 */
export async function freshDatabase(name: string): Promise<string> {
  if (!process.env.DATABASE_URL) return ''
  const admin = postgres(process.env.DATABASE_URL, { max: 1, onnotice: () => {} })
  await admin.unsafe(`drop database if exists ${name}`)
  await admin.unsafe(`create database ${name}`)
  await admin.end()
  const url = new URL(process.env.DATABASE_URL)
  url.pathname = `/${name}`
  return url.toString()
}

/** A new data dir holding `config` as config.json; returns both paths. */
export function dataDir(config: unknown): { dir: string; config: string } {
  const dir = mkdtempSync(join(tmpdir(), 'tollway-bench-'))
  const path = join(dir, 'config.json')
  writeFileSync(path, JSON.stringify(config))
  return { dir, config: path }
}

/** A free loopback port. */
export async function freePort(): Promise<number> {
  const s = Bun.serve({ port: 0, fetch: () => new Response() })
  const port = s.port!
  s.stop(true)
  return port
}

/** Runs `bun <args>` from the project root and waits until it prints `ready`. */
export async function spawn(args: string[], env: Record<string, string> = {}, ready = 'ready') {
  const proc = Bun.spawn([process.execPath, ...args], {
    cwd: join(import.meta.dir, '..'),
    // Bun's fetch holds 256 requests at once unless told otherwise, and every server runs with
    // the allocator setting `npm start` gives the gateway (bin/tollway), the proxy too (both
    // read once, at start).
    env: {
      BUN_CONFIG_MAX_HTTP_REQUESTS: '16384',
      MIMALLOC_PURGE_DELAY: '-1',
      ...process.env,
      ...env,
    },
    stdout: 'pipe',
    stderr: 'inherit',
  })
  const reader = proc.stdout.getReader()
  let out = ''
  const decoder = new TextDecoder()
  while (!out.includes(ready)) {
    const { value, done } = await reader.read()
    if (done) throw new Error(`${args.join(' ')} exited before it was ready:\n${out}`)
    out += decoder.decode(value)
  }
  // Keep draining so the child never blocks on a full pipe.
  ;(async () => {
    while (!(await reader.read()).done) {}
  })()
  return { proc, out }
}

export type Proc = { pid: number; ppid: number; name: string; cpu: number }

/** A `/proc` stat line (a process's or a thread's): parent, name and CPU seconds (user +
 * system; the name may hold spaces and parentheses, so fields are read after the last `)`). */
function statOf(stat: string): Omit<Proc, 'pid'> {
  const close = stat.lastIndexOf(')')
  const fields = stat.slice(close + 2).split(' ')
  return {
    ppid: Number(fields[1]),
    name: stat.slice(stat.indexOf('(') + 1, close),
    cpu: (Number(fields[11]) + Number(fields[12])) / 100,
  }
}

/**
 * Every process on this machine with its parent, name and CPU seconds (user + system): one
 * scan of /proc, for the functions below to read several figures from one sample.
 */
export function processes(): Proc[] {
  const all: Proc[] = []
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      all.push({ pid: Number(entry), ...statOf(readFileSync(`/proc/${entry}/stat`, 'utf8')) })
    } catch {
      // The process ended between the listing and the read.
    }
  }
  return all
}

/**
 * CPU seconds a process has used, with the worker processes it started (its `bun`
 * descendants: a gateway with `workers` > 1); NaN if it is gone.
 */
export function cpuSeconds(pid: number, all: Proc[] = processes()): number {
  if (!all.some((p) => p.pid === pid)) return Number.NaN
  const tree = new Set([pid])
  for (let grew = true; grew; ) {
    grew = false
    for (const p of all)
      if (!tree.has(p.pid) && tree.has(p.ppid) && p.name.startsWith('bun')) {
        tree.add(p.pid)
        grew = true
      }
  }
  return all.filter((p) => tree.has(p.pid)).reduce((sum, p) => sum + p.cpu, 0)
}

/** CPU seconds a process's main thread has used (a Bun process's JavaScript thread); NaN if
 * it is gone. */
export function mainThreadCpuSeconds(pid: number): number {
  try {
    return statOf(readFileSync(`/proc/${pid}/task/${pid}/stat`, 'utf8')).cpu
  } catch {
    return Number.NaN
  }
}

/** The machine's CPU time so far, in clock ticks over all cores: idle (with I/O wait) and in
 * all. */
export function machineTicks(): { idle: number; total: number } {
  const [, ...fields] = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/)
  const ticks = fields.map(Number)
  return { idle: ticks[3]! + ticks[4]!, total: ticks.reduce((a, b) => a + b, 0) }
}

/**
 * CPU seconds used by every process named `postgres` on this machine (a local server's
 * backends and helpers): where the database shares the box, its cost per request.
 */
export function postgresCpuSeconds(all: Proc[] = processes()): number {
  return all.filter((p) => p.name === 'postgres').reduce((sum, p) => sum + p.cpu, 0)
}

/**
 * The gateway's `workers` for a bench (BENCH_WORKERS, default 1): more than one needs
 * DATABASE_URL.
 */
export function workersEnv(): Record<string, string> {
  const n = process.env.BENCH_WORKERS
  return n ? { TOLLWAY_WORKERS: n } : {}
}

/**
 * A gateway for a bench (src/main.ts, a process of its own, BENCH_WORKERS workers) serving
 * `models` (see `benchModels`) on a fresh database `database` on DATABASE_URL's server (without
 * it, the embedded PGlite), its accounts on the plan `bench`: limits on, high enough not to
 * refuse, so that every request still runs every check. With an account of plenty of credits
 * and its key.
 */
export async function gateway(database: string, models: ReturnType<typeof benchModels>) {
  const databaseUrl = await freshDatabase(database)
  const { dir, config } = dataDir({
    logLevel: 'warn',
    ...models,
    plans: {
      bench: {
        tier: 0,
        // The most a plan may have (one a microsecond): checked on every request, never binding.
        requestsPerMinute: 60_000_000,
        maxConcurrent: 10_000,
        tokensPerMonth: 1_000_000_000_000,
      },
    },
    defaultPlan: 'bench',
  })
  const port = await freePort()
  const adminToken = 'bench-admin-token-0123456789'
  const server = await spawn(
    ['src/main.ts'],
    {
      TOLLWAY_CONFIG: config,
      ...workersEnv(),
      TOLLWAY_DATA_DIR: dir,
      PORT: String(port),
      ADMIN_TOKEN: adminToken,
      DATABASE_URL: databaseUrl,
    },
    'serving at',
  )
  const url = `http://127.0.0.1:${port}`
  try {
    return { server, url, databaseUrl, key: await apiKey(url, adminToken) }
  } catch (e) {
    server.proc.kill()
    throw e
  }
}

/** Creates an account with plenty of credits and a key through the admin API; the key. */
export async function apiKey(base: string, adminToken: string): Promise<string> {
  const headers = { authorization: `Bearer ${adminToken}`, 'content-type': 'application/json' }
  const post = async (path: string, body: unknown) =>
    (
      await fetch(`${base}/admin${path}`, { method: 'POST', headers, body: JSON.stringify(body) })
    ).json()
  const { id } = (await post('/accounts', { name: 'bench' })) as { id: string }
  await post(`/accounts/${id}/credits`, { amount: '1000000000000000' })
  const { key } = (await post(`/accounts/${id}/keys`, { name: 'bench' })) as { key: string }
  return key
}

/** A target's overhead over the upstream called directly, at p50 and p99 (ms), as table
 * cells: blank for `direct` itself. */
export function overhead(
  name: string,
  s: { p50: number; p99: number },
  direct: { p50: number; p99: number },
): [string, string] {
  if (name === 'direct') return ['', '']
  return [(s.p50 - direct.p50).toFixed(3), (s.p99 - direct.p99).toFixed(3)]
}

/** The `q` quantile (0..1) of ascending `sorted` values (NaN when empty). */
export function quantile(sorted: readonly number[], q: number): number {
  return sorted[Math.floor(q * (sorted.length - 1))] ?? Number.NaN
}

/**
 * Starts the fake upstream and a bare pass-through proxy in front of it (bench/servers.ts).
 * With `tokensPerSecond` the upstream paces its streams at that rate per stream.
 */
export async function upstreamAndProxy(tokensPerSecond?: number) {
  const upstreamPort = await freePort()
  const upstreamServer = await spawn([
    'bench/servers.ts',
    'upstream',
    String(upstreamPort),
    ...(tokensPerSecond ? [String(tokensPerSecond)] : []),
  ])
  const upstream = `http://127.0.0.1:${upstreamPort}/v1`
  const proxyPort = await freePort()
  const proxy = await spawn(['bench/servers.ts', 'proxy', String(proxyPort), upstream])
  return { upstream, proxyPort, proxy, children: [upstreamServer, proxy] }
}

/** The gateway config of one priced model per entry (model id → its upstream's base URL). */
export function benchModels(upstreams: Record<string, string>) {
  const entries = Object.entries(upstreams)
  return {
    upstreams: entries.map(([id, baseUrl]) => ({ name: id, baseUrl })),
    models: entries.map(([id]) => ({
      id,
      upstream: id,
      upstreamModel: 'bench',
      pricing: { input: '1000000', output: '2000000' },
      contextLength: 8192,
    })),
  }
}

/** The gateway config of the one priced model `bench`, served by `upstream`. */
export function benchModel(upstream: string) {
  return benchModels({ bench: upstream })
}

/** Writes a run to bench/results/`name`.json (with its date) and `name`.md, and prints the table. */
export function report(name: string, result: object, markdown: string): void {
  const dir = join(import.meta.dir, 'results')
  mkdirSync(dir, { recursive: true })
  writeFileSync(
    join(dir, `${name}.json`),
    `${JSON.stringify({ date: new Date().toISOString(), ...result }, null, 2)}\n`,
  )
  writeFileSync(join(dir, `${name}.md`), `${markdown}\n`)
  console.log(markdown)
}

/** The fake upstream's token chunk: one word, `" w"` (what the stream benches count). */
export const tokenChunk =
  '{"id":"c","object":"chat.completion.chunk","created":1,"model":"bench","choices":[{"index":0,"delta":{"content":" w"},"finish_reason":null}]}'

/** The fake upstream's usage chunk after `n` tokens of a 9-token prompt. */
export const usageChunk = (n: number) =>
  `{"id":"c","object":"chat.completion.chunk","created":1,"model":"bench","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":${n},"total_tokens":${n + 9}}}`
