/**
 * Retries of charges and extensions against the failure a retry is for, a dropped
 * connection: the statement may have committed before the connection went (its answer lost),
 * and the retry must then report what the first attempt did, not a different outcome.
 */
import { expect, test } from 'bun:test'
import type * as Db from '../../src/ledger/Db.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import { plans } from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const db = await Postgres.fresh(
  Object.fromEntries(Object.entries(plans).map(([k, p]) => [k, { wallet: null, ...p }])) as never,
)

/** `sql` whose next statement containing `match` commits, then loses its answer (once). */
function lossy(sql: Db.Sql, match: string) {
  let armed = false
  const proxy = new Proxy(sql, {
    apply(target, self, args) {
      const q = Reflect.apply(target as never, self, args) as Promise<unknown>
      if (armed && Array.isArray(args[0]) && (args[0] as string[]).join('').includes(match)) {
        armed = false
        return q.then(() => {
          throw Object.assign(new Error('write CONNECTION_CLOSED'), { code: 'CONNECTION_CLOSED' })
        })
      }
      return q
    },
  })
  return { sql: proxy as Db.Sql, arm: () => (armed = true) }
}

async function admitted(credits: bigint, want: bigint) {
  const a = await Ledger.account(db.sql, credits)
  const r = await Ledger.admit(db.sql, a.keyHash, want)
  if (r.status !== 'ok') throw new Error(r.status)
  return { accountId: a.id, requestId: r.requestId, held: r.held }
}

test('behavior: a charge whose first attempt committed but lost its answer reports what it charged', async () => {
  const { accountId, requestId, held } = await admitted(1_000n, 100n)
  const { sql, arm } = lossy(db.sql, 'tollway_ledger_batch')
  const r = Reservations.reservation(sql, { id: requestId, held, leaseSeconds: 60 })
  arm()
  const { charged } = await r.settle({
    cost: 40n,
    promptTokens: 1,
    completionTokens: 10,
    status: 'ok',
    latencyMs: 1,
    ttftMs: 1,
  })
  const state = await Ledger.accountState(db.sql, accountId)
  // Charged once (the retry found the reservation gone)...
  expect(state.balance).toBe(960n)
  // ...and reported as charged: the request's usage.cost and signed receipt are this number.
  expect(charged).toBe(40n)
})

test('behavior: an extension whose first attempt committed but lost its answer reports the payer covered it', async () => {
  // 100 credits: 50 held at admission, 40 more free for one extension.
  const { requestId, held } = await admitted(100n, 50n)
  const { sql, arm } = lossy(db.sql, 'tollway_extend')
  const r = Reservations.reservation(sql, { id: requestId, held, leaseSeconds: 60 })
  arm()
  const covered = await r.extend(40n)
  const [row] = await db.sql`select held from reservations where id = ${requestId}`
  // The reservation holds 90 in the database, not 130 (or a refusal for want of 130): the
  // stream may send what 90 pays for.
  expect(row?.held).toBe(90n)
  expect(covered).toBe(true)
  expect(r.held).toBe(90n)
})

test('behavior: an instance of an earlier version, calling tollway_extend with four arguments, extends as it always did', async () => {
  const { requestId } = await admitted(100n, 50n)
  const [row] = await db.sql`select tollway_extend(${requestId}, 30::numeric, 60, null) as held`
  expect(row!.held).toBe(80n)
  // One definition: the four-argument call reaches the same function as the five.
  const [fns] = await db.sql`select count(*)::int as n from pg_proc
    where proname = 'tollway_extend' and pronamespace = current_schema()::regnamespace`
  expect(fns!.n).toBe(1)
})
