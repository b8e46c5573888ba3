/**
 * Routing: model id → its configuration and the upstreams (routes) serving it, with a circuit
 * breaker and a latency estimate per provider. A provider that fails `threshold` times in a
 * row is `unavailable` for `cooldownMs`, then `loading`: requests probe it until a success
 * closes the circuit or a failure reopens it. A request goes to a model's routes in the order
 * of its routing strategy, skipping those whose circuit is open; one that fails before its
 * first token goes on to the next (see `routes`).
 */
import { NotFoundError, NoUpstreamError } from '../Errors.ts'
import type { Provider } from './Provider.ts'

type Price = { input: bigint; output: bigint }

/** One upstream serving a model. */
export type Route = {
  provider: Provider
  upstreamModel: string
  /** What the upstream costs the operator per 1M tokens (the `cheapest` strategy's order). */
  cost: Price
}

export type Model = {
  id: string
  /** What clients pay, base units per 1M tokens, whichever route serves them. */
  pricing: Price
  contextLength: number
  minTier: number
  /** The upstreams serving the model, in the operator's order; at least one. */
  routes: Route[]
  /** The strategy of a request that names none. */
  routing: Strategy
}

export type Status = 'ready' | 'loading' | 'unavailable'

/**
 * The order a request tries a model's routes in: `balanced` the operator's (the first listed
 * unless it is down), `fastest` by each upstream's recent latency, `cheapest` by what the
 * request costs the operator on each.
 */
export const STRATEGIES = ['balanced', 'fastest', 'cheapest'] as const
export type Strategy = (typeof STRATEGIES)[number]

type Circuit = { failures: number; openUntil: number }

/** Weight of the newest sample in a provider's latency average. */
const LATENCY_WEIGHT = 0.2

export class Router {
  private readonly byId: Map<string, Model>
  private readonly circuits = new Map<string, Circuit>()
  /**
   * Moving average of each provider's latency (to its first token, or answer), ms, and when
   * it was last timed.
   */
  private readonly latencies = new Map<string, { ms: number; at: number }>()
  /** Calls to each provider, by outcome. */
  private readonly calls = new Map<string, { ok: number; failed: number }>()

  private readonly options: { threshold: number; cooldownMs: number; staleMs: number }

  constructor(
    models: Model[],
    options: { threshold?: number; cooldownMs?: number; staleMs?: number } = {},
  ) {
    this.options = { threshold: 3, cooldownMs: 30_000, staleMs: 60_000, ...options }
    this.byId = new Map(models.map((m) => [m.id, m]))
  }

  /** Every model, in configuration order. */
  models(): Model[] {
    return [...this.byId.values()]
  }

  /** Whether a model has this id. */
  has(id: string): boolean {
    return this.byId.has(id)
  }

  /** The model with this id, or a 404 naming it. */
  model(id: string): Model {
    const m = this.byId.get(id)
    if (!m)
      throw new NotFoundError(
        `The model "${id.slice(0, 128)}" does not exist; GET /v1/models lists them.`,
        'model_not_found',
        {
          param: 'model',
        },
      )
    return m
  }

  /** The model, if one of its providers can take a request now; else 503. */
  route(id: string): Model {
    const m = this.model(id)
    if (this.status(m) === 'unavailable')
      throw new NoUpstreamError(
        `No healthy upstream serves "${id}" right now; retry shortly.`,
        'no_upstream_available',
        {
          headers: { 'retry-after': String(Math.ceil(this.retryInMs(m) / 1000)) },
        },
      )
    return m
  }

  /**
   * The routes a request tries, in order: those not shut off by their circuit, sorted by
   * `strategy` (ties keep the operator's order). `tokens`: the request's prompt and most
   * output tokens, to weigh input against output prices for `cheapest`.
   */
  routes(
    m: Model,
    strategy: Strategy = m.routing,
    tokens: { prompt: number; output: number } = { prompt: 1, output: 1 },
  ): Route[] {
    const open = m.routes.filter((r) => this.providerStatus(r.provider) !== 'unavailable')
    if (strategy === 'balanced' || open.length < 2) return open
    const now = Date.now()
    const key =
      strategy === 'fastest'
        ? // An upstream not timed yet, or not for `staleMs`, goes first: it is timed on that
          // request (one slow answer must not keep an upstream out of the order for good).
          (r: Route) => {
            const l = this.latencies.get(r.provider.name)
            return l === undefined || now - l.at > this.options.staleMs
              ? 0n
              : BigInt(Math.round(l.ms))
          }
        : (r: Route) => r.cost.input * BigInt(tokens.prompt) + r.cost.output * BigInt(tokens.output)
    // A stable sort: equal keys keep the operator's order.
    return open
      .map((r) => ({ r, k: key(r) }))
      .sort((a, b) => (a.k < b.k ? -1 : a.k > b.k ? 1 : 0))
      .map(({ r }) => r)
  }

  /** Health of a model: that of its healthiest provider. */
  status(m: Model): Status {
    let best: Status = 'unavailable'
    for (const r of m.routes) {
      const s = this.providerStatus(r.provider)
      if (s === 'ready') return s
      if (s === 'loading') best = s
    }
    return best
  }

  /** Records the outcome of a call to a provider, and on success how long it took. */
  record(provider: Provider, ok: boolean, latencyMs?: number): void {
    let calls = this.calls.get(provider.name)
    if (!calls) {
      calls = { ok: 0, failed: 0 }
      this.calls.set(provider.name, calls)
    }
    if (ok) calls.ok++
    else calls.failed++
    if (ok) {
      this.circuits.delete(provider.name)
      if (latencyMs !== undefined) {
        const before = this.latencies.get(provider.name)?.ms
        this.latencies.set(provider.name, {
          ms: before === undefined ? latencyMs : before + LATENCY_WEIGHT * (latencyMs - before),
          at: Date.now(),
        })
      }
      return
    }
    const c = this.circuits.get(provider.name) ?? { failures: 0, openUntil: 0 }
    c.failures++
    if (c.failures >= this.options.threshold) c.openUntil = Date.now() + this.options.cooldownMs
    this.circuits.set(provider.name, c)
  }

  /** Every provider a model routes to: its health, calls by outcome and moving latency. */
  upstreams(): {
    name: string
    status: Status
    ok: number
    failed: number
    latencyMs: number | undefined
  }[] {
    const providers = new Map<string, Provider>()
    for (const m of this.byId.values())
      for (const r of m.routes) providers.set(r.provider.name, r.provider)
    return [...providers.values()].map((p) => ({
      name: p.name,
      status: this.providerStatus(p),
      ok: this.calls.get(p.name)?.ok ?? 0,
      failed: this.calls.get(p.name)?.failed ?? 0,
      latencyMs: this.latencies.get(p.name)?.ms,
    }))
  }

  private providerStatus(p: Provider): Status {
    const c = this.circuits.get(p.name)
    if (!c || c.failures < this.options.threshold) return 'ready'
    return Date.now() < c.openUntil ? 'unavailable' : 'loading'
  }

  /** When the first of a model's open circuits lets a probe through. */
  private retryInMs(m: Model): number {
    const soonest = Math.min(
      ...m.routes.map((r) => this.circuits.get(r.provider.name)?.openUntil ?? 0),
    )
    return Math.max(1000, soonest - Date.now())
  }
}
