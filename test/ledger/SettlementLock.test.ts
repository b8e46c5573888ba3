/**
 * The settlement lock on a database one process alone uses (the embedded PGlite, one
 * connection): a pass must not hold that connection while it waits on the chain, or every
 * request waits with it.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import * as Db from '../../src/ledger/Db.ts'
import * as Embedded from '../../src/ledger/Embedded.ts'
import * as Settlements from '../../src/ledger/Settlements.ts'

const embedded = await Embedded.start()
const sql = Db.connect({ url: embedded.url, max: 1 })
await Db.migrate(sql)
afterAll(async () => {
  await sql.end()
  await embedded.stop()
})

describe('settlement lock, embedded database', () => {
  test('behavior: a request is answered while a settlement pass waits on the chain; a second pass meanwhile is refused, then runs', async () => {
    const store = Settlements.store(sql, { alone: true })
    const chain = Promise.withResolvers<void>()
    const pass = store.withLock(async (locked) => {
      await locked.clock()
      // The chain's answer (a settle's receipt: a block or more on a real chain).
      await chain.promise
      return locked.clock()
    })
    const answered = await Promise.race([
      sql`select 1 as one`.then(([r]) => r!.one === 1),
      Bun.sleep(3_000).then(() => 'still waiting'),
    ])
    expect(answered).toBe(true)
    // This instance's close path, or another instance of this process on the same handle.
    expect(await store.withLock(async () => 'second')).toEqual({ locked: false })
    expect(
      await Settlements.store(sql, { alone: true }).withLock(async () => 'other instance'),
    ).toEqual({ locked: false })
    chain.resolve()
    expect((await pass).locked).toBe(true)
    expect(await store.withLock(async () => 'after')).toEqual({ locked: true, value: 'after' })
  }, 20_000)
})
