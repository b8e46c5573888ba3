/**
 * The embedded database: PGlite (PostgreSQL compiled to WASM) served on a loopback port by
 * pglite-socket, so the gateway reaches it with the same postgres.js code as a real
 * server. PGlite is single-connection: connect to it with `max: 1`.
 */
import { mkdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from 'node:fs'
import { basename, join } from 'node:path'
import { PGlite } from '@electric-sql/pglite'
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'
import { zombie } from '../Processes.ts'
import type { Sql } from './Db.ts'

export type Embedded = { url: string; stop(): Promise<void> }

/** Thrown when another live process already serves the embedded database of a data dir. */
export class InUseError extends Error {
  override name = 'InUseError'
}

/**
 * Thrown when PGlite cannot open the data dir's database (a WAL or control file lost or cut
 * short by a crash or a full disk): PGlite itself aborts with a bare `RuntimeError: Aborted()`,
 * the reason only in PostgreSQL's log, which this error carries.
 */
export class OpenError extends Error {
  override name = 'OpenError'
}

/**
 * Claims `dataDir` for this process (a lock file with its pid and, where /proc tells, when it
 * started: `identity`). PGlite itself does not stop a second process from opening the same
 * files: two gateways on one data dir each saw their own writes, and the one stopped last
 * overwrote the other's. A lock of a process that is gone is taken over, and so is one whose
 * pid another process has now (after a crash and a reboot, another program had it, and every
 * start was refused). Returns the release.
 */
function claim(dataDir: string): () => void {
  mkdirSync(dataDir, { recursive: true })
  const path = join(dataDir, 'tollway.lock')
  let holder: number | undefined
  let started: string | undefined
  try {
    const [pid, at] = readFileSync(path, 'utf8').split('\n')
    holder = Number(pid?.trim())
    started = at?.trim() || undefined
  } catch {}
  if (holder && holder !== process.pid) {
    let alive = true
    try {
      process.kill(holder, 0)
    } catch (e) {
      alive = (e as { code?: string }).code === 'EPERM'
    }
    // A process killed whose parent has not reaped it yet (a zombie: its parent a supervisor
    // or an init that reaps late, or never) is gone, though signals still find its pid: a
    // gateway killed outright was held to serve on for as long, and the restart refused.
    if (alive && zombie(holder)) alive = false
    if (alive) {
      // Whether the process with that pid now is the one that wrote the lock: by when it
      // started, whatever it runs (a gateway of a bun named otherwise, bun-profile say, is
      // one). A lock without it (an earlier release's) is judged by what the process runs.
      const now = identity(holder)
      if (started !== undefined) alive = now === undefined || now === started
      else alive = aGateway(holder)
    }
    if (alive)
      throw new InUseError(
        `the embedded database in ${dataDir} is in use by process ${holder}; stop it first, or set another TOLLWAY_DATA_DIR`,
      )
  }
  writeFileSync(path, `${process.pid}\n${identity(process.pid) ?? ''}\n`)
  return () => rmSync(path, { force: true })
}

/**
 * When process `pid` started (the boot, and the clock ticks since it), which no other process
 * with that pid shares: undefined where /proc does not tell (not Linux).
 */
function identity(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // Field 22 (starttime), counted after the command's closing parenthesis (field 2).
    const start = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]
    const boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()
    return start ? `${boot}/${start}` : undefined
  } catch {
    return undefined
  }
}

/**
 * Whether process `pid` may be a gateway, for a lock that does not say when its process
 * started: it runs a bun (npm's, a global one, bun-profile, bun-debug) or the executable this
 * one runs. Said only where /proc tells (Linux, a process of ours to read); elsewhere any
 * live process may be. An executable replaced while it ran (an `npm install` under a running
 * gateway) still counts.
 */
function aGateway(pid: number): boolean {
  const exe = (p: string) => basename(readlinkSync(p).replace(/ \(deleted\)$/, ''))
  try {
    const its = exe(`/proc/${pid}/exe`)
    return /^bun(?:[-.]|$)/.test(its) || its === exe('/proc/self/exe')
  } catch {
    return true
  }
}

/** The end of PostgreSQL's message when the system refused a file for what it is, not for its content. */
const REFUSED =
  /(?:Permission denied|Operation not permitted|Read-only file system|No space left on device|Disk quota exceeded|Too many open files)$/

/** Starts PGlite with its data in `dataDir` (in memory when omitted) on a free port. */
export async function start(options: { dataDir?: string } = {}): Promise<Embedded> {
  const release = options.dataDir ? claim(options.dataDir) : () => {}
  // PostgreSQL's log while it opens: what went wrong when it aborts (afterwards, not kept).
  let log: string[] | undefined = []
  const db = await PGlite.create(options.dataDir, {
    onStderr: (line) => {
      log?.push(line)
      if (log && log.length > 50) log.shift()
      return false
    },
  }).catch((e: unknown) => {
    release()
    // A file system error (a full disk, a directory not ours to write) is said as it is.
    if (typeof (e as { code?: unknown } | undefined)?.code === 'string') throw e
    const said = log
      ?.map((l) => /\b(?:PANIC|FATAL|ERROR):\s+(.*)$/.exec(l)?.[1])
      .filter((l) => l !== undefined)
      .at(-1)
    const where = `the embedded database in ${options.dataDir ?? 'memory'} cannot be opened`
    // The file system's refusal that reached PostgreSQL (files of another user, a read-only
    // mount, a full disk) is no damage: moving the directory aside would start an empty ledger
    // for what a chown or some free space mends.
    if (said && REFUSED.test(said))
      throw new OpenError(
        `${where}: ${said}. That is the file system refusing it, not damage: make the directory and its files this user's to read and write (or free some space), then start again`,
        { cause: e },
      )
    throw new OpenError(
      `${where}: ${said ?? (e as Error).message}. It may be damaged (a crash or a full disk while it was written): move that directory aside to start with an empty database, or restore it from a backup`,
      { cause: e },
    )
  })
  log = undefined
  const server = new PGLiteSocketServer({ db, host: '127.0.0.1', port: 0 })
  await server.start()
  const address = (
    server as unknown as { server: { address(): { port: number } } }
  ).server.address()
  return {
    url: `postgres://postgres@127.0.0.1:${address.port}/postgres`,
    async stop() {
      await server.stop()
      await db.close()
      release()
    },
  }
}

/**
 * PGlite runs no WAL writer: a commit made with synchronous_commit off (admissions and API-key
 * charges, see migrations/0001) stays in memory until a later commit flushes the WAL, and a
 * killed gateway lost them all. A synchronous commit that writes WAL (a transactional logical
 * message: one record, no table) every `everyMs` flushes them, as PostgreSQL's WAL writer does
 * (wal_writer_delay). Returns the function that stops it.
 */
export function flushWal(sql: Sql, everyMs = 200): () => void {
  const timer = setInterval(() => {
    sql`select pg_logical_emit_message(true, 'tollway', '')`.catch(() => {})
  }, everyMs)
  return () => clearInterval(timer)
}

/**
 * PGlite runs no checkpointer either, and a backend alone (as PGlite's is) never asks for a
 * checkpoint itself: its WAL was kept from the start on, past max_wal_size, until the gateway
 * stopped (every request writes some, and `flushWal` a record every 200 ms), and a gateway
 * killed after weeks replayed all of it at its next start. A CHECKPOINT every `everyMs` (the
 * server's checkpoint_timeout, 5 minutes) lets the segments before it be recycled, as
 * PostgreSQL's checkpointer does. Returns the function that stops it.
 */
export function checkpoints(sql: Sql, everyMs = 300_000): () => void {
  const timer = setInterval(() => {
    sql`checkpoint`.catch(() => {})
  }, everyMs)
  return () => clearInterval(timer)
}
