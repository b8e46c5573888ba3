/** Parsing of request bodies and parameters into typed values or typed 400s. */
import type { Context } from 'hono'
import type { z } from 'zod'
import { InvalidRequestError, NotFoundError } from '../Errors.ts'
import { BadCursorError, isDay } from '../ledger/Page.ts'

/**
 * How deep a body's JSON may nest. Far beyond any real request (a tool's parameter schema is
 * a dozen levels), and far below where serializing it again for the upstream would overflow
 * the stack: a body 50,000 levels deep is 120 KB, under the size limit.
 */
export const MAX_DEPTH = 128

/**
 * The body length a Content-Length header declares. Sent more than once, the header reaches
 * here as a list ("10, 10"; RFC 9110 lets a server take identical values as one), which
 * `Number` reads as NaN, and NaN is over no limit: a list is taken at its largest value, and a
 * value that is not a length is refused.
 */
export function declared(length: string): number {
  let most = 0
  for (const part of length.split(',')) {
    const value = part.trim()
    if (!/^\d+$/.test(value))
      throw new InvalidRequestError(
        `Content-Length is not a length: "${length.slice(0, 40)}".`,
        'invalid_content_length',
      )
    most = Math.max(most, Number(value))
  }
  return most
}

/**
 * Parses JSON text; a 400 `invalid_json` if it is not JSON or nests deeper than MAX_DEPTH.
 * A number in a field named in `literal` (at any depth) is kept as the text it was written as:
 * a double rounds it (`1.0000000000000001` reads as 1, `9007199254740993` as 9007199254740992),
 * so the schema sees what was sent and can take it exactly, or refuse it.
 */
export function json(text: string, literal?: ReadonlySet<string>): unknown {
  let value: unknown
  try {
    value = literal
      ? JSON.parse(text, (key, v: unknown, context?: { source?: string }) =>
          typeof v === 'number' && literal.has(key) ? (context?.source ?? v) : v,
        )
      : JSON.parse(text)
  } catch {
    throw new InvalidRequestError('The request body is not valid JSON.', 'invalid_json')
  }
  // Nesting MAX_DEPTH deep takes at least that many brackets: short bodies need no walk.
  if (text.length > MAX_DEPTH && deeper(value, MAX_DEPTH))
    throw new InvalidRequestError(
      `The request body nests deeper than ${MAX_DEPTH} levels.`,
      'invalid_json',
    )
  return value
}

/** Whether `value` nests arrays and objects more than `max` deep (without recursion). */
export function deeper(value: unknown, max: number): boolean {
  const stack: [unknown, number][] = [[value, 0]]
  while (stack.length > 0) {
    const [v, d] = stack.pop()!
    if (typeof v !== 'object' || v === null) continue
    if (d >= max) return true
    for (const child of Array.isArray(v) ? v : Object.values(v)) stack.push([child, d + 1])
  }
  return false
}

/** Validates `value` with `schema`; a 400 naming the first bad field otherwise. */
export function parse<S extends z.ZodType>(schema: S, value: unknown): z.output<S> {
  const r = schema.safeParse(value)
  if (r.success) return r.data
  const issue = r.error.issues[0]!
  // A field a strict object does not take: named itself (its object's path is its parent's).
  if (issue.code === 'unrecognized_keys') {
    const param = [...issue.path, issue.keys[0]!].map(String).join('.')
    throw new InvalidRequestError(`${param}: unknown field; leave it out.`, 'unknown_parameter', {
      param,
    })
  }
  const param = issue.path.map(String).join('.')
  throw new InvalidRequestError(
    param ? `${param}: ${issue.message}` : issue.message,
    'invalid_value',
    {
      ...(param ? { param } : {}),
    },
  )
}

/** Reads and validates a JSON body (`literal`: see `json`). */
export async function body<S extends z.ZodType>(
  c: Context,
  schema: S,
  literal?: ReadonlySet<string>,
): Promise<z.output<S>> {
  return parse(schema, json(await c.req.text(), literal))
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/**
 * A path id that must be a UUID: anything else cannot exist, so it is a 404. Returned in its
 * canonical (lower-case) form, the one the database answers with: the scope of a listing's
 * cursors is a digest of the account's id as given (Page.scope), and the operator's
 * `/admin/accounts/{ID}/usage` must hand out the cursors `/v1/usage` of the same account takes.
 */
export function id(value: string, what: string): string {
  if (!UUID.test(value))
    throw new NotFoundError(`No ${what} with id "${value.slice(0, 64)}".`, `${what}_not_found`)
  return value.toLowerCase()
}

/** Runs a listing, turning a foreign cursor into a 400. */
export async function listing<T>(run: () => Promise<T>): Promise<T> {
  try {
    return await run()
  } catch (e) {
    if (e instanceof BadCursorError)
      throw new InvalidRequestError('cursor is not one this listing returned.', 'invalid_value', {
        param: 'cursor',
      })
    throw e
  }
}

/** `?limit=&cursor=` of a listing. */
export function page(c: Context): { limit: number; cursor?: string } {
  const raw = c.req.query('limit')
  // Decimal digits only: `Number` also reads `1e2`, `0x10`, `+5`, ` 5` and `5.0`.
  const limit = raw === undefined ? 50 : /^\d{1,3}$/.test(raw) ? Number(raw) : Number.NaN
  if (!Number.isInteger(limit) || limit < 1 || limit > 200)
    throw new InvalidRequestError('limit must be an integer from 1 to 200.', 'invalid_value', {
      param: 'limit',
    })
  const cursor = c.req.query('cursor')
  return cursor ? { limit, cursor } : { limit }
}

const ISO_TIME = /^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2}))?$/

/**
 * `?model=&key_id=&from=&to=` of the usage listing: `from` (inclusive) and `to` (exclusive)
 * are ISO 8601 dates (UTC midnight) or date-times with a zone (`Z` or an offset).
 */
export function usageFilter(c: Context): {
  model?: string
  keyId?: string
  from?: string
  to?: string
} {
  const out: { model?: string; keyId?: string; from?: string; to?: string } = {}
  const model = c.req.query('model')
  if (model !== undefined) {
    if (model.length === 0 || model.length > 256 || model.includes('\0'))
      throw new InvalidRequestError(
        'model must be a model id (1 to 256 characters).',
        'invalid_value',
        {
          param: 'model',
        },
      )
    out.model = model
  }
  const keyId = c.req.query('key_id')
  if (keyId !== undefined) {
    if (!UUID.test(keyId))
      throw new InvalidRequestError('key_id must be the id of a key (a UUID).', 'invalid_value', {
        param: 'key_id',
      })
    out.keyId = keyId
  }
  for (const param of ['from', 'to'] as const) {
    const raw = c.req.query(param)
    if (raw === undefined) continue
    const ms =
      ISO_TIME.test(raw) &&
      isDay(...(raw.slice(0, 10).split('-').map(Number) as [number, number, number]))
        ? Date.parse(raw)
        : Number.NaN
    // In UTC, a year PostgreSQL reads back too: 9999-12-31T23:59-23:59 is in year 10000, and
    // 0001-01-01T00:00+00:01 in year 0 (there is none: 1 BC comes before 1 AD).
    const year = new Date(ms).getUTCFullYear()
    if (Number.isNaN(ms) || year < 1 || year > 9999)
      throw new InvalidRequestError(
        `${param} must be an ISO 8601 date (2026-11-01) or date-time with a zone (2026-11-01T12:00:00Z).`,
        'invalid_value',
        { param },
      )
    out[param] = new Date(ms).toISOString()
  }
  return out
}
