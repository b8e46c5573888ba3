/** A TCP link to PostgreSQL that tests cut, mend, stall and resume (the database's faults). */
import { afterAll } from 'bun:test'
import { connect, createServer, type Socket } from 'node:net'
import { TLSSocket } from 'node:tls'

/**
 * A TCP forwarder to PostgreSQL; `cut` closes every connection and stops listening (new ones
 * are refused, as by a stopped server; what was held is dropped), `mend` listens again on the
 * same port. `stall` holds what either side sends (connections stay open, nothing is
 * answered: a hung database), or only the database's answers; `resume` passes it on. `drop`
 * loses for good what the connections open now carry, either way, and leaves them open, while
 * new connections work (a link lost without a reset: a failover, a NAT that forgot it).
 * `vanish` is a failover: the sessions of the connections open now end at the database, while
 * those connections stay open, silent. A connection whose traffic is lost hears of no close.
 * `reset` resets the connections open now (ECONNRESET at the client).
 * With `tls` (a key and certificate, PEM), it speaks TLS to its clients as PostgreSQL does (it
 * answers their SSLRequest, then decrypts), and plain to the database. With `otherPids`, it
 * gives its clients process ids other than the database's (in BackendKeyData), as a pooler
 * such as PgBouncer does.
 */
export async function forwarder(
  to: URL,
  o: { tls?: { key: string; cert: string }; otherPids?: boolean } = {},
) {
  const open = new Set<Socket>()
  /** The server name each TLS client asked for (SNI; false: none), in order. */
  const servernames: (string | false | null)[] = []
  let held: (() => void)[] | undefined
  /** Whether only the database's answers are held (its statements still reach it). */
  let answersOnly = false
  /** Connections whose traffic is lost (`drop`), by their client side. */
  const lost = new WeakSet<Socket>()
  /** The database side of each connection, by its client side. */
  const ups = new Map<Socket, Socket>()
  const forward = (from: Socket, to: Socket, answers: boolean, client: Socket) => {
    const rewrite = answers && o.otherPids ? otherPid() : undefined
    from.on('data', (chunk: Buffer) => {
      if (lost.has(client)) return
      const d = rewrite ? rewrite(chunk) : chunk
      if (held && (answers || !answersOnly)) held.push(() => to.write(d))
      else to.write(d)
    })
  }
  const proxy = createServer((raw) => {
    /** Forwards what `client` (the raw socket, or TLS on top of it) carries. */
    const start = (client: Socket) => {
      const up = connect(Number(to.port || 5432), to.hostname)
      ups.set(raw, up)
      forward(client, up, false, raw)
      forward(up, client, true, raw)
      const gone = () => {
        up.destroy()
        ups.delete(raw)
        // Lost: the client hears nothing, a close neither.
        if (lost.has(raw)) return
        client.destroy()
        raw.destroy()
        open.delete(raw)
      }
      for (const s of [client, up]) {
        s.on('error', gone)
        s.on('close', gone)
      }
    }
    open.add(raw)
    if (!o.tls) return start(raw)
    // The client's SSLRequest: yes, then TLS.
    raw.once('data', () => {
      raw.write('S')
      const secure = new TLSSocket(raw, { isServer: true, ...o.tls })
      secure.once('secure', () => servernames.push(secure.servername))
      start(secure as unknown as Socket)
    })
  })
  const listen = (port: number) =>
    new Promise<void>((resolve) => proxy.listen(port, '127.0.0.1', resolve))
  await listen(0)
  afterAll(() => void proxy.close())
  const port = (proxy.address() as { port: number }).port
  const url = new URL(to)
  url.hostname = '127.0.0.1'
  url.port = String(port)
  return {
    url: url.toString(),
    servernames,
    async cut() {
      held = undefined
      const closed = new Promise<void>((resolve) => proxy.close(() => resolve()))
      for (const c of open) c.destroy()
      await closed
    },
    mend: () => listen(port),
    /** Holds what either side sends, or with `answers` only what the database sends. */
    stall(what: 'both' | 'answers' = 'both') {
      held = []
      answersOnly = what === 'answers'
    },
    /** Loses what the connections open now carry from here on; new ones work. */
    drop() {
      for (const c of open) lost.add(c)
    },
    /**
     * A failover: the connections open now lose what they carry, and their sessions end at the
     * database (their link to it closes); the clients hear of neither. New ones work.
     */
    vanish() {
      for (const c of open) {
        lost.add(c)
        ups.get(c)?.destroy()
      }
    },
    /**
     * Resets the connections open now (a TCP RST: the client's socket errs ECONNRESET, as when
     * its session is ended while it writes); new ones work.
     */
    reset() {
      for (const c of open) c.resetAndDestroy()
    },
    resume() {
      const all = held ?? []
      held = undefined
      for (const f of all) f()
    },
  }
}

/**
 * Rewrites the process id in the BackendKeyData message of a connection's answers (the first
 * messages only), as a pooler gives ids of its own.
 */
function otherPid(): (chunk: Buffer) => Buffer {
  let done = false
  let pending = Buffer.alloc(0)
  return (chunk) => {
    if (done) return chunk
    const all = Buffer.concat([pending, chunk])
    let at = 0
    while (all.length - at >= 5) {
      const length = all.readUInt32BE(at + 1)
      if (all.length - at < 1 + length) break
      if (all[at] === 0x4b) {
        all.writeInt32BE(all.readInt32BE(at + 5) + 1_000_000, at + 5)
        done = true
        return all
      }
      if (all[at] === 0x5a) {
        done = true
        return all
      }
      at += 1 + length
    }
    // A message not whole yet is held back until it is.
    pending = all.subarray(at)
    return all.subarray(0, at)
  }
}
