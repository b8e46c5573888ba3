/** Accounts and plans. */
import type { Plan } from '../Config.ts'
import type { Sql } from './Db.ts'
import * as Page from './Page.ts'
import { accountsSettled } from './Reservations.ts'

export type Account = {
  id: string
  name: string
  plan: string
  balance: bigint
  reserved: bigint
  activeKeys: number
  activeRequests: number
  monthTokens: bigint
  createdAt: Date
}

/**
 * Writes the configured plans (upsert), so admission can read them in the same statement. A
 * plan whose requests per minute changed has its accounts' request-rate state rescaled to the
 * new limit in the same transaction (`tollway_rate_rescaled`: the requests it counts stay the
 * same).
 */
export async function syncPlans(sql: Sql, plans: Record<string, Plan>): Promise<void> {
  for (const [name, p] of Object.entries(plans)) {
    await sql.begin(async (tx) => {
      // The plan row locked first: an instance starting at the same time with the same change
      // reads the limit the first one wrote (its statement's snapshot is taken once it has the
      // lock), not the old one, so it does not rescale the accounts again. (A FOR UPDATE in
      // the statement's own read would not do: the upsert changes the row first, and the read
      // then skips it.)
      await tx`select 1 from plans where name = ${name} for update`
      await tx`
      with was as (select requests_per_minute as rpm from plans where name = ${name}),
      rescaled as (
        update accounts ac set rate_tat = tollway_rate_rescaled(ac.rate_tat, was.rpm,
          ${p.requestsPerMinute}::int, clock_timestamp())
        from was
        where ac.plan = ${name} and was.rpm is distinct from ${p.requestsPerMinute}::int
          and ac.rate_tat is not null
      )
      insert into plans (name, tier, requests_per_minute, max_concurrent, tokens_per_month,
        wallet_floor, wallet_refill_per_day, wallet_cap)
      values (${name}, ${p.tier}, ${p.requestsPerMinute}, ${p.maxConcurrent}, ${p.tokensPerMonth},
        ${p.wallet?.floor ?? null}, ${p.wallet?.refillPerDay ?? null}, ${p.wallet?.cap ?? null})
      on conflict (name) do update set tier = excluded.tier,
        requests_per_minute = excluded.requests_per_minute, max_concurrent = excluded.max_concurrent,
        tokens_per_month = excluded.tokens_per_month, wallet_floor = excluded.wallet_floor,
        wallet_refill_per_day = excluded.wallet_refill_per_day, wallet_cap = excluded.wallet_cap`
    })
  }
}

/**
 * The plans accounts are on that `plans` (the configuration) does not have, with how many
 * accounts each: a plan dropped from the configuration keeps its row, so its accounts are
 * still served on the limits last configured for it, while the admin API moves no account
 * to it.
 */
export async function unconfiguredPlans(
  sql: Sql,
  plans: Record<string, Plan>,
): Promise<{ plan: string; accounts: number }[]> {
  const rows = await sql`
    select plan, count(*)::int as accounts from accounts
    where not (plan = any(${Object.keys(plans)}::text[]))
    group by plan order by plan`
  return rows.map((r) => ({ plan: r.plan as string, accounts: r.accounts as number }))
}

/** Creates an account on a plan that must exist. */
export async function create(sql: Sql, input: { name: string; plan: string }): Promise<string> {
  const [row] =
    await sql`insert into accounts (name, plan) values (${input.name}, ${input.plan}) returning id`
  return row!.id as string
}

/** Reads one account, or undefined. */
export async function get(sql: Sql, id: string): Promise<Account | undefined> {
  await accountsSettled(sql)
  const [r] = await sql`select *, ${monthUsed(sql)} from accounts where id = ${id}`
  return r ? account(r) : undefined
}

/**
 * Renames an account or moves it to another plan (which must exist); undefined when there is
 * no such account. A new plan applies from the account's next admission, on every instance
 * (admission reads the plan in its statement); the month's tokens so far still count, and so do
 * the requests of the last minute: the request-rate state is rescaled to the new plan's limit
 * (`tollway_rate_rescaled`), so an upgraded account is not held to the old plan's pace nor a
 * downgraded one let a new burst.
 */
export async function update(
  sql: Sql,
  id: string,
  input: { name?: string | undefined; plan?: string | undefined },
): Promise<Account | undefined> {
  await accountsSettled(sql)
  const [r] = await sql`
    update accounts ac set name = coalesce(${input.name ?? null}, ac.name),
      plan = coalesce(${input.plan ?? null}, ac.plan),
      -- Subqueries on the row as it is once locked (a plan changed meanwhile is the one left).
      rate_tat = tollway_rate_rescaled(ac.rate_tat,
        (select requests_per_minute from plans where name = ac.plan),
        (select requests_per_minute from plans where name = coalesce(${input.plan ?? null}, ac.plan)),
        clock_timestamp())
    where ac.id = ${id} returning *, ${monthUsed(sql)}`
  return r ? account(r) : undefined
}

/** Lists accounts, newest first. */
export async function list(
  sql: Sql,
  input: { limit: number; cursor?: string },
): Promise<Page.Page<Account>> {
  const page = Page.newestFirst(sql, input.cursor, Page.scope('accounts'))
  await accountsSettled(sql)
  const rows = await sql`
    select *, ${monthUsed(sql)}, created_at::text as position from accounts
    ${page.after ? sql`where ${page.after}` : sql``}
    order by created_at desc, id desc limit ${input.limit + 1}`
  return Page.from(rows, input.limit, account, page.key)
}

/** The month's tokens so far (the counter is reset by the first charge of a new month). */
const monthUsed = (sql: Sql) =>
  sql`case when month_start < date_trunc('month', now() AT TIME ZONE 'UTC')::date then 0::bigint
    else month_tokens end as month_used`

// biome-ignore lint/suspicious/noExplicitAny: a row of the accounts table
function account(r: any): Account {
  return {
    id: r.id,
    name: r.name,
    plan: r.plan,
    balance: r.balance,
    reserved: r.reserved,
    activeKeys: r.active_keys,
    activeRequests: r.active_requests,
    monthTokens: r.month_used,
    createdAt: r.created_at,
  }
}
