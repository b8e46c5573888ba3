import { describe, expect, test } from 'bun:test'
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as Embedded from '../../src/ledger/Embedded.ts'

describe('Embedded', () => {
  test('error: a data dir another live process serves is refused; one whose process is gone is taken over, and released at stop', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tollway-embedded-'))
    const lock = join(dir, 'tollway.lock')
    // Another gateway: a bun process.
    const other = Bun.spawn([process.execPath, '-e', 'await Bun.sleep(30_000)'])
    try {
      writeFileSync(lock, `${other.pid}\n`)
      const refused = await Embedded.start({ dataDir: dir }).catch((e: unknown) => e)
      expect(refused).toBeInstanceOf(Embedded.InUseError)
      expect((refused as Error).message).toContain(String(other.pid))
    } finally {
      other.kill()
      await other.exited
    }
    // Its process is gone now: the lock is stale.
    const db = await Embedded.start({ dataDir: dir })
    expect(existsSync(lock)).toBe(true)
    await db.stop()
    expect(existsSync(lock)).toBe(false)
  }, 60_000)

  test('behavior: a lock naming a live process that is no gateway (its pid reused after a crash and a reboot) is taken over', async () => {
    if (process.platform !== 'linux') return
    const dir = mkdtempSync(join(tmpdir(), 'tollway-embedded-'))
    const lock = join(dir, 'tollway.lock')
    const other = Bun.spawn(['sleep', '30'])
    try {
      writeFileSync(lock, `${other.pid}\n`)
      const db = await Embedded.start({ dataDir: dir })
      expect(readFileSync(lock, 'utf8').trim()).toBe(String(process.pid))
      await db.stop()
    } finally {
      other.kill()
      await other.exited
    }
  }, 60_000)
})
