/**
 * Cursor pagination of the three listings (usage, credit transactions, accounts) walked page by
 * page over rows that share their times, with rows written between pages: every row there at
 * the start is given exactly once, newest first.
 */
import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Accounts from '../../src/ledger/Accounts.ts'
import * as Credits from '../../src/ledger/Credits.ts'
import type { Page } from '../../src/ledger/Page.ts'
import * as Usage from '../../src/ledger/Usage.ts'
import * as Postgres from '../helpers/Postgres.ts'

const { sql } = await Postgres.fresh()
/** A database of the accounts listing's own (it lists every account). */
const { sql: alone } = await Postgres.fresh()

/**
 * A time near a fixed instant: few milliseconds and microseconds, so that many rows tie, and
 * rows apart only in their microseconds (which a JS Date drops) come next to each other.
 */
const Time = fc.record({ ms: fc.integer({ min: 0, max: 3 }), us: fc.integer({ min: 0, max: 2 }) })
// Written as text cast in SQL: postgres.js sends a parameter typed timestamptz through a Date.
const at = (t: { ms: number; us: number }) =>
  `2026-11-01 12:00:00.${String(t.ms * 1000 + t.us).padStart(6, '0')}+00`

/**
 * Walks a listing to its end, running `between` after each page; a walk of more pages than
 * there could be rows (a cursor that does not move on) fails.
 */
async function walk<T extends { id: string }>(
  list: (cursor: string | undefined) => Promise<Page<T>>,
  between: (page: number) => Promise<void>,
): Promise<T[]> {
  const seen: T[] = []
  let cursor: string | undefined
  for (let page = 0; ; page++) {
    expect(page).toBeLessThan(1_000)
    const p = await list(cursor)
    seen.push(...p.data)
    if (!p.has_more) {
      expect(p.next_cursor).toBeNull()
      return seen
    }
    cursor = p.next_cursor!
    await between(page)
  }
}

/** Expects each of `ids` in `walked`, and no id twice there. */
function once(walked: { id: string }[], ids: string[]) {
  const walkedIds = walked.map((r) => r.id)
  expect(new Set(walkedIds).size).toBe(walkedIds.length)
  const all = new Set(walkedIds)
  for (const id of ids) expect(all.has(id)).toBe(true)
}

/** Expects `walked` in the order of `all` (which holds the rows written after the walk
 * passed their place too). */
function inOrder(walked: { id: string }[], all: string[]) {
  const walkedIds = new Set(walked.map((r) => r.id))
  expect(walked.map((r) => r.id)).toEqual(all.filter((id) => walkedIds.has(id)))
}

const account = () => Accounts.create(sql, { name: 'paged', plan: 'free' })

describe('Usage.list', () => {
  test('property: every row once, newest first, when rows share a time and rows are written between pages', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(Time, { minLength: 0, maxLength: 30 }),
        fc.integer({ min: 1, max: 7 }),
        fc.array(Time, { maxLength: 4 }),
        async (times, limit, later) => {
          const accountId = await account()
          const insert = async (t: { ms: number; us: number }) => {
            const id = crypto.randomUUID()
            await sql`insert into usage (id, account_id, model, stream, prompt_tokens,
              completion_tokens, cost, status, created_at)
              values (${id}, ${accountId}, 'm', false, 1, 1, 1, 'ok', ${at(t)}::text::timestamptz)`
            return id
          }
          const ids: string[] = []
          for (const t of times) ids.push(await insert(t))
          const walked = await walk(
            (cursor) =>
              Usage.list(sql, { accountId, limit, ...(cursor === undefined ? {} : { cursor }) }),
            async (page) => {
              const t = later[page]
              if (t) await insert(t)
            },
          )
          once(walked, ids)
          const order = await sql`select id from usage where account_id = ${accountId}
            order by created_at desc, id desc`
          inOrder(
            walked,
            order.map((r) => r.id as string),
          )
        },
      ),
      { numRuns: 60 },
    )
  }, 60_000)
})

describe('Credits.transactions', () => {
  test('property: every transaction once, newest first, with grants written between pages', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 0, max: 25 }),
        fc.integer({ min: 1, max: 7 }),
        fc.integer({ min: 0, max: 4 }),
        async (n, limit, later) => {
          const accountId = await account()
          const grant = () => Credits.grant(sql, { accountId, amount: 1n, note: null })
          for (let i = 0; i < n; i++) await grant()
          const [{ ids }] = (await sql`
            select coalesce(array_agg(id::text), '{}') as ids from credit_transactions
            where account_id = ${accountId}`) as unknown as [{ ids: string[] }]
          const walked = await walk(
            (cursor) =>
              Credits.transactions(sql, {
                accountId,
                limit,
                ...(cursor === undefined ? {} : { cursor }),
              }),
            async (page) => {
              if (page < later) await grant()
            },
          )
          once(walked, ids)
          const numbers = walked.map((t) => BigInt(t.id))
          for (let i = 1; i < numbers.length; i++) expect(numbers[i - 1]! > numbers[i]!).toBe(true)
        },
      ),
      { numRuns: 40 },
    )
  }, 60_000)
})

describe('Accounts.list', () => {
  test('property: every account once when accounts share a creation time and accounts are created between pages', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(Time, { maxLength: 15 }),
        fc.integer({ min: 1, max: 9 }),
        fc.array(Time, { maxLength: 3 }),
        async (times, limit, later) => {
          // The listing is of every account: each run starts with none.
          await alone`delete from accounts`
          const create = async (t: { ms: number; us: number }) => {
            const [row] = await alone`insert into accounts (name, plan, created_at)
              values ('paged', 'free', ${at(t)}::text::timestamptz) returning id`
            return row!.id as string
          }
          for (const t of times) await create(t)
          const ids = (await alone`select id from accounts`).map((r) => r.id as string)
          const walked = await walk(
            (cursor) =>
              Accounts.list(alone, { limit, ...(cursor === undefined ? {} : { cursor }) }),
            async (page) => {
              const t = later[page]
              if (t) await create(t)
            },
          )
          once(walked, ids)
          const order = await alone`select id from accounts order by created_at desc, id desc`
          inOrder(
            walked,
            order.map((r) => r.id as string),
          )
        },
      ),
      { numRuns: 30 },
    )
  }, 60_000)
})
