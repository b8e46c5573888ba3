/** Accounts and plans. */
import type { Plan } from '../Config.ts'
import type { Sql } from './Db.ts'
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

/** Writes the configured plans (upsert), so admission can read them in the same statement. */
export async function syncPlans(sql: Sql, plans: Record<string, Plan>): Promise<void> {
  for (const [name, p] of Object.entries(plans)) {
    await sql`
      insert into plans (name, tier, requests_per_minute, max_concurrent, tokens_per_month,
        wallet_floor, wallet_refill_per_day, wallet_cap)
      values (${name}, ${p.tier}, ${p.requestsPerMinute}, ${p.maxConcurrent}, ${p.tokensPerMonth},
        ${p.wallet?.floor ?? null}, ${p.wallet?.refillPerDay ?? null}, ${p.wallet?.cap ?? null})
      on conflict (name) do update set tier = excluded.tier,
        requests_per_minute = excluded.requests_per_minute, max_concurrent = excluded.max_concurrent,
        tokens_per_month = excluded.tokens_per_month, wallet_floor = excluded.wallet_floor,
        wallet_refill_per_day = excluded.wallet_refill_per_day, wallet_cap = excluded.wallet_cap`
  }
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
  const [r] = await sql`select * from accounts where id = ${id}`
  if (!r) return undefined
  return {
    id: r.id,
    name: r.name,
    plan: r.plan,
    balance: r.balance,
    reserved: r.reserved,
    activeKeys: r.active_keys,
    activeRequests: r.active_requests,
    monthTokens: r.month_tokens,
    createdAt: r.created_at,
  }
}
