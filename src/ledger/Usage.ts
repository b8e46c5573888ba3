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

/** Lists an account's usage newest first. */
export async function list(
  sql: Sql,
  input: { accountId: string; limit: number; cursor?: string },
): Promise<Page.Page<Row>> {
  const after = Page.parse(input.cursor, [Page.shapes.timestamp, Page.shapes.uuid])
  await accountsSettled(sql)
  const rows = await sql`
    select *, created_at::text as position from usage where account_id = ${input.accountId}
    ${after ? sql`and (created_at, id) < (${after[0]!}::text::timestamptz, ${after[1]!}::uuid)` : sql``}
    order by created_at desc, id desc limit ${input.limit + 1}`
  return Page.from(
    rows,
    input.limit,
    (r) => ({
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
    }),
    // The text form keeps microseconds, which a JS Date would drop (the query reads it back as
    // text, cast there: a timestamptz parameter would go through a Date).
    (r) => [r.position, r.id],
  )
}
