/**
 * Cursor pagination: an opaque base64url cursor over a (timestamp, id) or (id) key, led by the
 * scope of the listing it walks (see `scope`), so a cursor of another listing or another
 * account is refused rather than taken as a position in this one.
 */
import type { Sql } from './Db.ts'

export type Page<T> = { object: 'list'; data: T[]; has_more: boolean; next_cursor: string | null }

/** Encodes the position after `parts` as an opaque cursor. */
export function cursor(parts: string[]): string {
  return Buffer.from(parts.join('\n')).toString('base64url')
}

/** Thrown for a cursor that is not one of ours. */
export class BadCursorError extends Error {
  override name = 'BadCursorError'
}

/**
 * Decodes a cursor whose parts must match `shapes`, one pattern each; undefined when
 * there is no cursor, `BadCursorError` when it is not one of ours.
 */
export function parse(value: string | undefined, shapes: Shape[]): string[] | undefined {
  if (!value) return undefined
  const parts = Buffer.from(value, 'base64url').toString('utf8').split('\n')
  if (parts.length !== shapes.length || !parts.every((p, i) => shapes[i]!.test(p)))
    throw new BadCursorError('not a cursor of this listing')
  return parts
}

/** What one part of a cursor must be (a RegExp is one). */
export type Shape = { test(part: string): boolean }

/**
 * The first part of a listing's cursors: the listing's name and, for a listing of one
 * account's rows, a digest of the account's id (a key holder is never shown its account's id,
 * and needs none to page). Another listing's or account's cursor has another: a 400, where it
 * was taken as a position in this listing (another account's row id or time).
 */
export function scope(listing: string, owner?: string): string {
  if (owner === undefined) return listing
  const digest = Bun.CryptoHasher.hash('sha256', `${listing}\n${owner}`) as Buffer
  return `${listing}:${digest.subarray(0, 12).toString('base64url')}`
}

/** The shape of a cursor's first part: exactly `scope`. */
export const scoped = (scope: string): Shape => ({ test: (p) => p === scope })

/** Whether year `y`, month `m` (1–12), day `d` is a day of the calendar (JS takes 02-30 as
 * March 2, and years 0–99 as 1900–1999 in `Date.UTC`). */
export function isDay(y: number, m: number, d: number): boolean {
  const day = new Date(0)
  day.setUTCFullYear(y, m - 1, d)
  // PostgreSQL has no year 0 (1 BC comes before 1 AD): a date in it cannot be queried.
  return (
    y >= 1 && day.getUTCFullYear() === y && day.getUTCMonth() === m - 1 && day.getUTCDate() === d
  )
}

const TIMESTAMP =
  /^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(\.\d{1,6})?[+-](\d{2})(:\d{2})?$/

export const shapes = {
  /** A bigint row id (what the database can hold: a larger one is not one of ours). */
  id: { test: (p: string) => /^\d{1,19}$/.test(p) && BigInt(p) <= 2n ** 63n - 1n },
  uuid: /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/,
  /** Postgres' text form of a timestamptz, of a date and time that exist. */
  timestamp: {
    test(p: string) {
      const m = TIMESTAMP.exec(p)
      if (!m) return false
      const [y, mo, d, h, mi, sec, , off, offMin] = m
        .slice(1)
        .map((x) => Number(x?.replace(':', '') ?? 0))
      // PostgreSQL takes zone offsets up to ±15:59.
      return isDay(y!, mo!, d!) && h! < 24 && mi! < 60 && sec! < 60 && off! <= 15 && offMin! < 60
    },
  },
} satisfies Record<string, Shape>

/** Builds a page from `limit + 1` fetched rows. */
export function from<R, T>(
  rows: R[],
  limit: number,
  render: (r: R) => T,
  key: (r: R) => string[],
): Page<T> {
  const more = rows.length > limit
  const data = more ? rows.slice(0, limit) : rows
  const last = data[data.length - 1]
  return {
    object: 'list',
    data: data.map(render),
    has_more: more,
    next_cursor: more && last !== undefined ? cursor(key(last)) : null,
  }
}

/**
 * Newest first over (created_at, id uuid), the key of the usage and account listings: the
 * condition for the rows after `cursor` (none on the first page), and the cursor key of a row
 * that selected `created_at::text as position`. The time stays text both ways: through a JS
 * Date it would lose its microseconds, and rows of one batch (one time) would be skipped.
 * `scope` is the listing's (see `scope`).
 */
export function newestFirst(sql: Sql, cursor: string | undefined, scope: string) {
  const after = parse(cursor, [scoped(scope), shapes.timestamp, shapes.uuid])
  return {
    after: after
      ? sql`(created_at, id) < (${after[1]!}::text::timestamptz, ${after[2]!}::uuid)`
      : undefined,
    key: (r: Record<string, unknown>) => [scope, String(r.position), String(r.id)],
  }
}
