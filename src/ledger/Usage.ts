/** Usage logs: one row per admitted request, token counts and money only. */

import type { Sql } from './Db.ts'
import * as Page from './Page.ts'
import { accountsSettled } from './Reservations.ts'

export type Row = {
  id: string
  model: string
  stream: boolean
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
  cost: string
  status: string
  latency_ms: number | null
  time_to_first_token_ms: number | null
  key_id: string | null
  created_at: string
}

/** Which rows a listing takes; times are ISO 8601 (from inclusive, to exclusive). */
export type Filter = { model?: string; keyId?: string; from?: string; to?: string }

/** Lists an account's usage newest first. */
export async function list(
  sql: Sql,
  input: { accountId: string; limit: number; cursor?: string } & Filter,
): Promise<Page.Page<Row>> {
  const page = Page.newestFirst(sql, input.cursor, Page.scope('usage', input.accountId))
  await accountsSettled(sql)
  // Times go in as text, cast in the query (see Page.newestFirst).
  const rows = await sql`
    select *, created_at::text as position from usage where account_id = ${input.accountId}
    ${input.model !== undefined ? sql`and model = ${input.model}` : sql``}
    ${input.keyId !== undefined ? sql`and key_id = ${input.keyId}::uuid` : sql``}
    ${input.from !== undefined ? sql`and created_at >= ${input.from}::text::timestamptz` : sql``}
    ${input.to !== undefined ? sql`and created_at < ${input.to}::text::timestamptz` : sql``}
    ${page.after ? sql`and ${page.after}` : sql``}
    order by created_at desc, id desc limit ${input.limit + 1}`
  return Page.from(rows, input.limit, render, page.key)
}

/** One request's usage row (its id is the request's `x-request-id`), if the account's. */
export async function get(
  sql: Sql,
  input: { accountId: string; id: string },
): Promise<Row | undefined> {
  await accountsSettled(sql)
  const [row] = await sql`
    select * from usage where id = ${input.id}::uuid and account_id = ${input.accountId}`
  return row ? render(row) : undefined
}

// biome-ignore lint/suspicious/noExplicitAny: a row of the usage table
function render(r: any): Row {
  return {
    id: r.id,
    model: r.model,
    stream: r.stream,
    prompt_tokens: r.prompt_tokens,
    completion_tokens: r.completion_tokens,
    total_tokens: r.prompt_tokens + r.completion_tokens,
    cost: String(r.cost),
    status: r.status,
    latency_ms: r.latency_ms,
    time_to_first_token_ms: r.ttft_ms,
    key_id: r.key_id,
    created_at: r.created_at.toISOString(),
  }
}
