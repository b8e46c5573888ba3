import { describe, expect, test } from 'bun:test'
import { spawnSync } from 'node:child_process'
import {
  chmodSync,
  copyFileSync,
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import * as Db from '../../src/ledger/Db.ts'
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
      expect(readFileSync(lock, 'utf8').split('\n')[0]).toBe(String(process.pid))
      await db.stop()
    } finally {
      other.kill()
      await other.exited
    }
    // A lock that says when its process started: a bun process with that pid now, started
    // another time, is not its writer.
    const bun = Bun.spawn([process.execPath, '-e', 'await Bun.sleep(30_000)'])
    try {
      writeFileSync(lock, `${bun.pid}\n00000000-0000-0000-0000-000000000000/1\n`)
      const db = await Embedded.start({ dataDir: dir })
      expect(readFileSync(lock, 'utf8').split('\n')[0]).toBe(String(process.pid))
      await db.stop()
    } finally {
      bun.kill()
      await bun.exited
    }
  }, 60_000)
  test('behavior: a lock of a gateway killed outright that its parent has not reaped yet (a zombie) is taken over', async () => {
    if (process.platform !== 'linux') return
    const dir = mkdtempSync(join(tmpdir(), 'tollway-embedded-'))
    const lock = join(dir, 'tollway.lock')
    const state = (pid: number) => {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
      return stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    }
    // A parent that never reaps: the shell becomes sleep; its child, a bun, ends and stays
    // a zombie until the parent ends.
    const parent = Bun.spawn(
      ['sh', '-c', `"${process.execPath}" -e 'await Bun.sleep(200)' & echo $!; exec sleep 30`],
      { stdout: 'pipe' },
    )
    try {
      const first = await parent.stdout.getReader().read()
      const pid = Number(new TextDecoder().decode(first.value).trim())
      // The lock it wrote while it ran: its pid and when it started, as claim writes it.
      const boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()
      writeFileSync(lock, `${pid}\n${boot}/${state(pid)[19]}\n`)
      const deadline = Date.now() + 10_000
      while (state(pid)[0] !== 'Z') {
        if (Date.now() > deadline) throw new Error(`process ${pid} is not a zombie`)
        await Bun.sleep(20)
      }
      const db = await Embedded.start({ dataDir: dir })
      expect(readFileSync(lock, 'utf8').split('\n')[0]).toBe(String(process.pid))
      await db.stop()
    } finally {
      parent.kill()
      await parent.exited
    }
  }, 60_000)

  test('error: a data dir a live gateway holds is refused when that gateway runs a bun of another name (bun-profile, bun-debug)', async () => {
    if (process.platform !== 'linux') return
    const dir = mkdtempSync(join(tmpdir(), 'tollway-embedded-'))
    // A gateway started with a profiling build of bun: the same runtime, another file name.
    const bin = mkdtempSync(join(tmpdir(), 'tollway-bun-'))
    const profile = join(bin, 'bun-profile')
    copyFileSync(process.execPath, profile)
    chmodSync(profile, 0o755)
    const module = join(import.meta.dir, '../../src/ledger/Embedded.ts')
    const holder = Bun.spawn(
      [
        profile,
        '-e',
        `const E = await import(${JSON.stringify(module)}); await E.start({ dataDir: ${JSON.stringify(dir)} }); console.log('ready'); await Bun.sleep(60_000)`,
      ],
      { stdout: 'pipe', stderr: 'inherit' },
    )
    try {
      const ready = await new Response(holder.stdout).body!.getReader().read()
      expect(new TextDecoder().decode(ready.value)).toContain('ready')
      const refused = await Embedded.start({ dataDir: dir }).catch((e: unknown) => e)
      if (!(refused instanceof Error)) await (refused as Embedded.Embedded).stop()
      expect(refused).toBeInstanceOf(Embedded.InUseError)
      expect((refused as Error).message).toContain(String(holder.pid))
    } finally {
      holder.kill()
      await holder.exited
      rmSync(bin, { recursive: true, force: true })
    }
  }, 60_000)
  test('error: a data dir whose files the file system refuses (owned by another user, a read-only or full disk) is said to be that, not damage to move aside', async () => {
    if (process.platform !== 'linux') return
    const dir = mkdtempSync(join(tmpdir(), 'tollway-embedded-'))
    await (await Embedded.start({ dataDir: dir })).stop()
    // The directory may be written (the lock goes in), a file in it may not: as root, the
    // opener runs as nobody (PGlite made its files this user's, read-write for it alone).
    chmodSync(dir, 0o777)
    const root = process.getuid?.() === 0
    if (!root) chmodSync(join(dir, 'postmaster.pid'), 0)
    else writeFileSync(join(dir, 'postmaster.pid'), '', { mode: 0o600 })
    const module = join(import.meta.dir, '../../src/ledger/Embedded.ts')
    const script = join(mkdtempSync(join(tmpdir(), 'tollway-open-')), 'open.ts')
    writeFileSync(
      script,
      `const E = await import(${JSON.stringify(module)})
const e = await E.start({ dataDir: ${JSON.stringify(dir)} }).then(async (db) => { await db.stop(); return new Error('opened') }, (e) => e)
console.log(JSON.stringify({ name: e.name, message: e.message }))`,
    )
    chmodSync(dirname(script), 0o755)
    chmodSync(script, 0o644)
    const run = spawnSync(process.execPath, [script], {
      encoding: 'utf8',
      ...(root ? { uid: 65534, gid: 65534 } : {}),
    })
    const said = JSON.parse(run.stdout.trim().split('\n').at(-1)!) as {
      name: string
      message: string
    }
    expect(said.name).toBe('OpenError')
    expect(said.message).toContain('Permission denied')
    expect(said.message).not.toContain('move that directory aside')
    expect(said.message).toContain('not damage')
  }, 60_000)
})

describe('checkpoints', () => {
  test('behavior: the WAL of a long run is recycled, not kept: segments stay as many, however much is written', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-wal-'))
    const embedded = await Embedded.start({ dataDir })
    const sql = Db.connect({ url: embedded.url, max: 1 })
    const stop = Embedded.checkpoints(sql, 100)
    try {
      const segments = () =>
        readdirSync(join(dataDir, 'pg_wal')).filter((f) => /^[0-9A-F]{24}$/.test(f)).length
      await sql`create table filler (v text)`
      /** About 30 MB of WAL, then a checkpoint of the timer's after it. */
      const write = async () => {
        await sql`
          insert into filler
          select string_agg(md5(random()::text), '') from generate_series(1, 30000) g,
            generate_series(1, 30) h group by g`
        await sql`delete from filler`
        const [before] = await sql`select checkpoint_lsn from pg_control_checkpoint()`
        for (let i = 0; i < 100; i++) {
          const [now] = await sql`select checkpoint_lsn from pg_control_checkpoint()`
          if (now!.checkpoint_lsn !== before!.checkpoint_lsn) return
          await Bun.sleep(50)
        }
        throw new Error('no checkpoint came')
      }
      // The first checkpoints recycle as many segments as they find written between two (their
      // estimate of what the next will need): then no more are made.
      for (let i = 0; i < 3; i++) await write()
      const first = segments()
      for (let i = 0; i < 3; i++) await write()
      // Without checkpoints each 30 MB kept two more segments of 16 MB.
      expect(segments()).toBeLessThanOrEqual(first)
    } finally {
      stop()
      await sql.end()
      await embedded.stop()
      rmSync(dataDir, { recursive: true, force: true })
    }
  }, 120_000)
})
