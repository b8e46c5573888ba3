/**
 * The database handle: postgres.js against a real PostgreSQL server or the embedded PGlite
 * (see Embedded.ts), and the migration runner. Only `ledger/` imports postgres.
 */
import { createHash, randomBytes } from 'node:crypto'
import { readdirSync, readFileSync } from 'node:fs'
import net from 'node:net'
import { join } from 'node:path'
import tls from 'node:tls'
import postgres from 'postgres'

export type Sql = postgres.Sql<{ numeric: bigint }>

export type Options = {
  url: string
  /** Connections in the pool. The embedded server takes exactly one. */
  max?: number
  /** Schema to use (tests use one per file). Created if missing. */
  schema?: string
}

/**
 * A name of its own for a pool's sessions (their `application_name`): the instance's
 * reservations record it, and its heartbeat is written under it (Instances.ts).
 */
function instanceName(): string {
  return `tollway/${randomBytes(9).toString('base64url')}`
}

/**
 * Errors that say the database is out of reach, not that a statement was wrong: postgres.js's
 * own for a connection that failed or closed, the socket's, and PostgreSQL's classes 08
 * (connection exception), 53 (insufficient resources: disk full, out of memory, too many
 * connections) and 57P (the server shutting down or starting).
 */
const UNREACHABLE = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ETIMEDOUT',
  'EPIPE',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENOTFOUND',
  'CONNECTION_CLOSED',
  'CONNECTION_ENDED',
  'CONNECTION_DESTROYED',
  'CONNECT_TIMEOUT',
  'DATABASE_TIMEOUT',
])
export function isUnreachable(e: unknown): boolean {
  const code = (e as { code?: unknown } | null)?.code
  if (typeof code !== 'string') return false
  return UNREACHABLE.has(code) || /^(08|53)[0-9A-Z]{3}$/.test(code) || code.startsWith('57P')
}

/**
 * `url` without an `application_name` parameter (postgres.js would let it override the name
 * the gateway gives its sessions): a pool's sessions go by the instance's own name, which its
 * reservations record, its heartbeat is written under, and the watchdog finds them by.
 */
export function unnamed(url: string): string {
  const q = url.indexOf('?')
  if (q < 0) return url
  const params = new URLSearchParams(url.slice(q + 1))
  if (!params.has('application_name')) return url
  params.delete('application_name')
  const rest = params.toString()
  return rest ? `${url.slice(0, q)}?${rest}` : url.slice(0, q)
}

/**
 * How long (seconds) a connection waits before it connects again, after the pool's `retries`th
 * failure to connect in a row: postgres.js's own curve (3^n / 100 s, jittered by half), capped
 * at 1 s, not its 20. The count is the pool's, raised by each connection's failure, and a call
 * that finds the connection closed waits out that connection's delay, the database back or not:
 * a second's outage under a few calls (ten connections refused at once) left the pool's
 * connections 10 to 20 s each before they tried again, and the calls sent once the database was
 * back were 503s at the deadline (DATABASE_TIMEOUT_MS), the heartbeat held past other
 * instances' threshold (this one taken for dead, its reservations released). Capped, a refused
 * connection still tries at most about once a second.
 */
const reconnectDelay = (retries: number) =>
  (0.5 + Math.random() / 2) * Math.min(3 ** retries / 100, 1)

/** How long a pool's `end` waits for its statements under way when not told (seconds). */
const END_TIMEOUT_SECONDS = 2

/**
 * Opens a pool (and, with more than one connection, its `ordered` client, on first use; ending
 * the pool ends it too). numeric and int8 columns arrive as `bigint`. A bigint parameter is typed
 * int8 by postgres.js; pass money as `sql.typed.numeric(x)` so it never overflows.
 */
export function connect(options: Options): Sql {
  // One name for the pool and its companion: the same instance.
  const name = instanceName()
  const url = unnamed(options.url)
  const open = (max: number, seen?: Set<Seen>, extra?: Listening) =>
    postgres(url, {
      max,
      onnotice: () => {},
      backoff: reconnectDelay,
      ...extra,
      ...(seen ? { socket: dial(seen) } : {}),
      // A server that does not answer is out of reach after this long (postgres.js waits 30
      // s), and the request a 503 (http/App.ts), not a client's long wait.
      connect_timeout: 10,
      connection: {
        application_name: name,
        // Times as text in ISO form, whatever the server's default: the listings' cursors carry
        // a row's time as the text PostgreSQL gives it (Page.ts), checked against that form; a
        // server set to another style (SQL, German, Postgres) gave cursors no page took back.
        datestyle: 'ISO, MDY',
        ...(options.schema ? { search_path: options.schema } : {}),
      },
      types: {
        numeric: {
          to: 1700,
          from: [20, 1700],
          serialize: (x: bigint) => x.toString(),
          parse: (x: string) => BigInt(x),
        },
      },
    }) as unknown as Sql
  const max = options.max ?? 10
  const seen = new Set<Seen>()
  const sql = open(max, seen)
  const pool: Pool = {
    seen,
    name,
    alone: () => open(1),
    // No backoff of postgres.js's own: the Waker paces its attempts (100 ms, doubling to 2 s).
    // postgres.js's grows with each failed connect (3^n / 100 s, up to 20 s) and delays the
    // next connect by it, whoever asks: after an outage of a few seconds the Waker's LISTEN
    // waited 10 to 20 s behind it, as its own sql.listen did.
    listener: (o) => {
      // Its sockets kept (`dial`), for `cut`.
      const sockets = new Set<Seen>()
      const client = open(1, sockets, {
        ...o,
        max_lifetime: null,
        fetch_types: false,
        backoff: () => 0,
      })
      listeners.set(client, sockets)
      return client
    },
    lost: { ordered: 0, pool: 0 },
  }
  Object.defineProperty(sql, POOL, { value: pool })
  // Ended without a timeout, postgres.js waits for ever on a connection that closed under a
  // statement (the server ended it, or `unstick` did) and was not opened again: it keeps that
  // statement as under way. The wait is bounded; what still runs then is cut.
  const bounded = (o?: { timeout?: number }) => ({ timeout: END_TIMEOUT_SECONDS, ...o })
  const endPool = sql.end
  sql.end = (o) => endPool(bounded(o))
  if (max > 1) {
    let own: Sql | undefined
    /**
     * A statement run on `own` once a call there went through (not before: a database out of
     * reach is not asked more, and postgres.js waits longer before each new attempt to
     * connect); one a client, again only if it failed. Its `state` is the record postgres.js
     * keeps of the connection's server process: its id, updated in place each time postgres.js
     * connects again (after a close, or silently when the connection was idle). `replace`
     * reads it.
     */
    type Probe = Promise<unknown> & { state?: { pid?: number | null } }
    let probe: Probe | undefined
    let ended = false
    companions.set(sql, {
      // Once the pool has ended, none is opened: the pool itself answers (refusing, as ended).
      get() {
        if (ended) return sql
        if (!own) {
          own = open(1)
          probe = undefined
        }
        return own
      },
      answered(client) {
        if (client !== own || probe) return
        const p = client`select 1` as unknown as Probe
        probe = p
        p.catch(() => {
          if (probe === p) probe = undefined
        })
      },
      replace(old) {
        if (own !== old) return
        own = undefined
        // The process running its statements now (read now: the record is live).
        const pid = probe?.state?.pid ?? undefined
        probe = undefined
        pool.lost.ordered++
        lost.get(sql)?.('ordered')
        void (async () => {
          // Its server process ended first, while this connection still holds it (behind a
          // pooler, it goes back to the pool once the connection closes): a statement it still
          // runs (held by a lock, a slow disk) rolls back rather than commit after its caller
          // was told 503 and its hold released (a release that came first would find nothing to
          // free). Ended, its calls fail, and what was committed before is released
          // (Reservations).
          if (pid) await endSession(sql, pool, pid)
          // Its calls under way fail (CONNECTION_DESTROYED) now, not when TCP gives up.
          await old.end({ timeout: 0 }).catch(() => {})
        })()
      },
    })
    const end = sql.end
    sql.end = async (o) => {
      ended = true
      await Promise.all([end(o), own?.end(bounded(o))])
    }
  }
  return sql
}

/**
 * A pool connection's socket, and since when it has waited for an answer: the time of its
 * first write after it last read something, with what `wire` had read by then (`read`). One
 * that has read nothing since is still waiting. `socket` is what postgres.js writes to: `wire`,
 * the TCP socket, or the TLS socket on top of it (see `followTls`), whose reads `wire` counts.
 */
type Seen = {
  socket: net.Socket
  wire: net.Socket
  since?: number
  read: number
  /** Its server process, as the server told postgres.js (BackendKeyData), once known. */
  pid?: number
  /** When (`wallClock()`) it read `pid`. */
  keyAt?: number
  /** Stops reading for `pid` (see `readPid`). */
  unread?: () => void
}

/** How many connections of a pool were given up for lost: its ordered client's, its own. */
export type Losses = { ordered: number; pool: number }

/**
 * A pool: the sockets of its connections (not its ordered client's, see `onOrdered`), the name
 * its sessions go by, a client of one connection of its own (`alone`, opened each time), the
 * connections it gave up for lost, and whether `unstick` is under way.
 */
type Pool = {
  seen: Set<Seen>
  name: string
  alone: () => Sql
  listener: (o: Listening) => Sql
  lost: Losses
  busy?: boolean
  /** Whether another look was asked for while `unstick` ran. */
  again?: boolean
}
/**
 * Where a client `connect` opened keeps its Pool: a property of the client, not a map keyed by
 * it, so that a wrapper that passes properties through (a Proxy, as a test's link that can be
 * cut) finds it too; a Waker given such a wrapper could not open its LISTEN otherwise.
 */
const POOL = Symbol('tollway.pool')
const poolOf = (sql: object): Pool | undefined => (sql as { [POOL]?: Pool })[POOL]

/** What a client that LISTENs is told: each notification, and each close of its connection. */
type Listening = {
  onnotify?: (channel: string, payload: string) => void
  onclose?: () => void
  max_lifetime?: null
  fetch_types?: boolean
  backoff?: () => number
}

/**
 * A client of one connection to `sql`'s database for LISTEN, its own (not postgres.js's
 * `sql.listen`, which after a close listens again only on its pool's backoff, up to 20 s late
 * after an outage, and says nothing): `onnotify` hears its notifications, `onclose` each close
 * of its connection (one that failed to open too), after which its LISTENs are gone. Never
 * ended for idleness or age.
 */
export function listener(sql: Sql, o: Pick<Listening, 'onnotify' | 'onclose'>): Sql {
  const pool = poolOf(sql)
  if (!pool) throw new Error('listener: not a pool opened by Db.connect')
  return pool.listener(o)
}

/** The sockets of each client `listener` opened. */
const listeners = new WeakMap<object, Set<Seen>>()

/**
 * Closes the connection of a client `listener` opened (its `onclose` is told, and its next
 * statement connects again): one that stopped answering (a link lost without a reset, a NAT
 * that forgot it) would otherwise be taken for open until TCP gives up, its LISTEN hearing
 * nothing meanwhile.
 */
export function cut(client: Sql): void {
  for (const e of listeners.get(client) ?? []) {
    e.socket.destroy()
    e.wire.destroy()
  }
}

/** The connections of `sql`'s pool given up for lost so far (see `onOrdered`, `unstick`). */
export function lostConnections(sql: object): Losses {
  return { ...(poolOf(sql)?.lost ?? { ordered: 0, pool: 0 }) }
}

/**
 * Runs `f` on a client of one connection opened for it (`pool.alone`), ended after: the pool's
 * connections may all be lost, and postgres.js would queue a statement behind one of them.
 * Undefined when `f` fails (given up on: what it would do, its caller gives up on too).
 */
async function onAlone<T>(pool: Pool, f: (alone: Sql) => Promise<T>): Promise<T | undefined> {
  const alone = pool.alone()
  try {
    return await f(alone)
  } catch {
    return undefined
  } finally {
    void alone.end({ timeout: 0 }).catch(() => {})
  }
}

/** Ends this instance's server process `pid` (what it runs is rolled back), within `sql`'s
 * deadline (`onAlone`). */
async function endSession(sql: Sql, pool: Pool, pid: number) {
  await onAlone(pool, (alone) =>
    answered(
      sql,
      alone`select pg_terminate_backend(pid) from pg_stat_activity
        where application_name = ${pool.name} and pid = ${pid}`,
    ),
  )
}

/**
 * The socket postgres.js talks to the server through, returned before it connects (postgres.js
 * writes its startup message at once; the socket holds it until connected, and a failure to
 * connect reaches postgres.js as its own would), kept in `seen` with the time it began waiting
 * for an answer. Several hosts are taken in turn. Over TLS, postgres.js puts a TLS socket on
 * top of it and writes through that one; `followTls` watches it too.
 */
function dial(seen: Set<Seen>) {
  followTls()
  let next = 0
  return (o: {
    host: string[]
    port: number[]
    path?: string | false
    ssl?: unknown
    sslnegotiation?: string | null
  }) => {
    const i = next++ % o.host.length
    const host = o.host[i]!
    const port = o.port[i] ?? o.port[0]!
    const socket = o.path ? net.connect(o.path) : net.connect(port, host)
    // What postgres.js sets on a socket of its own: TLS names the server by it (SNI).
    Object.assign(socket, { host, port })
    const e: Seen = { socket, wire: socket, read: 0 }
    watchWrites(e)
    // TLS from the first byte (`sslnegotiation=direct`): the process id is read on the TLS
    // socket (`followTls`). Otherwise postgres.js asks for TLS first when told to, and the
    // server's one-byte answer comes before its messages.
    if (!o.ssl || o.sslnegotiation !== 'direct') readPid(e, socket, Boolean(o.ssl))
    dialed.set(socket, e)
    for (const s of seen) if (s.socket.destroyed) seen.delete(s)
    seen.add(e)
    return socket
  }
}

/** Patches the writes of `e.socket` to note when it began waiting for an answer. */
function watchWrites(e: Seen) {
  const { socket, wire } = e
  const write = socket.write
  socket.write = function (this: net.Socket, ...args: unknown[]) {
    if (e.since === undefined || wire.bytesRead !== e.read) {
      e.since = performance.now()
      e.read = wire.bytesRead
    }
    return (write as (...a: unknown[]) => boolean).apply(this, args)
  } as typeof socket.write
}

/**
 * Reads the process id the server gives a connection (its BackendKeyData message, among the
 * first it sends) from what `from` reads, beside postgres.js, then stops reading. With
 * `tlsAsked`, the server's one-byte answer to postgres.js's SSLRequest comes first: a yes
 * ("S") means TLS follows, read on the TLS socket instead (`followTls`). `unstick` tells by the
 * ids which connections' sessions the server no longer has.
 */
function readPid(e: Seen, from: net.Socket, tlsAsked: boolean) {
  let buffer: Buffer = Buffer.alloc(0)
  let answer = tlsAsked
  const stop = () => {
    from.removeListener('data', read)
    if (e.unread === stop) e.unread = undefined
  }
  const read = (chunk: Buffer) => {
    buffer = buffer.length === 0 ? chunk : Buffer.concat([buffer, chunk])
    if (answer) {
      answer = false
      if (buffer[0] !== 0x4e) return stop() // not "N" (plain): TLS follows, or an error
      buffer = buffer.subarray(1)
    }
    while (buffer.length >= 5) {
      const type = buffer[0]
      if (type === 0x4b) {
        // "K": Int32 length (12), Int32 process id, Int32 secret key.
        if (buffer.length < 9) return
        e.pid = buffer.readUInt32BE(5)
        e.keyAt = wallClock()
        return stop()
      }
      // Ready for a query ("Z") or an error ("E") without one before: none is coming.
      if (type === 0x5a || type === 0x45) return stop()
      const length = buffer.readUInt32BE(1)
      if (buffer.length < 1 + length) {
        if (length > 65_536) stop()
        return
      }
      buffer = buffer.subarray(1 + length)
    }
  }
  from.on('data', read)
  e.unread = stop
}

/**
 * The time now in milliseconds since the epoch, as this process's monotonic clock counts it
 * from its start: a step of the system clock (NTP) between two readings does not move it.
 */
const wallClock = () => performance.timeOrigin + performance.now()

/** The pool sockets `dial` made, by their TCP socket. */
const dialed = new WeakMap<net.Socket, Seen>()
let following = false

/**
 * Watches the TLS sockets postgres.js puts on the pool's sockets. Once the server agrees to TLS
 * (its SSLRequest), postgres.js calls `tls.connect({ socket })` on the socket `dial` gave it,
 * and writes through the TLS socket from then on: those writes never pass through the TCP
 * socket's `write`, so without this a connection over TLS never looked stuck. `tls.connect` is
 * wrapped once, for the process: a call on a socket `dial` made has its TLS socket watched (its
 * writes noted, and it is what `unstick` closes); any other call goes through untouched. postgres.js
 * keeps its own TLS handling (its modes, certificate checks, server name); test/ledger/Db.test.ts
 * checks that it still calls `tls.connect` so.
 */
function followTls() {
  if (following) return
  following = true
  const connect = tls.connect
  tls.connect = function (this: unknown, ...args: unknown[]) {
    const secure = (connect as (...a: unknown[]) => tls.TLSSocket).apply(this, args)
    const o = args[0] as { socket?: unknown } | null | undefined
    const e = o && typeof o === 'object' ? dialed.get(o.socket as net.Socket) : undefined
    if (e) {
      e.socket = secure
      watchWrites(e)
      e.unread?.()
      readPid(e, secure, false)
    }
    return secure
  } as typeof tls.connect
}

/**
 * Closes the sockets of `sql`'s pool that sent something `ms` or more ago and have read nothing
 * since: connections whose server no longer answers (a link that drops what it carries without
 * a reset: a failover, a NAT that forgot it). Each would otherwise hold the statements sent
 * down it, and those postgres.js sends after them, until TCP gives up, a quarter of an hour
 * later; closed, they fail (CONNECTION_CLOSED, out of reach: a 503 or a retry) and postgres.js
 * opens another connection for the next. Called when a call with a deadline expired; it looks
 * a tick later, by when the expiring call's own statement (sent a moment after the call began)
 * has waited `ms` too. First their server processes are ended (`endStuck`): one still running
 * (a lock, a slow disk) rolls back rather than commit what its caller was told 503 for (a
 * channel admission's hold, which the failed call's release would not find yet), and its
 * connection may close by itself first. Then the pool's other connections
 * whose sessions the server no longer has are closed too, idle or not: after a failover or a
 * restart behind a link that dropped them silently, each would otherwise be found only by a
 * call on it, one 503 at the deadline each. One at a time: its own statements, given up on,
 * would start another. Returns how many it closed.
 */
async function unstick(sql: Sql, ms: number): Promise<number> {
  const pool = poolOf(sql)
  if (!pool) return 0
  // Another expiry while one runs: it looks again once done (a connection may have gone quiet
  // meanwhile, its statement sent a moment after the first).
  if (pool.busy) {
    pool.again = true
    return 0
  }
  pool.busy = true
  let closed = 0
  try {
    do {
      pool.again = false
      closed += await unstickOnce(sql, pool, ms)
    } while (pool.again)
  } finally {
    pool.busy = false
  }
  return closed
}

/** One look of `unstick`. */
async function unstickOnce(sql: Sql, pool: Pool, ms: number): Promise<number> {
  await new Promise((resolve) => setTimeout(resolve, TICK_MS))
  const waited = (e: Seen) =>
    !e.socket.destroyed &&
    e.since !== undefined &&
    e.wire.bytesRead === e.read &&
    performance.now() - e.since >= ms
  const stuck = [...pool.seen].filter(waited)
  if (stuck.length === 0) return 0
  // Only connections whose process was known before the server listed its sessions: one made
  // since is not on the list, and is new, not gone.
  const known = [...pool.seen].filter((e) => e.pid !== undefined)
  const sessions = await endStuck(sql, pool, () => stuck.filter(waited), ms)
  // The stuck ones, each ended (its session ended by `endStuck`, its socket closed here, or
  // both), whichever closed it first; then those whose sessions are gone.
  let closed = stuck.length
  // Each socket's close event, which is when postgres.js hears of it: a moment after it is
  // destroyed (a turn of the event loop or more; Bun's about 1.4 ms), and until then postgres.js
  // takes the connection for open and sends a statement down it, which then fails
  // (CONNECTION_CLOSED). The look ends once postgres.js has heard of them all: what its caller
  // sends once told of the loss goes down connections opened again.
  const heard: Promise<unknown>[] = []
  const close = (e: Seen) => {
    heard.push(new Promise((resolve) => e.socket.once('close', resolve)))
    e.socket.destroy()
    e.wire.destroy()
    pool.seen.delete(e)
  }
  for (const e of stuck) if (waited(e)) close(e)
  if (sessions)
    for (const e of known)
      if (pool.seen.has(e) && !e.socket.destroyed && !sessions.alive(e)) {
        close(e)
        closed++
      }
  if (heard.length > 0) await within(CLOSE_HEARD_MS, Promise.all(heard))
  return closed
}

/** How long `unstick` waits for postgres.js to hear of the sockets it closed (ms). */
const CLOSE_HEARD_MS = 1_000

/**
 * Waits for `p` to settle, at most `ms`: undefined then (its outcome is not awaited). Its timer
 * keeps no process alive.
 */
export function within<T>(ms: number, p: Promise<T>): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined
  return Promise.race([
    p,
    new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), ms)
      timer.unref?.()
    }),
  ]).finally(() => clearTimeout(timer))
}

/**
 * How late (ms) a session may have begun, by the server's clock, after its connection read its
 * process id, and still be taken for that connection's: the error of the clocks' measured
 * offset. A later one with that id is another process, which took the id of one that is gone
 * (a restarted server).
 */
const SESSION_SLACK_MS = 2_000

/**
 * Ends the server processes of `pool`'s connections that waited past the deadline `ms`, on a
 * client of its own (`pool.alone`): this instance's processes that have run a statement for
 * `ms` less a tick (every statement on a stuck connection, whatever the network's delay), and
 * the processes of `stuck()`'s connections (those still waiting when it is asked) that are not
 * idle (one left in a transaction holds its locks). Returns which of the pool's connections the
 * server still has sessions for (`alive`); undefined where the server's ids are not the ones
 * it gave postgres.js (a pooler between, such as PgBouncer, gives ids of its own: they say
 * nothing), or on a failure. Within `sql`'s deadline.
 */
async function endStuck(
  sql: Sql,
  pool: Pool,
  stuck: () => Seen[],
  ms: number,
): Promise<{ alive(e: Seen): boolean } | undefined> {
  return onAlone(pool, async (alone) => {
    // postgres.js keeps the process id the server gave it on each statement's `state`.
    const probe = alone`select pg_backend_pid() as pid,
      (extract(epoch from clock_timestamp()) * 1000)::float8 as now` as unknown as Promise<
      postgres.Row[]
    > & {
      state?: { pid?: number | null }
    }
    const [me] = await answered(sql, probe)
    // The server's clock less this one's, within the round trip.
    const offset = Number(me?.now) - wallClock()
    const real = me?.pid !== undefined && me.pid === probe.state?.pid
    const ending = real ? stuck().filter((e) => e.pid !== undefined) : []
    /** The latest a session of connection `e` may have begun, by the server's clock. */
    const latest = (e: Seen) => e.keyAt! + offset + SESSION_SLACK_MS
    const rows = await answered(
      sql,
      alone`select a.pid, (extract(epoch from a.backend_start) * 1000)::float8 as started,
          case when (s.pid is not null and a.state <> 'idle'
              and extract(epoch from a.backend_start) * 1000 <= s.latest)
            or (a.state = 'active'
              and clock_timestamp() - a.query_start >= ${ms - TICK_MS} * interval '1 millisecond')
          then pg_terminate_backend(a.pid) end as ended
        from pg_stat_activity a
        left join unnest(${ending.map((e) => e.pid!)}::int[],
          ${ending.map(latest)}::float8[]) s(pid, latest)
          on s.pid = a.pid
        where a.application_name = ${pool.name} and a.pid <> pg_backend_pid()`,
    )
    if (!real) return undefined
    const started = new Map(rows.map((r) => [r.pid as number, Number(r.started)]))
    return {
      alive: (e: Seen) => {
        const at = started.get(e.pid!)
        return at !== undefined && at <= latest(e)
      },
    }
  })
}

/** A pool's ordered client (see `ordered`): the one in use, and its replacement (`onOrdered`). */
const companions = new WeakMap<
  Sql,
  { get(): Sql; answered(client: Sql): void; replace(old: Sql): void }
>()

/**
 * What a pool reports when its ordered client is replaced (`ordered`), or when it closed
 * connections of its own that no longer answered (`pool`, see `unstick`).
 */
const lost = new WeakMap<object, (which: 'ordered' | 'pool') => void>()

/** A database call a request waits for, not answered within its pool's deadline. */
export class DatabaseTimeoutError extends Error {
  readonly code = 'DATABASE_TIMEOUT'
}

const deadlines = new WeakMap<object, number>()

/**
 * Sets how long a request waits for an answer of `sql` in the calls that go through
 * `answered`: a database that takes connections but does not answer (a stalled disk, a link
 * that drops packets, a hung failover) would otherwise hold every request until TCP gives up,
 * a quarter of an hour later.
 */
export function deadline(
  sql: object,
  ms: number,
  onLost?: (which: 'ordered' | 'pool') => void,
): void {
  deadlines.set(sql, ms)
  if (onLost) lost.set(sql, onLost)
}

/**
 * Calls with a deadline (`answered`'s, and those on an ordered client, `onOrdered`), by the
 * time it passes; one ticker checks them all.
 */
type Watched = { at: number; expire: () => void }
const waiting = new Set<Watched>()
let ticker: ReturnType<typeof setInterval> | undefined
const TICK_MS = 250

function watch(w: Watched) {
  waiting.add(w)
  if (!ticker) {
    ticker = setInterval(tick, TICK_MS)
    ticker.unref?.()
  }
}

function tick() {
  const now = performance.now()
  for (const w of waiting)
    if (w.at <= now) {
      waiting.delete(w)
      w.expire()
    }
  if (waiting.size === 0) {
    clearInterval(ticker)
    ticker = undefined
  }
}

/**
 * `pending`, a call of `sql`, or a DatabaseTimeoutError (out of reach: a 503, see
 * `isUnreachable`) once it has not answered within the deadline set for `sql` (within a
 * quarter of a second after). Given as a function, it is told whether the caller gave up (a
 * batched call still waiting is then not sent, Batch.run). `late` gets an answer that came
 * after that: what the call did the caller never learnt of (an admission's hold, to release);
 * `failed`, its error, in time (before the caller hears of it) or late.
 */
export function answered<T>(
  sql: object,
  pending: PromiseLike<T> | ((gone: () => boolean) => PromiseLike<T>),
  late?: (value: T) => unknown,
  failed?: (e: unknown) => unknown,
): Promise<T> {
  const ms = deadlines.get(sql)
  if (ms === undefined)
    return Promise.resolve(typeof pending === 'function' ? pending(() => false) : pending)
  return new Promise<T>((resolve, reject) => {
    const w = {
      at: performance.now() + ms,
      gone: false,
      expire() {
        w.gone = true
        reject(new DatabaseTimeoutError('The database did not answer in time.'))
        void unstick(sql as Sql, ms).then((n) => {
          if (n === 0) return
          poolOf(sql)!.lost.pool += n
          lost.get(sql)?.('pool')
        })
      },
    }
    const call = typeof pending === 'function' ? pending(() => w.gone) : pending
    watch(w)
    call.then(
      (value) => {
        waiting.delete(w)
        if (!w.gone) resolve(value)
        else late?.(value)
      },
      (e: unknown) => {
        waiting.delete(w)
        failed?.(e)
        if (!w.gone) reject(e)
      },
    )
  })
}

/**
 * The connection of `sql` for statements that must run in the order they were sent: a pool's
 * own second client of one connection (opened on first use, ended with the pool), on which
 * postgres.js sends a statement while the ones before it still run and PostgreSQL runs them in
 * turn; `sql` itself when it has one connection only (the embedded server).
 */
export function ordered(sql: Sql): Sql {
  return companions.get(sql)?.get() ?? sql
}

/**
 * Runs `f` on the ordered client of `sql` (see `ordered`). A call there not answered within
 * the pool's deadline (`deadline`) takes the connection for lost: a link that drops what it
 * carries without a reset (a failover, a NAT that forgot it) would otherwise hold that call,
 * and every ledger call behind it, until TCP gives up, a quarter of an hour later. The client
 * is replaced: the calls under way on it fail (CONNECTION_DESTROYED: the ledger tries a charge
 * again on a new connection, and fails an admission as a 503, see Reservations) and the next
 * calls open a new one. Its server process is ended first (`connect`'s `replace`), so that a
 * statement still running there (a lock, a slow disk) rolls back rather than commit what its
 * caller, told 503 at the deadline, gave up on; what it committed before is released
 * (Reservations.admit).
 */
export function onOrdered<T>(sql: Sql, f: (client: Sql) => Promise<T>): Promise<T> {
  const companion = companions.get(sql)
  const client = companion?.get() ?? sql
  const ms = deadlines.get(sql)
  const call = f(client)
  if (!companion || client === sql || ms === undefined) return call
  const w: Watched = { at: performance.now() + ms, expire: () => companion.replace(client) }
  watch(w)
  call.then(
    () => {
      waiting.delete(w)
      companion.answered(client)
    },
    () => waiting.delete(w),
  )
  return call
}

const migrations = join(import.meta.dir, 'migrations')

const functions = join(import.meta.dir, 'functions')

/** This release's migrations, in the order they apply (by name). */
const migrationFiles = () =>
  readdirSync(migrations)
    .filter((f) => f.endsWith('.sql'))
    .sort()

/**
 * Migrations the database has that this release does not (a newer release migrated it): this
 * instance serves on, but may not know what those changed; its operator should upgrade it.
 */
export async function newer(sql: Sql): Promise<string[]> {
  const known = new Set(migrationFiles())
  const rows = await sql`select name from schema_migrations order by name`
  return rows.map((r) => r.name as string).filter((name) => !known.has(name))
}

/**
 * Applies the SQL files in `migrations/` that have not run yet, in name order, then each file
 * of `functions/` (the current definitions of SQL functions, `CREATE OR REPLACE`, its first
 * line `-- version: N`) whose version is above the one applied: a change to such a function
 * is an edit of its file with its version raised, not a migration restating it, and an older
 * instance starting during a rolling deploy never puts an older definition back. The same
 * version with another text is refused (an edit that forgot its version). All in one
 * transaction. Idempotent, and safe when several instances start at once (an advisory lock
 * serializes them).
 */
export async function migrate(sql: Sql): Promise<string[]> {
  const files = migrationFiles()
  return sql.begin(async (tx) => {
    await tx`select pg_advisory_xact_lock(hashtext(current_schema() || '.tollway_migrate'))`
    await tx`create table if not exists schema_migrations (
      name text primary key, applied_at timestamptz not null default now())`
    const done = new Set((await tx`select name from schema_migrations`).map((r) => r.name))
    const applied: string[] = []
    for (const file of files) {
      if (done.has(file)) continue
      await tx.unsafe(readFileSync(join(migrations, file), 'utf8'))
      await tx`insert into schema_migrations (name) values (${file})`
      applied.push(file)
    }
    await tx`create table if not exists schema_functions (
      name text primary key, version int not null, sha256 text not null,
      applied_at timestamptz not null default now())`
    // The table as its first commit made it, before versions.
    await tx`alter table schema_functions add column if not exists version int not null default 0`
    const current = new Map(
      (await tx`select name, version, sha256 from schema_functions`).map((r) => [r.name, r]),
    )
    for (const file of readdirSync(functions)
      .filter((f) => f.endsWith('.sql'))
      .sort()) {
      const text = readFileSync(join(functions, file), 'utf8')
      const version = Number(/^-- version: (\d+)\n/.exec(text)?.[1])
      if (!Number.isSafeInteger(version))
        throw new Error(`functions/${file}: its first line must be "-- version: N"`)
      const sha256 = createHash('sha256').update(text).digest('hex')
      const before = current.get(file)
      if (before && before.version > version) continue
      if (before && before.version === version) {
        if (before.sha256 === sha256) continue
        throw new Error(
          `functions/${file}: its text changed but not its version (${version}); raise it`,
        )
      }
      await tx.unsafe(text)
      await tx`insert into schema_functions (name, version, sha256)
        values (${file}, ${version}, ${sha256})
        on conflict (name) do update
        set version = excluded.version, sha256 = excluded.sha256, applied_at = now()`
      applied.push(`functions/${file}`)
    }
    return applied
  }) as Promise<string[]>
}

const turns = new Map<string, Promise<unknown>>()

/**
 * Runs `fn` with no other holder of the lock `name` running it: first in this process (one
 * turn at a time, so waiting callers do not each tie up a connection), then, among the
 * instances sharing the database, under a Postgres advisory lock that goes with the
 * transaction around `fn`. `fn` must not use the database. Should the transaction's connection
 * close while `fn` runs, the turn still ends only when `fn` does, with `fn`'s outcome (the
 * lock among instances was lost with the session). A one-connection pool (the
 * embedded server) skips the advisory lock: its instances all live in this process, and a
 * caller holding that one connection (the settlement worker's reserved one) would wait
 * for itself.
 */
export function exclusive(sql: Sql, name: string) {
  const shared = (sql.options as { max?: number }).max !== 1
  return <T>(fn: () => Promise<T>): Promise<T> => {
    const run = shared
      ? async () => {
          let work: Promise<T> | undefined
          try {
            return (await sql.begin(async (tx) => {
              await tx`select pg_advisory_xact_lock(hashtext(${name}))`
              work = fn()
              return work
            })) as T
          } catch (e) {
            // The transaction ended before `fn` did (its connection closed, taking the lock
            // with it): the turn lasts until `fn` is done, so that this process starts no other
            // holder while it still runs (sending a chain transaction), and the caller gets
            // `fn`'s outcome, which is what happened.
            if (work === undefined) throw e
            return await work
          }
        }
      : fn
    const previous = turns.get(name) ?? Promise.resolve()
    const mine = previous.then(run, run)
    const settled = mine.catch(() => {})
    turns.set(name, settled)
    void settled.then(() => {
      if (turns.get(name) === settled) turns.delete(name)
    })
    return mine
  }
}
