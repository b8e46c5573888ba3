/**
 * Small parts of OpenAI's wire format clients rely on: the separate usage chunk repeats the
 * stream's `system_fingerprint` (and `service_tier`), a path with a trailing slash is the same
 * path, and a completion asked for with another method (OPTIONS too) is a 405 naming POST.
 */
import { expect, test } from 'bun:test'
import * as Scripted from '../helpers/Scripted.ts'
import * as Sse from '../helpers/Sse.ts'

const url = Scripted.serve((body) => {
  const model = body.model as string
  if (!body.stream)
    return Response.json(
      Scripted.completion({ role: 'assistant', content: 'hello' }, undefined, model),
    )
  const fingerprinted = (c: object) => ({
    ...c,
    system_fingerprint: 'fp_42',
    service_tier: 'default',
  })
  return Scripted.events([
    fingerprinted(Scripted.chunk({ role: 'assistant', content: 'hello' }, null, model)),
    fingerprinted(Scripted.chunk({}, 'stop', model)),
    {
      ...fingerprinted(Scripted.chunk({}, null, model)),
      choices: [],
      usage: { prompt_tokens: 5, completion_tokens: 1, total_tokens: 6 },
    },
  ])
})
const gw = await Scripted.gateway(url, ['wire'])

test('behavior: the usage chunk of include_usage carries the stream system_fingerprint and service_tier', async () => {
  const { key } = await gw.account()
  const res = await gw.complete(key, {
    model: 'wire',
    stream: true,
    stream_options: { include_usage: true },
    messages: [{ role: 'user', content: 'hi' }],
  })
  const chunks = Sse.json(await res.text())
  const usage = chunks.find((c) => c.usage)!
  expect(usage.choices).toEqual([])
  expect(usage.system_fingerprint).toBe('fp_42')
  expect(usage.service_tier).toBe('default')
})

test('behavior: a trailing slash is the same path', async () => {
  const { key } = await gw.account()
  const res = await fetch(`${gw.url}/v1/chat/completions/`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'wire', messages: [{ role: 'user', content: 'hi' }] }),
  })
  expect(res.status).toBe(200)
  expect(((await res.json()) as { object: string }).object).toBe('chat.completion')
  expect((await fetch(`${gw.url}/v1/models/`)).status).toBe(200)
})

test('error: GET on /v1/chat/completions → 405 with Allow: POST', async () => {
  const { key } = await gw.account()
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    headers: { authorization: `Bearer ${key}` },
  })
  expect(res.status).toBe(405)
  expect(res.headers.get('allow')).toBe('POST')
  const body = (await res.json()) as { error: { type: string; code: string } }
  expect(body.error).toMatchObject({ type: 'invalid_request_error', code: 'method_not_allowed' })
})

test('error: a path asked for with a method it does not take → 405 naming those it takes; an unknown path → 404', async () => {
  const { key } = await gw.account()
  const auth = { authorization: `Bearer ${key}` }
  const credits = await fetch(`${gw.url}/v1/credits`, { method: 'DELETE', headers: auth })
  expect(credits.status).toBe(405)
  expect(credits.headers.get('allow')).toBe('GET, HEAD')
  expect(((await credits.json()) as { error: { code: string } }).error.code).toBe(
    'method_not_allowed',
  )
  const keys = await fetch(`${gw.url}/v1/keys`, { method: 'PUT', headers: auth })
  expect(keys.status).toBe(405)
  expect(keys.headers.get('allow')).toBe('GET, HEAD, POST')
  expect((await fetch(`${gw.url}/health`, { method: 'POST' })).status).toBe(405)
  const unknown = await fetch(`${gw.url}/v1/nothing-here`, { headers: auth })
  expect(unknown.status).toBe(404)
  expect(((await unknown.json()) as { error: { code: string } }).error.code).toBe('route_not_found')
})

test('error: OPTIONS without an Origin names in Allow the methods the path serves: POST on /v1/chat/completions, as its other methods are told', async () => {
  const { key } = await gw.account()
  const auth = { authorization: `Bearer ${key}` }
  for (const [path, allow] of [
    ['/v1/chat/completions', 'POST'],
    ['/v1/chat/completions/', 'POST'],
    ['/v1/models', 'GET, HEAD'],
    ['/v1/keys', 'GET, HEAD, POST'],
    ['/v1/credits', 'GET, HEAD'],
  ] as const) {
    for (const method of ['OPTIONS', 'PUT']) {
      const res = await fetch(`${gw.url}${path}`, { method, headers: auth })
      expect(res.status).toBe(405)
      expect(res.headers.get('allow')).toBe(allow)
      expect(((await res.json()) as { error: { code: string } }).error.code).toBe(
        'method_not_allowed',
      )
    }
  }
})
