/**
 * Browsers (CORS): a page may call the API with its key in a header (the default allows any
 * origin: keys travel as headers, never as cookies), read the headers clients need, on
 * answers and on errors alike; `corsOrigins` narrows the origins, `[]` turns it off.
 */
import { describe, expect, test } from 'bun:test'
import * as Config from '../../src/Config.ts'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()
const { key } = await gw.account()
const page = 'https://app.example'

const preflight = (url: string, origin = page) =>
  fetch(url, {
    method: 'OPTIONS',
    headers: {
      origin,
      'access-control-request-method': 'POST',
      'access-control-request-headers': 'authorization, content-type, idempotency-key',
    },
  })
const chat = (url: string, headers: Record<string, string>, stream = false) =>
  fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: JSON.stringify({ model: 'fake', stream, messages: [{ role: 'user', content: 'hi' }] }),
  })

describe('any origin (the default)', () => {
  test('behavior: a preflight is answered 204 with the methods and the headers asked for', async () => {
    const res = await preflight(`${gw.url}/v1/chat/completions`)
    expect(res.status).toBe(204)
    expect(res.headers.get('access-control-allow-origin')).toBe('*')
    expect(res.headers.get('access-control-allow-methods')).toContain('POST')
    expect(res.headers.get('access-control-allow-headers')).toContain('authorization')
    expect(res.headers.get('access-control-allow-headers')).toContain('idempotency-key')
  })

  test('behavior: a preflight allows every method the gateway serves: PATCH of an account, a voucher sent by PUT, PATCH or DELETE', async () => {
    for (const [path, method] of [
      ['/admin/accounts/0193', 'PATCH'],
      ['/v1/chat/completions', 'PUT'],
      ['/v1/chat/completions', 'PATCH'],
      ['/v1/keys/0193', 'DELETE'],
    ] as const) {
      const res = await fetch(`${gw.url}${path}`, {
        method: 'OPTIONS',
        headers: { origin: page, 'access-control-request-method': method },
      })
      expect(res.status).toBe(204)
      const allowed = (res.headers.get('access-control-allow-methods') ?? '').split(',')
      expect(allowed).toContain(method)
    }
  })

  test('behavior: answers, streamed or whole, and errors carry the origin and expose the headers clients read', async () => {
    for (const stream of [false, true]) {
      const res = await chat(gw.url, { origin: page, authorization: `Bearer ${key}` }, stream)
      expect(res.status).toBe(200)
      await res.text()
      expect(res.headers.get('access-control-allow-origin')).toBe('*')
      const exposed = res.headers.get('access-control-expose-headers') ?? ''
      for (const h of ['x-request-id', 'retry-after-ms', 'x-ratelimit-remaining-requests'])
        expect(exposed).toContain(h)
    }
    // A 401 a page must be able to read (its key is wrong), and a 404.
    for (const res of [
      await chat(gw.url, { origin: page, authorization: 'Bearer tw_wrong' }),
      await fetch(`${gw.url}/v1/nowhere`, { headers: { origin: page } }),
    ]) {
      expect(res.status).toBeGreaterThanOrEqual(400)
      expect(res.headers.get('access-control-allow-origin')).toBe('*')
      await res.text()
    }
  })

  test('behavior: a request without an Origin (a server, curl) gets no CORS headers', async () => {
    const res = await chat(gw.url, { authorization: `Bearer ${key}` })
    expect(res.status).toBe(200)
    await res.text()
    expect(res.headers.get('access-control-allow-origin')).toBeNull()
  })
})

describe('configured origins', () => {
  test('behavior: a listed origin is allowed by name; another gets no CORS headers; [] turns CORS off', async () => {
    const listed = await Gateway.create(
      { corsOrigins: [page] },
      { db: gw.db, upstream: gw.upstream },
    )
    const ok = await preflight(`${listed.url}/v1/chat/completions`)
    expect(ok.status).toBe(204)
    expect(ok.headers.get('access-control-allow-origin')).toBe(page)
    const other = await preflight(`${listed.url}/v1/chat/completions`, 'https://evil.example')
    expect(other.headers.get('access-control-allow-origin')).toBeNull()
    const off = await Gateway.create({ corsOrigins: [] }, { db: gw.db, upstream: gw.upstream })
    const none = await preflight(`${off.url}/v1/chat/completions`)
    expect(none.headers.get('access-control-allow-origin')).toBeNull()
  })

  test('error: an origin with a path, or not an origin, stops the start naming corsOrigins; CORS_ORIGINS takes a list or none', () => {
    expect(() => Config.from({ corsOrigins: ['https://app.example/path'] })).toThrow(/corsOrigins/)
    expect(() => Config.from({ corsOrigins: ['app.example'] })).toThrow(/corsOrigins/)
    const listed = Config.load({ CORS_ORIGINS: 'https://a.example, https://b.example' })
    expect(listed.corsOrigins).toEqual(['https://a.example', 'https://b.example'])
    expect(Config.load({ CORS_ORIGINS: 'none' }).corsOrigins).toEqual([])
    expect(Config.load({}).corsOrigins).toEqual(['*'])
  })
})
