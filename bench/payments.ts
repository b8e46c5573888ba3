/**
 * Vouchers accepted per second end to end: `HEAD /v1/chat/completions` with a voucher
 * credential → common verification (challenge HMAC, expiry) → signature check on the fast
 * path → persisted (synchronous commit) → 200 with a Payment-Receipt. The gateway runs as
 * its own process on the development chain (anvil); vouchers are signed before the clock
 * starts, so the client's signing is not measured. The per-channel rate limit is lifted
 * for the run (it would cap each channel at 10/s).
 *
 *   bun bench/payments.ts   → prints a table, writes bench/results/payments.{json,md}
 */
import { privateKeyToAccount } from 'viem/accounts'
import * as Client from '../src/chain/Client.ts'
import * as DevChain from '../src/chain/DevChain.ts'
import * as Token from '../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../src/client/Session.ts'
import * as Harness from './Harness.ts'

// One request in flight per channel (a channel's vouchers go in order), all channels at once.
const channels = Number(process.env.BENCH_CHANNELS ?? 32)
const perChannel = Number(process.env.BENCH_VOUCHERS ?? 400)
// Vouchers per channel sent before the clock starts (JIT, the verifier thread's first checks).
const warmup = 20

export async function run() {
  const chain = await DevChain.start({ accounts: channels + 1 })
  let gateway: { kill(signal?: number): void } | undefined
  try {
    const databaseUrl = await Harness.freshDatabase('tollway_bench_pay')
    const { dir: dataDir, config } = Harness.dataDir({
      logLevel: 'warn',
      echo: { tokenDelayMs: 0 },
      payments: { voucherRatePerSecond: 1e9 },
    })
    const port = await Harness.freePort()
    const profile = process.env.BENCH_PROFILE
      ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_PROFILE}`]
      : []
    gateway = (
      await Harness.spawn(
        [...profile, 'src/main.ts'],
        {
          TOLLWAY_CONFIG: config,
          ...Harness.workersEnv(),
          TOLLWAY_DATA_DIR: dataDir,
          PORT: String(port),
          DATABASE_URL: databaseUrl,
          ...DevChain.env(chain),
        },
        'serving at',
      )
    ).proc
    const url = `http://127.0.0.1:${port}/v1/chat/completions`
    const first = await fetch(url, {
      method: 'POST',
      body: '{"model":"tollway-echo","messages":[{"role":"user","content":"x"}]}',
    })
    const challenge = challengeOf(first.headers.get('www-authenticate'))!
    const client = Client.from({ rpcUrl: chain.rpcUrl, chainId: chain.chainId })
    const tokenDomain = await Token.domain(client, { token: chain.currencyAddress })

    // Open the channels, then sign every voucher before the clock starts.
    const sessions = await Promise.all(
      chain.payers.slice(0, channels).map(async (p) => {
        const session = new PayingSession({
          account: privateKeyToAccount(p.privateKey),
          challenge,
          tokenDomain,
        })
        const res = await fetch(url, {
          method: 'HEAD',
          headers: {
            authorization: await session.openWithAuthorization({
              deposit: 10_000_000n,
              initial: 1n,
            }),
          },
        })
        if (res.status !== 200) throw new Error(`open failed: ${res.status}`)
        return session
      }),
    )
    const signing = performance.now()
    const work: string[][] = []
    for (const s of sessions) {
      const list: string[] = []
      for (let i = 2; i < perChannel + 2; i++) list.push(await s.voucher(BigInt(i)))
      work.push(list)
    }
    const signedPerSecond = (channels * perChannel) / ((performance.now() - signing) / 1000)

    await Promise.all(
      work.map(async (list) => {
        for (const header of list.splice(0, warmup)) {
          const res = await fetch(url, { method: 'HEAD', headers: { authorization: header } })
          if (res.status !== 200) throw new Error(`warm-up voucher refused: ${res.status}`)
        }
      }),
    )
    let accepted = 0
    let errors = 0
    const latencies: number[] = []
    const started = performance.now()
    await Promise.all(
      work.map(async (list) => {
        for (const header of list) {
          const t = performance.now()
          const res = await fetch(url, { method: 'HEAD', headers: { authorization: header } })
          latencies.push(performance.now() - t)
          if (res.status === 200) accepted++
          else errors++
        }
      }),
    )
    const seconds = (performance.now() - started) / 1000
    latencies.sort((a, b) => a - b)
    const at = (q: number) => Harness.quantile(latencies, q)
    return {
      database: databaseUrl ? 'postgresql' : 'pglite',
      channels,
      vouchers: channels * (perChannel - warmup),
      concurrency: channels,
      vouchersPerSecond: accepted / seconds,
      p50Ms: at(0.5),
      p99Ms: at(0.99),
      errors,
      clientSignedPerSecond: signedPerSecond,
    }
  } finally {
    gateway?.kill('SIGINT' as never)
    await Bun.sleep(process.env.BENCH_PROFILE ? 1500 : 0)
    await chain.stop()
  }
}

export function table(r: Awaited<ReturnType<typeof run>>): string {
  return [
    '| vouchers accepted end to end (HEAD + verify + persist) | value |',
    '|---|---:|',
    `| vouchers/s (${r.channels} channels, ${r.concurrency} in flight, ${r.database}) | ${Math.round(r.vouchersPerSecond)} |`,
    `| latency p50 / p99 ms | ${r.p50Ms.toFixed(2)} / ${r.p99Ms.toFixed(2)} |`,
    `| errors | ${r.errors} |`,
  ].join('\n')
}

if (import.meta.main) {
  const r = await run()
  Harness.report('payments', r, table(r))
}
