import { describe, expect, test } from 'bun:test'
import { mkdtemp, readdir, utimes, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import fc from 'fast-check'
import { ClientError, StoreInUseError } from '../../src/client/Errors.ts'
import * as Store from '../../src/client/Store.ts'

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
  test('property: any JSON in the file: get and closedTotal return a value or throw ClientError, nothing else', async () => {
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
        },
      ),
      { numRuns: 1000 },
    )
  })
})

/** A second process running `code` against the store module (imported as `Store`). */
function child(code: string) {
  const store = join(import.meta.dir, '../../src/client/Store.ts')
  return Bun.spawn(
    [process.execPath, '-e', `import * as Store from ${JSON.stringify(store)}\n${code}`],
    { stdout: 'pipe', stderr: 'inherit' },
  )
}

/** Waits until `proc` prints `line`. */
async function printed(proc: ReturnType<typeof child>, line: string) {
  const reader = proc.stdout.getReader()
  let out = ''
  while (!out.includes(line)) {
    const { value, done } = await reader.read()
    if (done) throw new Error(`the child ended before printing ${line}: ${out}`)
    out += new TextDecoder().decode(value)
  }
  reader.releaseLock()
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
    const left = (await readdir(dirname(path))).filter((f) => f.endsWith('.owner'))
    expect(left).toEqual([])
    await Store.file(path).own!(key)
  }, 30_000)
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
