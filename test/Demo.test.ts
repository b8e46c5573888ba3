/** `npm run demo` as a user runs it: a subprocess on a fresh machine state, nothing configured. */
import { describe, expect, test } from 'bun:test'
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const root = join(import.meta.dir, '..')

describe('npm run demo', () => {
  test('behavior: opens a channel, streams with several vouchers, a second call, closes; the payee received what the agent paid; exits 0', async () => {
    const proc = Bun.spawn([process.execPath, 'demo/index.ts'], {
      cwd: root,
      // Nothing configured: not even the DATABASE_URL the test run has.
      env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '' },
      stdout: 'pipe',
      stderr: 'pipe',
    })
    const [out, err, code] = await Promise.all([
      new Response(proc.stdout).text(),
      new Response(proc.stderr).text(),
      proc.exited,
    ])
    expect(err).toBe('')
    expect(code).toBe(0)
    const vouchers = Number(/vouchers sent mid-stream: (\d+)/.exec(out)?.[1])
    expect(vouchers).toBeGreaterThanOrEqual(3)
    expect(out).toContain('same channel: yes')
    expect(out).toMatch(/settlement tx 0x[0-9a-f]{64}/)
    const paid = /paid by the agent \(on-chain\): (\d+)/.exec(out)?.[1]
    const received = /received by the payee \(on-chain\): (\d+)/.exec(out)?.[1]
    expect(BigInt(paid!)).toBeGreaterThan(0n)
    expect(received).toBe(paid!)
    expect(out).toContain(`spent per the last receipt: ${paid}`)
    expect(out).toMatch(/receipts \(2\):\n {2}\{"status":"success"/)
    expect(out).toContain('done in')
  }, 60_000)

  test('behavior: interrupted (Ctrl-C) mid-stream, it stops its gateway and chain and leaves no data dir behind', async () => {
    // A temp dir of its own, to see what the demo leaves in it.
    const tmp = mkdtempSync(join(tmpdir(), 'tollway-demo-test-'))
    const proc = Bun.spawn([process.execPath, 'demo/index.ts'], {
      cwd: root,
      env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', TMPDIR: tmp },
      stdout: 'pipe',
      stderr: 'pipe',
    })
    const reader = proc.stdout.getReader()
    let out = ''
    while (!out.includes('[voucher 1')) {
      const { value, done } = await reader.read()
      if (done) throw new Error(`the demo ended before its first voucher:\n${out}`)
      out += new TextDecoder().decode(value)
    }
    expect(readdirSync(tmp).some((f) => f.startsWith('tollway-demo-'))).toBe(true)
    proc.kill('SIGINT')
    expect(await proc.exited).toBe(130)
    expect(readdirSync(tmp)).toEqual([])
    // Its development chain (anvil, its state file in the data dir) is gone too.
    const alive = readdirSync('/proc')
      .filter((p) => /^\d+$/.test(p))
      .filter((p) => {
        try {
          return readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(tmp)
        } catch {
          return false
        }
      })
    expect(alive).toEqual([])
    rmSync(tmp, { recursive: true, force: true })
  }, 60_000)
})
