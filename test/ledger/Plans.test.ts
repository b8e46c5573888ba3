/**
 * Plans dropped from the configuration: their accounts keep the plan (its row is kept), so a
 * gateway starting without it says so rather than serve them on limits no configuration shows.
 */
import { describe, expect, test } from 'bun:test'
import * as Config from '../../src/Config.ts'
import * as Accounts from '../../src/ledger/Accounts.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Postgres from '../helpers/Postgres.ts'
import * as Upstream from '../helpers/Upstream.ts'

describe('plans the configuration no longer has', () => {
  test('behavior: a gateway started without a plan its accounts are on warns, naming the plan and how many accounts; with every plan configured, no warning', async () => {
    const plans = {
      ...Gateway.plans,
      legacy: { tier: 0, requestsPerMinute: 5, maxConcurrent: 1, tokensPerMonth: 1000 },
    }
    const db = await Postgres.fresh(Config.from({ plans }).plans)
    await Accounts.create(db.sql, { name: 'old', plan: 'legacy' })
    await Accounts.create(db.sql, { name: 'old too', plan: 'legacy' })
    await Accounts.create(db.sql, { name: 'current', plan: 'free' })
    const upstream = Upstream.start()

    const kept = await Gateway.create({ plans }, { db, upstream })
    expect(kept.logs.some((l) => l.includes('plans the configuration no longer has'))).toBe(false)

    const dropped = await Gateway.create({}, { db, upstream })
    const warned = dropped.logs.find((l) => l.includes('plans the configuration no longer has'))
    expect(warned).toBeDefined()
    expect(warned).toContain('"level":40')
    expect(warned).toContain('legacy: 2')
    expect(warned).not.toContain('free:')
    // Still served on the plan it had: the row is kept, as the warning says.
    const moved = await dropped.admin('/accounts', { name: 'new', plan: 'legacy' })
    expect(moved.status).toBe(400)
  })
})
