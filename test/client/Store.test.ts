import { describe, expect, setSystemTime, test } from 'bun:test'
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync, readlinkSync } from 'node:fs'
import { mkdtemp, readdir, rm, stat, utimes, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import fc from 'fast-check'
import { ClientError, StoreInUseError } from '../../src/client/Errors.ts'
import * as Store from '../../src/client/Store.ts'

/** This process's pid namespace as owner files name it (boot id and namespace). */
const pidNamespace = () =>
  `@${readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()}/${readlinkSync('/proc/self/ns/pid')}`

const state = (n: number): Store.ChannelState => ({
  channelId: `0x${n.toString(16).padStart(64, '0')}`,
  chainId: 31337,
  escrow: `0x${'11'.repeat(20)}`,
  currency: `0x${'22'.repeat(20)}`,
  recipient: `0x${'33'.repeat(20)}`,
  deposit: '1000',
  signed: String(n),
  url: 'http://localhost/v1/chat/completions',
})

const dir = () => mkdtemp(join(tmpdir(), 'tollway-store-'))

/** Whether this machine lets a process start another in a pid namespace of its own (root, or
 * unprivileged user namespaces, and util-linux's unshare). */
const unshares = spawnSync('unshare', ['--pid', '--fork', '--mount-proc', 'true']).status === 0

describe('file', () => {
  test('behavior: a missing file is an empty store; set, get (from a second store), delete', async () => {
    const path = join(await dir(), 'nested', 'channels.json')
    const a = Store.file(path)
    expect(await a.get('k')).toBeUndefined()
    await a.set('k', state(1))
    expect(await Store.file(path).get('k')).toEqual(state(1))
    await a.delete('k')
    expect(await Store.file(path).get('k')).toBeUndefined()
  })

  test('behavior: concurrent sets all land', async () => {
    const path = join(await dir(), 'channels.json')
    const s = Store.file(path)
    await Promise.all(Array.from({ length: 20 }, (_, i) => s.set(`k${i}`, state(i))))
    for (let i = 0; i < 20; i++) expect(await Store.file(path).get(`k${i}`)).toEqual(state(i))
  })

  test('error: a file that is not JSON → ClientError saying what to do', async () => {
    const path = join(await dir(), 'channels.json')
    await writeFile(path, '{nope')
    const e = await Store.file(path)
      .get('k')
      .catch((e) => e)
    expect(e).toBeInstanceOf(ClientError)
    expect(e.message).toContain('move it away')
  })

  test('error: a store whose directory is a file (ENOTDIR) → ClientError naming the store on every step, not the bare fs error', async () => {
    const notDir = join(await dir(), 'data')
    await writeFile(notDir, 'a file')
    const path = join(notDir, 'channels.json')
    const s = Store.file(path)
    for (const step of [
      () => s.get('k'),
      () => s.set('k', state(1)),
      () => s.closedTotal('k'),
      () => s.own!('k'),
      () => s.all!(),
    ]) {
      const e = await step().catch((e: unknown) => e)
      expect(e).toBeInstanceOf(ClientError)
      expect((e as ClientError).message).toContain(`The channel store ${path} cannot be`)
      // ENOTDIR reading it, EEXIST making its directory.
      expect((e as ClientError).details).toMatchObject({ path, code: expect.any(String) })
    }
  })
})

describe('closedTotal', () => {
  test('behavior: file: adds (concurrently too) and reads back from a second store; 0n when none', async () => {
    const path = join(await dir(), 'channels.json')
    const a = Store.file(path)
    expect(await a.closedTotal('k')).toBe(0n)
    await a.set('k', state(1))
    await Promise.all(Array.from({ length: 10 }, () => a.addClosedTotal('k', 7n)))
    const b = Store.file(path)
    expect(await b.closedTotal('k')).toBe(70n)
    expect(await b.closedTotal('other')).toBe(0n)
    expect(await b.get('k')).toEqual(state(1))
  })

  test('behavior: file: the first format (the channels map alone) still reads', async () => {
    const path = join(await dir(), 'channels.json')
    await writeFile(path, JSON.stringify({ k: state(3) }))
    const s = Store.file(path)
    expect(await s.get('k')).toEqual(state(3))
    expect(await s.closedTotal('k')).toBe(0n)
    await s.addClosedTotal('k', 5n)
    expect(await Store.file(path).get('k')).toEqual(state(3))
    expect(await Store.file(path).closedTotal('k')).toBe(5n)
  })

  test('error: a closed total that is not a decimal string → ClientError, not a smaller limit', async () => {
    const path = join(await dir(), 'channels.json')
    await writeFile(path, JSON.stringify({ channels: {}, closedTotals: { k: '-5' } }))
    const e = await Store.file(path)
      .closedTotal('k')
      .catch((e) => e)
    expect(e).toBeInstanceOf(ClientError)
    expect(e.message).toContain('repair')
  })

  test('behavior: memory: adds up', async () => {
    const s = Store.memory()
    await s.addClosedTotal('k', 2n)
    await s.addClosedTotal('k', 3n)
    expect(await s.closedTotal('k')).toBe(5n)
  })
})

describe('file (property)', () => {
  test('property: any JSON in the file: get, closedTotal and reserve return a value or throw ClientError, nothing else', async () => {
    const path = join(await dir(), 'channels.json')
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.json(),
          fc
            .record(
              { channels: fc.jsonValue(), closedTotals: fc.jsonValue() },
              { requiredKeys: [] },
            )
            .map((v) => JSON.stringify(v)),
        ),
        async (text) => {
          await writeFile(path, text)
          const s = Store.file(path)
          try {
            const got = await s.get('k')
            // A channel comes back whole, or not at all.
            if (got !== undefined) expect(Store.ChannelState.parse(got)).toEqual(got)
          } catch (e) {
            expect(e).toBeInstanceOf(ClientError)
          }
          try {
            expect(typeof (await s.closedTotal('k'))).toBe('bigint')
          } catch (e) {
            expect(e).toBeInstanceOf(ClientError)
          }
          // Every key in the budget: each entry of the file is read.
          try {
            const granted = await s.reserve!('k', 5n, { limit: 10n, shares: () => true })
            expect(granted >= 0n && granted <= 5n).toBe(true)
          } catch (e) {
            expect(e).toBeInstanceOf(ClientError)
          }
          // Each run's store gives back what it holds (its presence file and its renewal), as
          // a client that is done does: a thousand left held renew a thousand files.
          await s.release!().catch((e: unknown) => expect(e).toBeInstanceOf(ClientError))
        },
      ),
      { numRuns: 1000 },
    )
  }, 60_000)
})

/** A second process running `code` against the store module (imported as `Store`). */
function child(code: string) {
  const store = join(import.meta.dir, '../../src/client/Store.ts')
  return Bun.spawn(
    [process.execPath, '-e', `import * as Store from ${JSON.stringify(store)}\n${code}`],
    { stdout: 'pipe', stderr: 'inherit' },
  )
}

/** Another process holding 700 of 1,000 reserved under `x#0xP` in the store file at `path`,
 * until killed; it prints `reserved` once it holds it. */
const holding = (path: string) =>
  child(`
    const s = Store.file(${JSON.stringify(path)})
    await s.reserve('x#0xP', 700n, { limit: 1000n, shares: (k) => k.includes('#0xP') })
    console.log('reserved')
    await new Promise(() => setInterval(() => {}, 1000))
  `)

/** Waits until `proc` prints a line starting with `line`; that whole line. */
async function printed(proc: { stdout: ReadableStream<Uint8Array> }, line: string) {
  const reader = proc.stdout.getReader()
  let out = ''
  const found = () => out.split('\n').find((l, i, all) => l.startsWith(line) && i < all.length - 1)
  while (found() === undefined) {
    const { value, done } = await reader.read()
    if (done) throw new Error(`the child ended before printing ${line}: ${out}`)
    out += new TextDecoder().decode(value)
  }
  reader.releaseLock()
  return found() as string
}

/** Whether this machine makes named pipes (mkfifo). */
const fifos = spawnSync('mkfifo', ['--help']).status === 0

/**
 * Stalls the next write of `key` by store `s` under the write lock, as a stalled disk would, until
 * `resume`: `s` claims `key`, then its owner file, which that write reads (a store checks its
 * claim before it stores a channel), becomes a named pipe nothing writes to. `locked` waits until
 * the write holds the lock; `resume` writes the owner file's line into the pipe, and puts the
 * file back.
 */
async function stall(path: string, key: string, s: Store.Store) {
  await s.own!(key)
  const name = (await readdir(dirname(path))).find((f) => f.endsWith('.owner')) as string
  const owner = join(dirname(path), name)
  const line = await Bun.file(owner).text()
  await rm(owner)
  expect(spawnSync('mkfifo', [owner]).status).toBe(0)
  return {
    async locked() {
      while (!existsSync(`${path}.lock`)) await Bun.sleep(5)
    },
    async resume() {
      await writeFile(owner, line)
      await rm(owner)
      await writeFile(owner, line)
    },
  }
}

describe('file across processes', () => {
  test('behavior: writes from two processes at once all land', async () => {
    const path = join(await dir(), 'channels.json')
    const writer = (who: string) =>
      child(`
        const s = Store.file(${JSON.stringify(path)})
        const state = (n) => ({ channelId: '0x' + n.toString(16).padStart(64, '0'), chainId: 31337,
          escrow: '0x' + '11'.repeat(20), currency: '0x' + '22'.repeat(20),
          recipient: '0x' + '33'.repeat(20), deposit: '1000', signed: String(n), url: 'http://x' })
        // One after another, as a client writes, each a read and a write of the whole file.
        for (let i = 0; i < 40; i++) await s.set('${who}' + i, state(i))
        await s.addClosedTotal('total', 1n)
      `)
    const both = [writer('a'), writer('b')]
    expect(await Promise.all(both.map((p) => p.exited))).toEqual([0, 0])
    const all = await Store.file(path).all!()
    expect(Object.keys(all.channels).length).toBe(80)
    expect(all.closedTotals.total).toBe(2n)
  }, 30_000)

  test('behavior: a stale lock (its writer died) found by several writers at once is taken over by one at a time: every write lands', async () => {
    // Stores of their own stand for processes: they share nothing but the files.
    for (let trial = 0; trial < 30; trial++) {
      const path = join(await dir(), 'channels.json')
      // Left a minute ago by a process that died holding it.
      await writeFile(`${path}.lock`, '')
      const old = new Date(Date.now() - 60_000)
      await utimes(`${path}.lock`, old, old)
      const writers = Array.from({ length: 4 }, () => Store.file(path))
      const done = await Promise.allSettled(writers.map((w) => w.addClosedTotal('total', 1n)))
      expect(done.filter((d) => d.status === 'rejected')).toEqual([])
      expect(await Store.file(path).closedTotal('total')).toBe(4n)
    }
  }, 60_000)

  test('behavior: a lock left by a writer that died mid-write is taken over at once, not after its age', async () => {
    const path = join(await dir(), 'channels.json')
    // A process that wrote its pid in the lock, then died (killed mid-write).
    const dead = child(`console.log('started')`)
    await printed(dead, 'started')
    expect(await dead.exited).toBe(0)
    await writeFile(`${path}.lock`, String(dead.pid))
    const started = performance.now()
    await Store.file(path).addClosedTotal('total', 1n)
    expect(performance.now() - started).toBeLessThan(1_000)
    expect(await Store.file(path).closedTotal('total')).toBe(1n)
  }, 30_000)

  test('behavior: a lock of a writer in another pid namespace or machine (a container, a host sharing the volume) is not taken for its pid gone here; it is once older than any write takes', async () => {
    const path = join(await dir(), 'channels.json')
    // Its pid names no process here (a pid of an ended process of ours stands for it).
    const gone = child(`console.log('started')`)
    await printed(gone, 'started')
    expect(await gone.exited).toBe(0)
    await writeFile(`${path}.lock`, `${gone.pid} @another-boot/pid:[1]`)
    // Held for the whole wait (10 s): the write gives up, the holder's lock left as it was.
    const e = await Store.file(path)
      .addClosedTotal('total', 1n)
      .catch((e: unknown) => e)
    expect(e).toBeInstanceOf(ClientError)
    expect((e as ClientError).message).toContain('stayed locked')
    expect(await Bun.file(`${path}.lock`).text()).toBe(`${gone.pid} @another-boot/pid:[1]`)
    expect(await Store.file(path).closedTotal('total')).toBe(0n)
    // A minute old: its writer died holding it.
    const old = new Date(Date.now() - 60_000)
    await utimes(`${path}.lock`, old, old)
    await Store.file(path).addClosedTotal('total', 1n)
    expect(await Store.file(path).closedTotal('total')).toBe(1n)
  }, 30_000)

  test('behavior: a lock of a writer in another pid namespace or machine is aged by the clock of the file system that dated it: a clock 5 minutes ahead here does not take a lock dated just now', async () => {
    const path = join(await dir(), 'channels.json')
    await writeFile(`${path}.lock`, '1 @another-boot/pid:[1]')
    setSystemTime(new Date(Date.now() + 300_000))
    try {
      const writing = Store.file(path).addClosedTotal('total', 1n)
      // Its writer still at it: the write waits (stolen, it would land at once).
      await Bun.sleep(500)
      expect(await Bun.file(`${path}.lock`).text()).toBe('1 @another-boot/pid:[1]')
      expect(await Store.file(path).closedTotal('total')).toBe(0n)
      // Done: it removes its lock, and the write lands.
      await rm(`${path}.lock`)
      await writing
      expect(await Store.file(path).closedTotal('total')).toBe(1n)
    } finally {
      setSystemTime()
    }
  }, 30_000)

  test.skipIf(!existsSync('/proc/self/stat'))(
    'behavior: a lock of a live writer of this namespace is never taken, however old; one naming a process given its pid later (another start time) is',
    async () => {
      const path = join(await dir(), 'channels.json')
      const writer = child(`
      console.log('up')
      await new Promise(() => setInterval(() => {}, 1000))
    `)
      try {
        await printed(writer, 'up')
        const stat = readFileSync(`/proc/${writer.pid}/stat`, 'utf8')
        const since = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]
        const ns = pidNamespace()
        // Its write under way a minute (a disk stalled): waited for, until the wait gives up.
        await writeFile(`${path}.lock`, `${writer.pid} ${ns} ~${since}`)
        const old = new Date(Date.now() - 60_000)
        await utimes(`${path}.lock`, old, old)
        const e = await Store.file(path)
          .addClosedTotal('total', 1n)
          .catch((e: unknown) => e)
        expect(e).toBeInstanceOf(ClientError)
        expect((e as ClientError).message).toContain('stayed locked')
        expect(await Bun.file(`${path}.lock`).text()).toBe(`${writer.pid} ${ns} ~${since}`)
        // The same pid, started at another time: the lock's writer died, its pid given to this one.
        await writeFile(`${path}.lock`, `${writer.pid} ${ns} ~1`)
        await Store.file(path).addClosedTotal('total', 1n)
        expect(await Store.file(path).closedTotal('total')).toBe(1n)
      } finally {
        writer.kill('SIGKILL')
        await writer.exited
      }
    },
    30_000,
  )

  test.skipIf(!fifos)(
    'error: a write whose lock was taken while it stalled (judged dead after 30 s by a writer of another namespace) stores nothing: ClientError, the file and the lock left to that writer',
    async () => {
      const path = join(await dir(), 'channels.json')
      const key = 'http://127.0.0.1:8787#0xfee'
      const s = Store.file(path)
      await s.set(key, state(100))
      const stalled = await stall(path, key, s)
      const writing = s.set(key, state(200)).catch((e: unknown) => e)
      await stalled.locked()
      // Taken over by a writer of another namespace, which stores what its channels closed for.
      const taker = '7 @another-boot/pid:[1]'
      await writeFile(`${path}.lock`, taker)
      const theirs = await Bun.file(path).text()
      await writeFile(
        path,
        JSON.stringify({ channels: { [key]: state(100) }, closedTotals: { other: '500' } }),
      )
      const taken = await Bun.file(path).text()
      expect(taken).not.toBe(theirs)
      await stalled.resume()
      const e = await writing
      expect(e).toBeInstanceOf(ClientError)
      expect((e as ClientError).message).toContain('was taken over by another writer')
      // Its update not renamed over the taker's, whose lock it leaves in place.
      expect(await Bun.file(path).text()).toBe(taken)
      expect(await Store.file(path).closedTotal('other')).toBe(500n)
      expect(await Bun.file(`${path}.lock`).text()).toBe(taker)
      expect((await readdir(dirname(path))).filter((f) => f.endsWith('.tmp'))).toEqual([])
      // The taker done: this store writes again.
      await rm(`${path}.lock`)
      await s.set(key, state(200))
      expect(await Store.file(path).get(key)).toEqual(state(200))
      expect(await Store.file(path).closedTotal('other')).toBe(500n)
      await s.release!()
    },
    30_000,
  )

  test.skipIf(!fifos)(
    'behavior: a lock of another store of this process on the same file is never taken while its write is under way, however old; the other store writes once that write is done',
    async () => {
      const path = join(await dir(), 'channels.json')
      const key = 'http://127.0.0.1:8787#0xfab'
      const a = Store.file(path)
      const b = Store.file(path)
      const stalled = await stall(path, key, a)
      const writing = a.set(key, state(200))
      await stalled.locked()
      // Its write under way a minute (a disk stalled): waited for, until the wait gives up.
      const old = new Date(Date.now() - 60_000)
      await utimes(`${path}.lock`, old, old)
      const e = await b.addClosedTotal('total', 1n).catch((e: unknown) => e)
      expect(e).toBeInstanceOf(ClientError)
      expect((e as ClientError).message).toContain('stayed locked')
      await stalled.resume()
      await writing
      expect(existsSync(`${path}.lock`)).toBe(false)
      await b.addClosedTotal('total', 1n)
      expect(await Store.file(path).get(key)).toEqual(state(200))
      expect(await Store.file(path).closedTotal('total')).toBe(1n)
      await a.release!()
    },
    30_000,
  )

  test('error: a key another live process owns → StoreInUseError naming it; once it is gone, the key is taken over', async () => {
    const path = join(await dir(), 'channels.json')
    const key = 'http://127.0.0.1:8787#0xabc'
    const holder = child(`
      await Store.file(${JSON.stringify(path)}).own(${JSON.stringify(key)})
      console.log('owned')
      await new Promise(() => setInterval(() => {}, 1000))
    `)
    const s = Store.file(path)
    try {
      await printed(holder, 'owned')
      const refused = await s.own!(key).catch((e) => e)
      expect(refused).toBeInstanceOf(StoreInUseError)
      expect(refused).toBeInstanceOf(ClientError)
      expect(refused.message).toContain(`pid ${holder.pid}`)
      expect(refused.details).toMatchObject({ pid: holder.pid, key })
      // Another server (another key) is not held.
      await s.own!('http://127.0.0.1:9999#0xabc')
    } finally {
      // Killed (no exit handler ran): its claim is left, and taken over as its process is gone.
      holder.kill('SIGKILL')
      await holder.exited
    }
    await s.own!(key)
    // Owned by this store now: a further claim from it is no error.
    await s.own!(key)
  }, 30_000)

  test('error: a key a process in another pid namespace or machine owns → StoreInUseError while its presence file is renewed, though its pid names no process here; taken over once that file is stale', async () => {
    const path = join(await dir(), 'channels.json')
    const key = 'http://127.0.0.1:8787#0xf00'
    const token = crypto.randomUUID()
    const gone = child(`console.log('started')`)
    await printed(gone, 'started')
    await gone.exited
    const s = Store.file(path)
    // Claims it, then gives it up: the owner file's name.
    await s.own!(key)
    const owner = (await readdir(dirname(path))).find((f) => f.endsWith('.owner')) as string
    await s.release!()
    await writeFile(join(dirname(path), owner), `${gone.pid} ${token} @another-boot/pid:[1]`)
    await writeFile(`${path}.${token}.alive`, `${gone.pid} ${token} @another-boot/pid:[1]`)
    const refused = await s.own!(key).catch((e) => e)
    expect(refused).toBeInstanceOf(StoreInUseError)
    expect(refused.message).toContain('another container or on another machine')
    expect(refused.details).toMatchObject({ pid: gone.pid, key })
    const old = new Date(Date.now() - 180_000)
    await utimes(`${path}.${token}.alive`, old, old)
    await s.own!(key)
    await s.release!()
  }, 30_000)

  test('error: a store whose claim lapsed (its process unreachable past its presence file, a machine asleep) and was taken over by a process of another namespace stores its channel no more: StoreInUseError', async () => {
    const path = join(await dir(), 'channels.json')
    const key = 'http://127.0.0.1:8787#0xbee'
    const s = Store.file(path)
    await s.own!(key)
    await s.set(key, state(100))
    const owner = (await readdir(dirname(path))).find((f) => f.endsWith('.owner')) as string
    const token = crypto.randomUUID()
    await writeFile(join(dirname(path), owner), `7 ${token} @another-boot/pid:[1]`)
    const e = await s.set(key, state(200)).catch((e: unknown) => e)
    expect(e).toBeInstanceOf(StoreInUseError)
    expect((e as StoreInUseError).details).toMatchObject({ key, pid: 7 })
    expect(await s.get(key)).toEqual(state(100))
    // Its claim file gone (deleted by hand, nobody else claiming): claimed again as it stores.
    await rm(join(dirname(path), owner))
    await s.set(key, state(100))
    expect(await Bun.file(join(dirname(path), owner)).text()).toStartWith(`${process.pid} `)
    await s.release!()
  }, 30_000)

  /** A store of a new file that owned `key` and let it go: its owner file stays, for a test
   * to write another holder into. */
  const releasedOwner = async (key: string) => {
    const path = join(await dir(), 'channels.json')
    const s = Store.file(path)
    await s.own!(key)
    const owner = join(
      dirname(path),
      (await readdir(dirname(path))).find((f) => f.endsWith('.owner')) as string,
    )
    await s.release!()
    return { s, owner }
  }

  test.skipIf(!existsSync('/proc/self/stat'))(
    'behavior: a key whose owner file names a live process of this namespace started at another time (the pid given to it after the owner died) is taken over',
    async () => {
      const key = 'http://127.0.0.1:8787#0xace'
      const { s, owner } = await releasedOwner(key)
      const other = child(`
      console.log('up')
      await new Promise(() => setInterval(() => {}, 1000))
    `)
      try {
        await printed(other, 'up')
        const ns = pidNamespace()
        await writeFile(owner, `${other.pid} ${crypto.randomUUID()} ${ns} ~1`)
        await s.own!(key)
        expect(await Bun.file(owner).text()).toStartWith(`${process.pid} `)
      } finally {
        other.kill('SIGKILL')
        await other.exited
      }
      await s.release!()
    },
    30_000,
  )

  test.skipIf(!existsSync('/proc/self/stat'))(
    'behavior: a key whose owner file names a zombie (killed, never reaped by its parent) is taken over',
    async () => {
      const key = 'http://127.0.0.1:8787#0xdead'
      const { s, owner } = await releasedOwner(key)
      // A shell starts a child, prints its pid and becomes a sleep, which never reaps it: the
      // child, once it ends, stays a zombie (as a paying script killed under `timeout -s KILL`).
      const parent = Bun.spawn(['sh', '-c', 'sleep 0 & echo $!; exec sleep 30'], {
        stdout: 'pipe',
      })
      try {
        const reader = parent.stdout.getReader()
        const pid = Number(new TextDecoder().decode((await reader.read()).value).trim())
        const stat = () => readFileSync(`/proc/${pid}/stat`, 'utf8')
        const state = () => stat().slice(stat().lastIndexOf(')') + 2)
        for (let i = 0; i < 100 && !state().startsWith('Z'); i++) await Bun.sleep(20)
        expect(state()).toStartWith('Z')
        const ns = pidNamespace()
        await writeFile(owner, `${pid} ${crypto.randomUUID()} ${ns} ~${state().split(' ')[19]}`)
        await s.own!(key)
        expect(await Bun.file(owner).text()).toStartWith(`${process.pid} `)
      } finally {
        parent.kill('SIGKILL')
        await parent.exited
      }
      await s.release!()
    },
    30_000,
  )

  test('error: a key another store of this process owns → StoreInUseError; once it is released, or collected, the key is taken', async () => {
    const path = join(await dir(), 'channels.json')
    const key = 'http://127.0.0.1:8787#0x123'
    const first = Store.file(path)
    await first.own!(key)
    const second = Store.file(path)
    const refused = await second.own!(key).catch((e) => e)
    expect(refused).toBeInstanceOf(StoreInUseError)
    expect(refused.message).toContain('in this process')
    expect(refused.details).toMatchObject({ pid: process.pid, key })
    await first.release!()
    await second.own!(key)
    // A store no longer referenced (its client dropped) gives its keys up when collected.
    await (async () => {
      await second.release!()
      await Store.file(path).own!(key)
    })()
    Bun.gc(true)
    await new Promise((r) => setTimeout(r, 10))
    Bun.gc(true)
    await Store.file(path).own!(key)
  }, 30_000)

  test('behavior: a process that ends gives its keys up', async () => {
    const path = join(await dir(), 'channels.json')
    const key = 'http://127.0.0.1:8787#0xdef'
    const holder = child(`await Store.file(${JSON.stringify(path)}).own(${JSON.stringify(key)})`)
    expect(await holder.exited).toBe(0)
    // Its presence file (for processes of other namespaces) too.
    const left = (await readdir(dirname(path))).filter(
      (f) => f.endsWith('.owner') || f.endsWith('.alive'),
    )
    expect(left).toEqual([])
    await Store.file(path).own!(key)
  }, 30_000)
})

/** The budget of payer 0xP (its keys hold `#0xP`) within `limit`. */
const budget = (limit: bigint) => ({ limit, shares: (k: string) => k.includes('#0xP') })

describe('reserve', () => {
  for (const [name, make] of [
    ['file', async () => Store.file(join(await dir(), 'channels.json'))],
    ['memory', async () => Store.memory()],
  ] as const)
    test(`behavior: ${name}: grants within the limit, the most that fits past it; a lower amount always; the budget counts the payer's closed totals, signed channels (set apart too) and other keys' reservations, not another payer's`, async () => {
      const s = await make()
      await s.addClosedTotal('a#0xP', 30n)
      await s.set('b#0xP', state(100))
      await s.set('b#0xP#refused', state(50))
      // Another payer's, in the same store: not in this budget.
      await s.set('c#0xQ', state(900))
      await s.addClosedTotal('c#0xQ', 900n)
      // 30 closed, 100 and 50 signed: 820 free.
      expect(await s.reserve!('a#0xP', 500n, budget(1_000n))).toBe(500n)
      // 30, 500 reserved, 50: 420 free; b's own 100 signed is within what it asks for.
      expect(await s.reserve!('b#0xP', 600n, budget(1_000n))).toBe(420n)
      // 30, b's 420 reserved (over its 100 signed), 50.
      expect(await s.reserve!('a#0xP', 900n, budget(1_000n))).toBe(500n)
      // Lowered: the rest goes back.
      expect(await s.reserve!('a#0xP', 200n, budget(1_000n))).toBe(200n)
      expect(await s.reserve!('b#0xP', 600n, budget(1_000n))).toBe(600n)
      // The rest, then nothing: 0n.
      expect(await s.reserve!('d#0xP', 200n, budget(1_000n))).toBe(120n)
      expect(await s.reserve!('e#0xP', 100n, budget(1_000n))).toBe(0n)
      // Asking for more never loses what is held, though the key's own closed total now counts
      // too (its channel closed, what it reserved not given back yet).
      await s.addClosedTotal('d#0xP', 120n)
      expect(await s.reserve!('d#0xP', 121n, budget(1_000n))).toBe(120n)
      expect(await s.reserve!('d#0xP', 0n, budget(1_000n))).toBe(0n)
      expect(await s.reserve!('d#0xP', 120n, budget(1_000n))).toBe(0n)
    })

  test('behavior: file: a reservation counts while its holder is in use: another live process, another store of this process; not once the process ended or the store was released', async () => {
    const path = join(await dir(), 'channels.json')
    const holder = holding(path)
    const s = Store.file(path)
    try {
      await printed(holder, 'reserved')
      expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(300n)
    } finally {
      holder.kill('SIGKILL')
      await holder.exited
    }
    // Its process is gone: it signed nothing past its channels' entries.
    expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(1_000n)
    // Another store of this process on the file.
    await s.reserve!('y#0xP', 0n, budget(1_000n))
    const other = Store.file(path)
    expect(await other.reserve!('x#0xP', 600n, budget(1_000n))).toBe(600n)
    expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(400n)
    await other.release!()
    expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(1_000n)
    // Released, its reservations are gone from the file too (for other processes).
    const content = JSON.parse(await Bun.file(path).text())
    expect(Object.keys(content.reserved)).toEqual(['y#0xP'])
  }, 30_000)

  test('behavior: file: a reservation whose process ended is removed at the next reservation: a process given its pid later does not make it count again', async () => {
    const path = join(await dir(), 'channels.json')
    const holder = holding(path)
    await printed(holder, 'reserved')
    holder.kill('SIGKILL')
    await holder.exited
    const s = Store.file(path)
    expect(await s.reserve!('y#0xP', 100n, budget(1_000n))).toBe(100n)
    // The system gives the ended process's pid to another, long-lived one: here a live process's
    // pid written in its place, as that reuse would leave the file.
    const other = child(`
      console.log('up')
      await new Promise(() => setInterval(() => {}, 1000))
    `)
    try {
      await printed(other, 'up')
      const content = JSON.parse(await Bun.file(path).text())
      if (content.reserved['x#0xP']) content.reserved['x#0xP'].pid = other.pid
      await writeFile(path, JSON.stringify(content))
      // Nothing else holds anything: all of the limit.
      expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(1_000n)
    } finally {
      other.kill('SIGKILL')
      await other.exited
    }
  }, 30_000)

  test('behavior: file: reservations and writes from two processes at once: the grants together stay within the limit', async () => {
    const path = join(await dir(), 'channels.json')
    const reserver = (who: string) =>
      child(`
        const s = Store.file(${JSON.stringify(path)})
        const budget = { limit: 1000n, shares: (k) => k.includes('#0xP') }
        let granted = 0n
        // Up to 800 each, 20 at a time: together they ask more than the limit.
        for (let i = 1; i <= 40; i++) granted = await s.reserve('${who}#0xP', BigInt(i) * 20n, budget)
        console.log('granted ' + granted)
        await new Promise(() => setInterval(() => {}, 1000))
      `)
    const both = [reserver('a'), reserver('b')]
    try {
      const lines = await Promise.all(both.map((p) => printed(p, 'granted')))
      const granted = lines.map((l) => BigInt(l.split(' ')[1] as string))
      const sum = granted.reduce((a, b) => a + b, 0n)
      expect(sum).toBeLessThanOrEqual(1_000n)
      // Still held (their processes live): a third gets only what is left.
      expect(await Store.file(path).reserve!('c#0xP', 1_000n, budget(1_000n))).toBe(1_000n - sum)
    } finally {
      for (const p of both) p.kill('SIGKILL')
      await Promise.all(both.map((p) => p.exited))
    }
  }, 30_000)

  test('behavior: file: a reservation of a store in another pid namespace or machine counts while its presence file is renewed, whatever its pid names here; not once that file is stale or gone', async () => {
    const path = join(await dir(), 'channels.json')
    const token = crypto.randomUUID()
    const alive = `${path}.${token}.alive`
    const gone = child(`console.log('started')`)
    await printed(gone, 'started')
    await gone.exited
    /** The file as that store left it: 700 reserved under `x#0xP`, its pid `pid`. */
    const foreign = (pid: number) =>
      writeFile(
        path,
        JSON.stringify({
          channels: {},
          closedTotals: {},
          reserved: { 'x#0xP': { amount: '700', pid, token, ns: '@another-boot/pid:[1]' } },
        }),
      )
    // Live there (renewed just now), its pid naming no process here: it counts.
    await writeFile(alive, `${gone.pid} ${token} @another-boot/pid:[1]`)
    await foreign(gone.pid as number)
    const s = Store.file(path)
    expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(300n)
    // Not renewed for three minutes (its process died there), its pid naming a live process
    // here (init): it counts no more, and is removed.
    const old = new Date(Date.now() - 180_000)
    await utimes(alive, old, old)
    await foreign(1)
    expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(1_000n)
    expect(Object.keys(JSON.parse(await Bun.file(path).text()).reserved)).toEqual(['y#0xP'])
    // Its presence file gone (its store released, its process ended): nothing either.
    await rm(alive)
    await foreign(1)
    expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(1_000n)
    await s.release!()
  }, 30_000)

  test('behavior: file: a presence file is aged by the clock of the file system that dated it, not by this machine: a clock 5 minutes ahead here still counts a store renewed just now', async () => {
    const path = join(await dir(), 'channels.json')
    const token = crypto.randomUUID()
    await writeFile(
      path,
      JSON.stringify({
        channels: {},
        closedTotals: {},
        reserved: { 'x#0xP': { amount: '700', pid: 1, token, ns: '@another-boot/pid:[1]' } },
      }),
    )
    await writeFile(`${path}.${token}.alive`, `1 ${token} @another-boot/pid:[1]`)
    const s = Store.file(path)
    setSystemTime(new Date(Date.now() + 300_000))
    try {
      expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(300n)
    } finally {
      setSystemTime()
    }
    await s.release!()
  }, 30_000)

  test.skipIf(!unshares)(
    'behavior: file: a reservation of a real process in another pid namespace counts while it runs, and not once it ended',
    async () => {
      const path = join(await dir(), 'channels.json')
      const store = join(import.meta.dir, '../../src/client/Store.ts')
      // Pid 1 in a pid namespace of its own: a live process of that pid here is init.
      const other = Bun.spawn(
        [
          'unshare',
          '--pid',
          '--fork',
          '--mount-proc',
          process.execPath,
          '-e',
          `import * as Store from ${JSON.stringify(store)}
        const s = Store.file(${JSON.stringify(path)})
        await s.reserve('x#0xP', 700n, { limit: 1000n, shares: (k) => k.includes('#0xP') })
        console.log('reserved ' + process.pid)
        for await (const _ of console) break`,
        ],
        { stdin: 'pipe', stdout: 'pipe', stderr: 'inherit' },
      )
      const s = Store.file(path)
      try {
        expect(await printed(other, 'reserved')).toBe('reserved 1')
        expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(300n)
      } finally {
        other.stdin.write('end\n')
        other.stdin.end()
        await other.exited
      }
      expect(other.exitCode).toBe(0)
      expect(await s.reserve!('y#0xP', 1_000n, budget(1_000n))).toBe(1_000n)
      await s.release!()
    },
    30_000,
  )

  test('behavior: file: a store holding a reservation renews its presence file (processes of other namespaces see it in use)', async () => {
    const path = join(await dir(), 'channels.json')
    const s = Store.file(path)
    await s.reserve!('y#0xP', 100n, budget(1_000n))
    const alive = (await readdir(dirname(path))).find((f) => f.endsWith('.alive')) as string
    const old = new Date(Date.now() - 180_000)
    await utimes(join(dirname(path), alive), old, old)
    // Renewed within its heartbeat (10 s): waited for, not timed.
    while ((await stat(join(dirname(path), alive))).mtimeMs < Date.now() - 60_000)
      await Bun.sleep(200)
    await s.release!()
    expect((await readdir(dirname(path))).filter((f) => f.endsWith('.alive'))).toEqual([])
  }, 30_000)

  test('error: file: a store whose reservation was removed while its process was unreachable (a machine asleep past its presence file) stores no signature past it that no longer fits: ClientError; one that fits is reserved again', async () => {
    const path = join(await dir(), 'channels.json')
    /** What a process of another namespace leaves, judging this store gone: its reservation
     * removed, `amount` reserved by a live store of its own. */
    const takenBy = async (amount: string) => {
      const content = JSON.parse(await Bun.file(path).text())
      const token = crypto.randomUUID()
      content.reserved = { 'x#0xP': { amount, pid: 1, token, ns: '@another-boot/pid:[1]' } }
      await writeFile(`${path}.${token}.alive`, `1 ${token} @another-boot/pid:[1]`)
      await writeFile(path, JSON.stringify(content))
    }
    const s = Store.file(path)
    expect(await s.reserve!('y#0xP', 500n, budget(1_000n))).toBe(500n)
    await s.set('y#0xP', state(100))
    await takenBy('600')
    // 450 signed would make 1,050 with the other's 600.
    const e = await s.set('y#0xP', state(450)).catch((e: unknown) => e)
    expect(e).toBeInstanceOf(ClientError)
    expect((e as ClientError).message).toContain('Release this paying fetch')
    expect(await s.get('y#0xP')).toEqual(state(100))
    // Refused from then on (its client believes it holds 500), but for what it stored already.
    expect(await s.set('y#0xP', state(300)).catch((e: unknown) => e)).toBeInstanceOf(ClientError)
    await s.set('y#0xP', state(100))
    await s.release!()
    // Room left: reserved again, and stored.
    const t = Store.file(path)
    expect(await t.reserve!('z#0xP', 300n, budget(1_000n))).toBe(300n)
    await takenBy('200')
    await t.set('z#0xP', state(250))
    const content = JSON.parse(await Bun.file(path).text())
    expect(content.reserved['z#0xP']).toMatchObject({ amount: '300' })
    await t.release!()
  }, 30_000)

  test('behavior: file: a store reserving again as it wakes removes the reservations it counts as nothing: a holder of another namespace that wakes after it finds its own gone, the reservations in the file within the limit', async () => {
    const path = join(await dir(), 'channels.json')
    const ns = '@another-boot/pid:[1]'
    /** A store of another namespace: its presence file, renewed just now. */
    const foreign = async () => {
      const token = crypto.randomUUID()
      await writeFile(`${path}.${token}.alive`, `1 ${token} ${ns}`)
      return token
    }
    const a = await foreign()
    await writeFile(
      path,
      JSON.stringify({
        channels: {},
        closedTotals: {},
        reserved: { 'a#0xP': { amount: '600', pid: 1, token: a, ns } },
      }),
    )
    const s = Store.file(path)
    expect(await s.reserve!('y#0xP', 400n, budget(1_000n))).toBe(400n)
    await s.set('y#0xP', state(100))
    // This one judged gone by a third store (of another namespace too), which reserved 400 in its
    // place; then the first one's presence file lapses (its machine asleep in turn).
    const content = JSON.parse(await Bun.file(path).text())
    delete content.reserved['y#0xP']
    content.reserved['c#0xP'] = { amount: '400', pid: 1, token: await foreign(), ns }
    await writeFile(path, JSON.stringify(content))
    const old = new Date(Date.now() - 180_000)
    await utimes(`${path}.${a}.alive`, old, old)
    // Reserved again as it wakes, the first one's 600 counted as nothing.
    await s.set('y#0xP', state(350))
    // The first one wakes (its presence file renewed): what the file says it holds, with the
    // others', stays within the limit (its store finds its reservation gone before it signs on).
    await utimes(`${path}.${a}.alive`, new Date(), new Date())
    const reserved = JSON.parse(await Bun.file(path).text()).reserved as Record<
      string,
      { amount: string }
    >
    const sum = Object.values(reserved).reduce((n, r) => n + BigInt(r.amount), 0n)
    expect(sum).toBeLessThanOrEqual(1_000n)
    expect(reserved['a#0xP']).toBeUndefined()
    await s.release!()
  }, 30_000)

  test('behavior: file: presence files left by killed processes do not pile up: a store that starts to claim or reserve removes those beside it not renewed for 2 minutes, and no other', async () => {
    const path = join(await dir(), 'channels.json')
    const killed = child(
      `await Store.file(${JSON.stringify(path)}).reserve('x#0xP', 1n, { limit: 10n, shares: () => true })
      console.log('reserved')
      await new Promise(() => {})`,
    )
    await printed(killed, 'reserved')
    killed.kill('SIGKILL')
    await killed.exited
    const left = (await readdir(dirname(path))).filter((f) => f.endsWith('.alive'))
    expect(left).toHaveLength(1)
    // Left 3 minutes ago; beside it, one renewed just now, and one of another store's file.
    const old = new Date(Date.now() - 180_000)
    await utimes(join(dirname(path), left[0] as string), old, old)
    const fresh = `channels.json.${crypto.randomUUID()}.alive`
    const other = `others.json.${crypto.randomUUID()}.alive`
    await writeFile(join(dirname(path), fresh), '1')
    await writeFile(join(dirname(path), other), '1')
    await utimes(join(dirname(path), other), old, old)
    const s = Store.file(path)
    await s.reserve!('y#0xP', 1n, budget(10n))
    const now = (await readdir(dirname(path))).filter((f) => f.endsWith('.alive'))
    expect(now).not.toContain(left[0])
    expect(now).toContain(fresh)
    expect(now).toContain(other)
    expect(now).toHaveLength(3)
    await s.release!()
  }, 30_000)

  test('behavior: file: a store that claims and reserves at once, then is released, leaves no presence file renewed behind it', async () => {
    const path = join(await dir(), 'channels.json')
    const s = Store.file(path)
    await Promise.all([s.own!('y#0xP'), s.reserve!('y#0xP', 100n, budget(1_000n))])
    await s.release!()
    // Past a heartbeat (10 s): nothing renews, or writes again, a presence file of it.
    await Bun.sleep(11_000)
    expect((await readdir(dirname(path))).filter((f) => f.endsWith('.alive'))).toEqual([])
  }, 30_000)

  test('behavior: file: a store holding a reservation stores its channel over an entry that does not parse, as any store does', async () => {
    const path = join(await dir(), 'channels.json')
    const s = Store.file(path)
    await s.reserve!('y#0xP', 500n, budget(1_000n))
    const content = JSON.parse(await Bun.file(path).text())
    content.channels['y#0xP'] = { signed: 'lots' }
    await writeFile(path, JSON.stringify(content))
    await s.set('y#0xP', state(100))
    expect(await s.get('y#0xP')).toEqual(state(100))
    await s.release!()
  })

  test('error: file: a malformed reservation in the budget → ClientError saying to repair it', async () => {
    const path = join(await dir(), 'channels.json')
    await writeFile(
      path,
      JSON.stringify({ channels: {}, closedTotals: {}, reserved: { 'x#0xP': { amount: '-1' } } }),
    )
    const e = await Store.file(path).reserve!('y#0xP', 1n, budget(10n)).catch((e) => e)
    expect(e).toBeInstanceOf(ClientError)
    expect(e.message).toContain('repair')
  })
})

describe('memory', () => {
  test('behavior: set, get, delete', async () => {
    const s = Store.memory()
    await s.set('k', state(2))
    expect(await s.get('k')).toEqual(state(2))
    await s.delete('k')
    expect(await s.get('k')).toBeUndefined()
  })
})
