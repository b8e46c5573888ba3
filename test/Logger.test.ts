/**
 * Logs: JSON lines with an ISO time, written to standard output once an event-loop turn (one
 * write for the lines of a turn), and none lost when the process exits, however it exits.
 */
import { expect, test } from 'bun:test'
import { join } from 'node:path'
import * as Logger from '../src/Logger.ts'

test('behavior: the lines of one event-loop turn go to the sink in one write, in order; the next turn has its own', async () => {
  const writes: string[] = []
  const log = Logger.create('info', Logger.batched({ write: (t) => writes.push(t) }))
  for (let i = 0; i < 20; i++) log.info({ i }, 'line')
  expect(writes).toEqual([])
  await new Promise((r) => setImmediate(r))
  expect(writes).toHaveLength(1)
  const lines = writes[0]!
    .trimEnd()
    .split('\n')
    .map((l) => JSON.parse(l))
  expect(lines.map((l) => l.i)).toEqual([...Array(20).keys()])
  log.info({ i: 20 }, 'line')
  await new Promise((r) => setImmediate(r))
  expect(writes).toHaveLength(2)
  expect(JSON.parse(writes[1]!).i).toBe(20)
})

test('behavior: logger.flush(cb) writes what waits at once and then calls back', async () => {
  const writes: string[] = []
  const log = Logger.create('info', Logger.batched({ write: (t) => writes.push(t) }))
  log.info({ i: 1 }, 'line')
  const called = await new Promise<number>((resolve) => log.flush(() => resolve(writes.length)))
  expect(called).toBe(1)
  expect(JSON.parse(writes[0]!).i).toBe(1)
})

test('behavior: a turn of many lines is written in whole lines of at most PIPE_BUF bytes each (no write a pipe may interleave with another process), a longer line alone', async () => {
  const writes: string[] = []
  const log = Logger.create('info', Logger.batched({ write: (t) => writes.push(t) }))
  for (let i = 0; i < 100; i++) log.info({ i, pad: 'é'.repeat(i % 7 === 0 ? 100 : 10) }, 'line')
  log.info({ i: 100, pad: 'x'.repeat(Logger.PIPE_BUF) }, 'line')
  log.info({ i: 101 }, 'line')
  await new Promise((r) => setImmediate(r))
  expect(writes.length).toBeGreaterThan(2)
  expect(writes.length).toBeLessThan(20)
  const lines = writes.flatMap((w) => w.trimEnd().split('\n')).map((l) => JSON.parse(l))
  expect(lines.map((l) => l.i)).toEqual([...Array(102).keys()])
  for (const w of writes) {
    expect(w.endsWith('\n')).toBe(true)
    if (w.length < Logger.PIPE_BUF)
      expect(Buffer.byteLength(w)).toBeLessThanOrEqual(Logger.PIPE_BUF)
    else expect(w.trimEnd().split('\n')).toHaveLength(1)
  }
})

test('behavior: a line carries its time as ISO 8601 text, the same within a millisecond and new in the next', async () => {
  const first = Logger.isoTime()
  const time = JSON.parse(`{${first.slice(1)}}`).time as string
  expect(new Date(time).toISOString()).toBe(time)
  expect(Math.abs(Date.parse(time) - Date.now())).toBeLessThan(1_000)
  const at = Date.now()
  while (Date.now() === at) {}
  expect(Logger.isoTime()).not.toBe(first)
  const a = Logger.isoTime()
  const b = Logger.isoTime()
  // Both in one millisecond, or the second in the next: never an older time.
  expect(Date.parse(JSON.parse(`{${b.slice(1)}}`).time)).toBeGreaterThanOrEqual(
    Date.parse(JSON.parse(`{${a.slice(1)}}`).time),
  )
})

for (const [how, code, status] of [
  ['exit', 'process.exit(3)', 3],
  ['uncaught exception', "throw new Error('boom')", 1],
  ['unhandled rejection', "Promise.reject(new Error('boom'))", 1],
  ['end of work', '', 0],
] as const)
  test(`behavior: lines logged just before the process ends (${how}) are written, in order, around lines of earlier turns`, async () => {
    const logger = join(import.meta.dir, '../src/Logger.ts')
    const script = `
      import * as Logger from ${JSON.stringify(logger)}
      import { writeSync } from 'node:fs'
      const log = Logger.create('info')
      log.info({ n: 1 }, 'one')
      await new Promise((r) => setImmediate(r))
      writeSync(1, 'mark\\n')
      log.info({ n: 2 }, 'two')
      log.info({ n: 3 }, 'three')
      ${code}`
    const proc = Bun.spawn([process.execPath, '-e', script], { stdout: 'pipe', stderr: 'ignore' })
    const out = await new Response(proc.stdout).text()
    expect(await proc.exited).toBe(status)
    const lines = out.trimEnd().split('\n')
    // A turn's lines are written at its end: 'one' before the next turn's mark.
    expect(lines[1]).toBe('mark')
    expect([lines[0], lines[2], lines[3]].map((l) => JSON.parse(l!).msg)).toEqual([
      'one',
      'two',
      'three',
    ])
    expect(lines).toHaveLength(4)
  })
