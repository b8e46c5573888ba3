/**
 * The embedded database: PGlite (PostgreSQL compiled to WASM) served on a loopback port by
 * pglite-socket, so the gateway reaches it with the same postgres.js code as a real
 * server. PGlite is single-connection: connect to it with `max: 1`.
 */
import { PGlite } from '@electric-sql/pglite'
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'

export type Embedded = { url: string; stop(): Promise<void> }

/** Starts PGlite with its data in `dataDir` (in memory when omitted) on a free port. */
export async function start(options: { dataDir?: string } = {}): Promise<Embedded> {
  const db = await PGlite.create(options.dataDir)
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
    },
  }
}
