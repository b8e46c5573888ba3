/** Authentication: API keys (Bearer or X-API-Key) and the admin token. */
import { createHash, timingSafeEqual } from 'node:crypto'
import type { Context, MiddlewareHandler } from 'hono'
import { AuthError } from '../../Errors.ts'
import * as ApiKeys from '../../ledger/ApiKeys.ts'
import type { Deps } from '../Deps.ts'

export type KeyVariables = { accountId: string; keyId: string }

/** The raw key of a request: `Authorization: Bearer <key>` or `X-API-Key: <key>`. */
export function rawKey(c: Context): string | undefined {
  const auth = c.req.header('authorization')
  if (auth) {
    const m = /^Bearer\s+(\S+)\s*$/i.exec(auth)
    if (m) return m[1]
  }
  return c.req.header('x-api-key')?.trim() || undefined
}

/** A 401 with the challenge every 401 carries. */
export function unauthorized(message: string, code = 'invalid_api_key'): AuthError {
  return new AuthError(message, code, { headers: { 'www-authenticate': 'Bearer realm="tollway"' } })
}

export function missingKey(): AuthError {
  return unauthorized(
    'No API key: send it as "Authorization: Bearer <key>" or "X-API-Key: <key>".',
    'missing_api_key',
  )
}

export function badKey(): AuthError {
  return unauthorized('The API key is unknown or revoked.')
}

/** Requires an active API key; sets `accountId` and `keyId`. */
export function key(deps: Deps): MiddlewareHandler<{ Variables: KeyVariables }> {
  return async (c, next) => {
    const raw = rawKey(c)
    if (!raw) throw missingKey()
    const found = await ApiKeys.authenticate(deps.sql, raw)
    if (!found) throw badKey()
    c.set('accountId', found.accountId)
    c.set('keyId', found.keyId)
    await next()
  }
}

/** Requires the admin token (compared in constant time). */
export function admin(deps: Deps): MiddlewareHandler {
  const expected = createHash('sha256').update(deps.adminToken).digest()
  return async (c, next) => {
    const m = /^Bearer\s+(\S+)\s*$/i.exec(c.req.header('authorization') ?? '')
    const given = createHash('sha256')
      .update(m?.[1] ?? '')
      .digest()
    if (!m || !timingSafeEqual(given, expected))
      throw unauthorized(
        'This endpoint needs the admin token as "Authorization: Bearer <token>".',
        'invalid_admin_token',
      )
    await next()
  }
}
