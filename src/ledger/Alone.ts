/**
 * The API-key ledger's lone calls: an admission or a finish with nobody to share a batch
 * with (an idle or lightly loaded gateway) runs as one plain SQL statement instead of
 * `tollway_ledger_many`. Each is one statement and one transaction, as the batch function is,
 * and keeps its invariants, but costs PostgreSQL half the work: a PL/pgSQL function sets up
 * every expression it evaluates again in each transaction, and its statements each start an
 * executor, which a batch of many items shares and a lone item pays alone. Counted with
 * callgrind on a PostgreSQL 15 server of its own (README, Benchmarks): a lone finish and a
 * lone admission cost it 1.35 million instructions this way, 2.70 million through the function.
 *
 * Each covers the common case only, and declines (undefined) anything else, having changed
 * nothing: an admission with an Idempotency-Key, on a plan with a token wallet, that any limit
 * refuses, that the balance covers only in part, or whose key is unknown; a finish of a
 * reservation with an Idempotency-Key, of a channel, or on a wallet plan. The batch function
 * then decides it, with the exact answer (which refusal, which partial hold). The formulas
 * here are those of functions/tollway_ledger_many.sql; test/ledger/Alone.test.ts checks that
 * both give the same answers and rows.
 */
import type { Sql } from './Db.ts'

/** An admission's answer, as `tollway_ledger_many` returns it (its row, status ok). */
export type AdmitRow = {
  account_id: string
  key_id: string
  held: bigint
  available: bigint
  concurrency_room: number | null
  quota_room: bigint | null
  rate_limit: number | null
  rate_remaining: number | null
}

/**
 * Admits a request that every check passes and whose whole `want` the free balance covers:
 * locks the account (with its plan, as the batch function does), takes the hold, counts the
 * request against concurrency and the request rate, and writes its reservation.
 */
export async function admit(
  sql: Sql,
  i: {
    keyHash: Uint8Array
    model: string
    stream: boolean
    minTier: number
    promptTokens: number
    want: bigint
    requestId: string
    leaseSeconds: number
  },
): Promise<AdmitRow | undefined> {
  const want = sql.typed.numeric(i.want)
  const [row] = await sql`
    with now as (
      select clock_timestamp() as ts,
        -- As the batch function: no wait for a WAL flush (see migrations/0001_ledger.sql).
        set_config('synchronous_commit', 'off', true) as durability
    ), locked as (
      select ac.id, ak.id as kid, ac.balance, ac.reserved, ac.active_requests, ac.rate_tat,
        ac.month_start, ac.month_tokens, pl.tier, pl.requests_per_minute as rpm,
        pl.max_concurrent, pl.tokens_per_month, now.ts,
        date_trunc('month', now.ts at time zone 'UTC')::date as this_month
      from api_keys ak
        join accounts ac on ac.id = ak.account_id
        join plans pl on pl.name = ac.plan
        cross join now
      where ak.hash = ${i.keyHash} and ak.revoked_at is null and pl.wallet_floor is null
      for update of ac
    ), checked as (
      select locked.*,
        case when rpm is null then null
          else greatest(coalesce(rate_tat, ts), ts) + interval '60 seconds' / rpm end as new_tat,
        case when month_start < this_month then 0 else month_tokens end as month_used
      from locked
    ), held as (
      update accounts ac set reserved = ac.reserved + ${want},
        active_requests = ac.active_requests + 1, rate_tat = coalesce(c.new_tat, ac.rate_tat)
      from checked c
      where ac.id = c.id and c.tier >= ${i.minTier}
        and (c.max_concurrent is null or c.active_requests < c.max_concurrent)
        and (c.new_tat is null or c.new_tat - c.ts <= interval '60 seconds')
        and (c.tokens_per_month is null or c.month_used + ${i.promptTokens} <= c.tokens_per_month)
        and c.balance - c.reserved >= ${want}
      returning ac.id, c.kid, ac.balance - ac.reserved as available, ac.active_requests,
        c.max_concurrent, c.tokens_per_month, c.month_used, c.rpm, c.new_tat, c.ts
    ), reserved as (
      insert into reservations (id, account_id, key_id, model, stream, held, expires_at)
      select ${i.requestId}, h.id, h.kid, ${i.model}, ${i.stream}, ${want},
        h.ts + make_interval(secs => ${i.leaseSeconds})
      from held h
    )
    select h.id as account_id, h.kid as key_id, ${want} as held, h.available,
      h.max_concurrent - h.active_requests as concurrency_room,
      h.tokens_per_month - h.month_used - ${i.promptTokens} as quota_room,
      h.rpm as rate_limit,
      case when h.rpm is null then null
        else floor(extract(epoch from (interval '60 seconds' - (h.new_tat - h.ts)))
          / extract(epoch from interval '60 seconds' / h.rpm))::int end as rate_remaining
    from held h`
  return row as AdmitRow | undefined
}

/**
 * Finishes an API-key request without an Idempotency-Key on a plan without a token wallet:
 * takes its reservation, charges the cost (never more than the account can pay: its free
 * balance plus this reservation), releases the rest, counts the tokens against the month and
 * writes the transaction and usage rows. The reservation goes first, then the account row, in
 * the order the batch function locks them. Undefined when declined, or when the reservation
 * is gone (finished already): the batch function tells which.
 */
export async function finish(
  sql: Sql,
  f: {
    id: string
    cost: bigint
    promptTokens: number
    completionTokens: number
    status: string
    latencyMs: number | null
    ttftMs: number | null
  },
): Promise<{ charged: bigint } | undefined> {
  const [row] = await sql`
    with now as (
      select clock_timestamp() as ts, set_config('synchronous_commit', 'off', true) as durability
    ), taken as (
      delete from reservations r
      using accounts ac0 join plans pl on pl.name = ac0.plan
      where r.id = ${f.id} and r.idem_key is null and ac0.id = r.account_id
        and pl.wallet_floor is null
      returning r.account_id, r.key_id, r.held, r.model, r.stream
    ), locked as (
      select ac.id, t.key_id, t.held, t.model, t.stream,
        greatest(0, least(${sql.typed.numeric(f.cost)}, ac.balance - ac.reserved + t.held)) as amount,
        date_trunc('month', now.ts at time zone 'UTC')::date as this_month
      from accounts ac join taken t on ac.id = t.account_id cross join now
      for update of ac
    ), charged as (
      update accounts ac set balance = ac.balance - l.amount, reserved = ac.reserved - l.held,
        active_requests = ac.active_requests - 1,
        month_tokens = case when ac.month_start < l.this_month then 0 else ac.month_tokens end
          + ${f.promptTokens + f.completionTokens},
        month_start = l.this_month, wallet_tokens = null, wallet_at = null
      from locked l
      where ac.id = l.id
      returning ac.id, l.key_id, l.model, l.stream, l.amount
    ), paid as (
      insert into credit_transactions (account_id, amount, kind, request_id)
      select c.id, -c.amount, 'usage', ${f.id} from charged c where c.amount > 0
    ), used as (
      insert into usage (id, account_id, key_id, model, stream, prompt_tokens, completion_tokens,
        cost, status, latency_ms, ttft_ms)
      select ${f.id}, c.id, c.key_id, c.model, c.stream, ${f.promptTokens}, ${f.completionTokens},
        c.amount, ${f.status}, ${f.latencyMs}, ${f.ttftMs}
      from charged c
    )
    select amount as charged from charged`
  return row ? { charged: row.charged as bigint } : undefined
}
