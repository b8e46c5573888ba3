import { describe, expect, test } from 'bun:test'
import type { Provider } from '../../src/upstream/Provider.ts'
import { type Route, Router } from '../../src/upstream/Router.ts'

const provider = (name: string): Provider => ({
  name,
  stream: () => Promise.reject(new Error('not called')),
  complete: () => Promise.reject(new Error('not called')),
})
const route = (name: string, cost = 1n, upstreamModel = name): Route => ({
  provider: provider(name),
  upstreamModel,
  cost: { input: cost, output: cost },
})
const names = (routes: readonly Route[]) => routes.map((r) => r.provider.name)
const model = (routes: Route[], id = 'm') => ({
  id,
  pricing: { input: 1n, output: 1n },
  contextLength: 100,
  minTier: 0,
  routes,
  routing: 'balanced' as const,
})
const whole = { prompt: 1, output: 1, stream: false }
const streamed = { prompt: 1, output: 1, stream: true }

describe('Router.routes', () => {
  test('behavior: fastest orders by moving latency; an untimed route goes first for one request, then waits its turn until timed', () => {
    const [a, b, c] = [route('a'), route('b'), route('c')]
    const m = model([a, b, c])
    const router = new Router([m])
    router.timed(a, false, 300)
    router.timed(b, false, 20)
    // c is untimed: first for one request (which times it), last for the others meanwhile.
    expect(names(router.routes(m, 'fastest', whole))).toEqual(['c', 'b', 'a'])
    expect(names(router.routes(m, 'fastest', whole))).toEqual(['b', 'a', 'c'])
    expect(names(router.routes(m, 'fastest', whole))).toEqual(['b', 'a', 'c'])
    router.timed(c, false, 100)
    expect(names(router.routes(m, 'fastest', whole))).toEqual(['b', 'c', 'a'])
    // One slow answer moves the average a fifth of the way: b stays ahead of c.
    router.timed(b, false, 200)
    expect(names(router.routes(m, 'fastest', whole))).toEqual(['b', 'c', 'a'])
    // ordered keeps the operator order whatever the latencies.
    expect(names(router.routes(m, 'ordered', whole))).toEqual(['a', 'b', 'c'])
  })

  test('behavior: balanced draws the first route with weight the inverse square of its cost, the rest follow the draw', () => {
    const [a, b, c] = [route('a', 1n), route('b', 2n), route('c', 1n)]
    const m = model([a, b, c])
    // A seeded generator (mulberry32): the same draws every run.
    let seed = 42
    const random = () => {
      seed = (seed + 0x6d2b79f5) | 0
      let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296
    }
    const router = new Router([m], { random })
    const firsts = new Map<string, number>()
    const n = 9_000
    for (let i = 0; i < n; i++) {
      const order = names(router.routes(m, 'balanced', whole))
      expect(order.toSorted()).toEqual(['a', 'b', 'c'])
      firsts.set(order[0]!, (firsts.get(order[0]!) ?? 0) + 1)
    }
    // Weights 1, 1/4, 1: a and c first 4/9 of the time each, b 1/9.
    expect(firsts.get('a')! / n).toBeCloseTo(4 / 9, 1)
    expect(firsts.get('c')! / n).toBeCloseTo(4 / 9, 1)
    expect(firsts.get('b')! / n).toBeCloseTo(1 / 9, 1)
    // It is the default, and a route that costs nothing goes first.
    const free = route('free', 0n)
    const withFree = model([a, free])
    const r = new Router([withFree])
    for (let i = 0; i < 20; i++) expect(names(r.routes(withFree))).toEqual(['free', 'a'])
  })

  test('behavior: balanced puts routes that cost nothing first, spread evenly among themselves', () => {
    const m = model([route('free1', 0n), route('free2', 0n), route('paid', 5n)])
    const router = new Router([m])
    const firsts = new Map<string, number>()
    for (let i = 0; i < 2_000; i++) {
      const first = names(router.routes(m, 'balanced', whole))[0]!
      firsts.set(first, (firsts.get(first) ?? 0) + 1)
    }
    expect(firsts.get('paid') ?? 0).toBe(0)
    expect((firsts.get('free2') ?? 0) / 2_000).toBeCloseTo(0.5, 1)
  })

  test('behavior: balanced spreads over the routes whose circuit is closed only', () => {
    const [a, b] = [route('a'), route('b')]
    const m = model([a, b])
    const router = new Router([m], { threshold: 1 })
    router.record(a.provider, false)
    for (let i = 0; i < 20; i++) expect(names(router.routes(m, 'balanced', whole))).toEqual(['b'])
  })

  test('behavior: an estimate not renewed for staleMs makes its route first again, once', async () => {
    const [slow, fast] = [route('slow'), route('fast')]
    const m = model([slow, fast])
    const router = new Router([m], { staleMs: 50 })
    router.timed(slow, true, 500)
    router.timed(fast, true, 10)
    expect(names(router.routes(m, 'fastest', streamed))).toEqual(['fast', 'slow'])
    await Bun.sleep(70)
    router.timed(fast, true, 10)
    // slow's one slow answer is stale: it is tried first once, the others wait for its timing.
    const orders = Array.from({ length: 5 }, () => names(router.routes(m, 'fastest', streamed)))
    expect(orders.filter((o) => o[0] === 'slow')).toHaveLength(1)
  })

  test('behavior: latencies are kept apart for streams and whole completions, and by upstream model', () => {
    const shared = route('shared', 1n, 'x')
    const other = route('other', 1n, 'x')
    const m = model([shared, other])
    const router = new Router([m])
    router.timed(shared, true, 200)
    router.timed(other, true, 400)
    router.timed(shared, false, 900)
    router.timed(other, false, 300)
    // A whole completion of another model on the same upstream takes 20 s: no matter here.
    router.timed(route('shared', 1n, 'y'), true, 20_000)
    expect(names(router.routes(m, 'fastest', streamed))).toEqual(['shared', 'other'])
    expect(names(router.routes(m, 'fastest', whole))).toEqual(['other', 'shared'])
  })

  test('behavior: cheapest weighs input and output costs by the request; a route with an open circuit is left out', () => {
    const inputCheap: Route = { ...route('in'), cost: { input: 1n, output: 100n } }
    const outputCheap: Route = { ...route('out'), cost: { input: 100n, output: 1n } }
    const m = model([inputCheap, outputCheap])
    const router = new Router([m])
    const asks = (prompt: number, output: number) => ({ prompt, output, stream: false })
    expect(names(router.routes(m, 'cheapest', asks(1000, 10)))).toEqual(['in', 'out'])
    expect(names(router.routes(m, 'cheapest', asks(10, 1000)))).toEqual(['out', 'in'])
    for (let i = 0; i < 3; i++) router.record(inputCheap.provider, false)
    expect(names(router.routes(m, 'cheapest', asks(1000, 10)))).toEqual(['out'])
    expect(router.status(m)).toBe('ready')
    for (let i = 0; i < 3; i++) router.record(outputCheap.provider, false)
    expect(router.status(m)).toBe('unavailable')
    expect(() => router.available(m, true)).toThrow(/No healthy upstream/)
  })

  test('behavior: a route whose upstream lacks its model (404) three times is left out alone; the same upstream serves other routes', () => {
    const shared = provider('shared')
    const lacking: Route = {
      provider: shared,
      upstreamModel: 'gone',
      cost: { input: 1n, output: 1n },
    }
    const serving: Route = {
      provider: shared,
      upstreamModel: 'here',
      cost: { input: 1n, output: 1n },
    }
    const spare = route('spare')
    const m = model([lacking, spare])
    const other = model([serving], 'other')
    const router = new Router([m, other])
    for (let i = 0; i < 2; i++) router.recordRoute(lacking, false)
    expect(names(router.routes(m, 'ordered', whole))).toEqual(['shared', 'spare'])
    router.recordRoute(lacking, false)
    expect(names(router.routes(m, 'ordered', whole))).toEqual(['spare'])
    expect(router.routes(other)).toEqual([serving])
    expect(router.status(other)).toBe('ready')
    expect(router.upstreams().find((u) => u.name === 'shared')!.status).toBe('ready')
  })
})
