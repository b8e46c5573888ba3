import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Db from '../../src/ledger/Db.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import { Waker } from '../../src/ledger/Waker.ts'
import { forwarder } from '../helpers/Forwarder.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const db = await Postgres.fresh()
const { sql } = db

const channel = (deposit: bigint) => Ledger.channel(sql, deposit)
const sig = Ledger.signature
const voucher = (channelId: Channels.Hex, amount: bigint, minDelta = 1n) =>
  Ledger.voucher(sql, channelId, amount, minDelta)
const invariants = (channelId: Channels.Hex) => Ledger.channelState(sql, channelId)

describe('acceptVoucher', () => {
  test('behavior: accepts increasing vouchers; replays, small deltas and amounts over the deposit change nothing', async () => {
    const c = await channel(1000n)
    expect((await voucher(c.channelId, 100n)).status).toBe('accepted')
    expect((await voucher(c.channelId, 100n)).status).toBe('replay')
    expect((await voucher(c.channelId, 50n)).status).toBe('replay')
    expect((await voucher(c.channelId, 105n, 10n)).status).toBe('delta_too_small')
    expect((await voucher(c.channelId, 1001n)).status).toBe('exceeds_deposit')
    expect((await voucher(c.channelId, 1000n)).status).toBe('accepted')
    expect((await invariants(c.channelId)).acceptedCumulative).toBe(1000n)
    expect((await Channels.get(sql, c.channelId))!.voucherSignature).toBe(sig(1000n))
    const missing = `0x${'f'.repeat(64)}` as Channels.Hex
    expect((await voucher(missing, 1n)).status).toBe('not_found')
  })

  test('behavior: a channel first seen already settled on chain starts there: no voucher at or below it is accepted, nor pays for a request', async () => {
    const id = () => crypto.randomUUID().replaceAll('-', '')
    const c = await Channels.observe(sql, {
      channelId: `0x${id()}${id()}` as Channels.Hex,
      deposit: 1000n,
      chainId: 31337,
      escrow: `0x${'0'.repeat(39)}1`,
      payer: `0x${'0'.repeat(39)}2`,
      payee: `0x${'0'.repeat(39)}3`,
      token: `0x${'0'.repeat(39)}4`,
      signer: `0x${'0'.repeat(39)}2`,
      settled: 400n,
      finalized: false,
      closeRequested: false,
    })
    expect(await invariants(c.channelId)).toMatchObject({
      settled: 400n,
      spent: 400n,
      acceptedCumulative: 400n,
    })
    expect((await voucher(c.channelId, 300n)).status).toBe('replay')
    expect((await voucher(c.channelId, 400n)).status).toBe('replay')
    expect((await voucher(c.channelId, 450n)).status).toBe('accepted')
    // Only what the new voucher adds above what was settled before (50), not 450.
    expect((await Ledger.hold(sql, c.channelId, { want: 60n, need: 60n })).status).toBe(
      'insufficient',
    )
    expect((await Ledger.hold(sql, c.channelId, { want: 50n, need: 50n })).status).toBe('ok')
  })

  test('error: amounts only grow, even when written by hand', async () => {
    const c = await channel(1000n)
    await voucher(c.channelId, 500n)
    const id = Buffer.from(c.channelId.slice(2), 'hex')
    await expect(
      sql`update channels set accepted_cumulative = 10 where channel_id = ${id}`,
    ).rejects.toThrow(/only grow/)
    await expect(sql`update channels set spent = 600 where channel_id = ${id}`).rejects.toThrow(
      /channel_spent_within_accepted/,
    )
    await expect(sql`delete from vouchers where channel_id = ${id}`).rejects.toThrow(/append-only/)
  })

  test('behavior: a close request or finalization stops vouchers and admissions', async () => {
    const c = await channel(1000n)
    await voucher(c.channelId, 100n)
    await Channels.observe(sql, { ...c, closeRequested: true })
    expect((await voucher(c.channelId, 200n)).status).toBe('close_requested')
    const a = await Channels.admit(sql, {
      channelId: c.channelId,
      model: 'm',
      stream: true,
      want: 1n,
      need: 1n,
      requestId: crypto.randomUUID(),
      leaseSeconds: 60,
    })
    expect(a.status).toBe('close_requested')
  })
})

describe('a channel charge', () => {
  /** A channel with a request of 100 held on it: the request's id and its reservation on `on`. */
  const held = async (on: Db.Sql) => {
    const c = await channel(1000n)
    await voucher(c.channelId, 300n)
    const id = crypto.randomUUID()
    expect(
      (await Ledger.hold(sql, c.channelId, { want: 100n, need: 50n, requestId: id })).status,
    ).toBe('ok')
    const r = Reservations.reservation(on, {
      id,
      held: 100n,
      leaseSeconds: 60,
      channelId: c.channelId,
    })
    return { id, channelId: c.channelId, r }
  }
  /** `sql` whose charge statements are seen by `charge` first, which may refuse one (an error). */
  const charging = (charge: () => Error | undefined) =>
    new Proxy(sql, {
      apply(target, self, args) {
        const text = Array.isArray(args[0]) ? (args[0] as string[]).join('') : ''
        const refused = text.includes('tollway_channel_finish_many') ? charge() : undefined
        return refused ? Promise.reject(refused) : Reflect.apply(target as never, self, args)
      },
    }) as Db.Sql
  const outcome = (cost: bigint) => ({
    cost,
    promptTokens: 1,
    completionTokens: 1,
    status: 'ok' as const,
    latencyMs: 1,
    ttftMs: 1,
  })

  test('behavior: one failing past its first tries (the database out of reach) is written once the database answers again, not left to the sweep', async () => {
    let down = true
    const { id, channelId, r } = await held(
      charging(() =>
        down
          ? Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' })
          : undefined,
      ),
    )
    // Its first tries fail: the caller hears of it.
    expect(
      await r.settle(outcome(80n)).then(
        () => 'charged',
        () => 'failed',
      ),
    ).toBe('failed')
    down = false
    // Back: the charge goes through, exactly once, and the hold is released.
    for (let i = 0; i < 100; i++) {
      const [u] = await sql`select cost from usage where id = ${id}`
      if (u) break
      await Bun.sleep(100)
    }
    await Reservations.drained(5_000)
    expect(await invariants(channelId)).toMatchObject({ spent: 80n, reserved: 0n })
    const rows = await sql`select cost from usage where id = ${id}`
    expect(rows.map((u) => u.cost)).toEqual([80n])
  }, 20_000)

  test('behavior: one whose reservation a sweep released first (abandoned, charged what it had recorded) charges the rest, as far as the authorized balance goes', async () => {
    const { id, channelId, r } = await held(sql)
    // What the request had recorded as delivered when its lease ran out.
    await Reservations.extend(sql, { id, amount: 0n, leaseSeconds: 60, delivered: 30n, from: 100n })
    await sql`update reservations set expires_at = now() - interval '1 second' where id = ${id}`
    expect(await Reservations.sweep(sql, undefined)).toBe(1)
    expect(await invariants(channelId)).toMatchObject({ spent: 30n, reserved: 0n })
    // Its own charge comes after: the rest, 80 in all.
    expect((await r.settle(outcome(80n))).charged).toBe(80n)
    expect(await invariants(channelId)).toMatchObject({ spent: 80n, reserved: 0n })
    const rows = await sql`select status, cost from usage where id = ${id}`
    expect(rows.map((u) => `${u.status}:${u.cost}`)).toEqual(['ok:80'])
    // Past what the payer authorized (300), it stops there.
    const second = await held(sql)
    await sql`update reservations set expires_at = now() - interval '1 second' where id = ${second.id}`
    await Reservations.sweep(sql, undefined)
    expect((await second.r.settle(outcome(5_000n))).charged).toBe(300n)
    expect(await invariants(second.channelId)).toMatchObject({ spent: 300n, reserved: 0n })
  })

  test('behavior: a late charge takes back the Idempotency-Key its sweep freed, and charges nothing more once a retry has taken it (one charge for one key)', async () => {
    const idempotency = { key: 'late', fingerprint: new Uint8Array([3]) }
    const keyOf = async (channelId: Channels.Hex) =>
      (
        await sql`
          select request_id, state from channel_idempotency_keys
          where channel_id = ${Buffer.from(channelId.slice(2), 'hex')} and key = 'late'`
      )[0]
    /** A channel request with the key, released by a sweep before it charged anything. */
    const swept = async () => {
      const c = await channel(1000n)
      await voucher(c.channelId, 300n)
      const id = crypto.randomUUID()
      const hold = { want: 100n, need: 50n, idempotency }
      expect((await Ledger.hold(sql, c.channelId, { ...hold, requestId: id })).status).toBe('ok')
      await sql`update reservations set expires_at = now() - interval '1 second' where id = ${id}`
      expect(await Reservations.sweep(sql, undefined)).toBe(1)
      expect(await keyOf(c.channelId)).toBeUndefined()
      const on = (requestId: string) =>
        Reservations.reservation(sql, {
          id: requestId,
          held: 100n,
          leaseSeconds: 60,
          channelId: c.channelId,
          idempotency,
        })
      return { channelId: c.channelId, id, late: on(id), hold, on }
    }

    const alone = await swept()
    expect((await alone.late.settle(outcome(80n))).charged).toBe(80n)
    expect(await keyOf(alone.channelId)).toEqual({ request_id: alone.id, state: 'completed' })
    expect((await Ledger.hold(sql, alone.channelId, alone.hold)).status).toBe(
      'idempotency_completed',
    )
    expect(await invariants(alone.channelId)).toMatchObject({ spent: 80n, reserved: 0n })

    const raced = await swept()
    const retry = crypto.randomUUID()
    expect(
      (await Ledger.hold(sql, raced.channelId, { ...raced.hold, requestId: retry })).status,
    ).toBe('ok')
    expect((await raced.late.settle(outcome(80n))).charged).toBe(0n)
    expect((await raced.on(retry).settle(outcome(80n))).charged).toBe(80n)
    expect(await keyOf(raced.channelId)).toEqual({ request_id: retry, state: 'completed' })
    expect(await invariants(raced.channelId)).toMatchObject({ spent: 80n, reserved: 0n })
  })

  test.skipIf(!process.env.DATABASE_URL)(
    'behavior: the sweep leaves a reservation whose lease its instance renews while the sweep is under way (the stream is alive): its later charge is still covered by its hold',
    async () => {
      const { id, channelId, r } = await held(sql)
      await Reservations.extend(sql, {
        id,
        amount: 0n,
        leaseSeconds: 60,
        delivered: 30n,
        from: 100n,
      })
      // Its lease ran out as far as the sweep sees; its instance renews it (recording 60
      // delivered) in a transaction not yet committed: the extension under way.
      await sql`update reservations set expires_at = now() - interval '1 second' where id = ${id}`
      const renewal = await Ledger.locked(sql, [
        (tx) =>
          Reservations.extend(tx, { id, amount: 0n, leaseSeconds: 60, delivered: 60n, from: 100n }),
      ])
      expect(
        await Ledger.sweepDuring(
          sql,
          renewal,
          () => Reservations.sweep(sql, Buffer.from(channelId.slice(2), 'hex')),
          'tollway_channel_finish_many',
        ),
      ).toBe(0)
      expect(await Ledger.lease(sql, id)).toEqual({ delivered: 60n, live: true })
      expect(await invariants(channelId)).toMatchObject({ spent: 0n, reserved: 100n })
      // Another request takes what is free; the stream's charge is still whole (had its hold
      // been released, its late charge would find nothing free: 30 spent for 100 sent).
      expect(
        await Ledger.hold(sql, channelId, { want: 300n, need: 1n, requestId: crypto.randomUUID() }),
      ).toMatchObject({ status: 'ok', held: 200n })
      expect((await r.settle(outcome(100n))).charged).toBe(100n)
      expect(await invariants(channelId)).toMatchObject({ spent: 100n, reserved: 200n })
    },
  )

  test('behavior: a settle asked for twice charges once, with one charge statement', async () => {
    let statements = 0
    const { r } = await held(
      charging(() => {
        statements++
        return undefined
      }),
    )
    const [a, b] = await Promise.all([r.settle(outcome(70n)), r.settle(outcome(70n))])
    expect([a.charged, b.charged]).toEqual([70n, 70n])
    expect(statements).toBe(1)
  })
})

describe('admit, extend, finish', () => {
  test('behavior: paid from the authorized balance; spent grows by the exact charge at the end', async () => {
    const c = await channel(1000n)
    await voucher(c.channelId, 300n)
    const id = crypto.randomUUID()
    const a = await Channels.admit(sql, {
      channelId: c.channelId,
      model: 'm',
      stream: true,
      want: 100n,
      need: 50n,
      requestId: id,
      leaseSeconds: 60,
    })
    expect(a).toMatchObject({ status: 'ok', held: 100n })
    const r = Reservations.reservation(sql, {
      id,
      held: 100n,
      leaseSeconds: 60,
      channelId: c.channelId,
    })
    expect(await r.extend(200n)).toBe(true)
    expect(await r.extend(1n)).toBe(false)
    const { charged } = await r.settle({
      cost: 250n,
      promptTokens: 1,
      completionTokens: 1,
      status: 'ok',
      latencyMs: 1,
      ttftMs: 1,
    })
    expect(charged).toBe(250n)
    expect(await invariants(c.channelId)).toMatchObject({ spent: 250n, reserved: 0n })
    const [u] = await sql`select cost, account_id from usage where id = ${id}`
    expect(u).toEqual({ cost: 250n, account_id: null })
  })

  test('property: concurrent vouchers, admissions, extensions and settlements keep settled ≤ spent ≤ accepted ≤ deposit', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.bigInt(1n, 5_000n),
        fc.array(
          fc.record({
            voucher: fc.bigInt(0n, 6_000n),
            want: fc.bigInt(1n, 500n),
            extend: fc.bigInt(0n, 300n),
            cost: fc.bigInt(0n, 900n),
          }),
          { minLength: 1, maxLength: 30 },
        ),
        async (deposit, ops) => {
          const c = await channel(deposit)
          let charged = 0n
          await Promise.all(
            ops.map(async (op) => {
              await voucher(c.channelId, op.voucher)
              const id = crypto.randomUUID()
              const a = await Channels.admit(sql, {
                channelId: c.channelId,
                model: 'm',
                stream: true,
                want: op.want,
                need: 1n,
                requestId: id,
                leaseSeconds: 60,
              })
              await invariants(c.channelId)
              if (a.status !== 'ok') return
              const r = Reservations.reservation(sql, {
                id,
                held: a.held,
                leaseSeconds: 60,
                channelId: c.channelId,
              })
              await r.extend(op.extend)
              await invariants(c.channelId)
              const settled = await r.settle({
                cost: op.cost,
                promptTokens: 0,
                completionTokens: 0,
                status: 'ok',
                latencyMs: 0,
                ttftMs: null,
              })
              charged += settled.charged
            }),
          )
          const end = await invariants(c.channelId)
          expect(end.reserved).toBe(0n)
          expect(end.spent).toBe(charged)
        },
      ),
      { numRuns: 30 },
    )
  }, 60_000)
})

describe('a connection lost under a batch of admissions', () => {
  test.skipIf(!process.env.DATABASE_URL)(
    'error: a batch of channel admissions that committed and lost its answer with its connection is not run again into its own request ids: each fails as out of reach (a 503), and their holds are released',
    async () => {
      // One connection: the calls on it run in the order sent.
      const { link, pool } = await Ledger.linked(db.schema!, 1)
      const admit = (channelId: Channels.Hex) =>
        Reservations.admitOnChannel(pool, {
          channelId,
          model: 'm',
          stream: false,
          want: 10n,
          need: 10n,
          requestId: crypto.randomUUID(),
          leaseSeconds: 60,
        })
      const [a, b] = [await channel(1_000n), await channel(1_000n)]
      for (const c of [a, b]) await voucher(c.channelId, 500n)
      // The statement prepared first (postgres.js waits for a new one's description).
      await admit(a.channelId)
      // Both channel rows held apart: four calls on a go (and wait), three on b wait behind
      // them and go as one batch once a's are done.
      const rows = await Ledger.locked(
        sql,
        [a, b].map(
          (c) => (tx) =>
            tx`select 1 from channels where channel_id = ${Buffer.from(c.channelId.slice(2), 'hex')} for update`,
        ),
      )
      try {
        const first = [1, 2, 3, 4].map(() => admit(a.channelId))
        await Bun.sleep(50)
        const batch = [1, 2, 3].map(() => admit(b.channelId).catch((e: { code?: string }) => e))
        await rows.free(0)
        expect((await Promise.all(first)).map((r) => r.status)).toEqual(Array(4).fill('ok'))
        // The batch waits on b's row: it commits once that is free, its answer held.
        await Bun.sleep(50)
        link.stall('answers')
        await rows.free(1)
        for (let i = 0; i < 100 && (await invariants(b.channelId)).reserved < 30n; i++)
          await Bun.sleep(10)
        expect((await invariants(b.channelId)).reserved).toBe(30n)
        await Ledger.loseAnswer(link, batch)
        // Released, each charged nothing (a finish `database_unavailable`).
        let state = await invariants(b.channelId)
        for (let i = 0; i < 100 && state.reserved > 0n; i++) {
          await Bun.sleep(20)
          state = await invariants(b.channelId)
        }
        expect([state.reserved, state.spent]).toEqual([0n, 0n])
        const id = Buffer.from(b.channelId.slice(2), 'hex')
        const usage = await sql`select status, cost from usage where channel_id = ${id}`
        expect(usage.map((r) => `${r.status}:${r.cost}`)).toEqual(
          Array(3).fill('database_unavailable:0'),
        )
      } finally {
        await rows.end()
        await pool.end({ timeout: 1 })
      }
    },
    20_000,
  )
})

describe('channelReservation', () => {
  test('behavior: a stream short of funds waits, and a voucher accepted through another connection (another instance) wakes it', async () => {
    if (!process.env.DATABASE_URL) return // LISTEN needs a second connection, which the embedded server cannot take
    const other = Db.connect({ url: db.url, max: 2, ...(db.schema ? { schema: db.schema } : {}) })
    const waker = await Waker.start(sql, { listen: true, pollMs: 10_000 })
    try {
      const c = await channel(1000n)
      await voucher(c.channelId, 100n)
      const id = crypto.randomUUID()
      await Channels.admit(sql, {
        channelId: c.channelId,
        model: 'm',
        stream: true,
        want: 100n,
        need: 100n,
        requestId: id,
        leaseSeconds: 60,
      })
      const r = Reservations.channelReservation(sql, {
        id,
        held: 100n,
        leaseSeconds: 60,
        channelId: c.channelId,
        waker,
        timeoutMs: 5_000,
      })
      expect(await r.extend(50n)).toBe(false)
      const started = performance.now()
      const waiting = r.waitForFunds(150n, new AbortController().signal)
      await Bun.sleep(50)
      await Channels.acceptVoucher(other, {
        channelId: c.channelId,
        cumulativeAmount: 200n,
        signature: sig(200n),
        minDelta: 1n,
      })
      expect(await waiting).toBe(true)
      expect(performance.now() - started).toBeLessThan(2_000)
      expect(r.held).toBe(150n)
      await invariants(c.channelId)
    } finally {
      await waker.stop()
      await other.end()
    }
  })

  test('behavior: the waker listens again after its listen session ended while the database refused connections', async () => {
    if (!process.env.DATABASE_URL) return // LISTEN needs a second connection
    const link = await forwarder(new URL(db.url))
    const far = Db.connect({ url: link.url, max: 2, ...(db.schema ? { schema: db.schema } : {}) })
    const log: string[] = []
    const waker = await Waker.start(far, {
      listen: true,
      pollMs: 60_000,
      log: (m) => log.push(m),
    })
    try {
      // The listen session ends, and for a while the database takes no new connection (it
      // restarts): each attempt to listen again fails, and postgres.js's own waits between
      // attempts grew to 10 to 20 s by the end.
      await link.cut()
      await Bun.sleep(12_000)
      await link.mend()
      // A voucher accepted elsewhere afterwards still wakes a waiter here, well before the
      // poll (60 s). NOTIFY again until it is heard: the waker may still be on its way back.
      expect(await heardWithin(waker, `0x${'a1'.repeat(32)}`, 5_000)).toBe(true)
      expect(log[0]).toContain('lost the LISTEN')
    } finally {
      await waker.stop()
      await far.end({ timeout: 1 })
    }
  }, 40_000)

  test('behavior: the waker listens again when its LISTEN connection stops answering without a close (a link lost without a reset)', async () => {
    if (!process.env.DATABASE_URL) return // LISTEN needs a second connection
    const link = await forwarder(new URL(db.url))
    const far = Db.connect({ url: link.url, max: 2, ...(db.schema ? { schema: db.schema } : {}) })
    const log: string[] = []
    const waker = await Waker.start(far, {
      listen: true,
      pollMs: 60_000,
      checkMs: 500,
      log: (m) => log.push(m),
    })
    try {
      // What the LISTEN connection carries is lost from now on, and it hears of no close.
      link.drop()
      // A voucher accepted elsewhere still wakes a waiter here, well before the poll (60 s),
      // once the unanswered check has closed that connection and the waker listens on another.
      expect(await heardWithin(waker, `0x${'a2'.repeat(32)}`, 8_000)).toBe(true)
      expect(log[0]).toContain('lost the LISTEN')
    } finally {
      await waker.stop()
      await far.end({ timeout: 1 })
    }
  }, 30_000)

  test('behavior: a channel whose waits ended by the poll or an abort is not kept by the waker', async () => {
    const waker = await Waker.start(sql, { listen: false, pollMs: 20 })
    const never = new AbortController().signal
    for (let i = 0; i < 5; i++)
      expect(await waker.next(`0x${'ab'.repeat(31)}0${i}`, never)).toBe(true)
    const gone = new AbortController()
    const waiting = waker.next(`0x${'cd'.repeat(32)}`, gone.signal)
    expect(waker.waiting).toBe(1)
    gone.abort()
    expect(await waiting).toBe(false)
    // Two waiting on one channel: the first ending leaves the other's entry.
    const [a, b] = [new AbortController(), new AbortController()]
    const first = waker.next(`0x${'ef'.repeat(32)}`, a.signal)
    const second = waker.next(`0x${'ef'.repeat(32)}`, b.signal)
    a.abort()
    await first
    expect(waker.waiting).toBe(1)
    waker.wake(`0x${'ef'.repeat(32)}`)
    expect(await second).toBe(true)
    expect(waker.waiting).toBe(0)
    await waker.stop()
  })

  test('behavior: without a voucher the wait ends at the timeout', async () => {
    const waker = await Waker.start(sql, { listen: false, pollMs: 20 })
    const c = await channel(1000n)
    await voucher(c.channelId, 10n)
    const id = crypto.randomUUID()
    await Channels.admit(sql, {
      channelId: c.channelId,
      model: 'm',
      stream: true,
      want: 10n,
      need: 10n,
      requestId: id,
      leaseSeconds: 60,
    })
    const r = Reservations.channelReservation(sql, {
      id,
      held: 10n,
      leaseSeconds: 60,
      channelId: c.channelId,
      waker,
      timeoutMs: 200,
    })
    const started = performance.now()
    expect(await r.waitForFunds(20n, new AbortController().signal)).toBe(false)
    expect(performance.now() - started).toBeGreaterThanOrEqual(190)
  })
})

/**
 * Whether a waiter on `channelId` hears a voucher accepted elsewhere (a NOTIFY, sent again
 * every 200 ms: the waker may still be on its way back) within `ms`.
 */
async function heardWithin(waker: Waker, channelId: string, ms: number): Promise<boolean> {
  let heard = false
  void waker.next(channelId, new AbortController().signal).then(() => {
    heard = true
  })
  const deadline = performance.now() + ms
  while (!heard && performance.now() < deadline) {
    await sql`select pg_notify('tollway_channel', ${channelId.slice(2)})`
    await Bun.sleep(200)
  }
  return heard
}
