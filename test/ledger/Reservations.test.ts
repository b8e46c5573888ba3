import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Credits from '../../src/ledger/Credits.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import { plans } from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const db = await Postgres.fresh(
  Object.fromEntries(Object.entries(plans).map(([k, p]) => [k, { wallet: null, ...p }])) as never,
)
const { sql } = db

const account = (credits: bigint, plan?: string) => Ledger.account(sql, credits, plan)

const ids = new WeakMap<object, string>()
/** Admits a request; `requestOf(result)` gives its reservation id. */
const admit = async (keyHash: Uint8Array, want: bigint, need = want) => {
  const { requestId, ...r } = await Ledger.admit(sql, keyHash, want, { need })
  ids.set(r, requestId)
  return r
}
const requestOf = (r: object) => ids.get(r)!

/** Every ledger invariant of DESIGN.md that a row can show. */
const invariants = (accountId: string) => Ledger.accountState(sql, accountId)

describe('admit', () => {
  test('behavior: holds between need and want, as much as is free', async () => {
    const a = await account(100n)
    const r = await admit(a.keyHash, 150n, 40n)
    expect(r).toMatchObject({ status: 'ok', held: 100n })
    expect(await admit(a.keyHash, 10n, 1n)).toMatchObject({ status: 'insufficient', available: 0n })
    await invariants(a.id)
  })

  test('behavior: the monthly quota left after the prompt comes with an admission (none without a quota)', async () => {
    const free = await account(1_000n, 'free')
    await sql`update accounts set month_tokens = 499000 where id = ${free.id}`
    // promptTokens is 1 (see admit).
    expect(await admit(free.keyHash, 10n)).toMatchObject({ status: 'ok', quotaRoom: 999 })
    // A month that has ended counts nothing (another account: the free plan runs one at a time).
    const lastMonth = await account(1_000n, 'free')
    await sql`update accounts set month_tokens = 499000, month_start = '2000-01-01' where id = ${lastMonth.id}`
    expect(await admit(lastMonth.keyHash, 10n)).toMatchObject({ status: 'ok', quotaRoom: 499_999 })
    const unlimited = await account(1_000n, 'unlimited')
    expect(await admit(unlimited.keyHash, 10n)).toMatchObject({ status: 'ok', quotaRoom: null })
  })

  test('error: an unknown key', async () => {
    expect(await admit(new Uint8Array(32), 1n)).toEqual({ status: 'unauthorized' })
  })

  test('behavior: money values beyond 64 bits are exact', async () => {
    const big = 10n ** 40n + 7n
    const a = await account(big)
    const r = await admit(a.keyHash, big - 7n)
    expect(r).toMatchObject({ status: 'ok', held: big - 7n })
    expect((await invariants(a.id)).balance).toBe(big)
  })

  test('behavior: money values beyond 64 bits are exact through the batch function (its JSON answer)', async () => {
    // Far above 2^53: a JSON number would round them.
    const big = 10n ** 40n + 7n
    const a = await account(big)
    // An Idempotency-Key takes the admission to the batch function (its finish goes alone).
    const input = (requestId: string, want: bigint, need: bigint) => ({
      keyHash: a.keyHash,
      model: 'm',
      stream: false,
      minTier: 0,
      promptTokens: 1,
      want,
      need,
      idempotencyKey: requestId,
      fingerprint: new Uint8Array([1]),
      requestId,
      leaseSeconds: 60,
    })
    const id = crypto.randomUUID()
    expect(await Reservations.admit(sql, input(id, big - 3n, 1n))).toMatchObject({
      status: 'ok',
      held: big - 3n,
      available: 3n,
    })
    expect(await Reservations.admit(sql, input(crypto.randomUUID(), big, 5n))).toMatchObject({
      status: 'insufficient',
      available: 3n,
    })
    const r = Reservations.reservation(sql, { id, held: big - 3n, leaseSeconds: 60 })
    const cost = 10n ** 39n + 11n
    expect(await r.settle({ cost, ...Ledger.outcome })).toEqual({ charged: cost })
    const state = await invariants(a.id)
    expect(state).toMatchObject({ balance: big - cost, reserved: 0n, usage_cost: cost })
    // And as Ledger.many reads the answer for the tests: a held beyond 2^53, a refusal's free balance.
    const held = { ...Ledger.item(a.keyHash), want: (big - cost - 1n).toString(), need: '1' }
    const [ok, short] = await Ledger.many(sql, [
      held,
      { ...Ledger.item(a.keyHash), want: big.toString(), need: big.toString() },
    ])
    expect(ok).toMatchObject({ status: 'ok', held: big - cost - 1n, available: 1n })
    expect(short).toMatchObject({ status: 'insufficient', available: 1n })
    // and a finish's: a charge and a balance beyond 2^53.
    const [done] = await Ledger.many(sql, [
      {
        op: 'finish',
        id: held.requestId,
        cost: (big - cost - 2n).toString(),
        promptTokens: 1,
        completionTokens: 1,
        status: 'ok',
        latencyMs: 1,
        ttftMs: 1,
      },
    ])
    expect(done).toMatchObject({ status: 'finished', charged: big - cost - 2n, balance: 2n })
  })

  test("behavior: a prompt over the plan's whole monthly quota is refused as such, and instances of earlier releases (a rolling deploy) read the answer as the plan refusal they know, which they remember nothing of", async () => {
    // The plan `small`: 200 tokens a month.
    const a = await account(1_000n, 'small')
    const admission = { ...Ledger.item(a.keyHash), promptTokens: 201 }
    expect(
      await Reservations.admit(sql, {
        ...admission,
        keyHash: a.keyHash,
        want: 1n,
        need: 1n,
        requestId: crypto.randomUUID(),
      }),
    ).toEqual({ status: 'prompt_over_quota', tokensPerMonth: 200 })
    // The function's answer as instances of versions 6 to 9 read it: each entry by its status,
    // fields by position. A status version 6 does not know had its route answer a 500; a quota
    // refusal (versions 8 and 9) had version 7's remember the key as out of quota and refuse
    // its other long prompts for a minute. A plan refusal ("tier") is a 403 in each, and
    // remembered by none.
    const positional = [
      'admit',
      admission.keyHash,
      admission.model,
      admission.stream,
      admission.minTier,
      admission.promptTokens,
      admission.want,
      admission.need,
      null,
      null,
      admission.requestId,
      admission.leaseSeconds,
    ]
    const [r] =
      await sql`select tollway_ledger_batch(${sql.json([positional] as never)}) as answers`
    const [entry] = JSON.parse(r!.answers as string) as unknown[][]
    expect(entry![0]).toBe('tier')
    expect(entry!.slice(1, 3)).toEqual([a.id, expect.any(String)])
    expect(entry!.slice(3)).toEqual([200, 'prompt_over_quota'])
    // Nothing held or counted.
    expect(await invariants(a.id)).toMatchObject({ reserved: 0n })
    const [row] =
      await sql`select month_tokens, active_requests, rate_tat from accounts where id = ${a.id}`
    expect(row).toMatchObject({ month_tokens: 0n, active_requests: 0, rate_tat: null })
  })
})

describe('extend and finish', () => {
  /** A finished request's counts, for the charges below. */
  const outcome = Ledger.outcome

  test('error: a charge that fails (once, twice) is tried again and lands once, waited for or not; one that keeps failing reports the failure', async () => {
    // A real failure in the database: the first inserts into usage raise (a sequence counts
    // attempts across the rolled-back transactions).
    await sql.unsafe(`
      create sequence fail_usage minvalue -100 start 1;
      create function fail_usage() returns trigger language plpgsql as $$
      begin
        if nextval('fail_usage') <= 2 then raise exception 'injected failure'; end if;
        return new;
      end $$;
      create trigger fail_usage before insert on usage for each row execute function fail_usage();`)
    try {
      const a = await account(100n)
      const r = await admit(a.keyHash, 30n)
      const res = Reservations.reservation(sql, { id: requestOf(r), held: 30n, leaseSeconds: 60 })
      const outcome = {
        cost: 20n,
        promptTokens: 1,
        completionTokens: 1,
        status: 'ok',
        latencyMs: 1,
        ttftMs: 1,
      }
      expect((await res.settle(outcome, true)).charged).toBe(20n)
      expect(await invariants(a.id)).toMatchObject({ balance: 80n, reserved: 0n, usage: 1 })

      await sql`select setval('fail_usage', 1, false)`
      const b = await admit(a.keyHash, 30n)
      const waited = Reservations.reservation(sql, {
        id: requestOf(b),
        held: 30n,
        leaseSeconds: 60,
      })
      expect((await waited.settle(outcome)).charged).toBe(20n)
      expect(await invariants(a.id)).toMatchObject({ balance: 60n, reserved: 0n, usage: 2 })

      // Failing on every try (the first 103 inserts): the failure reaches the caller.
      await sql`select setval('fail_usage', -100, false)`
      const c = await admit(a.keyHash, 30n)
      const failing = Reservations.reservation(sql, {
        id: requestOf(c),
        held: 30n,
        leaseSeconds: 60,
      })
      await expect(failing.settle(outcome)).rejects.toThrow('injected failure')
    } finally {
      await sql.unsafe(
        'drop trigger fail_usage on usage; drop function fail_usage(); drop sequence fail_usage',
      )
    }
  }, 15_000)

  test('behavior: extend is refused past the free balance; finish charges at most what the account can pay', async () => {
    const a = await account(100n)
    const r = await admit(a.keyHash, 30n)
    expect(r.status).toBe('ok')
    const id = requestOf(r)
    const res = Reservations.reservation(sql, { id, held: 30n, leaseSeconds: 60 })
    expect(await res.extend(70n)).toBe(true)
    expect(res.held).toBe(100n)
    expect(await res.extend(1n)).toBe(false)
    // Asked to charge more than the balance: capped, never below zero.
    const { charged } = await res.settle({
      cost: 500n,
      promptTokens: 1,
      completionTokens: 1,
      status: 'ok',
      latencyMs: 1,
      ttftMs: 1,
    })
    expect(charged).toBe(100n)
    expect((await invariants(a.id)).balance).toBe(0n)
    // Settling twice charges once.
    expect(
      (
        await res.settle({
          cost: 5n,
          promptTokens: 0,
          completionTokens: 0,
          status: 'ok',
          latencyMs: 1,
          ttftMs: 1,
        })
      ).charged,
    ).toBe(100n)
    expect(
      await Reservations.finish(sql, {
        id,
        cost: 5n,
        promptTokens: 0,
        completionTokens: 0,
        status: 'ok',
        latencyMs: 0,
        ttftMs: null,
      }),
    ).toBeUndefined()
  })

  test('error: a channel request charged down the API-key path fails and changes nothing', async () => {
    const c = await Ledger.channel(sql, 1_000n)
    await Ledger.voucher(sql, c.channelId, 500n)
    const requestId = crypto.randomUUID()
    expect(
      await Ledger.hold(sql, c.channelId, { want: 100n, need: 100n, requestId }),
    ).toMatchObject({ status: 'ok' })
    const before = await Ledger.channelState(sql, c.channelId)
    const f = { id: requestId, cost: 40n, ...outcome }
    // No channelId: the API-key ledger, which only charges accounts.
    await expect(Reservations.finish(sql, f)).rejects.toThrow(
      /paid by channel .*tollway_channel_finish_many/,
    )
    expect(await Ledger.channelState(sql, c.channelId)).toEqual(before)
    expect(
      (await sql`select count(*)::int as n from reservations where id = ${requestId}`)[0]!.n,
    ).toBe(1)
    // The channel's own path charges it.
    const done = await Reservations.finish(sql, f, { channelId: c.channelId })
    expect(done).toMatchObject({ charged: 40n, channel: { spent: 40n } })
  })

  // A second session to hold the lock: the embedded database has one connection.
  test.skipIf(db.max === 1)(
    'behavior: a read of an account waits for the account writes of the instance, not for a channel charge stuck on a lock',
    async () => {
      const a = await account(100n)
      const r = await admit(a.keyHash, 30n)
      const c = await Ledger.channel(sql, 1_000n)
      await Ledger.voucher(sql, c.channelId, 500n)
      const requestId = crypto.randomUUID()
      await Ledger.hold(sql, c.channelId, { want: 100n, need: 100n, requestId })
      // Another session holds the channel's row: its charge waits.
      const other = await sql.reserve()
      await other`begin`
      await other`select 1 from channels where channel_id = decode(${c.channelId.slice(2)}, 'hex') for update`
      const channelCharge = Reservations.finish(
        sql,
        { id: requestId, cost: 40n, ...outcome },
        { channelId: c.channelId },
      )
      // The account's charge, in the background, is waited for; the stuck channel charge is not.
      void Reservations.finish(sql, { id: requestOf(r), cost: 25n, ...outcome })
      const read = await Promise.race([
        Credits.balance(sql, a.id),
        Bun.sleep(3_000).then(() => 'stuck'),
      ])
      expect(read).toEqual({ balance: 75n, reserved: 0n })
      await other`rollback`
      other.release()
      expect(await channelCharge).toMatchObject({ charged: 40n })
    },
  )

  test('error: credit transactions are append-only', async () => {
    const a = await account(10n)
    await expect(
      sql`update credit_transactions set amount = 1000 where account_id = ${a.id}`,
    ).rejects.toThrow(/append-only/)
    await expect(sql`delete from credit_transactions where account_id = ${a.id}`).rejects.toThrow(
      /append-only/,
    )
    await expect(
      sql`update accounts set reserved = balance + 1 where id = ${a.id}`,
    ).rejects.toThrow(/balance_covers_reserved/)
  })

  test('behavior: the sweep charges a dead request what it had delivered at its last extend', async () => {
    const a = await account(100n)
    const r = await admit(a.keyHash, 20n)
    const id = requestOf(r)
    expect(
      await Reservations.extend(sql, {
        id,
        amount: 20n,
        leaseSeconds: 60,
        delivered: 15n,
        from: 20n,
      }),
    ).toBe(40n)
    // A refused extend still records what was sent (a stream pausing for funds), never lowers
    // it, and never records more than is held.
    expect(
      await Reservations.extend(sql, {
        id,
        amount: 1_000n,
        leaseSeconds: 60,
        delivered: 35n,
        from: 40n,
      }),
    ).toBeUndefined()
    await Reservations.extend(sql, { id, amount: 0n, leaseSeconds: 60, delivered: 10n, from: 40n })
    const [held] = await sql`select held, delivered from reservations where id = ${id}`
    expect(held).toEqual({ held: 40n, delivered: 35n })
    await Reservations.extend(sql, { id, amount: 0n, leaseSeconds: 60, delivered: 99n, from: 40n })
    expect((await sql`select delivered from reservations where id = ${id}`)[0]!.delivered).toBe(40n)
    await sql`update reservations set expires_at = now() - interval '1 second' where id = ${id}`
    expect(await Reservations.sweep(sql)).toBeGreaterThanOrEqual(1)
    expect(await invariants(a.id)).toMatchObject({ balance: 60n, reserved: 0n, open: 0 })
    const [u] = await sql`select status, cost from usage where id = ${id}`
    expect(u).toEqual({ status: 'abandoned', cost: 40n })
  })

  test('behavior: a lease renewal and an extension update the reservation in place (HOT): no index entry is written', async () => {
    const a = await account(100n)
    const id = requestOf(await admit(a.keyHash, 20n))
    // The backend's counts not yet reported (they may hold earlier transactions'), before and
    // after, in one transaction (they are reported between transactions only).
    const counts = await sql.begin(async (tx) => {
      const count = async () =>
        (
          await tx`
            select pg_stat_get_xact_tuples_updated('reservations'::regclass)::int as updated,
              pg_stat_get_xact_tuples_hot_updated('reservations'::regclass)::int as hot`
        )[0]!
      const before = await count()
      await tx`select tollway_extend(${id}, 0, 60, null, 20)`
      await tx`select tollway_extend(${id}, 5, 60, 3, 20)`
      const after = await count()
      return { updated: after.updated - before.updated, hot: after.hot - before.hot }
    })
    // The renewal, then the delivered amount and the extension.
    expect(counts).toEqual({ updated: 3, hot: 3 })
    expect(await invariants(a.id)).toMatchObject({ balance: 100n, reserved: 25n, open: 1 })
  })

  test('behavior: the sweep releases a dead request that delivered nothing, charging nothing', async () => {
    const a = await account(100n)
    expect(await admit(a.keyHash, 60n)).toMatchObject({ status: 'ok' })
    await sql`update reservations set expires_at = now() - interval '1 second' where account_id = ${a.id}`
    expect(await Reservations.sweep(sql)).toBeGreaterThanOrEqual(1)
    const inv = await invariants(a.id)
    expect(inv).toMatchObject({ balance: 100n, reserved: 0n, open: 0 })
    const [u] = await sql`select status, cost from usage where account_id = ${a.id}`
    expect(u).toEqual({ status: 'abandoned', cost: 0n })
  })

  /** A request's own charge as it comes late: 30, for 3 prompt and 5 completion tokens. */
  const lateOutcome = {
    cost: 30n,
    promptTokens: 3,
    completionTokens: 5,
    status: 'ok',
    latencyMs: 7,
    ttftMs: 2,
  }

  /** Reservation `id` (40 held of account `accountId`'s 100) as the renewal left it past a
   * sweep: live, 15 recorded delivered, its hold whole, nothing charged. */
  async function expectRenewed(accountId: string, id: string) {
    expect(await Ledger.lease(sql, id)).toEqual({ delivered: 15n, live: true })
    expect(await invariants(accountId)).toMatchObject({ balance: 100n, reserved: 40n, open: 1 })
    expect(await sql`select 1 from usage where id = ${id}`).toHaveLength(0)
  }

  test.skipIf(!process.env.DATABASE_URL)(
    'behavior: the sweep leaves a reservation whose lease its instance renews while the sweep is under way (the request is alive): not released, nor charged what it had recorded',
    async () => {
      const a = await account(100n)
      const id = requestOf(await admit(a.keyHash, 40n))
      await Reservations.extend(sql, { id, amount: 0n, leaseSeconds: 60, delivered: 5n, from: 40n })
      // Its lease ran out as far as the sweep sees; its instance renews it (recording 15
      // delivered) in a transaction not yet committed: the extension under way.
      await sql`update reservations set expires_at = now() - interval '1 second' where id = ${id}`
      const renewal = await Ledger.locked(sql, [
        (tx) =>
          Reservations.extend(tx, { id, amount: 0n, leaseSeconds: 60, delivered: 15n, from: 40n }),
      ])
      expect(
        await Ledger.sweepDuring(
          sql,
          renewal,
          () => Reservations.sweep(sql),
          'tollway_ledger_batch',
        ),
      ).toBe(0)
      await expectRenewed(a.id, id)
      // Another request takes what is free; the renewed one's charge is still whole (had its
      // hold been released, its late charge would find nothing free: 5 charged of 40).
      expect(await admit(a.keyHash, 100n, 1n)).toMatchObject({ status: 'ok', held: 60n })
      const late = Reservations.reservation(sql, { id, held: 40n, leaseSeconds: 60 })
      expect((await late.settle({ ...lateOutcome, cost: 40n })).charged).toBe(40n)
      expect(await invariants(a.id)).toMatchObject({ balance: 60n, reserved: 60n, open: 1 })
    },
  )

  test.skipIf(!process.env.DATABASE_URL)(
    'behavior: the sweep leaves a reservation whose lease its instance renewed after the sweep read it expired',
    async () => {
      const a = await account(100n)
      const id = requestOf(await admit(a.keyHash, 40n))
      await sql`update reservations set expires_at = now() - interval '1 second' where id = ${id}`
      // The table held against writers (reads go on): the sweep reads the lease run out, then
      // waits to change anything; meanwhile the instance renews it, committed before the
      // sweep goes on.
      const renewal = await Ledger.locked(sql, [
        async (tx) => {
          await tx`lock table reservations in exclusive mode`
          await Reservations.extend(tx, {
            id,
            amount: 0n,
            leaseSeconds: 60,
            delivered: 15n,
            from: 40n,
          })
        },
      ])
      expect(await Ledger.sweepDuring(sql, renewal, () => Reservations.sweep(sql))).toBe(0)
      await expectRenewed(a.id, id)
    },
  )

  test('behavior: a request whose reservation a sweep released first charges the rest and counts its tokens in its plan (month and wallet), as a charge in time does', async () => {
    // Swept after recording 10 (the rest is 20 more), after recording all 30 (nothing more to
    // charge), and not swept; then swept after recording 10 as the cost of 3 prompt and 2
    // completion tokens, and all 30 as the cost of all 8 tokens: the sweep counts those, the
    // late charge the rest (never one twice).
    const cases = [
      [10n],
      [30n],
      null,
      [10n, { prompt: 3, completion: 2 }, 5n],
      [30n, { prompt: 3, completion: 5 }, 8n],
    ] as const
    const rows: Record<string, unknown>[] = []
    for (const c of cases) {
      const a = await account(100n, 'wallet')
      const id = requestOf(await admit(a.keyHash, 40n))
      if (c !== null) {
        const [delivered, tokens, counted] = c
        await Reservations.extend(sql, {
          id,
          amount: 0n,
          leaseSeconds: 60,
          delivered,
          tokens,
          from: 40n,
        })
        await sql`update reservations set expires_at = now() - interval '1 second' where id = ${id}`
        expect(await Reservations.sweep(sql)).toBeGreaterThanOrEqual(1)
        // What the sweep charged for, counted at once.
        expect((await invariants(a.id)).month_tokens).toBe(counted ?? 0n)
      }
      const r = Reservations.reservation(sql, { id, held: 40n, leaseSeconds: 60 })
      expect((await r.settle(lateOutcome)).charged).toBe(30n)
      const s = await invariants(a.id)
      const [w] = await sql`
        select round(wallet_tokens)::int as wallet, wallet_at is not null as dated
        from accounts where id = ${a.id}`
      const [u] = await sql`
        select status, cost, prompt_tokens, completion_tokens from usage where id = ${id}`
      rows.push({ ...s, ...w, ...u })
    }
    for (const r of rows)
      expect(r).toMatchObject({
        balance: 70n,
        reserved: 0n,
        open: 0,
        month_tokens: 8n,
        usage_tokens: 8n,
        wallet: rows[2]!.wallet,
        dated: true,
        status: 'ok',
        cost: 30n,
        prompt_tokens: 3,
        completion_tokens: 5,
      })
  })

  test('behavior: a request released free having delivered nothing after a sweep released it first counts no tokens in its plan (month and wallet), as a release in time does', async () => {
    // Its upstream failed before the first token; and a client gone before any was asked.
    for (const status of ['upstream_error', 'cancelled']) {
      const rows: Record<string, unknown>[] = []
      for (const swept of [true, false]) {
        const a = await account(100n, 'wallet')
        const id = requestOf(await admit(a.keyHash, 40n))
        if (swept) {
          await sql`update reservations set expires_at = now() - interval '1 second' where id = ${id}`
          expect(await Reservations.sweep(sql)).toBeGreaterThanOrEqual(1)
        }
        const r = Reservations.reservation(sql, { id, held: 40n, leaseSeconds: 60 })
        const free = { ...lateOutcome, cost: 0n, completionTokens: 0, status }
        expect((await r.settle(free)).charged).toBe(0n)
        const s = await invariants(a.id)
        const [w] = await sql`select wallet_tokens from accounts where id = ${a.id}`
        const [u] = await sql`
          select status, cost, prompt_tokens from usage where id = ${id}`
        rows.push({ ...s, ...w, ...u })
      }
      for (const r of rows)
        expect(r).toMatchObject({
          balance: 100n,
          reserved: 0n,
          open: 0,
          month_tokens: 0n,
          // Full, as a fresh wallet is.
          wallet_tokens: 10_000,
          status,
          cost: 0n,
          prompt_tokens: 3,
        })
    }
  })

  test('behavior: a late charge takes back the Idempotency-Key its sweep freed, and charges nothing more once a retry has taken it (one charge for one key)', async () => {
    const idempotency = { key: 'late', fingerprint: new Uint8Array([1, 2]) }
    const keyOf = async (accountId: string) =>
      (
        await sql`
          select request_id, state from idempotency_keys
          where account_id = ${accountId} and key = 'late'`
      )[0]
    /** An admission with the key, released by a sweep before it charged anything. */
    const swept = async () => {
      const a = await account(100n)
      const r = await Ledger.admit(sql, a.keyHash, 40n, { idempotency })
      expect(r.status).toBe('ok')
      await sql`update reservations set expires_at = now() - interval '1 second' where id = ${r.requestId}`
      expect(await Reservations.sweep(sql)).toBeGreaterThanOrEqual(1)
      // Nothing charged: the key is free for a retry.
      expect(await keyOf(a.id)).toBeUndefined()
      const late = Reservations.reservation(sql, {
        id: r.requestId,
        held: 40n,
        leaseSeconds: 60,
        idempotency,
      })
      return { a, id: r.requestId, late }
    }

    // No retry came: the late charge marks the key completed, so a retry now is not run.
    const alone = await swept()
    expect((await alone.late.settle(lateOutcome)).charged).toBe(30n)
    expect(await keyOf(alone.a.id)).toEqual({ request_id: alone.id, state: 'completed' })
    expect(await Ledger.admit(sql, alone.a.keyHash, 40n, { idempotency })).toMatchObject({
      status: 'idempotency_completed',
    })
    expect(await invariants(alone.a.id)).toMatchObject({ balance: 70n, reserved: 0n, open: 0 })

    // A retry took the key first: it is the one charged, the late charge adds nothing.
    const raced = await swept()
    const retry = await Ledger.admit(sql, raced.a.keyHash, 40n, { idempotency })
    expect(retry.status).toBe('ok')
    expect((await raced.late.settle(lateOutcome)).charged).toBe(0n)
    const again = Reservations.reservation(sql, {
      id: retry.requestId,
      held: 40n,
      leaseSeconds: 60,
      idempotency,
    })
    expect((await again.settle(lateOutcome)).charged).toBe(30n)
    expect(await keyOf(raced.a.id)).toEqual({ request_id: retry.requestId, state: 'completed' })
    expect(await invariants(raced.a.id)).toMatchObject({
      balance: 70n,
      reserved: 0n,
      open: 0,
      month_tokens: 8n,
    })
    const rows = await sql`
      select status, cost from usage where account_id = ${raced.a.id} order by id = ${retry.requestId}`
    expect(rows.map((u) => `${u.status}:${u.cost}`)).toEqual(['abandoned:0', 'ok:30'])
  })

  test('property: a late charge and a retry with its Idempotency-Key at the same moment charge the request once, and neither fails', async () => {
    const idempotency = { key: 'racing', fingerprint: new Uint8Array([5]) }
    for (let i = 0; i < 25; i++) {
      const a = await account(100n)
      const r = await Ledger.admit(sql, a.keyHash, 40n, { idempotency })
      await sql`update reservations set expires_at = now() - interval '1 second' where id = ${r.requestId}`
      expect(await Reservations.sweep(sql)).toBeGreaterThanOrEqual(1)
      const late = Reservations.reservation(sql, {
        id: r.requestId,
        held: 40n,
        leaseSeconds: 60,
        idempotency,
      })
      // Both at once: whichever takes the key first is the one the payer pays for.
      const [, retry] = await Promise.all([
        late.settle(lateOutcome),
        Ledger.admit(sql, a.keyHash, 40n, { idempotency }),
      ])
      if (retry.status === 'ok')
        await Reservations.reservation(sql, {
          id: retry.requestId,
          held: 40n,
          leaseSeconds: 60,
          idempotency,
        }).settle(lateOutcome)
      else expect(retry.status).toBe('idempotency_completed')
      expect(await invariants(a.id)).toMatchObject({ balance: 70n, reserved: 0n, open: 0 })
    }
  }, 30_000)

  test('behavior: a late charge that can charge nothing (the payer has nothing free) and did not end well leaves its freed Idempotency-Key free', async () => {
    const idempotency = { key: 'late-nothing', fingerprint: new Uint8Array([4]) }
    const a = await account(40n)
    const r = await Ledger.admit(sql, a.keyHash, 40n, { idempotency })
    await sql`update reservations set expires_at = now() - interval '1 second' where id = ${r.requestId}`
    expect(await Reservations.sweep(sql)).toBeGreaterThanOrEqual(1)
    // Another request holds all there is.
    expect((await admit(a.keyHash, 40n)).status).toBe('ok')
    const late = Reservations.reservation(sql, {
      id: r.requestId,
      held: 40n,
      leaseSeconds: 60,
      idempotency,
    })
    expect((await late.settle({ ...lateOutcome, status: 'client_closed' })).charged).toBe(0n)
    const keys = await sql`
        select state from idempotency_keys where account_id = ${a.id} and key = 'late-nothing'`
    expect(keys).toHaveLength(0)
    expect(await invariants(a.id)).toMatchObject({ balance: 40n, reserved: 40n, open: 1 })
  })
})
describe('under concurrency', () => {
  test('property: random concurrent admits, extends, finishes and grants keep every invariant', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.bigInt(0n, 2_000n),
        fc.array(
          fc.record({
            want: fc.bigInt(1n, 300n),
            extends: fc.array(fc.bigInt(0n, 200n), { maxLength: 4 }),
            cost: fc.bigInt(0n, 1_500n),
            grant: fc.option(fc.bigInt(-100n, 300n).filter((x) => x !== 0n)),
          }),
          { minLength: 1, maxLength: 40 },
        ),
        async (credits, ops) => {
          const a = await account(credits)
          const grants: bigint[] = []
          let charged = 0n
          // Every operation runs at once: admissions, extensions, settlements and grants interleave.
          await Promise.all(
            ops.map(async (op) => {
              if (op.grant !== null) {
                const b = await Credits.grant(sql, {
                  accountId: a.id,
                  amount: op.grant,
                  note: null,
                })
                if (b !== undefined) grants.push(op.grant)
              }
              const r = await admit(a.keyHash, op.want, 1n)
              if (r.status !== 'ok') return
              const res = Reservations.reservation(sql, {
                id: requestOf(r),
                held: r.held,
                leaseSeconds: 60,
              })
              for (const e of op.extends) {
                const before = res.held
                if (await res.extend(e)) expect(res.held).toBe(before + e)
                await invariants(a.id)
              }
              const settle = {
                cost: op.cost,
                promptTokens: 1,
                completionTokens: 1,
                status: 'ok',
                latencyMs: 1,
                ttftMs: 1,
              }
              const { charged: c } = await res.settle(settle)
              expect(c <= op.cost).toBe(true)
              charged += c
            }),
          )
          const inv = await invariants(a.id)
          expect(inv.open).toBe(0)
          expect(inv.reserved).toBe(0n)
          expect(inv.balance).toBe(credits + grants.reduce((s, g) => s + g, 0n) - charged)
          expect(inv.balance >= 0n).toBe(true)
        },
      ),
      { numRuns: 25 },
    )
  }, 60_000)
})
