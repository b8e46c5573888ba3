/** Cursor pagination: an opaque base64url cursor over a (timestamp, id) or (id) key. */

export type Page<T> = { object: 'list'; data: T[]; has_more: boolean; next_cursor: string | null }

/** Encodes the position after `parts` as an opaque cursor. */
export function cursor(parts: string[]): string {
  return Buffer.from(parts.join('\n')).toString('base64url')
}

/** Decodes a cursor into `n` parts, or returns undefined if it is not one of ours. */
export function parse(value: string | undefined, n: number): string[] | undefined {
  if (!value) return undefined
  const parts = Buffer.from(value, 'base64url').toString('utf8').split('\n')
  return parts.length === n && parts.every((p) => p.length > 0) ? parts : undefined
}

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
