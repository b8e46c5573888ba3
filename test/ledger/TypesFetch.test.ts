/**
 * A connection that closes while postgres.js fetches the server's array types (its first
 * statement on each new connection) fails what waits on it, and nothing else: the fetch's own
 * failure was a promise nobody awaited, an unhandled rejection (a line on standard error from
 * the gateway; under bun test, a failure of whichever test ran then). The chaos test
 * (test/ledger/Chaos.test.ts, with sessions ended) found it. A server of a few lines speaks the
 * start of the protocol: it lets the connection in, then closes it on its first statement.
 */
import { afterAll, expect, test } from 'bun:test'
import { createServer, type Socket } from 'node:net'
import * as Db from '../../src/ledger/Db.ts'

/** A message of the protocol: its type, its length, its body. */
const message = (type: string, body: Buffer) => {
  const head = Buffer.alloc(5)
  head.write(type, 0)
  head.writeInt32BE(body.length + 4, 1)
  return Buffer.concat([head, body])
}

const int32s = (...xs: number[]) => {
  const b = Buffer.alloc(4 * xs.length)
  for (const [i, x] of xs.entries()) b.writeInt32BE(x, 4 * i)
  return b
}

test('error: a connection closed while its types are fetched fails its statement, with no rejection left unhandled', async () => {
  const firstStatement = Promise.withResolvers<void>()
  const again = Promise.withResolvers<void>()
  let connections = 0
  const sockets = new Set<Socket>()
  const server = createServer((socket) => {
    sockets.add(socket)
    socket.on('error', () => {})
    if (++connections > 1) {
      // Connecting again: what the close left to do is done (the fetch has failed).
      again.resolve()
      socket.destroy()
      return
    }
    let started = false
    socket.on('data', () => {
      if (!started) {
        // The startup message: authenticated, its process, ready.
        started = true
        socket.write(
          Buffer.concat([
            message('R', int32s(0)),
            message('K', int32s(4242, 1)),
            message('Z', Buffer.from('I')),
          ]),
        )
        return
      }
      // Its first statement, the array types: the session ends.
      firstStatement.resolve()
      socket.destroy()
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  afterAll(() => {
    for (const s of sockets) s.destroy()
    server.close()
  })
  const { port } = server.address() as { port: number }
  const sql = Db.connect({ url: `postgres://u@127.0.0.1:${port}/d`, max: 1 })
  const query = sql`select 1`.then(
    () => 'answered',
    (e: { code?: string }) => e.code,
  )
  await firstStatement.promise
  await again.promise
  await sql.end({ timeout: 0 })
  // Never answered: it failed with the connection (or with the pool ended, as it connected again).
  expect(await query).not.toBe('answered')
})
