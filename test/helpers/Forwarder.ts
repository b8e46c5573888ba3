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
 * With `tls` (a key and certificate, PEM), it speaks TLS to its clients as PostgreSQL does (it
 * answers their SSLRequest, then decrypts), and plain to the database.
 */
export async function forwarder(to: URL, o: { tls?: { key: string; cert: string } } = {}) {
  const open = new Set<Socket>()
  /** The server name each TLS client asked for (SNI; false: none), in order. */
  const servernames: (string | false | null)[] = []
  let held: (() => void)[] | undefined
  /** Whether only the database's answers are held (its statements still reach it). */
  let answersOnly = false
  /** Connections whose traffic is lost (`drop`), by their client side. */
  const lost = new WeakSet<Socket>()
  const forward = (from: Socket, to: Socket, answers: boolean, client: Socket) =>
    from.on('data', (d: Buffer) => {
      if (lost.has(client)) return
      if (held && (answers || !answersOnly)) held.push(() => to.write(d))
      else to.write(d)
    })
  const proxy = createServer((raw) => {
    /** Forwards what `client` (the raw socket, or TLS on top of it) carries. */
    const start = (client: Socket) => {
      const up = connect(Number(to.port || 5432), to.hostname)
      forward(client, up, false, raw)
      forward(up, client, true, raw)
      const gone = () => {
        client.destroy()
        raw.destroy()
        up.destroy()
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
    resume() {
      const all = held ?? []
      held = undefined
      for (const f of all) f()
    },
  }
}
