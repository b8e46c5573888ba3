/** `workers` > 1: processes sharing the port and the database, stopped with the first one. */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import postgres from 'postgres'
import * as Gateway from './helpers/Gateway.ts'

const root = join(import.meta.dir, '..')
const url = process.env.DATABASE_URL
const name = `tollway_workers_${crypto.randomUUID().replaceAll('-', '').slice(0, 12)}`

afterAll(async () => {
  if (!url) return
  const admin = postgres(url, { max: 1, onnotice: () => {} })
  await admin.unsafe(`drop database if exists ${name} with (force)`)
  await admin.unsafe(`drop database if exists ${name}_stop with (force)`)
  await admin.end()
})

/** The pids listening on `port` (ss -ltnp). */
async function listeners(port: string): Promise<number[]> {
  const out = await new Response(Bun.spawn(['ss', '-Hltnp', `sport = :${port}`]).stdout).text()
  return [...out.matchAll(/pid=(\d+)/g)].map((m) => Number(m[1])).sort()
}

async function until(check: () => Promise<boolean> | boolean, ms = 15_000) {
  const end = Date.now() + ms
  while (!(await check())) {
    if (Date.now() > end) throw new Error('timed out')
    await Bun.sleep(100)
  }
}

const alive = (pid: number) => {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

/**
 * Runs `bin/tollway serve` with two workers on a fresh database `database` (its own process
 * group when `group`, as a shell's foreground job is); returns it once both serve.
 */
async function serveWorkers(database: string, env: Record<string, string> = {}, group = false) {
  const admin = postgres(url!, { max: 1, onnotice: () => {} })
  await admin.unsafe(`create database ${database}`)
  await admin.end()
  const db = new URL(url!)
  db.pathname = `/${database}`
  const proc = Bun.spawn([...(group ? ['setsid'] : []), 'bin/tollway', 'serve'], {
    cwd: root,
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? '',
      DATABASE_URL: db.toString(),
      TOLLWAY_WORKERS: '2',
      TOLLWAY_DATA_DIR: mkdtempSync(join(tmpdir(), 'tollway-workers-')),
      PORT: '0',
      LOG_LEVEL: 'warn',
      ADMIN_TOKEN: 'workers-admin-token-0123456789',
      ...env,
    },
    stdout: 'pipe',
    stderr: 'pipe',
  })
  const reader = proc.stdout.getReader()
  let out = ''
  while (!out.includes('Try it:')) {
    const { value, done } = await reader.read()
    if (done) throw new Error(`exited early:\n${out}`)
    out += new TextDecoder().decode(value)
  }
  ;(async () => {
    while (!(await reader.read()).done) {}
  })()
  const base = /serving at (http:\/\/\S+)/.exec(out)![1]!
  await until(async () => (await listeners(new URL(base).port)).length === 2)
  return { proc, out, base }
}

describe('workers', () => {
  test.skipIf(!url)(
    'behavior: two processes serve one port on one database; one that dies is replaced; all stop with the first',
    async () => {
      const { proc, out, base } = await serveWorkers(name)
      try {
        expect(out).toContain('workers:     2 processes share the port')
        const port = new URL(base).port
        const [a, b] = await listeners(port)
        expect([a, b]).toContain(proc.pid)
        const worker = a === proc.pid ? b! : a!

        // Both serve, each with the chain the first one started (a Payment challenge in
        // every 402), over connections the kernel spreads between them.
        for (let i = 0; i < 20; i++) {
          const res = await fetch(`${base}/v1/chat/completions`, {
            method: 'POST',
            headers: { connection: 'close' },
            body: '{"model":"tollway-echo","messages":[{"role":"user","content":"hi"}]}',
          })
          expect(res.status).toBe(402)
          expect(res.headers.get('www-authenticate')).toContain('Payment ')
        }
        // One account, charged through both: the ledger is the database's.
        const headers = {
          authorization: 'Bearer workers-admin-token-0123456789',
          'content-type': 'application/json',
        }
        const post = async (path: string, body: unknown) =>
          (await fetch(`${base}${path}`, {
            method: 'POST',
            headers: { ...headers, connection: 'close' },
            body: JSON.stringify(body),
          }).then((r) => r.json())) as Record<string, string>
        const { id } = await post('/admin/accounts', { name: 'w', plan: 'pro' })
        await post(`/admin/accounts/${id}/credits`, { amount: '1000000' })
        const { key } = await post(`/admin/accounts/${id}/keys`, { name: 'w' })
        let charged = 0n
        for (let i = 0; i < 10; i++) {
          const res = await fetch(`${base}/v1/chat/completions`, {
            method: 'POST',
            headers: { authorization: `Bearer ${key}`, connection: 'close' },
            body: '{"model":"tollway-echo","max_tokens":2,"messages":[{"role":"user","content":"one two"}]}',
          })
          expect(res.status).toBe(200)
          charged += BigInt(((await res.json()) as { usage: { cost: string } }).usage.cost)
        }
        // A worker answers before its charge commits (README, "How money is metered"), and a
        // read on the other worker waits only for its own: the balance gets there within a
        // round trip, and never goes below.
        const balance = async () =>
          BigInt(
            (
              (await fetch(`${base}/v1/credits`, {
                headers: { authorization: `Bearer ${key}`, connection: 'close' },
              }).then((r) => r.json())) as { balance: string }
            ).balance,
          )
        expect(charged).toBeGreaterThan(0n)
        await until(async () => {
          const now = await balance()
          expect(now).toBeGreaterThanOrEqual(1_000_000n - charged)
          return now === 1_000_000n - charged
        }, 5_000)

        // A worker that dies is started again.
        process.kill(worker, 'SIGKILL')
        await until(async () => {
          const now = await listeners(port)
          return now.length === 2 && !now.includes(worker)
        })
        const replacement = (await listeners(port)).find((p) => p !== proc.pid)!

        // Stopping the first stops them all.
        proc.kill('SIGTERM')
        expect(await proc.exited).toBe(0)
        await until(() => !alive(replacement))
      } finally {
        proc.kill('SIGKILL')
      }
    },
    60_000,
  )

  test.skipIf(!url)(
    'behavior: one SIGINT to the process group (a Ctrl-C) lets the streams under way on every worker finish',
    async () => {
      const dataDir = mkdtempSync(join(tmpdir(), 'tollway-workers-'))
      const config = join(dataDir, 'config.json')
      writeFileSync(
        config,
        JSON.stringify({
          devChain: false,
          echo: { tokenDelayMs: 20 },
          plans: {
            free: { tier: 0, requestsPerMinute: 10, maxConcurrent: 1, tokensPerMonth: 500_000 },
            big: { tier: 1, requestsPerMinute: null, maxConcurrent: null, tokensPerMonth: null },
          },
        }),
      )
      const token = 'workers-admin-token-0123456789'
      const { proc, base } = await serveWorkers(
        `${name}_stop`,
        { TOLLWAY_DATA_DIR: dataDir, TOLLWAY_CONFIG: config },
        true,
      )
      try {
        const { key } = await Gateway.account(base, token, { plan: 'big', credits: 100_000_000n })
        // Several streams on connections of their own: the kernel spreads them over both processes.
        const streams = await Promise.all(
          Array.from({ length: 8 }, async () => {
            const res = await fetch(`${base}/v1/chat/completions`, {
              method: 'POST',
              headers: {
                authorization: `Bearer ${key}`,
                'content-type': 'application/json',
                connection: 'close',
              },
              body: JSON.stringify({
                model: 'tollway-echo',
                stream: true,
                max_tokens: 40,
                messages: [{ role: 'user', content: 'finish what you started' }],
              }),
            })
            if (res.status !== 200) throw new Error(`${res.status} ${await res.text()}`)
            const r = res.body!.getReader()
            const first = new TextDecoder().decode((await r.read()).value)
            return { r, first }
          }),
        )
        process.kill(-proc.pid, 'SIGINT')
        const ends = await Promise.all(
          streams.map(async ({ r, first }) => {
            let body = first
            try {
              for (let x = await r.read(); !x.done; x = await r.read())
                body += new TextDecoder().decode(x.value)
            } catch (e) {
              return `cut: ${(e as Error).message}`
            }
            return body.trimEnd().endsWith('data: [DONE]') ? 'finished' : 'cut (no [DONE])'
          }),
        )
        expect(ends.every((e) => e === 'finished')).toBe(true)
        expect(await proc.exited).toBe(0)
      } finally {
        try {
          process.kill(-proc.pid, 'SIGKILL')
        } catch {}
      }
    },
    60_000,
  )
})
