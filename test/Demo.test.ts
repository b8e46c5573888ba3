/** `npm run demo` as a user runs it: a subprocess on a fresh machine state, nothing configured. */
import { describe, expect, test } from 'bun:test'
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
})
