/**
 * An instance whose machine is gone leaves its database sessions behind: PostgreSQL keeps them
 * (and what they hold) until TCP keepalive gives up, hours later. A lock such a session held
 * must not outlive the instance's heartbeat: the settlement lock, taken for a whole pass
 * (chain calls included), would otherwise keep every other instance from settling, and from
 * reading the payers' forced closes back, for those hours, while a payer's grace period is 15
 * minutes.
 */
import { afterAll, expect, test } from 'bun:test'
import { getBlockNumber } from 'viem/actions'
import * as Db from '../../src/ledger/Db.ts'
import * as Instances from '../../src/ledger/Instances.ts'
import * as Anvil from '../helpers/Anvil.ts'
import { forwarder } from '../helpers/Forwarder.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Postgres from '../helpers/Postgres.ts'
import * as Upstream from '../helpers/Upstream.ts'

const server = Boolean(process.env.DATABASE_URL)

/** Waits (up to `ms`) for `f` to hold; whether it did. */
async function until(f: () => Promise<boolean>, ms: number): Promise<boolean> {
  const end = performance.now() + ms
  while (performance.now() < end) {
    if (await f()) return true
    await Bun.sleep(100)
  }
  return f()
}

test.skipIf(!server)(
  'behavior: an instance gone with its machine in the middle of a settlement pass (its session lingers, holding the settlement lock) stops the other settling no longer than its heartbeat threshold: the other reads the chain up to its head again',
  async () => {
    const chain = await Anvil.start()
    afterAll(() => chain.stop())
    const db = await Postgres.fresh()
    const upstream = Upstream.start()
    // b reaches the database and the chain through links the test stalls.
    const dbLink = await forwarder(new URL(process.env.DATABASE_URL!))
    const rpcLink = await forwarder(new URL(chain.rpcUrl))
    const sql = Db.connect({ url: dbLink.url, schema: db.schema!, max: 4 })
    afterAll(() => sql.end({ timeout: 1 }))
    const payments = {
      challengeSecret: 'test-challenge-secret-0123456789',
      settlement: { thresholdAmount: '1000000000000', idleSeconds: 3_600, intervalSeconds: 1 },
    }
    const options = { sweepMs: 200, deadAfterMs: 1_500 }
    const b = await Gateway.create(
      { chain: { ...Gateway.chainOf(chain), rpcUrl: rpcLink.url }, payments },
      { db: { ...db, sql }, upstream },
      options,
    )
    const a = await Gateway.create(
      { chain: Gateway.chainOf(chain), payments },
      { db, upstream },
      options,
    )
    const bName = (await Instances.nameOf(b.sql))!
    expect(bName).toStartWith('tollway/')
    // The settlement lock (a bigint key: its low 32 bits are `objid`), not another advisory lock
    // b takes a moment in its sweep (the Idempotency-Key prune's).
    const bHoldsALock = async () =>
      (
        await db.sql`
          select 1 from pg_locks l join pg_stat_activity s on s.pid = l.pid
          where l.locktype = 'advisory' and l.granted and s.application_name = ${bName}
            and l.objsubid = 1 and l.objid::bigint
              = hashtext(current_schema() || '.tollway_settlement')::bigint & 4294967295`
      ).length > 0

    try {
      // b's chain stops answering: its next pass takes the settlement lock and waits on the
      // chain with it (viem tries for half a minute).
      rpcLink.stall()
      expect(await until(bHoldsALock, 20_000)).toBe(true)
      // Then its machine is gone: its sessions linger in PostgreSQL, the lock with them.
      dbLink.stall()
      await Bun.sleep(300)
      expect(await bHoldsALock()).toBe(true)

      // New blocks (where a payer's CloseRequested would be): a pass of a reads them, moving the
      // cursor to the head, once b's heartbeat is past the threshold (1.5 s) and a sweep ran.
      for (let i = 0; i < 3; i++) await chain.payeeClient.request({ method: 'evm_mine' } as never)
      const head = await getBlockNumber(chain.payeeClient, { cacheTime: 0 })
      const cursor = async () => {
        const [r] = await db.sql`select max(block) as block from chain_cursors`
        return (r?.block as bigint | null) ?? -1n
      }
      expect(await until(async () => (await cursor()) >= head, 15_000)).toBe(true)
      expect(a.logs.join('\n')).toContain('ended the database sessions of instances that are gone')
    } finally {
      // b's links back, so that it stops (its sessions ended, it opens new ones).
      rpcLink.resume()
      dbLink.resume()
    }
  },
  90_000,
)
