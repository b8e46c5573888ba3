/**
 * The API-key ledger's lone calls: an admission or a finish with nobody to share a batch
 * with (an idle or lightly loaded gateway) runs as one plain SQL statement instead of
 * `tollway_ledger_batch`. Each is one statement and one transaction, as the batch function is,
 * and keeps its invariants, but costs PostgreSQL half the work: a PL/pgSQL function sets up
 * every expression it evaluates again in each transaction, and its statements each start an
 * executor, which a batch of many items shares and a lone item pays alone. Counted with
 * callgrind on a PostgreSQL 15 server of its own (README, Benchmarks): a lone finish and a
 * lone admission cost it 1.35 million instructions this way, 2.70 million through the function.
 *
 * Each covers the common case only, and declines (undefined) anything else, having changed
 * nothing: an admission with an Idempotency-Key, on a plan with a token wallet, that any limit
 * refuses, that the balance covers only in part, or whose key is unknown; a finish whose cost
 * the account cannot pay in full, or that races an extension or a change of plan. A finish
 * declines as little as it can: the API-key ledger pipelines the next call behind it
 * (Reservations.ts), and that call runs before the batch statement that then does a declined
 * one. Every condition is written on the row the statement updates, so
 * PostgreSQL checks it again on the row as it is once locked (a condition on a copy read
 * earlier in the statement, even with FOR UPDATE, let concurrent admissions past the
 * balance: test/ledger/Reservations.test.ts found it). The batch function
 * then decides it, with the exact answer (which refusal, which partial hold). The formulas
 * here are those of functions/tollway_ledger_batch.sql; test/ledger/Alone.test.ts checks that
 * both give the same answers and rows.
 */
import type { Sql } from './Db.ts'
import type { AdmitInput, Finish } from './Reservations.ts'

/** A lone admission's row (status ok): the fields of the batch's `ok` answer, by name. */
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
 * takes the hold on the account row, counts the request against concurrency and the request
 * rate, and writes its reservation. A plan changed meanwhile finds no row (declined).
 */
export async function admit(
  sql: Sql,
  i: Omit<AdmitInput, 'need' | 'idempotencyKey' | 'fingerprint'>,
): Promise<AdmitRow | undefined> {
  const want = sql.typed.numeric(i.want)
  // Every check reads the account row the UPDATE writes (not a copy read before it): under
  // concurrent writers PostgreSQL checks them again on the row as it is once locked, so a
  // request admitted here is admitted against the latest balance and counts.
  const [row] = await sql`
    with now as (
      select ts, date_trunc('month', ts at time zone 'UTC')::date as this_month,
        -- As the batch function: no wait for a WAL flush (see migrations/0001_ledger.sql).
        set_config('synchronous_commit', 'off', true) as durability
      from clock_timestamp() ts
    ), held as (
      update accounts ac set reserved = ac.reserved + ${want},
        active_requests = ac.active_requests + 1,
        -- The period rounded down to a microsecond, and the limit's periods the span the
        -- arrival time may run ahead, as the batch function's (see there).
        rate_tat = case when pl.requests_per_minute is null then ac.rate_tat
          else greatest(coalesce(ac.rate_tat, now.ts), now.ts)
            + interval '1 microsecond' * (60000000 / pl.requests_per_minute) end
      from api_keys ak, plans pl, now
      where ak.hash = ${i.keyHash} and ak.revoked_at is null and ac.id = ak.account_id
        and pl.name = ac.plan and pl.wallet_floor is null and pl.tier >= ${i.minTier}
        and (pl.max_concurrent is null or ac.active_requests < pl.max_concurrent)
        and (pl.requests_per_minute is null
          or greatest(coalesce(ac.rate_tat, now.ts), now.ts)
            + interval '1 microsecond' * (60000000 / pl.requests_per_minute) - now.ts
            <= interval '1 microsecond' * (60000000 / pl.requests_per_minute) * pl.requests_per_minute)
        and (pl.tokens_per_month is null
          or case when ac.month_start < now.this_month then 0 else ac.month_tokens end
            + ${i.promptTokens} <= pl.tokens_per_month)
        and ac.balance - ac.reserved >= ${want}
      returning ac.id, ak.id as kid, ac.balance - ac.reserved as available, ac.active_requests,
        pl.max_concurrent, pl.tokens_per_month, pl.requests_per_minute as rpm,
        case when ac.month_start < now.this_month then 0 else ac.month_tokens end as month_used,
        ac.rate_tat as new_tat, now.ts
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
        else floor(extract(epoch from (interval '1 microsecond' * (60000000 / h.rpm) * h.rpm
            - (h.new_tat - h.ts)))
          / extract(epoch from interval '1 microsecond' * (60000000 / h.rpm)))::int end as rate_remaining
    from held h`
  return row as AdmitRow | undefined
}

/**
 * The tokens a finish counts against its plan's month and token wallet, as the batch function
 * counts them (functions/tollway_ledger_batch.sql): all of them for a request charged for (its
 * cost before any cap by what the payer has free), answered, or that delivered some; none for
 * one answered free having delivered nothing (an upstream failing before its first token, a
 * client gone before any upstream was asked).
 */
export function countedTokens(f: {
  cost: bigint
  status: string
  promptTokens: number
  completionTokens: number
}): number {
  return f.cost > 0n || f.status === 'ok' || f.completionTokens > 0
    ? f.promptTokens + f.completionTokens
    : 0
}

/**
 * Finishes an API-key request whose whole cost the account can pay (its free balance plus this
 * reservation): takes its reservation, charges the cost, releases the rest, counts the tokens
 * against the month (and the token wallet, on a plan with one) when the request was charged
 * for, answered (status ok) or delivered tokens, marks its Idempotency-Key completed (`idempotent`: it has
 * one; or frees it, when nothing was charged and it failed),
 * and writes the transaction and usage rows. The reservation goes first, then the account row,
 * in the order the batch function locks them. Undefined when declined (a cost beyond what the account can pay is
 * capped by the batch function; a race with an extension or a change of plan is left to it
 * too; so is a reservation with an Idempotency-Key not said `idempotent`), or when the
 * reservation is gone (finished already) or is a channel's: the batch function tells which.
 */
export async function finish(
  sql: Sql,
  f: Finish,
  idempotent = false,
): Promise<{ charged: bigint } | undefined> {
  const cost = sql.typed.numeric(f.cost)
  const tokens = countedTokens(f)
  // Its Idempotency-Key (`idempotent`; else none, and the key table is left untouched): a
  // retry is told the request was charged; one that charged nothing and failed frees it.
  const keyed = !idempotent
    ? sql``
    : sql`, completed as (
        update idempotency_keys k set state = 'completed' from charged c
        where k.account_id = c.id and k.key = c.idem_key and (${cost} > 0 or ${f.status} = 'ok')
      ), freed as (
        delete from idempotency_keys k using charged c
        where k.account_id = c.id and k.key = c.idem_key and ${cost} = 0 and ${f.status} <> 'ok'
      )`
  try {
    const [row] = await sql`
      with now as (
        select ts, date_trunc('month', ts at time zone 'UTC')::date as this_month,
          set_config('synchronous_commit', 'off', true) as durability
        from clock_timestamp() ts
      ), taken as (
        delete from reservations r
        using accounts ac0 join plans pl on pl.name = ac0.plan
        where r.id = ${f.id} and ac0.id = r.account_id
          and (r.idem_key is null or ${idempotent})
        returning r.account_id, r.key_id, r.held, r.model, r.stream, r.idem_key, ac0.plan,
          pl.wallet_floor, pl.wallet_cap, pl.wallet_refill_per_day
      ), charged as (
        -- The whole cost, when the account can pay it (its free balance plus this
        -- reservation), checked on the row as it is once locked.
        update accounts ac set balance = ac.balance - ${cost}, reserved = ac.reserved - t.held,
          active_requests = ac.active_requests - 1,
          month_tokens = case when ac.month_start < now.this_month then 0 else ac.month_tokens end
            + ${tokens},
          month_start = now.this_month,
          wallet_tokens = case when t.wallet_floor is null then null
            else greatest(0, least(t.wallet_cap::double precision,
              coalesce(ac.wallet_tokens, t.wallet_cap)
                + coalesce(extract(epoch from now.ts - ac.wallet_at), 0) / 86400.0
                  * t.wallet_refill_per_day) - ${tokens}) end,
          wallet_at = case when t.wallet_floor is null then null else now.ts end
        from taken t, now
        where ac.id = t.account_id and ac.balance - ac.reserved + t.held >= ${cost}
          -- PostgreSQL checks the row's constraints on the version this statement sees before
          -- it finds a newer one: a hold extended meanwhile (t.held is as it is now) must not
          -- make that version's reserved negative. And a plan changed meanwhile (its wallet
          -- read above would be another's) leaves the finish to the batch function.
          and ac.reserved >= t.held and ac.plan = t.plan
        returning ac.id, t.key_id, t.model, t.stream, t.idem_key
      )${keyed}, paid as (
        insert into credit_transactions (account_id, amount, kind, request_id)
        select c.id, -${cost}, 'usage', ${f.id} from charged c where ${cost} > 0
      ), used as (
        insert into usage (id, account_id, key_id, model, stream, prompt_tokens,
          completion_tokens, cost, status, latency_ms, ttft_ms)
        select ${f.id}, c.id, c.key_id, c.model, c.stream, ${f.promptTokens},
          ${f.completionTokens}, ${cost}, ${f.status}, ${f.latencyMs}, ${f.ttftMs}
        from charged c
      )
      -- A reservation taken whose charge could not be paid in full: the statement fails
      -- whole (nothing changed), and the batch function charges what can be paid.
      select (select count(*) from charged)
        / ((select count(*) from charged) - (select count(*) from taken) + 1) as finished`
    return row!.finished === 1n ? { charged: f.cost } : undefined
  } catch (e) {
    // Undone whole: the batch function decides it.
    if (DECLINED.has((e as { code?: string }).code ?? '')) return undefined
    throw e
  }
}

/**
 * What the finish statement raises to undo itself (division by zero, see above), and a check
 * constraint failing on a version of a row a concurrent writer changed (which the conditions
 * above keep from happening): either way nothing changed.
 */
const DECLINED = new Set(['22012', '23514'])
