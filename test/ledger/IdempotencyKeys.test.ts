/**
 * The Idempotency-Key window (IdempotencyKeys.ts): completed keys older than it are forgotten, a
 * chunk at a time, never one whose request runs or holds a reservation; a request sent with a
 * forgotten key is a new request. Every keyed request wrote a row, and nothing deleted one.
 */
import { describe, expect, test } from 'bun:test'
import type * as Channels from '../../src/ledger/Channels.ts'
import * as IdempotencyKeys from '../../src/ledger/IdempotencyKeys.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import { plans } from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const db = await Postgres.fresh(
  Object.fromEntries(Object.entries(plans).map(([k, p]) => [k, { wallet: null, ...p }])) as never,
)
const { sql } = db

/** An hour: the window of these tests. */
const WINDOW = 3600

const fingerprint = new Uint8Array([9])
const keyed = (key: string) => ({ key, fingerprint })

/** Holds 10 of channel `channelId` for request `requestId`, keyed `key`: the hold's answer. */
const keyedHold = (channelId: Channels.Hex, key: string, requestId: string) =>
  Ledger.hold(sql, channelId, { want: 10n, need: 10n, requestId, idempotency: keyed(key) })

/** Finishes request `id` charged `cost` (of `channelId`, if given), with its key. */
const finish = (id: string, cost: bigint, channelId?: Channels.Hex) =>
  Reservations.finish(sql, { id, cost, ...Ledger.outcome }, { channelId, idempotent: true })

/** The keys of account `id` (by key: state and request). */
const accountKeys = async (id: string) =>
  Object.fromEntries(
    (await sql`select key, state, request_id from idempotency_keys where account_id = ${id}`).map(
      (r) => [r.key, { state: r.state, request: r.request_id }],
    ),
  )

/** The keys of channel `channelId`. */
const channelKeys = async (channelId: Channels.Hex) =>
  Object.fromEntries(
    (
      await sql`
        select key, state, request_id from channel_idempotency_keys
        where channel_id = ${Buffer.from(channelId.slice(2), 'hex')}`
    ).map((r) => [r.key, { state: r.state, request: r.request_id }]),
  )

/** Makes the keys `keys` of account `id` (or of channel `channelId`) `hours` old, and the
 * usage rows of their requests (a request that ended then). */
async function age(o: { id?: string; channelId?: Channels.Hex; keys: string[]; hours: number }) {
  const at = sql`now() - make_interval(secs => ${o.hours * 3600})`
  const aged = o.id
    ? await sql`
        update idempotency_keys set created_at = ${at}
        where account_id = ${o.id} and key = any(${o.keys}) returning request_id`
    : await sql`
        update channel_idempotency_keys set created_at = ${at}
        where channel_id = ${Buffer.from(o.channelId!.slice(2), 'hex')} and key = any(${o.keys})
        returning request_id`
  await sql`update usage set created_at = ${at} where id = any(${aged.map((r) => r.request_id)}::uuid[])`
}

describe('prune', () => {
  test('behavior: completed keys older than the window are forgotten; young ones, running ones and one whose request holds a reservation are kept, and usage and charges stay', async () => {
    const a = await Ledger.account(sql, 1_000n)
    const done: Record<string, string> = {}
    for (const k of ['old', 'young']) {
      const r = await Ledger.admit(sql, a.keyHash, 10n, { idempotency: keyed(k) })
      expect(r.status).toBe('ok')
      expect(await finish(r.requestId, 4n)).toMatchObject({ charged: 4n })
      done[k] = r.requestId
    }
    // Still running (in progress, its reservation held).
    const running = await Ledger.admit(sql, a.keyHash, 10n, { idempotency: keyed('running') })
    expect(running.status).toBe('ok')
    // Completed while its request still holds a reservation: no path of the ledger leaves one
    // (a key is completed with its reservation's delete), written here by hand.
    const held = await Ledger.admit(sql, a.keyHash, 10n, { idempotency: keyed('held') })
    expect(held.status).toBe('ok')
    await sql`
      update idempotency_keys set state = 'completed' where account_id = ${a.id} and key = 'held'`
    // In progress, and no reservation seen with it: written by hand too.
    await sql`
      insert into idempotency_keys (account_id, key, fingerprint, request_id, state)
      values (${a.id}, 'orphan', '\\x09', gen_random_uuid(), 'in_progress')`
    await age({ id: a.id, keys: ['old', 'running', 'held', 'orphan'], hours: 2 })
    // Just inside the window.
    await age({ id: a.id, keys: ['young'], hours: 0.9 })

    // A channel's keys alike.
    const c = await Ledger.channel(sql, 1_000n)
    await Ledger.voucher(sql, c.channelId, 500n)
    const channelOld = crypto.randomUUID()
    expect((await keyedHold(c.channelId, 'old', channelOld)).status).toBe('ok')
    expect(await finish(channelOld, 4n, c.channelId)).toMatchObject({ charged: 4n })
    const channelRunning = crypto.randomUUID()
    expect((await keyedHold(c.channelId, 'running', channelRunning)).status).toBe('ok')
    await age({ channelId: c.channelId, keys: ['old', 'running'], hours: 2 })
    const before = await Ledger.accountState(sql, a.id)
    const channelBefore = await Ledger.channelState(sql, c.channelId)

    expect(await IdempotencyKeys.prune(sql, WINDOW)).toBe(2)
    expect(await accountKeys(a.id)).toEqual({
      young: { state: 'completed', request: done.young },
      running: { state: 'in_progress', request: running.requestId },
      held: { state: 'completed', request: held.requestId },
      orphan: { state: 'in_progress', request: expect.any(String) },
    })
    expect(await channelKeys(c.channelId)).toEqual({
      running: { state: 'in_progress', request: channelRunning },
    })
    // Nothing else goes with them: the usage rows, the charges, the balances.
    expect(await Ledger.accountState(sql, a.id)).toEqual(before)
    expect(await Ledger.channelState(sql, c.channelId)).toEqual(channelBefore)
    const [u] = await sql`
      select count(*)::int as n from usage where id = any(${[done.old!, channelOld]})`
    expect(u!.n).toBe(2)
    const [t] = await sql`
      select count(*)::int as n from credit_transactions where request_id = ${done.old!}`
    expect(t!.n).toBe(1)
    // A second pass finds nothing more.
    expect(await IdempotencyKeys.prune(sql, WINDOW)).toBe(0)
    // Once their requests end, their keys are kept a window from then (a retry of an answer
    // just given is still told so), then go too.
    await finish(running.requestId, 1n)
    await finish(held.requestId, 1n)
    await finish(channelRunning, 1n, c.channelId)
    expect(await IdempotencyKeys.prune(sql, WINDOW)).toBe(0)
    await age({ id: a.id, keys: ['running', 'held'], hours: 2 })
    await age({ channelId: c.channelId, keys: ['running'], hours: 2 })
    expect(await IdempotencyKeys.prune(sql, WINDOW)).toBe(3)
    expect(await accountKeys(a.id)).toEqual({
      young: { state: 'completed', request: done.young },
      orphan: { state: 'in_progress', request: expect.any(String) },
    })
    await sql`delete from idempotency_keys where account_id = ${a.id} and key = 'orphan'`
    expect(await channelKeys(c.channelId)).toEqual({})
  })

  test('behavior: a request retried with a key forgotten is admitted as a new request, and charged as one', async () => {
    const a = await Ledger.account(sql, 1_000n)
    const first = await Ledger.admit(sql, a.keyHash, 10n, { idempotency: keyed('retried') })
    expect(first.status).toBe('ok')
    expect(await finish(first.requestId, 4n)).toMatchObject({ charged: 4n })
    // Within the window: a repeat, not run or charged.
    expect(await Ledger.admit(sql, a.keyHash, 10n, { idempotency: keyed('retried') })).toEqual({
      status: 'idempotency_completed',
      otherRequest: first.requestId,
      requestId: expect.any(String),
    })
    await age({ id: a.id, keys: ['retried'], hours: 25 })
    expect(await IdempotencyKeys.prune(sql, WINDOW)).toBe(1)

    const retry = await Ledger.admit(sql, a.keyHash, 10n, { idempotency: keyed('retried') })
    expect(retry.status).toBe('ok')
    expect(await accountKeys(a.id)).toEqual({
      retried: { state: 'in_progress', request: retry.requestId },
    })
    expect(await finish(retry.requestId, 4n)).toMatchObject({ charged: 4n })
    expect(await accountKeys(a.id)).toEqual({
      retried: { state: 'completed', request: retry.requestId },
    })
    const s = await Ledger.accountState(sql, a.id)
    expect([s.balance, s.usage, s.usage_cost]).toEqual([992n, 2, 8n])

    // A channel's alike.
    const c = await Ledger.channel(sql, 1_000n)
    await Ledger.voucher(sql, c.channelId, 500n)
    const hold = (requestId: string) => keyedHold(c.channelId, 'retried', requestId)
    const one = crypto.randomUUID()
    expect((await hold(one)).status).toBe('ok')
    expect(await finish(one, 4n, c.channelId)).toMatchObject({ charged: 4n })
    expect((await hold(crypto.randomUUID())).status).toBe('idempotency_completed')
    await age({ channelId: c.channelId, keys: ['retried'], hours: 25 })
    expect(await IdempotencyKeys.prune(sql, WINDOW)).toBe(1)
    const two = crypto.randomUUID()
    expect((await hold(two)).status).toBe('ok')
    expect(await finish(two, 4n, c.channelId)).toMatchObject({ charged: 4n })
    expect(await Ledger.channelState(sql, c.channelId)).toMatchObject({ spent: 8n, reserved: 0n })
  })

  test('behavior: a backlog longer than a chunk is forgotten a chunk at a time, oldest first, each its own transaction', async () => {
    const a = await Ledger.account(sql, 1_000n)
    // Seven old completed keys, the last written the oldest (so that the table's order is not
    // their age's).
    await sql`
      insert into idempotency_keys (account_id, key, fingerprint, request_id, state, created_at)
      select ${a.id}, 'k' || i, '\\x09', gen_random_uuid(), 'completed',
        now() - make_interval(hours => 2 + i)
      from generate_series(1, 7) i`
    const left = async () => Object.keys(await accountKeys(a.id)).sort()

    // One chunk takes at most its limit, the oldest.
    expect(await IdempotencyKeys.pruneChunk(sql, WINDOW, 3)).toEqual({ accounts: 3, channels: 0 })
    expect(await left()).toEqual(['k1', 'k2', 'k3', 'k4'])
    // A stop between chunks ends the prune after the chunk under way.
    let chunks = 0
    const counted = <T>(chunk: Promise<T>) => {
      chunks++
      return chunk
    }
    expect(
      await IdempotencyKeys.prune(sql, WINDOW, { limit: 2, call: counted, stopped: () => true }),
    ).toBe(2)
    expect([chunks, await left()]).toEqual([1, ['k1', 'k2']])
    // Otherwise chunk after chunk, until one is not full.
    await sql`
      insert into idempotency_keys (account_id, key, fingerprint, request_id, state, created_at)
      select ${a.id}, 'm' || i, '\\x09', gen_random_uuid(), 'completed', now() - interval '2 hours'
      from generate_series(1, 5) i`
    chunks = 0
    expect(await IdempotencyKeys.prune(sql, WINDOW, { limit: 2, call: counted })).toBe(7)
    // 2 + 2 + 2 + 1.
    expect([chunks, await left()]).toEqual([4, []])
  })

  test.skipIf(db.max === 1)(
    'behavior: an instance that finds another pruning leaves the work to it, deleting nothing',
    async () => {
      const a = await Ledger.account(sql, 1_000n)
      await sql`
        insert into idempotency_keys (account_id, key, fingerprint, request_id, state, created_at)
        values (${a.id}, 'elsewhere', '\\x09', gen_random_uuid(), 'completed',
          now() - interval '2 hours')`
      const other = await sql.reserve()
      try {
        await other`
          select pg_advisory_lock(hashtext(current_schema() || '.tollway_idempotency_prune'))`
        expect(await IdempotencyKeys.pruneChunk(sql, WINDOW)).toBeUndefined()
        expect(await IdempotencyKeys.prune(sql, WINDOW)).toBe(0)
        expect(Object.keys(await accountKeys(a.id))).toEqual(['elsewhere'])
        await other`
          select pg_advisory_unlock(hashtext(current_schema() || '.tollway_idempotency_prune'))`
      } finally {
        other.release()
      }
      expect(await IdempotencyKeys.prune(sql, WINDOW)).toBe(1)
      expect(await accountKeys(a.id)).toEqual({})
    },
  )
})

describe('window', () => {
  test("behavior: runs from the request's end: a key first used before the window whose request ended within it is kept", async () => {
    const a = await Ledger.account(sql, 1_000n)
    const long = await Ledger.admit(sql, a.keyHash, 10n, { idempotency: keyed('long') })
    expect(await finish(long.requestId, 4n)).toMatchObject({ charged: 4n })
    const short = await Ledger.admit(sql, a.keyHash, 10n, { idempotency: keyed('short') })
    expect(await finish(short.requestId, 4n)).toMatchObject({ charged: 4n })
    // Both first used two hours ago, the short one's request ended then too; the long one's ran
    // until a moment ago.
    await age({ id: a.id, keys: ['long', 'short'], hours: 2 })
    await sql`update usage set created_at = now() where id = ${long.requestId}`
    await IdempotencyKeys.prune(sql, WINDOW)
    expect(Object.keys(await accountKeys(a.id))).toEqual(['long'])
  })
})
