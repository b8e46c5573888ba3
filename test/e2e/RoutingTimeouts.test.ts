/**
 * Routing against an upstream whose timing is exact: the client's timeout_ms against the
 * circuit breakers and the upstream's own timeout, keep-alives before the first token,
 * failover on a 404, what an operator sees of a failover, and the echo model's pauses.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { createServer, type ServerResponse } from 'node:http'
import * as Gateway from '../helpers/Gateway.ts'

/** Requests for a model the upstream does not have. */
let lacking = 0
/** An upstream whose timing is exact (node:http flushes headers before any body byte). */
const server = createServer(async (req, res) => {
  let raw = ''
  for await (const part of req) raw += part
  const body = JSON.parse(raw) as { model: string; stream?: boolean }
  const usage = { prompt_tokens: 5, completion_tokens: 1, total_tokens: 6 }
  const chunk = (delta: object, finish: string | null = null) =>
    `data: ${JSON.stringify({ id: 'c', object: 'chat.completion.chunk', created: 1, model: body.model, choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`
  const end = (r: ServerResponse) => {
    r.write(chunk({}, 'stop'))
    r.write(`data: ${JSON.stringify({ id: 'c', choices: [], usage })}\n\n`)
    r.end('data: [DONE]\n\n')
  }
  const sse = () => {
    res.writeHead(200, { 'content-type': 'text/event-stream' })
    res.flushHeaders()
  }
  const answer = () => {
    if (body.stream) {
      sse()
      res.write(chunk({ role: 'assistant', content: 'ok' }))
      return end(res)
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(
      JSON.stringify({
        id: 'c',
        object: 'chat.completion',
        created: 1,
        model: body.model,
        choices: [
          { index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' },
        ],
        usage,
      }),
    )
  }
  switch (body.model) {
    case 'not-here':
    case 'not-here-either':
      lacking++
      res.writeHead(404, { 'content-type': 'application/json' })
      res.end('{"error":{"message":"The model not-here does not exist","code":"model_not_found"}}')
      return
    case 'slow-ok': // a healthy upstream that takes 150 ms to answer
      await Bun.sleep(150)
      answer()
      return
    case 'pings': // headers and a role chunk at once, keep-alives, the first word at 800 ms
      sse()
      res.write(chunk({ role: 'assistant', content: '' }))
      for (let i = 0; i < 16; i++) {
        await Bun.sleep(50)
        if (res.destroyed) return
        res.write(': keep-alive\n\n')
      }
      res.write(chunk({ content: 'late' }))
      end(res)
      return
    case 'late-headers': // headers at 600 ms, the first chunk 600 ms later (each within 1 s)
      await Bun.sleep(600)
      sse()
      await Bun.sleep(600)
      if (res.destroyed) return
      res.write(chunk({ role: 'assistant', content: 'hi' }))
      end(res)
      return
    case 'hang': // never answers
      await new Promise((resolve) => res.on('close', resolve))
      return
    case 'fail':
      res.writeHead(503, { 'content-type': 'application/json' })
      res.end('{"error":{"message":"overloaded"}}')
      return
    default:
      answer()
  }
})
await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
afterAll(() => void server.close())
const url = `http://127.0.0.1:${(server.address() as { port: number }).port}/v1`

const price = { input: '1000000', output: '2000000' }
const one = (id: string, upstream: string, upstreamModel: string) => ({
  id,
  upstream,
  upstreamModel,
  pricing: price,
  contextLength: 4096,
})
const routed = (id: string, routes: [string, string][]) => ({
  id,
  routes: routes.map(([upstream, upstreamModel]) => ({ upstream, upstreamModel })),
  pricing: price,
  contextLength: 4096,
})
const gw = await Gateway.create({
  upstreams: ['steady', 'pinger', 'lazy', 'gone', 'spare', 'hung', 'other', 'failing'].map(
    (name) => ({ name, baseUrl: url, timeoutMs: 1_000, completionTimeoutMs: 1_000 }),
  ),
  models: [
    one('victim', 'steady', 'slow-ok'),
    one('keepalive', 'pinger', 'pings'),
    one('late', 'lazy', 'late-headers'),
    routed('moved', [
      ['gone', 'not-here'],
      ['spare', 'ok'],
    ]),
    routed('abandoned', [
      ['hung', 'hang'],
      ['other', 'ok'],
    ]),
    routed('flaky', [
      ['failing', 'fail'],
      ['spare', 'ok'],
    ]),
    routed('down-then-missing', [
      ['failing', 'fail'],
      ['gone', 'not-here-either'],
    ]),
  ],
})

const messages = [{ role: 'user', content: 'hello there' }]
function post(key: string, body: Record<string, unknown>, signal?: AbortSignal) {
  return fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    ...(signal ? { signal } : {}),
    headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
    body: JSON.stringify({ messages, ...body }),
  })
}
type Failure = { error: { code: string; message: string } }

describe('timeout_ms', () => {
  test('behavior: a client timeout_ms shorter than a healthy upstream does not open its circuit for every other client', async () => {
    const impatient = await gw.account()
    for (let i = 0; i < 3; i++) {
      const res = await post(impatient.key, { model: 'victim', timeout_ms: 50 })
      expect(res.status).toBe(502)
      expect(((await res.json()) as Failure).error.code).toBe('upstream_timeout')
      // The client's own bound: its SDK is not to send it again by itself.
      expect(res.headers.get('x-should-retry')).toBe('false')
    }
    // The upstream answered every request it was given in 150 ms, well within its 1 s.
    const health = await (await fetch(`${gw.url}/v1/models/victim/health`)).json()
    expect(health).toEqual({ model: 'victim', status: 'ready' })
    const patient = await gw.account()
    expect((await post(patient.key, { model: 'victim' })).status).toBe(200)
  })

  test('behavior: timeout_ms bounds the wait for the first token of an upstream that sends keep-alives', async () => {
    const { id, key } = await gw.account()
    const res = await post(key, { model: 'keepalive', stream: true, timeout_ms: 200 })
    const text = await res.text()
    // The first word comes at 800 ms, four times the client's timeout_ms: no stream begins.
    expect(res.status).toBe(502)
    expect(text).toContain('upstream_timeout')
    expect((await Gateway.ledger(gw.sql, id)).balance).toBe(1_000_000n)
  })

  test('behavior: a generous timeout_ms does not cut a stream the upstream timeout lets through', async () => {
    const { key } = await gw.account()
    const plain = await post(key, { model: 'late', stream: true })
    expect(plain.status).toBe(200)
    expect(await plain.text()).toContain('[DONE]')
    // Ten seconds only shortens the upstream's 1 s: it must not fail what passed without it.
    const generous = await post(key, { model: 'late', stream: true, timeout_ms: 10_000 })
    expect(generous.status).toBe(200)
    expect(await generous.text()).toContain('[DONE]')
  })
})

describe('failover', () => {
  test('behavior: a route whose upstream no longer has its model (404) hands the request to the next', async () => {
    const { key } = await gw.account()
    const before = lacking
    expect((await post(key, { model: 'moved' })).status).toBe(200)
    // Three 404s leave the route out (not the upstream: its circuit stays closed).
    for (let i = 0; i < 5; i++) expect((await post(key, { model: 'moved' })).status).toBe(200)
    expect(lacking - before).toBe(3)
    const metrics = await (
      await fetch(`${gw.url}/metrics`, {
        headers: { authorization: `Bearer ${gw.config.adminToken}` },
      })
    ).text()
    expect(metrics).toContain('tollway_upstream_status{upstream="gone"} 1')
  })

  test('error: a 404 from the last route does not hide the 5xx of the one before: a 502, not a 400 blaming the request', async () => {
    const { key } = await gw.account()
    const before = lacking
    const res = await post(key, { model: 'down-then-missing' })
    expect(lacking - before).toBe(1)
    expect(res.status).toBe(502)
    const { error } = (await res.json()) as { error: { type: string; code: string } }
    expect(error).toMatchObject({ type: 'upstream_error', code: 'upstream_status' })
  })

  test('behavior: clients that leave while a route hangs do not open its circuit', async () => {
    const { key } = await gw.account()
    for (const stream of [false, true, false, true]) {
      const gone = new AbortController()
      setTimeout(() => gone.abort(), 150)
      await post(key, { model: 'abandoned', stream }, gone.signal).then(
        (r) => r.text(),
        () => {},
      )
      await Bun.sleep(20)
    }
    // The hanging upstream only lost its clients: its circuit is closed, so it is still tried
    // first (and the request runs out of its timeout_ms there).
    const res = await post(key, { model: 'abandoned', timeout_ms: 100 })
    expect(res.status).toBe(502)
    expect(((await res.json()) as Failure).error.code).toBe('upstream_timeout')
  })

  test('behavior: a route that fails and is recovered by the next is logged, naming its upstream and the request', async () => {
    const { key } = await gw.account()
    const before = gw.logs.length
    const res = await post(key, { model: 'flaky' })
    expect(res.status).toBe(200)
    const line = gw.logs.slice(before).find((l) => l.includes('route failed'))
    expect(line).toBeDefined()
    // The request's id, as its answer and its completion line carry it: the failure is the
    // request's to an operator reading the log.
    expect(JSON.parse(line!)).toMatchObject({
      request: res.headers.get('x-request-id'),
      model: 'flaky',
      upstream: 'failing',
      code: 'upstream_status',
    })
  })
})

describe('tollway-echo', () => {
  test('behavior: timeout_ms cuts an echo stream that pauses longer than it', async () => {
    const echo = await Gateway.create({ models: [], echo: { tokenDelayMs: 400 } })
    const { key } = await echo.account()
    const res = await fetch(`${echo.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
      body: JSON.stringify({
        model: 'tollway-echo',
        stream: true,
        timeout_ms: 150,
        messages: [{ role: 'user', content: 'one two three' }],
      }),
    })
    const text = await res.text()
    // Every word comes 400 ms after the one before: the first is later than 150 ms.
    expect(text).toContain('upstream_timeout')
    expect(text).not.toContain('one')
  })
})

describe('completionTimeoutMs', () => {
  test('behavior: a whole completion waits its upstream completionTimeoutMs, a stream only timeoutMs for its headers; past it, a 502 upstream_timeout, nothing charged', async () => {
    const thinking = await Gateway.create({
      upstreams: [{ name: 'thinker', baseUrl: url, timeoutMs: 100, completionTimeoutMs: 1_000 }],
      models: [one('thinking', 'thinker', 'slow-ok'), one('stuck', 'thinker', 'hang')],
    })
    const { id, key } = await thinking.account()
    const call = (model: string, stream: boolean) =>
      fetch(`${thinking.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
        body: JSON.stringify({ model, stream, messages }),
      })
    // 150 ms to answer: past timeoutMs, within completionTimeoutMs.
    const whole = await call('thinking', false)
    expect(whole.status).toBe(200)
    const charged = (await Gateway.ledger(thinking.sql, id)).balance
    expect(charged).toBeLessThan(1_000_000n)
    // A stream's headers 150 ms late: cut at timeoutMs.
    const stream = await call('thinking', true)
    expect(stream.status).toBe(502)
    expect(((await stream.json()) as Failure).error.code).toBe('upstream_timeout')
    // Never answered: cut at completionTimeoutMs.
    const at = performance.now()
    const stuck = await call('stuck', false)
    expect(stuck.status).toBe(502)
    expect(((await stuck.json()) as Failure).error.code).toBe('upstream_timeout')
    expect(performance.now() - at).toBeGreaterThanOrEqual(900)
    const l = await Gateway.ledger(thinking.sql, id)
    expect(l.balance).toBe(charged)
    expect(l.reserved).toBe(0n)
  }, 15_000)
})
