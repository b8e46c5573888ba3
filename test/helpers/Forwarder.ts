/** A TCP link to PostgreSQL that tests cut, mend, stall and resume (the database's faults). */
import { afterAll } from 'bun:test'
import { connect, createServer, type Socket } from 'node:net'

/**
 * A TCP forwarder to PostgreSQL; `cut` closes every connection and stops listening (new ones
 * are refused, as by a stopped server; what was held is dropped), `mend` listens again on the
 * same port. `stall` holds what either side sends (connections stay open, nothing is
 * answered: a hung database), or only the database's answers; `resume` passes it on. `drop`
 * loses for good what the connections open now carry, either way, and leaves them open, while
 * new connections work (a link lost without a reset: a failover, a NAT that forgot it).
 */
export async function forwarder(to: URL) {
  const open = new Set<Socket>()
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
  const proxy = createServer((client) => {
    const up = connect(Number(to.port || 5432), to.hostname)
    forward(client, up, false, client)
    forward(up, client, true, client)
    const gone = () => {
      client.destroy()
      up.destroy()
      open.delete(client)
    }
    for (const s of [client, up]) {
      s.on('error', gone)
      s.on('close', gone)
    }
    open.add(client)
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
