/** `npm start` as a user runs it: a subprocess with nothing configured. */
import { describe, expect, test } from 'bun:test'
import {
  closeSync,
  constants,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PGlite } from '@electric-sql/pglite'
import type { Hex } from 'viem'
import { getTransactionCount } from 'viem/actions'
import * as Client from '../src/chain/Client.ts'
import * as Escrow from '../src/chain/Escrow.ts'
import { createFetch, Store } from '../src/client/index.ts'
import { challengeOf } from '../src/client/Session.ts'
import * as Anvil from './helpers/Anvil.ts'

const root = join(import.meta.dir, '..')

/** Runs `bin/tollway serve`, the command users run (npm start runs the same with the same env). */
async function serve(env: Record<string, string>, args = ['serve']) {
  const proc = Bun.spawn(['bin/tollway', ...args], {
    cwd: root,
    env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', ...env },
    stdout: 'pipe',
    stderr: 'pipe',
  })
  const reader = proc.stdout.getReader()
  let out = ''
  const decoder = new TextDecoder()
  const deadline = Date.now() + 60_000
  while (!out.includes('Try it:') || !out.includes('stream":true')) {
    if (Date.now() > deadline) throw new Error(`no start-up banner:\n${out}`)
    const { value, done } = await reader.read()
    if (done) throw new Error(`exited early:\n${out}\n${await new Response(proc.stderr).text()}`)
    out += decoder.decode(value)
  }
  return { proc, out }
}

/** A data dir on one port for every start, as a restarted gateway has (the paying client
 * keeps its channels by origin), and a client store in it. */
function restartable() {
  const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
  const probe = Bun.listen({ hostname: '127.0.0.1', port: 0, socket: { data() {} } })
  const env = { TOLLWAY_DATA_DIR: dataDir, PORT: String(probe.port) }
  probe.stop(true)
  return { dataDir, env, store: Store.file(join(dataDir, 'client-channels.json')) }
}

/** One paid completion from the banner's first development payer; its escrow and channel. */
async function payOnce(out: string, store: Store.Store) {
  const url = /serving at (http:\/\/\S+)/.exec(out)![1]!
  const escrow = /escrow: +(0x[0-9a-fA-F]{40})/.exec(out)![1]! as Hex
  const key = /payer 1: +0x[0-9a-fA-F]{40} key (0x[0-9a-f]{64})/.exec(out)![1]! as Hex
  const fetch = createFetch({
    account: key,
    limits: { maxDeposit: 100_000n, maxTotal: 1_000_000n },
    allow: { escrows: [escrow] },
    store,
  })
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    body: JSON.stringify({
      model: 'tollway-echo',
      max_tokens: 3,
      messages: [{ role: 'user', content: 'one two three' }],
    }),
  })
  expect(res.status).toBe(200)
  await res.text()
  return { escrow, channel: (await fetch.channel(url))!.channelId }
}

describe('npm start', () => {
  test('behavior: embedded defaults serve, print the URL, admin token, dev chain and one working curl', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const { proc, out } = await serve({ TOLLWAY_DATA_DIR: dataDir, PORT: '0' })
    const rpcUrl = /RPC URL: +(\S+)/.exec(out)?.[1]
    try {
      const url = /serving at (http:\/\/\S+)/.exec(out)![1]!
      const token = readFileSync(join(dataDir, 'admin-token'), 'utf8').trim()
      expect(out).toContain(`admin token: ${token}`)
      expect(rpcUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
      expect(
        (
          (await (
            await fetch(rpcUrl!, {
              method: 'POST',
              headers: { 'content-type': 'application/json' },
              body: '{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}',
            })
          ).json()) as { result: string }
        ).result,
      ).toBe('0x7a69')
      expect(out).toMatch(/escrow: +0x[0-9a-fA-F]{40}/)
      expect(out).toMatch(/payer 1: +0x[0-9a-fA-F]{40} key 0x[0-9a-f]{64}/)
      // The printed curl works as printed.
      const curl = out.split('\n').find((l) => l.trim().startsWith('curl'))!
      const key = /Bearer (\S+)"/.exec(curl)![1]!
      const body = /-d '(.+)'/.exec(curl)![1]!
      const res = await fetch(`${url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${key}` },
        body,
      })
      expect(res.status).toBe(200)
      const text = await res.text()
      expect(text).toContain('"usage"')
      expect(text.trim().endsWith('data: [DONE]')).toBe(true)
      const models = (await (await fetch(`${url}/v1/models`)).json()) as { data: { id: string }[] }
      expect(models.data.map((m) => m.id)).toEqual(['tollway-echo'])
      // Bun's fetch would hold 256 upstream requests at once; the launcher lifts that.
      const environ = readFileSync(`/proc/${proc.pid}/environ`, 'utf8').split('\0')
      expect(environ).toContain('BUN_CONFIG_MAX_HTTP_REQUESTS=16384')
      // and keeps the memory it frees for its next requests (README, Configuration).
      expect(environ).toContain('MIMALLOC_PURGE_DELAY=-1')
    } finally {
      proc.kill('SIGTERM')
      await proc.exited
    }
    // anvil went with it.
    const rpc = () =>
      fetch(rpcUrl!, { method: 'POST', body: '{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}' })
    await expect(rpc()).rejects.toThrow()
    expect(existsSync(join(dataDir, 'pgdata'))).toBe(true)
  }, 90_000)

  test('behavior: options before serve (tollway --json serve) still serve, and keep serving; with ADMIN_TOKEN set, a kept token is left alone and said to be stale, and the CLI takes ADMIN_TOKEN', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    writeFileSync(join(dataDir, 'admin-token'), 'twadm_kept-by-an-earlier-start\n')
    const adminToken = 'configured-admin-token-0123456789'
    const { proc, out } = await serve(
      { TOLLWAY_DATA_DIR: dataDir, PORT: '0', ADMIN_TOKEN: adminToken },
      ['--json', '--url', 'http://127.0.0.1:1', 'serve'],
    )
    try {
      const url = /serving at (http:\/\/\S+)/.exec(out)![1]!
      await Bun.sleep(1_000)
      expect(proc.exitCode).toBeNull()
      expect((await fetch(`${url}/health`)).status).toBe(200)
      // The kept token may be another gateway's on this data dir: left alone, and said.
      expect(readFileSync(join(dataDir, 'admin-token'), 'utf8')).toContain('kept-by-an-earlier')
      expect(out).toContain('does not open this gateway')
      // A token the operator set is not printed (start-up output ends up in logs).
      expect(out).toContain('admin token: (as configured')
      expect(out).not.toContain(adminToken)
      const cli = (env: Record<string, string>) => {
        const p = Bun.spawn(['bin/tollway', '--url', url, '--json', 'accounts', 'list'], {
          cwd: root,
          env: { PATH: process.env.PATH ?? '', TOLLWAY_DATA_DIR: dataDir, ...env },
          stdout: 'pipe',
          stderr: 'pipe',
        })
        return Promise.all([p.exited, new Response(p.stdout).text(), new Response(p.stderr).text()])
      }
      const [code, stdout] = await cli({ ADMIN_TOKEN: adminToken })
      expect(code).toBe(0)
      expect(stdout).toContain('"name":"dev"')
      // The CLI reading the stale file gets a 401 that says where its token came from.
      const [stale, , err] = await cli({})
      expect(stale).toBe(2)
      expect(err).toContain(`the token was read from ${join(dataDir, 'admin-token')}`)
    } finally {
      proc.kill('SIGTERM')
      await proc.exited
    }
  }, 90_000)

  test('behavior: a SIGINT during start-up stops it once started, before it serves', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const proc = Bun.spawn(['bin/tollway', 'serve'], {
      cwd: root,
      env: {
        PATH: process.env.PATH ?? '',
        HOME: process.env.HOME ?? '',
        TOLLWAY_DATA_DIR: dataDir,
        PORT: '0',
      },
      stdout: 'pipe',
      stderr: 'pipe',
    })
    const out = new Response(proc.stdout).text()
    // Once it says it is starting: the embedded database and the chain take seconds more.
    const reader = proc.stderr.getReader()
    let err = ''
    while (!err.includes('tollway: starting')) {
      const { value, done } = await reader.read()
      if (done) throw new Error(`exited before starting:\n${err}`)
      err += new TextDecoder().decode(value)
    }
    proc.kill('SIGINT')
    for (let r = await reader.read(); !r.done; r = await reader.read())
      err += new TextDecoder().decode(r.value)
    expect(await proc.exited).toBe(0)
    expect(err).toContain('stopping once start-up is done')
    expect(await out).not.toContain('serving at')
  }, 90_000)

  test('behavior: a SIGTERM while the development key is read, after the server started and before the banner, still stops it cleanly (exit 0, the data dir lock released)', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const config = join(dataDir, 'config.json')
    writeFileSync(config, JSON.stringify({ devChain: false }))
    const env = { TOLLWAY_DATA_DIR: dataDir, PORT: '0', TOLLWAY_CONFIG: config }
    const first = await serve(env)
    const key = /Bearer (tw_\S+)"/.exec(first.out)![1]!
    first.proc.kill('SIGINT')
    expect(await first.proc.exited).toBe(0)
    // The kept key becomes a named pipe: the next start waits in its read of it (the last
    // step before the banner) until the test writes the key, which holds the window open.
    const keyFile = join(dataDir, 'dev-key')
    rmSync(keyFile)
    expect(Bun.spawnSync(['mkfifo', keyFile]).exitCode).toBe(0)
    const proc = Bun.spawn(['bin/tollway', 'serve'], {
      cwd: root,
      env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', ...env },
      stdout: 'pipe',
      stderr: 'pipe',
    })
    const out = new Response(proc.stdout).text()
    const err = new Response(proc.stderr).text()
    try {
      // Opening the pipe to write succeeds once the gateway has it open to read.
      let fd: number | undefined
      const deadline = Date.now() + 60_000
      while (fd === undefined) {
        if (Date.now() > deadline || proc.exitCode !== null)
          throw new Error(`never read the key:\n${await err}`)
        try {
          fd = openSync(keyFile, constants.O_WRONLY | constants.O_NONBLOCK)
        } catch {
          await Bun.sleep(50)
        }
      }
      proc.kill('SIGTERM')
      writeSync(fd, `${key}\n`)
      closeSync(fd)
      expect(await proc.exited).toBe(0)
      expect(await err).toContain('stopping once start-up is done')
      expect(await out).not.toContain('serving at')
      expect(existsSync(join(dataDir, 'pgdata', 'tollway.lock'))).toBe(false)
    } finally {
      proc.kill('SIGKILL')
    }
  }, 90_000)

  test('behavior: stopped (SIGINT), it lets a stream under way finish and refuses new connections; a second signal cuts what is left', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const config = join(dataDir, 'config.json')
    writeFileSync(config, JSON.stringify({ devChain: false, echo: { tokenDelayMs: 20 } }))
    const { proc, out } = await serve({
      TOLLWAY_DATA_DIR: dataDir,
      PORT: '0',
      TOLLWAY_CONFIG: config,
    })
    const url = /serving at (http:\/\/\S+)/.exec(out)![1]!
    const key = /Bearer (tw_\S+)"/.exec(out)![1]!
    const stream = (max_tokens: number) =>
      fetch(`${url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
        body: JSON.stringify({
          model: 'tollway-echo',
          stream: true,
          max_tokens,
          messages: [{ role: 'user', content: 'finish what you started' }],
        }),
      })
    try {
      // 40 words at 20 ms: under way for most of a second after the signal.
      const res = await stream(40)
      const reader = res.body!.getReader()
      await reader.read()
      proc.kill('SIGINT')
      await Bun.sleep(100)
      await expect(fetch(`${url}/health`)).rejects.toThrow()
      let body = ''
      for (let r = await reader.read(); !r.done; r = await reader.read())
        body += new TextDecoder().decode(r.value)
      expect(body).toContain('"usage"')
      expect(body.trimEnd().endsWith('data: [DONE]')).toBe(true)
      expect(await proc.exited).toBe(0)
    } finally {
      proc.kill('SIGKILL')
    }
    // Again, with a stream too long for the grace: a second signal cuts it at once.
    const again = await serve({ TOLLWAY_DATA_DIR: dataDir, PORT: '0', TOLLWAY_CONFIG: config })
    try {
      const url2 = /serving at (http:\/\/\S+)/.exec(again.out)![1]!
      const res = await fetch(`${url2}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
        body: JSON.stringify({
          model: 'tollway-echo',
          stream: true,
          max_tokens: 5_000,
          messages: [{ role: 'user', content: 'a long one' }],
        }),
      })
      const reader = res.body!.getReader()
      await reader.read()
      again.proc.kill('SIGINT')
      await Bun.sleep(200)
      const at = performance.now()
      again.proc.kill('SIGINT')
      // Cut, the stream still ends as a stream: an error event saying why, its usage, [DONE].
      let body = ''
      for (let r = await reader.read(); !r.done; r = await reader.read())
        body += new TextDecoder().decode(r.value)
      expect(body).toContain('"code":"gateway_stopping"')
      expect(body).toContain('"usage"')
      expect(body.trimEnd().endsWith('data: [DONE]')).toBe(true)
      expect(await again.proc.exited).toBe(0)
      expect(performance.now() - at).toBeLessThan(5_000)
    } finally {
      again.proc.kill('SIGKILL')
    }
  }, 90_000)

  test('behavior: restarted on its data dir after a kill, the embedded gateway keeps the charges made before it and releases the dead one reservations at once', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const config = join(dataDir, 'config.json')
    writeFileSync(config, JSON.stringify({ echo: { tokenDelayMs: 50 } }))
    const env = { TOLLWAY_DATA_DIR: dataDir, PORT: '0', TOLLWAY_CONFIG: config }
    const first = await serve(env)
    const url = /serving at (http:\/\/\S+)/.exec(first.out)![1]!
    const key = readFileSync(join(dataDir, 'dev-key'), 'utf8').trim()
    const headers = { authorization: `Bearer ${key}`, 'content-type': 'application/json' }
    // A whole completion, charged (its charge commits without waiting for a WAL flush).
    const whole = await fetch(`${url}/v1/chat/completions`, {
      method: 'POST',
      headers,
      body: JSON.stringify({
        model: 'tollway-echo',
        max_tokens: 3,
        messages: [{ role: 'user', content: 'one two three' }],
      }),
    })
    expect(whole.status).toBe(200)
    await whole.text()
    const charged = (await (await fetch(`${url}/v1/credits`, { headers })).json()) as {
      balance: string
    }
    expect(BigInt(charged.balance)).toBeLessThan(10_000_000n)
    const res = await fetch(`${url}/v1/chat/completions`, {
      method: 'POST',
      headers,
      body: JSON.stringify({
        model: 'tollway-echo',
        stream: true,
        max_tokens: 400,
        messages: [{ role: 'user', content: 'slow words' }],
      }),
    })
    expect(res.status).toBe(200)
    await res.body!.getReader().read()
    const held = (await (await fetch(`${url}/v1/credits`, { headers })).json()) as {
      reserved: string
    }
    expect(BigInt(held.reserved)).toBeGreaterThan(0n)
    // Past the WAL flush (every 200 ms: what a crash may lose, as with PostgreSQL's WAL writer).
    await Bun.sleep(500)
    first.proc.kill('SIGKILL')
    await first.proc.exited
    // The data dir's lock is the dead process's: the next start takes it over.
    const second = await serve(env)
    try {
      const again = /serving at (http:\/\/\S+)/.exec(second.out)![1]!
      const credits = (await (await fetch(`${again}/v1/credits`, { headers })).json()) as {
        balance: string
        reserved: string
      }
      expect(credits.reserved).toBe('0')
      // The charge before the kill is kept (PGlite has no WAL writer: it was lost), and the
      // stream is charged at most what it held.
      expect(BigInt(credits.balance)).toBeLessThanOrEqual(BigInt(charged.balance))
      expect(BigInt(credits.balance)).toBeGreaterThanOrEqual(
        BigInt(charged.balance) - BigInt(held.reserved),
      )
    } finally {
      second.proc.kill('SIGTERM')
      await second.proc.exited
    }
  }, 120_000)

  test('behavior: restarted on its data dir, even after a kill, the development chain is the same: a channel opened before is still open and pays', async () => {
    const { env, store } = restartable()
    const pay = (out: string) => payOnce(out, store)
    const first = await serve(env)
    const before = await pay(first.out)
    // Past anvil's next state dump (every second), then killed outright.
    await Bun.sleep(1_500)
    first.proc.kill('SIGKILL')
    await first.proc.exited
    const second = await serve(env)
    try {
      const after = await pay(second.out)
      expect(after).toEqual(before)
      // On the chain itself, not only in the gateway's database (a fresh chain had the
      // gateway serve vouchers of a channel that no longer existed).
      const rpcUrl = /RPC URL: +(\S+)/.exec(second.out)![1]!
      const client = Client.from({ rpcUrl, chainId: 31337 })
      const onChain = await Escrow.getChannel(client, {
        escrow: before.escrow,
        channelId: before.channel,
      })
      expect(onChain?.deposit).toBe(100_000n)
    } finally {
      second.proc.kill('SIGTERM')
      await second.proc.exited
    }
  }, 120_000)

  test('behavior: a development chain state that cannot be read is set aside: the chain starts afresh and the channels it lacks are closed, not served unfunded', async () => {
    const { dataDir, env, store } = restartable()
    const pay = async (out: string) => (await payOnce(out, store)).channel
    const first = await serve(env)
    const before = await pay(first.out)
    first.proc.kill('SIGTERM')
    await first.proc.exited
    // As a full disk leaves it: cut short.
    writeFileSync(join(dataDir, 'anvil-state.json'), '{"block":')
    const second = await serve(env)
    try {
      expect(readdirSync(dataDir).some((f) => f.startsWith('anvil-state.json.unreadable-'))).toBe(
        true,
      )
      // The old channel is gone with the chain: closed, so the client opens another.
      const after = await pay(second.out)
      expect(after).not.toBe(before)
    } finally {
      second.proc.kill('SIGTERM')
      await second.proc.exited
    }
  }, 120_000)

  test('behavior: a gateway killed outright (SIGKILL) does not leave its development chain running', async () => {
    const { proc, out } = await serve({
      TOLLWAY_DATA_DIR: mkdtempSync(join(tmpdir(), 'tollway-main-')),
      PORT: '0',
    })
    const rpcUrl = /RPC URL: +(\S+)/.exec(out)![1]!
    expect(await Anvil.stopsAnswering(rpcUrl, 0)).toBe(false)
    proc.kill('SIGKILL')
    await proc.exited
    expect(await Anvil.stopsAnswering(rpcUrl)).toBe(true)
  }, 60_000)

  test('behavior: a configured chain (the five variables) is used as it is: nothing deployed, no anvil started', async () => {
    const chain = await Anvil.start()
    /** Anvil processes the gateway `root` started (its descendants): none on this machine's
     * other anvils, which other tests or tools may start and stop meanwhile. */
    const anvils = (root: number) => {
      const parent = new Map<number, number>()
      const anvil = new Set<number>()
      for (const p of readdirSync('/proc')) {
        if (!/^\d+$/.test(p)) continue
        try {
          const stat = readFileSync(`/proc/${p}/stat`, 'utf8')
          parent.set(Number(p), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]))
          if (readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('anvil')) anvil.add(Number(p))
        } catch {}
      }
      const under = (pid: number): boolean => {
        for (let p = parent.get(pid); p !== undefined && p > 1; p = parent.get(p))
          if (p === root) return true
        return false
      }
      return [...anvil].filter(under).length
    }
    const before = {
      nonce: await getTransactionCount(chain.payeeClient, { address: chain.payee.address }),
    }
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const { proc, out } = await serve({
      TOLLWAY_DATA_DIR: dataDir,
      PORT: '0',
      CHAIN_RPC_URL: chain.rpcUrl,
      CHAIN_ID: String(chain.chainId),
      ESCROW_ADDRESS: chain.escrowAddress,
      CURRENCY_ADDRESS: chain.currencyAddress,
      PAYEE_PRIVATE_KEY: chain.payee.privateKey,
    })
    try {
      const url = /serving at (http:\/\/\S+)/.exec(out)![1]!
      // No development chain: nothing printed about one, no anvil process, no transaction.
      expect(out).not.toMatch(/RPC URL:|payer 1:/)
      expect(anvils(proc.pid)).toBe(0)
      expect(await getTransactionCount(chain.payeeClient, { address: chain.payee.address })).toBe(
        before.nonce,
      )
      // Challenges name the configured chain and escrow.
      const res = await fetch(`${url}/v1/chat/completions`, {
        method: 'POST',
        body: '{"model":"tollway-echo","messages":[{"role":"user","content":"hi"}]}',
      })
      expect(res.status).toBe(402)
      const c = challengeOf(res.headers.get('www-authenticate'))!
      expect(c.request).toMatchObject({
        recipient: chain.payee.address,
        currency: chain.currencyAddress,
        methodDetails: { chainId: chain.chainId, escrowContract: chain.escrowAddress },
      })
    } finally {
      proc.kill('SIGTERM')
      await proc.exited
      await chain.stop()
    }
  }, 90_000)

  test('behavior: an IPv6 HOST serves at a bracketed URL; a data dir whose database was deleted prints a key that works again', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const config = join(dataDir, 'config.json')
    writeFileSync(config, '{"devChain": false}')
    const env = { TOLLWAY_DATA_DIR: dataDir, PORT: '0', HOST: '::1', TOLLWAY_CONFIG: config }
    const chat = async (out: string) => {
      const url = /serving at (http:\/\/\S+)/.exec(out)![1]!
      const key = /Bearer (tw_\S+?)"/.exec(out)![1]!
      return {
        url,
        status: (
          await fetch(`${url}/v1/chat/completions`, {
            method: 'POST',
            headers: { authorization: `Bearer ${key}` },
            body: JSON.stringify({
              model: 'tollway-echo',
              messages: [{ role: 'user', content: 'hi' }],
            }),
          })
        ).status,
      }
    }
    for (const round of [1, 2]) {
      const { proc, out } = await serve(env)
      try {
        const { url, status } = await chat(out)
        expect(url).toMatch(/^http:\/\/\[::1\]:\d+$/)
        expect(status).toBe(200)
      } finally {
        proc.kill()
        await proc.exited
      }
      // The database goes; the kept dev-key file stays.
      if (round === 1) rmSync(join(dataDir, 'pgdata'), { recursive: true, force: true })
    }
  }, 90_000)

  test('error: a bad value stops the start with a message naming the field', async () => {
    const proc = Bun.spawn([process.execPath, 'src/main.ts'], {
      cwd: root,
      env: { PATH: process.env.PATH ?? '', PORT: 'many', CHAIN_ID: '5' },
      stdout: 'pipe',
      stderr: 'pipe',
    })
    expect(await proc.exited).toBe(1)
    const err = await new Response(proc.stderr).text()
    expect(err).toContain('PORT')
    // Started bare, without the launcher: warned that upstream requests are capped.
    expect(err).toContain('BUN_CONFIG_MAX_HTTP_REQUESTS')
  })

  test('error: a DATABASE_URL the gateway cannot connect to stops the start naming it, its password left out', async () => {
    const proc = Bun.spawn([process.execPath, 'src/main.ts'], {
      cwd: root,
      env: {
        PATH: process.env.PATH ?? '',
        PORT: '0',
        DATABASE_URL: 'postgres://someone:hunter2@127.0.0.1:1/tollway',
      },
      stdout: 'pipe',
      stderr: 'pipe',
    })
    expect(await proc.exited).toBe(1)
    const err = await new Response(proc.stderr).text()
    expect(err).toContain('DATABASE_URL: cannot use postgres://someone:***@127.0.0.1:1/tollway')
    expect(err).not.toContain('hunter2')
  })

  test('error: an empty kept admin token, a data dir another gateway serves, or one that cannot be written, stops the start naming it', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    writeFileSync(join(dataDir, 'admin-token'), '\n')
    const config = join(dataDir, 'config.json')
    writeFileSync(config, '{"devChain": false}')
    const start = async (dir: string) => {
      const proc = Bun.spawn([process.execPath, 'src/main.ts'], {
        cwd: root,
        env: {
          PATH: process.env.PATH ?? '',
          TOLLWAY_DATA_DIR: dir,
          PORT: '0',
          TOLLWAY_CONFIG: config,
        },
        stdout: 'pipe',
        stderr: 'pipe',
      })
      return { code: await proc.exited, err: await new Response(proc.stderr).text() }
    }
    const empty = await start(dataDir)
    expect(empty.code).toBe(1)
    expect(empty.err).toContain(join(dataDir, 'admin-token'))
    // A data dir whose embedded database a live process holds.
    const busy = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    mkdirSync(join(busy, 'pgdata'))
    const other = Bun.spawn([process.execPath, '-e', 'await Bun.sleep(30_000)'])
    try {
      writeFileSync(join(busy, 'pgdata', 'tollway.lock'), `${other.pid}\n`)
      const held = await start(busy)
      expect(held.code).toBe(1)
      expect(held.err).toContain(`in use by process ${other.pid}`)
    } finally {
      other.kill()
    }
    // A data dir that cannot be one (a file's path; as unwritable as a read-only or full disk).
    const file = join(dataDir, 'config.json')
    const unusable = await start(join(file, 'data'))
    expect(unusable.code).toBe(1)
    expect(unusable.err).toContain('configuration error')
    expect(unusable.err).toContain(`TOLLWAY_DATA_DIR / dataDir: cannot use ${join(file, 'data')}`)
    expect(unusable.err).not.toContain('    at ')
    // One where no directory can be made (mkdir answers ENOENT under /proc).
    if (process.platform === 'linux') {
      const nowhere = await start('/proc/tollway-data')
      expect(nowhere.code).toBe(1)
      expect(nowhere.err).toContain('TOLLWAY_DATA_DIR / dataDir: cannot use /proc/tollway-data')
      expect(nowhere.err).not.toContain('    at ')
    }
  }, 60_000)

  test('error: an embedded database that cannot be opened (its WAL lost, as a crash or a full disk leaves it) stops the start naming the data dir and what PostgreSQL said, not a WASM abort', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const config = join(dataDir, 'config.json')
    writeFileSync(config, '{"devChain": false}')
    const pgdata = join(dataDir, 'pgdata')
    const db = await PGlite.create(pgdata)
    await db.query('select 1')
    await db.close()
    const wal = join(pgdata, 'pg_wal')
    for (const f of readdirSync(wal)) if (/^[0-9A-F]{24}$/.test(f)) writeFileSync(join(wal, f), '')
    const proc = Bun.spawn(['bin/tollway', 'serve'], {
      cwd: root,
      env: {
        PATH: process.env.PATH ?? '',
        TOLLWAY_DATA_DIR: dataDir,
        PORT: '0',
        TOLLWAY_CONFIG: config,
      },
      stdout: 'pipe',
      stderr: 'pipe',
    })
    expect(await proc.exited).toBe(1)
    const err = await new Response(proc.stderr).text()
    expect(err).toContain('configuration error')
    expect(err).toContain(`the embedded database in ${pgdata} cannot be opened`)
    expect(err).toContain('could not locate a valid checkpoint record')
    expect(err).not.toContain('Aborted()')
    expect(err).not.toContain('    at ')
    // The data dir is not left locked.
    expect(existsSync(join(pgdata, 'tollway.lock'))).toBe(false)
  }, 60_000)

  test('error: a host that does not resolve, or a port in use, stops the start naming HOST / PORT', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const config = join(dataDir, 'config.json')
    writeFileSync(config, '{"devChain": false}')
    const taken = Bun.serve({ port: 0, hostname: '127.0.0.1', fetch: () => new Response() })
    try {
      for (const env of [
        { HOST: 'not.a.host.invalid', PORT: '0' },
        { HOST: '127.0.0.1', PORT: String(taken.port) },
      ]) {
        const proc = Bun.spawn([process.execPath, 'src/main.ts'], {
          cwd: root,
          env: {
            PATH: process.env.PATH ?? '',
            TOLLWAY_DATA_DIR: dataDir,
            TOLLWAY_CONFIG: config,
            ...env,
          },
          stdout: 'pipe',
          stderr: 'pipe',
        })
        expect(await proc.exited).toBe(1)
        const err = await new Response(proc.stderr).text()
        expect(err).toContain('HOST / PORT: cannot listen on')
        expect(err).toContain(env.HOST)
      }
    } finally {
      taken.stop(true)
    }
  }, 60_000)

  test('error: a partly configured chain names what is missing', async () => {
    const proc = Bun.spawn([process.execPath, 'src/main.ts'], {
      cwd: root,
      env: { PATH: process.env.PATH ?? '', CHAIN_RPC_URL: 'http://127.0.0.1:1' },
      stdout: 'pipe',
      stderr: 'pipe',
    })
    expect(await proc.exited).toBe(1)
    const err = await new Response(proc.stderr).text()
    expect(err).toContain('ESCROW_ADDRESS')
  })
})

describe('development chain port', () => {
  test("behavior: a DEV_CHAIN_PORT that is the gateway's own PORT leaves that port to the gateway; anvil takes a free one", async () => {
    const { start } = await import('../src/main.ts')
    const Config = await import('../src/Config.ts')
    const probe = Bun.serve({ port: 0, hostname: '127.0.0.1', fetch: () => new Response() })
    const port = probe.port!
    probe.stop(true)
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-main-'))
    const gateway = await start(
      Config.from({ dataDir, port, devChainPort: port, logLevel: 'error' }),
    )
    try {
      expect(gateway.url).toBe(`http://127.0.0.1:${port}`)
      expect(await (await fetch(`${gateway.url}/health`)).json()).toEqual({ status: 'ok' })
      expect(gateway.chain!.rpcUrl).not.toBe(`http://127.0.0.1:${port}`)
    } finally {
      await gateway.stop()
    }
  }, 60_000)
})
