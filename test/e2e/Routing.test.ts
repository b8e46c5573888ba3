/**
 * Models served by several upstreams (`routes`): failover before the first token, the
 * routing strategies, the client's `timeout_ms` and price ceilings.
 */
import { describe, expect, setSystemTime, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'
import * as Upstream from '../helpers/Upstream.ts'

const fake = Upstream.start({ slowMs: 40 })
// A port nothing listens on: an upstream that cannot be reached.
const closed = Bun.serve({ port: 0, fetch: () => new Response() })
const nowhere = `http://127.0.0.1:${closed.port}/v1`
closed.stop(true)

const price = { input: '1000000', output: '2000000' }
/** Upstreams by name; each has its own circuit breaker. */
const upstreams = [
  ['primary', fake.url],
  ['backup', fake.url],
  ['slow', fake.url],
  ['hang', fake.url],
  ['flaky', fake.url],
  ['rejecting', fake.url],
  ['limited', fake.url],
  ['limited-b', fake.url],
  ['down-a', nowhere],
  ['down-b', nowhere],
  ['down-c', nowhere],
  ['down-own', nowhere],
  ['down-mine', nowhere],
  ['down-theirs', nowhere],
  ['limited-mine', fake.url],
  ['limited-theirs', fake.url],
].map(([name, baseUrl]) => ({
  name: name!,
  baseUrl: baseUrl!,
  timeoutMs: 1_000,
  completionTimeoutMs: 1_000,
}))

const route = (upstream: string, upstreamModel: string, cost?: number) => ({
  upstream,
  upstreamModel,
  ...(cost === undefined ? {} : { cost: { input: cost, output: cost } }),
})
/** A route through an outside aggregator. */
const external = (upstream: string, upstreamModel: string) => ({
  ...route(upstream, upstreamModel),
  external: true,
})
/** A model whose routes are tried in the order listed (the default), unless `routing` says
 * otherwise. */
const model = (
  id: string,
  routes: (ReturnType<typeof route> | ReturnType<typeof external>)[],
  routing?: string,
) => ({
  id,
  routes,
  pricing: price,
  contextLength: 4096,
  ...(routing === undefined ? {} : { routing }),
})

const gw = await Gateway.create({
  upstreams,
  models: [
    model('failover', [route('down-a', 'a'), route('primary', 'fake-primary')]),
    model('rejected', [route('rejecting', 'fake-400'), route('backup', 'fake-after-400')]),
    model('all-down', [route('down-b', 'b'), route('down-c', 'c')]),
    model('circuit', [route('flaky', 'fake-500'), route('backup', 'fake-after-flaky')]),
    model('rate-limited', [route('limited', 'fake-429'), route('backup', 'fake-after-429')]),
    model('limited-only', [route('limited-b', 'fake-429')]),
    model('with-external', [external('primary', 'fake-outside'), route('backup', 'fake-own')]),
    model('only-external', [external('primary', 'fake-outside-only')]),
    model('external-cheapest', [external('primary', 'fake-outside-cheap')], 'cheapest'),
    model('own-down', [route('down-own', 'own'), external('primary', 'fake-outside-up')]),
    // Both routes down (or rate limiting), each alone to its model beside: their circuits open
    // (their waits begin) at different times.
    model('theirs-down', [external('down-theirs', 'theirs')]),
    model('both-down', [route('down-mine', 'mine'), external('down-theirs', 'theirs')], 'cheapest'),
    model('theirs-limited', [external('limited-theirs', 'fake-429')]),
    model(
      'both-limited',
      [route('limited-mine', 'fake-429'), external('limited-theirs', 'fake-429')],
      'cheapest',
    ),
    model(
      'by-cost',
      [route('primary', 'fake-dear', 5_000_000), route('backup', 'fake-cheap', 10)],
      'balanced',
    ),
    model(
      'spread',
      [route('primary', 'fake-spread-a'), route('backup', 'fake-spread-b')],
      'balanced',
    ),
    model(
      'cheap-default',
      [route('primary', 'fake-dear-2', 5_000_000), route('backup', 'fake-cheap-2', 10)],
      'cheapest',
    ),
    model('by-speed', [route('slow', 'fake-slow'), route('primary', 'fake-quick')]),
    model('hanging', [route('hang', 'fake-hang'), route('backup', 'fake-after-hang')]),
    model('stalling', [route('backup', 'fake-stall')]),
    {
      id: 'single',
      upstream: 'primary',
      upstreamModel: 'fake',
      pricing: price,
      contextLength: 4096,
    },
  ],
})

const messages = [{ role: 'user' as const, content: 'route me somewhere good' }]

function post(key: string, body: Record<string, unknown>) {
  return fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
    body: JSON.stringify({ messages, ...body }),
  })
}

/** The upstream model names the fake was asked for since `from` (an index into `received`). */
const asked = (from: number) => fake.received.slice(from).map((r) => r.model)

type Failure = { error: { type: string; code: string; message: string; param?: string } }

describe('routes: failover before the first token', () => {
  test('behavior: an upstream that cannot be reached hands the request to the next route, charged once', async () => {
    const { id, key } = await gw.account()
    const from = fake.received.length
    const { data: r, response } = await gw
      .openai(key)
      .chat.completions.create({ model: 'failover', messages })
      .withResponse()
    expect(r.choices[0]!.message.content).toBe(messages[0]!.content)
    expect(response.headers.get('x-tollway-upstream')).toBe('primary')
    expect(r.model).toBe('failover')
    expect(asked(from)).toEqual(['fake-primary'])
    const l = await Gateway.ledger(gw.sql, id)
    const cost = BigInt(r.usage!.prompt_tokens + 2 * r.usage!.completion_tokens)
    expect(l.balance).toBe(1_000_000n - cost)
    expect(l.reserved).toBe(0n)
    const [u] = await gw.sql`select count(*)::int as n from usage where account_id = ${id}`
    expect(u!.n).toBe(1)
  })

  test('behavior: a stream whose first upstream answers 500 streams from the next', async () => {
    const { key } = await gw.account()
    const from = fake.received.length
    const { data: stream, response } = await gw
      .openai(key)
      .chat.completions.create({
        model: 'circuit',
        messages,
        stream: true,
      })
      .withResponse()
    let text = ''
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? ''
    expect(text).toBe(messages[0]!.content)
    expect(asked(from)).toEqual(['fake-500', 'fake-after-flaky'])
    // The client is told which upstream served it.
    expect(response.headers.get('x-tollway-upstream')).toBe('backup')
  })

  test('behavior: an upstream whose circuit opened is skipped, not tried first every time', async () => {
    const { key } = await gw.account()
    // Three failures open the circuit (the stream above was one).
    for (let i = 0; i < 3; i++) expect((await post(key, { model: 'circuit' })).status).toBe(200)
    const from = fake.received.length
    expect((await post(key, { model: 'circuit' })).status).toBe(200)
    expect(asked(from)).toEqual(['fake-after-flaky'])
    // The model stays ready while one of its upstreams is.
    const health = await (await fetch(`${gw.url}/v1/models/circuit/health`)).json()
    expect(health).toEqual({ model: 'circuit', status: 'ready' })
  })

  test('error: an upstream that rejects the request itself (400) ends it; the next is not tried', async () => {
    const { id, key } = await gw.account()
    const from = fake.received.length
    const res = await post(key, { model: 'rejected' })
    expect(res.status).toBe(400)
    expect(((await res.json()) as Failure).error.code).toBe('upstream_rejected')
    expect(asked(from)).toEqual(['fake-400'])
    expect((await Gateway.ledger(gw.sql, id)).balance).toBe(1_000_000n)
  })

  test('behavior: an upstream that answers 429 hands the request to the next route and is skipped for the wait it asked for, with no mark against its health', async () => {
    const { key } = await gw.account()
    let from = fake.received.length
    expect((await post(key, { model: 'rate-limited' })).status).toBe(200)
    expect(asked(from)).toEqual(['fake-429', 'fake-after-429'])
    // Within its wait (300 ms, its retry-after-ms) the route is not called.
    from = fake.received.length
    expect((await post(key, { model: 'rate-limited', stream: true })).status).toBe(200)
    expect(asked(from)).toEqual(['fake-after-429'])
    // After it, it is tried again, however often it said 429: no circuit opens.
    for (let i = 0; i < 4; i++) {
      await Bun.sleep(320)
      from = fake.received.length
      expect((await post(key, { model: 'rate-limited' })).status).toBe(200)
      expect(asked(from)).toEqual(['fake-429', 'fake-after-429'])
    }
    const health = await (await fetch(`${gw.url}/v1/models/limited-only/health`)).json()
    expect(health).toEqual({ model: 'limited-only', status: 'ready' })
    // Counted apart: five 429s, no failure against its health.
    const metrics = await (
      await fetch(`${gw.url}/metrics`, {
        headers: { authorization: `Bearer ${gw.config.adminToken}` },
      })
    ).text()
    expect(metrics).toContain(
      'tollway_upstream_calls_total{upstream="limited",outcome="rate_limited"} 5',
    )
    expect(metrics).toContain('tollway_upstream_calls_total{upstream="limited",outcome="failed"} 0')
    expect(metrics).toContain('tollway_upstream_status{upstream="limited"} 1')
  })

  test('error: every route rate limiting the gateway is a 503 upstream_rate_limited with the wait it asked for, nothing charged; within the wait nothing is held or sent upstream', async () => {
    const { id, key } = await gw.account()
    await Bun.sleep(320) // any wait an earlier test left has passed
    let from = fake.received.length
    for (const stream of [false, true]) {
      const res = await post(key, { model: 'limited-only', stream })
      expect(res.status).toBe(503)
      const { error } = (await res.json()) as Failure
      expect(error.type).toBe('no_upstream_available')
      expect(error.code).toBe('upstream_rate_limited')
      expect(res.headers.get('retry-after')).toBe('1')
      const ms = Number(res.headers.get('retry-after-ms'))
      expect(ms).toBeGreaterThan(0)
      expect(ms).toBeLessThanOrEqual(300)
    }
    // The first was sent and refused upstream; the second waited out its Retry-After.
    expect(asked(from)).toEqual(['fake-429'])
    const l = await Gateway.ledger(gw.sql, id)
    expect(l.balance).toBe(1_000_000n)
    expect(l.reserved).toBe(0n)
    // Refused before admission: no usage row for it.
    const [u] = await gw.sql`select count(*)::int as n from usage where account_id = ${id}`
    expect(u!.n).toBe(1)
    await Bun.sleep(320)
    from = fake.received.length
    expect((await post(key, { model: 'limited-only' })).status).toBe(503)
    expect(asked(from)).toEqual(['fake-429'])
  })

  test('error: every route failing is a 502 naming each upstream tried, nothing charged', async () => {
    const { id, key } = await gw.account()
    for (const stream of [false, true]) {
      const res = await post(key, { model: 'all-down', stream })
      expect(res.status).toBe(502)
      const { error } = (await res.json()) as Failure
      expect(error.type).toBe('upstream_error')
      expect(error.code).toBe('upstream_unreachable')
      expect(error.message).toContain('(down-b, down-c)')
    }
    const l = await Gateway.ledger(gw.sql, id)
    expect(l.balance).toBe(1_000_000n)
    expect(l.reserved).toBe(0n)
  })
})

describe('routing_strategy', () => {
  test('behavior: balanced spreads requests evenly over routes that cost the same; without a routing the operator order holds', async () => {
    const { key } = await gw.account()
    const from = fake.received.length
    for (let i = 0; i < 40; i++) expect((await post(key, { model: 'spread' })).status).toBe(200)
    const order = asked(from)
    const a = order.filter((m) => m === 'fake-spread-a').length
    expect(order).toHaveLength(40)
    // Evenly at random: fewer than 6 of 40 on either is a chance of about 1 in 700,000.
    expect(a).toBeGreaterThanOrEqual(6)
    expect(a).toBeLessThanOrEqual(34)
    // A model without a routing (a primary and its backup, as configs before balanced spread
    // requests meant): every request to the first listed.
    const ordered = fake.received.length
    for (let i = 0; i < 10; i++) expect((await post(key, { model: 'by-speed' })).status).toBe(200)
    expect(new Set(asked(ordered))).toEqual(new Set(['fake-slow']))
  })

  test('behavior: balanced weighs routes by the inverse square of their cost; ordered keeps the operator order; cheapest takes the cheaper upstream', async () => {
    const { key } = await gw.account()
    let from = fake.received.length
    // Its routing, balanced: 500,000 times cheaper is first but for a chance of 1 in
    // 2.5 * 10^11 each.
    expect((await post(key, { model: 'by-cost' })).status).toBe(200)
    expect((await post(key, { model: 'by-cost', routing_strategy: 'balanced' })).status).toBe(200)
    expect(asked(from)).toEqual(['fake-cheap', 'fake-cheap'])
    from = fake.received.length
    expect((await post(key, { model: 'by-cost', routing_strategy: 'ordered' })).status).toBe(200)
    expect(asked(from)).toEqual(['fake-dear'])
    from = fake.received.length
    const r = await post(key, { model: 'by-cost', routing_strategy: 'cheapest' })
    expect(r.status).toBe(200)
    expect(asked(from)).toEqual(['fake-cheap'])
    // The client pays the model's price whichever upstream served it.
    const body = (await r.json()) as {
      usage: { prompt_tokens: number; completion_tokens: number; cost: string }
    }
    expect(body.usage.cost).toBe(
      String(body.usage.prompt_tokens + 2 * body.usage.completion_tokens),
    )
  })

  test('behavior: a model configured with routing cheapest takes the cheaper route unless the request names a strategy', async () => {
    const { key } = await gw.account()
    const from = fake.received.length
    expect((await post(key, { model: 'cheap-default' })).status).toBe(200)
    expect((await post(key, { model: 'cheap-default', routing_strategy: 'ordered' })).status).toBe(
      200,
    )
    expect(asked(from)).toEqual(['fake-cheap-2', 'fake-dear-2'])
  })

  test('behavior: fastest moves to the upstream that answered sooner once both are timed', async () => {
    const { key } = await gw.account()
    const from = fake.received.length
    // Streams: the slow upstream waits before each word, the first one too.
    const streamed = async (body: Record<string, unknown>) => {
      const res = await post(key, { model: 'by-speed', stream: true, ...body })
      expect(res.status).toBe(200)
      expect(await res.text()).toContain('[DONE]')
    }
    for (let i = 0; i < 4; i++) await streamed({ routing_strategy: 'fastest' })
    const order = asked(from)
    // Untimed upstreams go first, so each is timed once; then the quick one wins every time.
    expect(order.slice(2)).toEqual(['fake-quick', 'fake-quick'])
    expect(order.slice(0, 2).toSorted()).toEqual(['fake-quick', 'fake-slow'])
    // The model's own routing (ordered here) still goes to the slow one, listed first.
    const again = fake.received.length
    await streamed({})
    expect(asked(again)).toEqual(['fake-slow'])
  })

  test('error: an unknown routing_strategy is a 400 naming it', async () => {
    const { key } = await gw.account()
    const res = await post(key, { model: 'single', routing_strategy: 'random' })
    expect(res.status).toBe(400)
    const { error } = (await res.json()) as Failure
    expect(error.param).toBe('routing_strategy')
    expect(error.message).toContain('balanced, fastest, cheapest')
  })
})

describe('timeout_ms', () => {
  test('behavior: it cuts an upstream that does not answer sooner than its own timeout, and bounds every route tried', async () => {
    const { id, key } = await gw.account()
    // The upstream's own timeout (1 s) would let the next route answer...
    const from = fake.received.length
    expect((await post(key, { model: 'hanging' })).status).toBe(200)
    expect(asked(from)).toEqual(['fake-hang', 'fake-after-hang'])
    // ...the client's 150 ms is over by then, for the first route and the request.
    for (const stream of [false, true]) {
      const started = performance.now()
      const res = await post(key, { model: 'hanging', stream, timeout_ms: 150 })
      const took = performance.now() - started
      expect(res.status).toBe(502)
      expect(((await res.json()) as Failure).error.code).toBe('upstream_timeout')
      expect(took).toBeLessThan(900)
    }
    expect((await Gateway.ledger(gw.sql, id)).reserved).toBe(0n)
  })

  test('behavior: it bounds the pauses of a stream that has begun (an error event, charged for what was sent)', async () => {
    const { id, key } = await gw.account()
    const started = performance.now()
    const res = await post(key, { model: 'stalling', stream: true, timeout_ms: 150 })
    expect(res.status).toBe(200)
    const text = await res.text()
    expect(performance.now() - started).toBeLessThan(900)
    expect(text).toContain('upstream_timeout')
    const l = await Gateway.ledger(gw.sql, id)
    expect(l.balance).toBeLessThan(1_000_000n)
    expect(l.reserved).toBe(0n)
  })

  test('error: timeout_ms that is not a positive whole number of ms is a 400 naming it', async () => {
    const { key } = await gw.account()
    for (const bad of [0, -5, 1.5, '100', 3_600_001]) {
      const res = await post(key, { model: 'single', timeout_ms: bad })
      expect(res.status).toBe(400)
      expect(((await res.json()) as Failure).error.param).toBe('timeout_ms')
    }
  })
})

describe('allow_external', () => {
  test('behavior: external routes are tried unless allow_external is false; by default not for cheapest', async () => {
    const { key } = await gw.account()
    const first = async (body: Record<string, unknown>) => {
      const from = fake.received.length
      const res = await post(key, { model: 'with-external', routing_strategy: 'ordered', ...body })
      expect(res.status).toBe(200)
      return asked(from)[0]
    }
    expect(await first({})).toBe('fake-outside')
    expect(await first({ allow_external: true })).toBe('fake-outside')
    expect(await first({ allow_external: false })).toBe('fake-own')
    // cheapest leaves them out unless asked (the two cost the same here: the operator's order
    // would put the external one first).
    expect(await first({ routing_strategy: 'cheapest' })).toBe('fake-own')
    expect(await first({ routing_strategy: 'cheapest', allow_external: true })).toBe('fake-outside')
  })

  test('error: allow_external false on a model served only externally, or not a boolean, is a 400 naming it, nothing charged or sent', async () => {
    const { id, key } = await gw.account()
    const from = fake.received.length
    const none = await post(key, { model: 'only-external', allow_external: false })
    expect(none.status).toBe(400)
    const { error } = (await none.json()) as Failure
    expect(error.code).toBe('no_route_allowed')
    expect(error.param).toBe('allow_external')
    const bad = await post(key, { model: 'with-external', allow_external: 'no' })
    expect(bad.status).toBe(400)
    expect(((await bad.json()) as Failure).error.param).toBe('allow_external')
    expect(fake.received.length).toBe(from)
    expect((await Gateway.ledger(gw.sql, id)).balance).toBe(1_000_000n)
  })
})

describe('no route left', () => {
  test('error: cheapest on a model served only externally is a 400 no_route_allowed (cheapest leaves external routes out unless allow_external is true), not a 503 to retry forever; nothing held or sent', async () => {
    const { id, key } = await gw.account()
    const from = fake.received.length
    for (const body of [
      { model: 'external-cheapest' },
      { model: 'only-external', routing_strategy: 'cheapest' },
    ]) {
      const res = await post(key, body)
      expect(res.status).toBe(400)
      const { error } = (await res.json()) as Failure
      expect(error.code).toBe('no_route_allowed')
      expect(error.param).toBe('allow_external')
      expect(error.message).toContain('cheapest')
    }
    expect(fake.received.length).toBe(from)
    const [u] = await gw.sql`select count(*)::int as n from usage where account_id = ${id}`
    expect(u!.n).toBe(0)
    // Allowed, it is served.
    const ok = await post(key, { model: 'external-cheapest', allow_external: true })
    expect(ok.status).toBe(200)
    expect(asked(from)).toEqual(['fake-outside-cheap'])
  })

  test('error: the only route allow_external false leaves, its circuit open, is a 503 no_upstream_available with the wait until its probe, refused before anything is held', async () => {
    const { id, key } = await gw.account()
    // Three failures open its circuit (each a 502: the route cannot be reached).
    for (let i = 0; i < 3; i++)
      expect((await post(key, { model: 'own-down', allow_external: false })).status).toBe(502)
    const [before] = await gw.sql`select count(*)::int as n from usage where account_id = ${id}`
    const from = fake.received.length
    const res = await post(key, { model: 'own-down', allow_external: false })
    expect(res.status).toBe(503)
    expect(((await res.json()) as Failure).error.code).toBe('no_upstream_available')
    // The cool-down is 30 s: its wait, not a second.
    const retry = Number(res.headers.get('retry-after'))
    expect(retry).toBeGreaterThan(20)
    expect(retry).toBeLessThanOrEqual(30)
    expect(fake.received.length).toBe(from)
    const [after] = await gw.sql`select count(*)::int as n from usage where account_id = ${id}`
    expect(after!.n).toBe(before!.n)
    expect((await Gateway.ledger(gw.sql, id)).reserved).toBe(0n)
    // The external route still serves a request that allows it.
    expect((await post(key, { model: 'own-down' })).status).toBe(200)
    expect(asked(from)).toEqual(['fake-outside-up'])
  })
})

describe('waits of the routes a request may use', () => {
  test('error: every route down, a request that leaves the external one out is told the wait of its own route, not of the external one that probes sooner', async () => {
    const { key } = await gw.account()
    // The clock stands still (the circuits read Date.now): the external route's circuit opens
    // 10 s before the own route's.
    const t0 = Date.now()
    setSystemTime(new Date(t0))
    try {
      for (let i = 0; i < 3; i++)
        expect((await post(key, { model: 'theirs-down' })).status).toBe(502)
      setSystemTime(new Date(t0 + 10_000))
      for (let i = 0; i < 3; i++) expect((await post(key, { model: 'both-down' })).status).toBe(502)
      const waits = async (body: Record<string, unknown>) => {
        const res = await post(key, { model: 'both-down', ...body })
        expect(res.status).toBe(503)
        expect(((await res.json()) as Failure).error.code).toBe('no_upstream_available')
        return res.headers.get('retry-after')
      }
      // cheapest (the model's) leaves the external route out, as allow_external false does:
      // its own route probes in 30 s.
      expect(await waits({})).toBe('30')
      expect(await waits({ routing_strategy: 'ordered', allow_external: false })).toBe('30')
      // Allowed, the external route probes first, in 20 s.
      expect(await waits({ allow_external: true })).toBe('20')
    } finally {
      setSystemTime()
    }
  }, 20_000)

  test('error: a route that answers 429 tells a request that leaves the external one out its own wait, not the shorter wait of the external one', async () => {
    const { key } = await gw.account()
    const t0 = Date.now()
    setSystemTime(new Date(t0))
    try {
      // The external route waits out its 429 (300 ms) from t0.
      expect((await post(key, { model: 'theirs-limited' })).status).toBe(503)
      setSystemTime(new Date(t0 + 200))
      const waits = async () => {
        const res = await post(key, { model: 'both-limited' })
        expect(res.status).toBe(503)
        expect(((await res.json()) as Failure).error.code).toBe('upstream_rate_limited')
        return res.headers.get('retry-after-ms')
      }
      // The own route answers 429: its wait, 300 ms (the external one's ends in 100 ms, and
      // the request could not use it then either).
      const from = fake.received.length
      expect(await waits()).toBe('300')
      expect(asked(from)).toEqual(['fake-429'])
      // Refused before it is sent, the same wait.
      expect(await waits()).toBe('300')
      expect(asked(from)).toEqual(['fake-429'])
    } finally {
      setSystemTime()
    }
  }, 20_000)
})

describe('unknown keys', () => {
  test('error: an unknown key is a 401 before any refusal of routing (no route allowed, a price above the ceilings, circuits open, upstreams rate limiting)', async () => {
    const { key } = await gw.account()
    // The own route of own-down, and every route of all-down, with open circuits; limited-only
    // waiting out its 429.
    for (let i = 0; i < 3; i++) {
      await post(key, { model: 'own-down', allow_external: false })
      await post(key, { model: 'all-down' })
    }
    expect((await post(key, { model: 'limited-only' })).status).toBe(503)
    const bodies = [
      { model: 'only-external', allow_external: false },
      { model: 'external-cheapest' },
      { model: 'single', max_input_price_per_million: 1, max_output_price_per_million: 1 },
      { model: 'own-down', allow_external: false },
      { model: 'all-down' },
      { model: 'limited-only' },
    ]
    for (const body of bodies) expect((await post(key, body)).status).not.toBe(401)
    for (const body of bodies) {
      const res = await post(`tw_${'x'.repeat(40)}`, body)
      expect(res.status).toBe(401)
      expect(((await res.json()) as Failure).error.type).toBe('auth_error')
    }
  }, 20_000)
})

describe('price ceilings', () => {
  test('behavior: a model within both ceilings is served; above either, a 400 before anything is charged or sent', async () => {
    const { id, key } = await gw.account()
    const ok = await post(key, {
      model: 'single',
      max_input_price_per_million: 1_000_000,
      max_output_price_per_million: '2000000',
    })
    expect(ok.status).toBe(200)
    const balance = (await Gateway.ledger(gw.sql, id)).balance
    const from = fake.received.length
    for (const [input, output, param] of [
      [999_999, 2_000_000, 'max_input_price_per_million'],
      ['1000000', '1999999', 'max_output_price_per_million'],
    ] as const) {
      const res = await post(key, {
        model: 'single',
        max_input_price_per_million: input,
        max_output_price_per_million: output,
      })
      expect(res.status).toBe(400)
      const { error } = (await res.json()) as Failure
      expect(error.code).toBe('price_above_ceiling')
      expect(error.param).toBe(param)
    }
    expect(fake.received.length).toBe(from)
    expect((await Gateway.ledger(gw.sql, id)).balance).toBe(balance)
  })

  test('error: a model priced above the ceilings is a 400 price_above_ceiling even while its circuits are open (not a 503 to retry into the same refusal)', async () => {
    const { key } = await gw.account()
    // Open the circuits of both its routes (unreachable, each call a failure).
    let status = 0
    for (let i = 0; i < 3 && status !== 503; i++)
      status = (await post(key, { model: 'all-down' })).status
    expect(status).toBe(503)
    const res = await post(key, {
      model: 'all-down',
      max_input_price_per_million: 1,
      max_output_price_per_million: 1,
    })
    expect(res.status).toBe(400)
    expect(((await res.json()) as Failure).error.code).toBe('price_above_ceiling')
  })

  test('error: one ceiling without the other, or one that is not a price, is a 400 naming it', async () => {
    const { key } = await gw.account()
    const cases: [Record<string, unknown>, string][] = [
      [{ max_input_price_per_million: 5 }, 'max_output_price_per_million'],
      [{ max_output_price_per_million: 5 }, 'max_input_price_per_million'],
      [
        { max_input_price_per_million: -1, max_output_price_per_million: 5 },
        'max_input_price_per_million',
      ],
      [
        { max_input_price_per_million: 5, max_output_price_per_million: '1e6' },
        'max_output_price_per_million',
      ],
    ]
    for (const [ceilings, param] of cases) {
      const res = await post(key, { model: 'single', ...ceilings })
      expect(res.status).toBe(400)
      expect(((await res.json()) as Failure).error.param).toBe(param)
    }
  })

  test('behavior: the gateway parameters never reach the upstream', async () => {
    const { key } = await gw.account()
    const from = fake.received.length
    const res = await post(key, {
      model: 'single',
      routing_strategy: 'fastest',
      timeout_ms: 5_000,
      max_input_price_per_million: 10_000_000,
      max_output_price_per_million: 10_000_000,
      allow_external: true,
      temperature: 0.5,
    })
    expect(res.status).toBe(200)
    const body = fake.received[from]!.body
    expect(body.temperature).toBe(0.5)
    for (const k of [
      'routing_strategy',
      'timeout_ms',
      'allow_external',
      'max_input_price_per_million',
      'max_output_price_per_million',
    ])
      expect(body).not.toHaveProperty(k)
  })
})
