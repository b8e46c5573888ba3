import { describe, expect, test } from 'bun:test'
import type { Provider } from '../../src/upstream/Provider.ts'
import { type Route, Router } from '../../src/upstream/Router.ts'

const provider = (name: string): Provider => ({
  name,
  stream: () => Promise.reject(new Error('not called')),
  complete: () => Promise.reject(new Error('not called')),
})
const route = (name: string, cost = 1n): Route => ({
  provider: provider(name),
  upstreamModel: name,
  cost: { input: cost, output: cost },
})
const names = (routes: Route[]) => routes.map((r) => r.provider.name)

describe('Router.routes', () => {
  const model = (routes: Route[]) => ({
    id: 'm',
    pricing: { input: 1n, output: 1n },
    contextLength: 100,
    minTier: 0,
    routes,
    routing: 'balanced' as const,
  })

  test('behavior: fastest orders by moving latency, untimed first; an estimate not renewed for staleMs counts as untimed', async () => {
    const [a, b, c] = [route('a'), route('b'), route('c')]
    const m = model([a, b, c])
    const router = new Router([m], { staleMs: 80 })
    expect(names(router.routes(m, 'fastest'))).toEqual(['a', 'b', 'c'])
    router.record(a.provider, true, 300)
    router.record(b.provider, true, 20)
    // c is untimed: it goes first, then the faster of the timed.
    expect(names(router.routes(m, 'fastest'))).toEqual(['c', 'b', 'a'])
    router.record(c.provider, true, 100)
    expect(names(router.routes(m, 'fastest'))).toEqual(['b', 'c', 'a'])
    // One slow answer moves the average a fifth of the way: b stays ahead of c.
    router.record(b.provider, true, 200)
    expect(names(router.routes(m, 'fastest'))).toEqual(['b', 'c', 'a'])
    // Time passes; b and c are timed again, a is not: a's one slow answer no longer keeps it
    // last, it is tried first to be timed afresh.
    await Bun.sleep(100)
    router.record(b.provider, true, 20)
    router.record(c.provider, true, 100)
    expect(names(router.routes(m, 'fastest'))).toEqual(['a', 'b', 'c'])
    // balanced keeps the operator order whatever the latencies.
    expect(names(router.routes(m))).toEqual(['a', 'b', 'c'])
  })

  test('behavior: cheapest weighs input and output costs by the request; a route with an open circuit is left out', () => {
    const inputCheap: Route = { ...route('in'), cost: { input: 1n, output: 100n } }
    const outputCheap: Route = { ...route('out'), cost: { input: 100n, output: 1n } }
    const m = model([inputCheap, outputCheap])
    const router = new Router([m])
    expect(names(router.routes(m, 'cheapest', { prompt: 1000, output: 10 }))).toEqual(['in', 'out'])
    expect(names(router.routes(m, 'cheapest', { prompt: 10, output: 1000 }))).toEqual(['out', 'in'])
    for (let i = 0; i < 3; i++) router.record(inputCheap.provider, false)
    expect(names(router.routes(m, 'cheapest', { prompt: 1000, output: 10 }))).toEqual(['out'])
    expect(router.status(m)).toBe('ready')
    for (let i = 0; i < 3; i++) router.record(outputCheap.provider, false)
    expect(router.status(m)).toBe('unavailable')
    expect(() => router.route('m')).toThrow(/No healthy upstream/)
  })
})
