/** Prepaid credits: an append-only transaction log whose sum is the balance. */

import type { Sql } from './Db.ts'
import * as Page from './Page.ts'
import { accountsSettled } from './Reservations.ts'

export type Transaction = {
  id: string
  amount: string
  kind: 'grant' | 'usage'
  note: string | null
  request_id: string | null
  created_at: string
}

/** Thrown when a grant would take a balance past what numeric(78,0) holds. */
export class BalanceOverflowError extends Error {
  override name = 'BalanceOverflowError'
}

/**
 * Adds `amount` (negative: removes) to an account. Returns the new balance, or undefined
 * if the account does not exist or a debit would take the balance below what is reserved.
 */
export async function grant(
  sql: Sql,
  input: { accountId: string; amount: bigint; note: string | null },
): Promise<bigint | undefined> {
  await accountsSettled(sql)
  try {
    const [row] = await sql`
      select tollway_grant(${input.accountId}, ${sql.typed.numeric(input.amount)}, ${input.note}) as balance`
    return row?.balance ?? undefined
  } catch (e) {
    // numeric_value_out_of_range: the statement changed nothing.
    if ((e as { code?: string }).code === '22003')
      throw new BalanceOverflowError('the balance would pass 78 digits')
    throw e
  }
}

/** The account's balance and how much of it in-flight requests hold. */
export async function balance(
  sql: Sql,
  accountId: string,
): Promise<{ balance: bigint; reserved: bigint } | undefined> {
  await accountsSettled(sql)
  const [row] = await sql`select balance, reserved from accounts where id = ${accountId}`
  return row ? { balance: row.balance, reserved: row.reserved } : undefined
}

/** Lists transactions newest first. */
export async function transactions(
  sql: Sql,
  input: { accountId: string; limit: number; cursor?: string },
): Promise<Page.Page<Transaction>> {
  const scope = Page.scope('transactions', input.accountId)
  const [, after] = Page.parse(input.cursor, [Page.scoped(scope), Page.shapes.id]) ?? []
  await accountsSettled(sql)
  const rows = await sql`
    select id, amount, kind, note, request_id, created_at from credit_transactions
    where account_id = ${input.accountId} ${after ? sql`and id < ${after}` : sql``}
    order by id desc limit ${input.limit + 1}`
  return Page.from(
    rows,
    input.limit,
    (r) => ({
      id: String(r.id),
      amount: String(r.amount),
      kind: r.kind,
      note: r.note,
      request_id: r.request_id,
      created_at: r.created_at.toISOString(),
    }),
    (r) => [scope, String(r.id)],
  )
}
