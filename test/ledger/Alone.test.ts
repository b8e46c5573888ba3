/**
 * The lone-call statements (src/ledger/Alone.ts) against the batch function they stand in for:
 * twin accounts in the same state, one served by each, must end with the same answers and
 * rows; what a lone statement declines it leaves untouched, for the batch function to decide.
 */
import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Alone from '../../src/ledger/Alone.ts'
import * as Credits from '../../src/ledger/Credits.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import { plans } from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const db = await Postgres.fresh({
  ...plans,
  // A minute over 7 is no whole number of microseconds.
  sevenPerMinute: { tier: 0, requestsPerMinute: 7, maxConcurrent: null, tokensPerMonth: null },
  // A minute over 7,768 rounded down to a microsecond (7,723 us) fits 7,769 times in a minute.
  many: { tier: 0, requestsPerMinute: 7_768, maxConcurrent: null, tokensPerMonth: null },
} as never)
const { sql } = db

type Item = Record<string, unknown>
/** Items run by the batch function itself (not through the batcher, which tries Alone first). */
const batch = (items: Item[]) => Ledger.many(sql, items)

const admitItem = (keyHash: Uint8Array, o: Partial<Record<string, unknown>> = {}) => ({
  ...Ledger.item(keyHash),
  want: '10',
  need: '10',
  ...o,
})

const outcome = { promptTokens: 3, completionTokens: 5, status: 'ok', latencyMs: 7, ttftMs: 2 }

/** The columns both ways write; rate_tat compared apart (each statement reads its own clock). */
const row = async (id: string) => {
  const [r] = await sql`
    select balance, reserved, active_requests, month_start, month_tokens, wallet_tokens, rate_tat
    from accounts where id = ${id}`
  const { rate_tat, ...rest } = r!
  return { rest, tat: rate_tat as Date | null }
}

const State = fc.record({
  plan: fc.constantFrom('free', 'pro', 'unlimited', 'wallet'),
  balance: fc.bigInt(0n, 300n),
  reservedShare: fc.constantFrom(0, 10, 50, 100),
  active: fc.integer({ min: 0, max: 4 }),
  monthTokens: fc.constantFrom(0, 499_990, 499_999, 9_999_999),
  lastMonth: fc.boolean(),
  tatAheadSeconds: fc.constantFrom(null, -5, 0, 30, 59, 61),
  want: fc.bigInt(1n, 100n),
  needShare: fc.integer({ min: 1, max: 100 }),
  promptTokens: fc.integer({ min: 1, max: 20 }),
  minTier: fc.integer({ min: 0, max: 2 }),
})

/** Two accounts on `plan` in the same state, each with a key. */
async function twins(s: typeof State extends fc.Arbitrary<infer T> ? T : never) {
  const pair = [
    await Ledger.account(sql, s.balance, s.plan),
    await Ledger.account(sql, s.balance, s.plan),
  ]
  const reserved = (s.balance * BigInt(s.reservedShare)) / 100n
  for (const a of pair) {
    // A reservation row stands behind whatever is reserved and active (the invariants).
    for (let i = 0; i < s.active; i++)
      await sql`insert into reservations (id, account_id, model, stream, held, expires_at)
        values (${crypto.randomUUID()}, ${a.id}, 'm', false, ${i === 0 ? sql.typed.numeric(reserved) : sql.typed.numeric(0n)},
          clock_timestamp() + interval '1 hour')`
    await sql`update accounts set reserved = ${s.active > 0 ? sql.typed.numeric(reserved) : sql.typed.numeric(0n)},
      active_requests = ${s.active}, month_tokens = ${s.monthTokens},
      month_start = ${s.lastMonth ? sql`'2000-01-01'::date` : sql`month_start`},
      rate_tat = ${s.tatAheadSeconds === null ? null : sql`clock_timestamp() + make_interval(secs => ${s.tatAheadSeconds})`}
      where id = ${a.id}`
  }
  return pair as [(typeof pair)[0], (typeof pair)[0]]
}

describe('admit alone', () => {
  test('property: admits what the batch function admits in full, with the same answer and rows; declines the rest and changes nothing', async () => {
    await fc.assert(
      fc.asyncProperty(State, async (s) => {
        const [alone, batched] = await twins(s)
        const need = (s.want * BigInt(s.needShare)) / 100n || 1n
        const input = {
          model: 'm',
          stream: false,
          minTier: s.minTier,
          promptTokens: s.promptTokens,
          want: s.want,
        }
        const before = await row(alone.id)
        const requestId = crypto.randomUUID()
        const a = await Alone.admit(sql, {
          ...input,
          keyHash: alone.keyHash,
          requestId,
          leaseSeconds: 60,
        })
        const [b] = await batch([
          admitItem(batched.keyHash, { ...input, want: s.want.toString(), need: need.toString() }),
        ])
        if (a) {
          expect(b).toMatchObject({
            status: 'ok',
            held: a.held,
            available: a.available,
            concurrency_room: a.concurrency_room,
            quota_room: a.quota_room,
            rate_limit: a.rate_limit,
          })
          expect(a.held).toBe(s.want)
          // The rate left is read off each statement's own clock: a tick apart at most.
          if (a.rate_remaining !== null)
            expect(Math.abs(a.rate_remaining - (b!.rate_remaining as number))).toBeLessThanOrEqual(
              1,
            )
          const [x, y] = [await row(alone.id), await row(batched.id)]
          expect(x.rest).toEqual(y.rest)
          if (x.tat !== null || y.tat !== null)
            expect(Math.abs(x.tat!.getTime() - y.tat!.getTime())).toBeLessThan(1_000)
          const [r] =
            await sql`select held, key_id is not null as keyed from reservations where id = ${requestId}`
          expect(r).toEqual({ held: s.want, keyed: true })
        } else {
          // Declined: refused by the batch function, held in part, or a wallet plan's.
          expect(b!.status !== 'ok' || (b!.held as bigint) < s.want || s.plan === 'wallet').toBe(
            true,
          )
          expect(await row(alone.id)).toEqual(before)
          expect(await sql`select 1 from reservations where id = ${requestId}`).toHaveLength(0)
        }
        await Ledger.accountState(sql, alone.id)
        await Ledger.accountState(sql, batched.id)
      }),
      { numRuns: 200 },
    )
  }, 60_000)

  test('behavior: concurrent admissions and debits never hold past the balance', async () => {
    for (let round = 0; round < 10; round++) {
      const a = await Ledger.account(sql, 5n)
      const answers = await Promise.all(
        Array.from({ length: 20 }, async (_, i) => {
          if (i % 3 === 0)
            await Credits.grant(sql, { accountId: a.id, amount: i % 2 ? -1n : 1n, note: null })
          const input = { model: 'm', stream: false, minTier: 0, promptTokens: 1, leaseSeconds: 60 }
          return Alone.admit(sql, {
            ...input,
            keyHash: a.keyHash,
            want: BigInt(1 + (i % 3)),
            requestId: crypto.randomUUID(),
          })
        }),
      )
      const state = await Ledger.accountState(sql, a.id)
      const held = answers.reduce((sum, r) => sum + (r?.held ?? 0n), 0n)
      expect(state.reserved).toBe(held)
      expect(held > 0n).toBe(true)
    }
  }, 30_000)

  test('behavior: a plan of 7 requests a minute admits 7 at once, one at a time or in one batch, counting down to none remaining', async () => {
    const input = { model: 'm', stream: false, minTier: 0, promptTokens: 1, want: 1n }
    const lone = await Ledger.account(sql, 100n, 'sevenPerMinute')
    const remaining: (number | null | undefined)[] = []
    for (let i = 0; i < 8; i++) {
      const r = await Alone.admit(sql, {
        ...input,
        keyHash: lone.keyHash,
        requestId: crypto.randomUUID(),
        leaseSeconds: 60,
      })
      remaining.push(r?.rate_remaining)
    }
    // The 8th is declined: the batch function refuses it.
    expect(remaining).toEqual([6, 5, 4, 3, 2, 1, 0, undefined])
    const batched = await Ledger.account(sql, 100n, 'sevenPerMinute')
    const answers = await batch(
      Array.from({ length: 8 }, () => ({
        ...Ledger.item(batched.keyHash),
        requestId: crypto.randomUUID(),
      })),
    )
    expect(answers.map((a) => [a.status, a.rate_remaining])).toEqual([
      ...[6, 5, 4, 3, 2, 1, 0].map((n) => ['ok', n]),
      ['rate', 0],
    ])
  })

  test('behavior: a plan of 7,768 requests a minute admits 7,768 at once and says 7,767 remain after the first, not one more, though its rounded period fits the minute once more', async () => {
    const lone = await Ledger.account(sql, 100_000n, 'many')
    const first = await Alone.admit(sql, {
      model: 'm',
      stream: false,
      minTier: 0,
      promptTokens: 1,
      want: 1n,
      keyHash: lone.keyHash,
      requestId: crypto.randomUUID(),
      leaseSeconds: 60,
    })
    expect(first?.rate_remaining).toBe(7_767)
    const batched = await Ledger.account(sql, 100_000n, 'many')
    const answers = await batch(
      Array.from({ length: 7_769 }, () => ({
        ...Ledger.item(batched.keyHash),
        want: '1',
        need: '1',
        requestId: crypto.randomUUID(),
      })),
    )
    expect(answers[0]!.rate_remaining).toBe(7_767)
    expect(answers.filter((a) => a.status === 'ok').length).toBe(7_768)
    expect([answers.at(-2)!.rate_remaining, answers.at(-1)!.status]).toEqual([0, 'rate'])
  })

  test('error: an unknown or revoked key is declined', async () => {
    const a = await Ledger.account(sql, 100n)
    const input = {
      model: 'm',
      stream: false,
      minTier: 0,
      promptTokens: 1,
      want: 5n,
      leaseSeconds: 60,
    }
    expect(
      await Alone.admit(sql, {
        ...input,
        keyHash: new Uint8Array(32),
        requestId: crypto.randomUUID(),
      }),
    ).toBeUndefined()
    await sql`update api_keys set revoked_at = now() where account_id = ${a.id}`
    expect(
      await Alone.admit(sql, { ...input, keyHash: a.keyHash, requestId: crypto.randomUUID() }),
    ).toBeUndefined()
    expect((await Ledger.accountState(sql, a.id)).reserved).toBe(0n)
  })
})

describe('finish alone', () => {
  test('property: charges, releases and writes the rows the batch function does, counting the tokens of a request charged for, answered, or that delivered tokens, only; a cost beyond what the account can pay is declined, changing nothing', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.bigInt(0n, 100n),
        fc.bigInt(1n, 60n),
        fc.oneof(fc.constant(0n), fc.bigInt(0n, 200n)),
        fc.boolean(),
        fc.constantFrom('ok', 'upstream_error', 'cancelled', 'database_unavailable'),
        fc.constantFrom(0, 5),
        async (extra, want, cost, lastMonth, status, completionTokens) => {
          const pair = [
            await Ledger.account(sql, want + extra, 'pro'),
            await Ledger.account(sql, want + extra, 'pro'),
          ]
          const ids: string[] = []
          for (const a of pair) {
            if (lastMonth)
              await sql`update accounts set month_tokens = 77, month_start = '2000-01-01' where id = ${a.id}`
            const r = await Ledger.admit(sql, a.keyHash, want)
            expect(r.status).toBe('ok')
            ids.push(r.requestId)
          }
          const f = { ...outcome, cost, status, completionTokens }
          const before = await Ledger.accountState(sql, pair[0]!.id)
          const a = await Alone.finish(sql, { id: ids[0]!, ...f })
          const [b] = await batch([{ op: 'finish', id: ids[1], ...f, cost: cost.toString() }])
          if (cost > want + extra) {
            // More than the account can pay: declined, nothing changed; the batch function
            // charges what can be paid.
            expect(a).toBeUndefined()
            expect(await Ledger.accountState(sql, pair[0]!.id)).toEqual(before)
            expect(b).toMatchObject({ status: 'finished', charged: want + extra })
            const [c] = await batch([{ op: 'finish', id: ids[0], ...f, cost: cost.toString() }])
            expect(c).toMatchObject({ status: 'finished', charged: want + extra })
          } else {
            expect(a).toEqual({ charged: cost })
            expect(b).toMatchObject({ status: 'finished', charged: cost })
          }
          const [x, y] = [await row(pair[0]!.id), await row(pair[1]!.id)]
          expect(x.rest).toEqual(y.rest)
          // Its cost before the cap by what the account can pay, its status, or tokens it
          // delivered: a request answered free having delivered nothing counts no tokens (last
          // month's 77 are gone either way: the month has turned).
          const counted = cost > 0n || status === 'ok' || completionTokens > 0
          expect(x.rest.month_tokens).toBe(counted ? BigInt(3 + completionTokens) : 0n)
          const usage = async (id: string) =>
            (
              await sql`select model, stream, prompt_tokens, completion_tokens, cost, status, latency_ms, ttft_ms, key_id is not null as keyed from usage where id = ${id}`
            )[0]
          expect(await usage(ids[0]!)).toEqual(await usage(ids[1]!))
          const [s0, s1] = [
            await Ledger.accountState(sql, pair[0]!.id),
            await Ledger.accountState(sql, pair[1]!.id),
          ]
          expect(s0).toEqual(s1)
          // Gone once finished: a second finish finds nothing.
          expect(await Alone.finish(sql, { id: ids[0]!, ...f })).toBeUndefined()
        },
      ),
      { numRuns: 25 },
    )
  }, 60_000)

  test.skipIf(db.max === 1)(
    'behavior: a finish waiting on its reservation while an extension of it commits charges as the batch function does',
    async () => {
      const a = await Ledger.account(sql, 100n, 'pro')
      const r = await Ledger.admit(sql, a.keyHash, 10n)
      const other = await sql.reserve()
      try {
        await other`begin`
        expect(
          (
            await other`select tollway_extend(${r.requestId}, ${sql.typed.numeric(20n)}, 60, null, ${sql.typed.numeric(10n)}) as held`
          )[0]!.held,
        ).toBe(30n)
        const finished = Reservations.finish(sql, { id: r.requestId, ...outcome, cost: 25n })
        await Bun.sleep(200)
        await other`commit`
        expect(await finished).toEqual({ charged: 25n })
      } finally {
        other.release()
      }
      expect(await Ledger.accountState(sql, a.id)).toMatchObject({
        balance: 75n,
        reserved: 0n,
        open: 0,
      })
    },
  )

  test.skipIf(db.max === 1)(
    'behavior: a finish waiting on its account while the account moves to a wallet plan takes the tokens from the wallet, as the batch function does',
    async () => {
      const twins = [await Ledger.account(sql, 100n, 'pro'), await Ledger.account(sql, 100n, 'pro')]
      const wallets: unknown[] = []
      for (const [i, a] of twins.entries()) {
        const r = await Ledger.admit(sql, a.keyHash, 10n)
        const other = await sql.reserve()
        try {
          await other`begin`
          await other`update accounts set plan = 'wallet' where id = ${a.id}`
          const f = { ...outcome, cost: 5n }
          const finished =
            i === 0
              ? Reservations.finish(sql, { id: r.requestId, ...f })
              : batch([{ op: 'finish', id: r.requestId, ...f, cost: '5' }])
          await Bun.sleep(200)
          await other`commit`
          await finished
        } finally {
          other.release()
        }
        const [w] =
          await sql`select wallet_tokens, wallet_at is not null as dated from accounts where id = ${a.id}`
        wallets.push(w)
      }
      expect(wallets[0]).toEqual(wallets[1])
      expect(wallets[0]).toMatchObject({ dated: true })
    },
  )

  test('behavior: a reservation with an Idempotency-Key, or on a wallet plan, is charged with the rows, key state and counted tokens the batch function leaves', async () => {
    const cases = [
      { plan: 'pro', key: true, cost: 5n, status: 'ok', completionTokens: 5 },
      { plan: 'pro', key: true, cost: 0n, status: 'upstream_error', completionTokens: 0 },
      { plan: 'wallet', key: false, cost: 5n, status: 'ok', completionTokens: 5 },
      { plan: 'wallet', key: true, cost: 0n, status: 'upstream_error', completionTokens: 0 },
      { plan: 'wallet', key: false, cost: 0n, status: 'cancelled', completionTokens: 0 },
      // A model priced at nothing: its answers count, and so do the tokens a stream of it cut
      // short delivered.
      { plan: 'wallet', key: false, cost: 0n, status: 'ok', completionTokens: 5 },
      { plan: 'wallet', key: false, cost: 0n, status: 'cancelled', completionTokens: 5 },
    ]
    for (const c of cases) {
      const pair = [
        await Ledger.account(sql, 100n, c.plan),
        await Ledger.account(sql, 100n, c.plan),
      ]
      const ids: string[] = []
      for (const a of pair) {
        const requestId = crypto.randomUUID()
        const [r] = await batch([
          admitItem(a.keyHash, {
            requestId,
            ...(c.key ? { idempotencyKey: 'k1', fingerprint: '00' } : {}),
          }),
        ])
        expect(r!.status).toBe('ok')
        ids.push(requestId)
      }
      const f = { ...outcome, cost: c.cost, status: c.status, completionTokens: c.completionTokens }
      if (c.key) {
        // Not said to have a key: declined, nothing changed (the key would stay in progress).
        const before = await Ledger.accountState(sql, pair[0]!.id)
        expect(await Alone.finish(sql, { id: ids[0]!, ...f })).toBeUndefined()
        expect(await Ledger.accountState(sql, pair[0]!.id)).toEqual(before)
      }
      expect(await Alone.finish(sql, { id: ids[0]!, ...f }, c.key)).toEqual({ charged: c.cost })
      const [b] = await batch([{ op: 'finish', id: ids[1], ...f, cost: c.cost.toString() }])
      expect(b).toMatchObject({ status: 'finished', charged: c.cost })
      const [x, y] = [await row(pair[0]!.id), await row(pair[1]!.id)]
      expect(x.rest).toEqual(y.rest)
      // Tokens count for a request charged for, answered, or that delivered some; one answered
      // free having delivered nothing takes none from the month or the wallet (full: a fresh
      // wallet is).
      const counted = c.cost > 0n || c.status === 'ok' || c.completionTokens > 0
      const tokens = 3 + c.completionTokens
      expect(x.rest.month_tokens).toBe(counted ? BigInt(tokens) : 0n)
      if (c.plan === 'wallet') expect(x.rest.wallet_tokens).toBe(counted ? 10_000 - tokens : 10_000)
      // The key: completed once charged or answered; freed when nothing was charged and it failed.
      const key = async (accountId: string) =>
        (await sql`select state from idempotency_keys where account_id = ${accountId}`)[0]?.state
      expect(await key(pair[0]!.id)).toBe(await key(pair[1]!.id))
      if (c.key) expect(await key(pair[0]!.id)).toBe(c.cost > 0n ? 'completed' : undefined)
      const [s0, s1] = [
        await Ledger.accountState(sql, pair[0]!.id),
        await Ledger.accountState(sql, pair[1]!.id),
      ]
      expect(s0).toEqual(s1)
    }
  })

  test('behavior: declines a channel reservation, and changes nothing', async () => {
    const channel = await Ledger.channel(sql, 1_000n)
    await Ledger.voucher(sql, channel.channelId, 100n)
    const id = crypto.randomUUID()
    expect(
      (await Ledger.hold(sql, channel.channelId, { want: 10n, need: 10n, requestId: id })).status,
    ).toBe('ok')
    expect(await Alone.finish(sql, { id, ...outcome, cost: 5n })).toBeUndefined()
    expect(await sql`select 1 from reservations where id = ${id}`).toHaveLength(1)
    expect(await sql`select 1 from usage where id = ${id}`).toHaveLength(0)
  })
})
