/**
 * The set-based channel functions of migration 0006 against the item-by-item ones they
 * replace (tollway_channel_admit, tollway_finish), on twin channels: one statement must mean
 * exactly what its items run one by one mean.
 */
import { describe, expect, test } from 'bun:test'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Postgres from '../helpers/Postgres.ts'

const db = await Postgres.fresh()
const { sql } = db

/** Two channels in the same state (deposit, voucher, and optionally finalized or closing). */
async function twins(accepted: bigint, state: 'open' | 'finalized' | 'closing' = 'open') {
  const pair = [await Ledger.channel(sql, 1_000_000n), await Ledger.channel(sql, 1_000_000n)]
  for (const c of pair) {
    await Ledger.voucher(sql, c.channelId, accepted)
    if (state === 'finalized')
      await sql`update channels set finalized = true where channel_id = decode(${c.channelId.slice(2)}, 'hex')`
    if (state === 'closing')
      await sql`update channels set close_requested_at = now() where channel_id = decode(${c.channelId.slice(2)}, 'hex')`
  }
  return pair.map((c) => c.channelId.slice(2))
}

type Item = {
  channel: number
  want: string
  need: string
  stream?: boolean
  key?: string
  fingerprint?: string
}

describe('tollway_channel_admit_many', () => {
  test('behavior: one statement gives, item for item, what tollway_channel_admit gives one by one', async () => {
    const [a1, a2] = await twins(100n)
    const [b1, b2] = await twins(1_000n)
    const [f1, f2] = await twins(1_000n, 'finalized')
    const [k1, k2] = await twins(1_000n, 'closing')
    const missing = ['ff'.repeat(32), 'fe'.repeat(32)]
    // [batch channel, one-by-one channel]
    const pairs = [[a1, a2], [b1, b2], [f1, f2], [k1, k2], missing] as [string, string][]
    const items: Item[] = [
      { channel: 0, want: '40', need: '40' },
      { channel: 1, want: '500', need: '100', stream: true },
      { channel: 0, want: '40', need: '40', stream: true },
      { channel: 0, want: '40', need: '30' }, // only 20 left: insufficient
      { channel: 0, want: '50', need: '20' }, // takes the last 20
      { channel: 1, want: '300', need: '10', key: 'k', fingerprint: 'aa' },
      { channel: 1, want: '300', need: '10', key: 'k', fingerprint: 'aa' }, // same key: in progress
      { channel: 1, want: '300', need: '10', key: 'k', fingerprint: 'bb' }, // other body: mismatch
      { channel: 1, want: '900', need: '300' }, // 200 left: insufficient
      { channel: 2, want: '10', need: '10' },
      { channel: 3, want: '10', need: '10' },
      { channel: 4, want: '10', need: '10' },
    ]
    const requests = items.map((): [string, string] => [crypto.randomUUID(), crypto.randomUUID()])
    const json = items.map((it, n) => ({
      channelId: pairs[it.channel]![0],
      model: 'm',
      stream: it.stream ?? false,
      want: it.want,
      need: it.need,
      requestId: requests[n]![0],
      leaseSeconds: 60,
      idempotencyKey: it.key ?? null,
      fingerprint: it.fingerprint ?? null,
    }))
    const batch =
      await sql`select * from tollway_channel_admit_many(${sql.json(json)}) order by idx`
    const single: Record<string, unknown>[] = []
    for (const [n, it] of items.entries()) {
      const [row] = await sql`
        select * from tollway_channel_admit(decode(${pairs[it.channel]![1]}, 'hex'), 'm',
          ${it.stream ?? false}, ${it.want}::numeric, ${it.need}::numeric, ${requests[n]![1]!},
          60, ${it.key ?? null}, ${it.fingerprint ? Buffer.from(it.fingerprint, 'hex') : null})`
      single.push(row!)
    }
    const comparable = (r: Record<string, unknown>, side: 0 | 1) => ({
      status: r.status,
      held: r.held,
      available: r.available,
      accepted_cumulative: r.accepted_cumulative,
      deposit: r.deposit,
      spent: r.spent,
      // The other request of an idempotency refusal: the same item's, on its side.
      other:
        r.other_request === null ? null : requests.findIndex((q) => q[side] === r.other_request),
    })
    expect(batch.map((r) => comparable(r, 0))).toEqual(single.map((r) => comparable(r, 1)))
    expect(batch.map((r) => r.status)).toEqual([
      'ok',
      'ok',
      'ok',
      'insufficient',
      'ok',
      'ok',
      'idempotency_in_progress',
      'idempotency_mismatch',
      'insufficient',
      'finalized',
      'close_requested',
      'not_found',
    ])
    // The channels and their reservations end the same.
    for (const [x, y] of pairs.slice(0, 2)) {
      expect(await Ledger.channelState(sql, `0x${x}`)).toEqual(
        await Ledger.channelState(sql, `0x${y}`),
      )
      const [cx] =
        await sql`select reserved, active_stream from channels where channel_id = decode(${x}, 'hex')`
      const [cy] =
        await sql`select reserved, active_stream from channels where channel_id = decode(${y}, 'hex')`
      expect(cx!.reserved).toBe(cy!.reserved)
      const side = (id: unknown, s: 0 | 1) => requests.findIndex((q) => q[s] === id)
      expect(side(cx!.active_stream, 0)).toBe(side(cy!.active_stream, 1))
      const [rx] =
        await sql`select count(*)::int n, sum(held) held from reservations where channel_id = decode(${x}, 'hex')`
      const [ry] =
        await sql`select count(*)::int n, sum(held) held from reservations where channel_id = decode(${y}, 'hex')`
      expect(rx).toEqual(ry!)
    }
  })
})

describe('tollway_channel_finish_many', () => {
  test('behavior: one statement charges, item for item, what tollway_finish charges one by one', async () => {
    const [a1, a2] = await twins(1_000n)
    const [b1, b2] = await twins(1_000n)
    const pairs = [
      [a1, a2],
      [b1, b2],
    ] as [string, string][]
    // Holds on each side: [channel, held, cost]. The channel's free balance caps a charge
    // above its hold; a charge of nothing on a keyed request frees the key.
    const holds = [
      [0, 300n, 250n],
      [1, 100n, 100n],
      [0, 300n, 600n], // over its hold: takes what is free (1000 − 600 held − 250 spent + 300)
      [1, 500n, 0n],
      [0, 100n, 1_000n], // nothing free beyond its own hold by then
    ] as const
    const ids = holds.map((): [string, string] => [crypto.randomUUID(), crypto.randomUUID()])
    for (const side of [0, 1] as const)
      for (const [n, [channel, held]] of holds.entries()) {
        const r = await Channels.admit(sql, {
          channelId: `0x${pairs[channel]![side]}`,
          model: 'm',
          stream: false,
          want: held,
          need: held,
          requestId: ids[n]![side],
          leaseSeconds: 60,
          ...(n === 3 ? { idempotencyKey: 'free', fingerprint: new Uint8Array([1]) } : {}),
        })
        expect(r.status).toBe('ok')
      }
    const outcome = (n: number) => ({
      cost: holds[n]![2].toString(),
      promptTokens: 1,
      completionTokens: 2,
      status: n === 3 ? 'upstream_error' : 'ok',
      latencyMs: 3,
      ttftMs: n === 3 ? null : 4,
    })
    const json = [...holds.keys(), 0].map((n, i) => ({
      // The last is the first again: already finished, no row.
      id: ids[n]![0],
      ...outcome(i === holds.length ? 0 : n),
    }))
    const batch =
      await sql`select * from tollway_channel_finish_many(${sql.json(json)}) order by idx`
    const single: Record<string, unknown>[] = []
    for (const n of holds.keys()) {
      const o = outcome(n)
      const [row] = await sql`
        select * from tollway_finish(${ids[n]![1]}, ${o.cost}::numeric, ${o.promptTokens},
          ${o.completionTokens}, ${o.status}, ${o.latencyMs}, ${o.ttftMs})`
      single.push(row!)
    }
    expect(batch.map((r) => r.idx)).toEqual([0, 1, 2, 3, 4])
    const strip = ({ idx: _, ...r }: Record<string, unknown>) => r
    expect(batch.map(strip)).toEqual(single)
    for (const [x, y] of pairs) {
      expect(await Ledger.channelState(sql, `0x${x}`)).toEqual(
        await Ledger.channelState(sql, `0x${y}`),
      )
      const state = async (id: string) => {
        const [c] =
          await sql`select spent, reserved from channels where channel_id = decode(${id}, 'hex')`
        const usage =
          await sql`select cost, status, prompt_tokens, completion_tokens, latency_ms, ttft_ms
          from usage where channel_id = decode(${id}, 'hex') order by cost, status`
        const keys =
          await sql`select key from channel_idempotency_keys where channel_id = decode(${id}, 'hex')`
        return { ...c, usage: [...usage], keys: keys.length }
      }
      expect(await state(x)).toEqual(await state(y))
    }
  })

  test('behavior: finds its reservations by the primary key, reservations vacuumed empty or not', async () => {
    // The function's own statement, planned as the function plans it: generic (its
    // plan_cache_mode), with its settings (proconfig). 0006 joined the items, and that plan
    // scanned and hashed the whole table at every call, with statistics or without.
    const [fn] = await sql`
      select prosrc, proconfig from pg_proc
      where oid = 'tollway_channel_finish_many(jsonb)'::regprocedure`
    const statement = /FOR e IN\s+(WITH[\s\S]*?)\s+LOOP/.exec(fn!.prosrc as string)?.[1]
    expect(statement).toBeDefined()
    for (const live of [0, 200]) {
      await sql`delete from reservations`
      await sql`vacuum analyze reservations`
      const channel = (await twins(1_000_000n))[0]!
      if (live > 0)
        await sql`select * from tollway_channel_admit_many(${sql.json(
          Array.from({ length: live }, () => ({
            channelId: channel,
            model: 'm',
            stream: false,
            want: '1',
            need: '1',
            requestId: crypto.randomUUID(),
            leaseSeconds: 60,
          })),
        )})`
      const plan = await sql.begin(async (tx) => {
        for (const setting of (fn!.proconfig as string[] | null) ?? []) {
          const [name, value] = setting.split('=') as [string, string]
          await tx`select set_config(${name}, ${value}, true)`
        }
        await tx.unsafe(
          `prepare finish_many_plan(jsonb) as ${statement!.replaceAll('p_items', '$1')}`,
        )
        const rows = await tx.unsafe(`explain execute finish_many_plan('[]')`)
        await tx.unsafe('deallocate finish_many_plan')
        return rows.map((r) => r['QUERY PLAN'] as string).join('\n')
      })
      expect(plan).toContain('reservations_pkey')
      expect(plan).not.toContain('Seq Scan on reservations')
    }
  })
})
