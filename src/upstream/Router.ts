/**
 * Routing: model id → its configuration and the upstreams (routes) serving it, with a circuit
 * breaker and a latency estimate per provider. A provider that fails `threshold` times in a
 * row is `unavailable` for `cooldownMs`, then `loading`: requests probe it until a success
 * closes the circuit or a failure reopens it. A request goes to a model's routes in the order
 * of its routing strategy, skipping those whose circuit is open; one that fails before its
 * first token goes on to the next (see `routes`). A route whose upstream answered 429 (rate
 * limiting the gateway) is skipped for the wait it asked for (`rateLimited`); that says
 * nothing of the upstream's health, and opens no circuit.
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
  /** An outside aggregator (skipped by a request with `allow_external: false`). */
  external?: boolean
}

export type Model = {
  id: string
  /** What clients pay, base units per 1M tokens, whichever route serves them. */
  pricing: Price
  contextLength: number
  /** The most tokens one answer may have (unset: what the context leaves). */
  maxOutputTokens?: number | undefined
  minTier: number
  /** The upstreams serving the model, in the operator's order; at least one. */
  routes: Route[]
  /** The strategy of a request that names none. */
  routing: Strategy
}

export type Status = 'ready' | 'loading' | 'unavailable'

/**
 * The order a request tries a model's routes in: `balanced` spreads requests over them, the
 * first drawn at random with weight the inverse square of what the request costs the
 * operator on each (equal costs: evenly), the rest in the order of the same draw; `fastest`
 * by each upstream's recent latency; `cheapest` by what the request costs the operator on
 * each; `ordered` the operator's order (the first listed takes every request unless it is
 * down: a primary and its backups).
 */
export const STRATEGIES = ['balanced', 'fastest', 'cheapest', 'ordered'] as const
export type Strategy = (typeof STRATEGIES)[number]

/**
 * Whether a request may go to external routes: as it says (`allow_external`), else unless its
 * strategy is `cheapest` (as the references have it).
 */
export function externalAllowed(strategy: Strategy, asked?: boolean): boolean {
  return asked ?? strategy !== 'cheapest'
}

type Circuit = { failures: number; openUntil: number }
/** A provider's calls by outcome: answered, failed (against its health), rate limited (429). */
type Calls = { ok: number; failed: number; rateLimited: number }

/** Weight of the newest sample in a route's latency average. */
const LATENCY_WEIGHT = 0.2

/** A route: its upstream and upstream model (a provider's name alone keys its own circuit). */
function routeKey(r: Pick<Route, 'provider' | 'upstreamModel'>): string {
  return `${r.provider.name}\0${r.upstreamModel}`
}

/** A route's latency is kept apart by upstream, upstream model and kind of call. */
function latencyKey(r: Pick<Route, 'provider' | 'upstreamModel'>, stream: boolean): string {
  return `${r.provider.name}\0${r.upstreamModel}\0${stream ? 'first_token' : 'answer'}`
}

export class Router {
  private readonly byId: Map<string, Model>
  private readonly circuits = new Map<string, Circuit>()
  /** Routes waiting out an upstream's 429: until when (ms since the epoch), by route key. */
  private readonly limited = new Map<string, number>()
  /**
   * Moving average of each route's latency, ms, and when it was last timed: apart for streams
   * (to the first token) and whole completions (to the answer, which grows with its length),
   * and per upstream model (one upstream serves fast and slow ones). See `timed`.
   */
  private readonly latencies = new Map<string, { ms: number; at: number }>()
  /** When each untimed or stale route was last put first to be timed again (see `routes`). */
  private readonly probed = new Map<string, number>()
  /** Calls to each provider, by outcome. */
  private readonly calls = new Map<string, Calls>()

  private readonly options: {
    threshold: number
    cooldownMs: number
    staleMs: number
    /** Uniform in [0, 1): `balanced`'s draws. */
    random: () => number
  }

  constructor(
    models: Model[],
    options: {
      threshold?: number
      cooldownMs?: number
      staleMs?: number
      random?: () => number
    } = {},
  ) {
    this.options = {
      threshold: 3,
      cooldownMs: 30_000,
      staleMs: 60_000,
      random: Math.random,
      ...options,
    }
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

  /**
   * Refuses (the 503 of `unavailable`) a request none of whose routes (external ones only with
   * `allowExternal`) takes requests now, their circuits open: with the wait of those routes, not
   * of an external one it leaves out, which may probe sooner (and then serve it no better).
   */
  available(m: Model, allowExternal: boolean): void {
    // Nothing failing anywhere (the common case): no route to look at.
    if (this.circuits.size === 0) return
    for (const r of m.routes)
      if ((allowExternal || !r.external) && this.routeStatus(r) !== 'unavailable') return
    throw this.unavailable(m, this.allowed(m, allowExternal))
  }

  /**
   * The 503 of a model none of whose `routes` (those a request may use) takes requests now:
   * `Retry-After` until the first of their open circuits lets a probe through.
   */
  unavailable(m: Model, routes: readonly Route[] = m.routes): NoUpstreamError {
    return new NoUpstreamError(
      `No healthy upstream serves "${m.id}" right now; retry shortly.`,
      'no_upstream_available',
      { headers: { 'retry-after': String(Math.ceil(this.retryInMs(routes) / 1000)) } },
    )
  }

  /** A model's routes a request may use: its external ones only with `allowExternal`. */
  allowed(m: Model, allowExternal: boolean): readonly Route[] {
    return allowExternal ? m.routes : m.routes.filter((r) => !r.external)
  }

  /**
   * The routes a request tries, in order: those not shut off by their circuit, sorted by
   * `strategy` (ties keep the operator's order). `tokens`: the request's prompt and most
   * output tokens, to weigh input against output prices for `cheapest`. External routes
   * only with `allowExternal` (default: except for `cheapest`, as the references have it).
   */
  routes(
    m: Model,
    strategy: Strategy = m.routing,
    request: { prompt: number; output: number; stream: boolean } = {
      prompt: 1,
      output: 1,
      stream: false,
    },
    allowExternal: boolean = externalAllowed(strategy),
  ): readonly Route[] {
    // Nothing failing anywhere (the common case): every route, as configured.
    const allowed = this.allowed(m, allowExternal)
    const open =
      this.circuits.size === 0 && this.limited.size === 0
        ? allowed
        : allowed.filter((r) => this.routeStatus(r) !== 'unavailable' && !this.waiting(r))
    if (strategy === 'ordered' || open.length < 2) return open
    const cost = (r: Route): bigint =>
      r.cost.input * BigInt(request.prompt) + r.cost.output * BigInt(request.output)
    if (strategy === 'balanced') return this.spread(open, cost)
    const now = Date.now()
    const { staleMs } = this.options
    const key =
      strategy === 'fastest'
        ? // A route not timed yet, or not for `staleMs`, goes first for one request, which
          // times it (one slow answer must not keep it out of the order for good); requests
          // meanwhile order it by its old estimate (untimed: last).
          (r: Route): number => {
            const l = this.latencies.get(latencyKey(r, request.stream))
            if (l !== undefined && now - l.at <= staleMs) return l.ms
            const probed = this.probed.get(latencyKey(r, request.stream))
            if (probed === undefined || now - probed > staleMs) return -1
            return l?.ms ?? Number.POSITIVE_INFINITY
          }
        : cost
    // A stable sort: equal keys keep the operator's order.
    const sorted = open
      .map((r) => ({ r, k: key(r) }))
      .sort((a, b) => (a.k < b.k ? -1 : a.k > b.k ? 1 : 0))
    if (sorted[0]!.k === -1) this.probed.set(latencyKey(sorted[0]!.r, request.stream), now)
    return sorted.map(({ r }) => r)
  }

  /**
   * `routes` in a random order in which each is first with probability proportional to the
   * inverse square of its cost (a weighted draw without replacement: each route's key is
   * u^(1/weight) for a uniform u, the largest first, compared as logarithms). Routes that
   * cost nothing go before those that cost something, drawn evenly among themselves.
   */
  private spread(routes: readonly Route[], cost: (r: Route) => bigint): Route[] {
    const costs = routes.map(cost)
    let most = 0n
    for (const c of costs) if (c > most) most = c
    const keyed = routes.map((r, i) => {
      const u = this.options.random()
      // Routes that cost nothing: first, in a uniform draw among themselves (keys in (-1, 0]).
      if (costs[i] === 0n && most > 0n) return { r, k: -u }
      // Costs relative to the dearest, so that squares of large bigints stay finite numbers.
      const relative = most === 0n ? 1 : Number((costs[i]! * 1_000_000n) / most) / 1_000_000
      // log(u) / weight, weight = 1 / relative² (1 - u is in (0, 1], so log is finite),
      // below every free route's key.
      return { r, k: (most === 0n ? 0 : -1) + Math.log(1 - u) * relative * relative }
    })
    return keyed.sort((a, b) => b.k - a.k).map(({ r }) => r)
  }

  /** Health of a model: that of its healthiest provider. */
  status(m: Model): Status {
    let best: Status = 'unavailable'
    for (const r of m.routes) {
      const s = this.routeStatus(r)
      if (s === 'ready') return s
      if (s === 'loading') best = s
    }
    return best
  }

  /** Records the outcome of a call to a provider (its health). */
  record(provider: Provider, ok: boolean): void {
    const calls = this.callsOf(provider)
    if (ok) {
      calls.ok++
      this.circuits.delete(provider.name)
      return
    }
    calls.failed++
    this.fail(provider.name)
  }

  /** Records how long a route took to answer (a stream: to its first token). */
  timed(route: Route, stream: boolean, ms: number): void {
    const k = latencyKey(route, stream)
    const before = this.latencies.get(k)?.ms
    this.latencies.set(k, {
      ms: before === undefined ? ms : before + LATENCY_WEIGHT * (ms - before),
      at: Date.now(),
    })
  }

  /**
   * Every provider a model routes to: its health and calls by outcome; and the moving latency
   * of each route timed, by upstream model and kind (`first_token` of a stream, `answer`).
   */
  upstreams(): {
    name: string
    status: Status
    ok: number
    failed: number
    rateLimited: number
    latencies: { upstreamModel: string; kind: 'first_token' | 'answer'; ms: number }[]
  }[] {
    const providers = new Map<string, { provider: Provider; routes: Route[] }>()
    for (const m of this.byId.values())
      for (const r of m.routes) {
        const p = providers.get(r.provider.name) ?? { provider: r.provider, routes: [] }
        p.routes.push(r)
        providers.set(r.provider.name, p)
      }
    return [...providers.values()].map(({ provider, routes }) => ({
      name: provider.name,
      status: this.circuitStatus(provider.name),
      ok: this.calls.get(provider.name)?.ok ?? 0,
      failed: this.calls.get(provider.name)?.failed ?? 0,
      rateLimited: this.calls.get(provider.name)?.rateLimited ?? 0,
      latencies: [...new Set(routes.map((r) => r.upstreamModel))].flatMap((upstreamModel) =>
        (['first_token', 'answer'] as const).flatMap((kind) => {
          const l = this.latencies.get(
            latencyKey({ provider, upstreamModel }, kind === 'first_token'),
          )
          return l ? [{ upstreamModel, kind, ms: l.ms }] : []
        }),
      ),
    }))
  }

  /**
   * Records whether a route's upstream has its model: one that answers 404 for it
   * `threshold` times in a row is left out for `cooldownMs`, as a failing upstream is, but
   * alone (the upstream's other models are fine).
   */
  recordRoute(route: Route, found: boolean): void {
    // The common case, nothing failing anywhere, costs no key.
    if (found) {
      if (this.circuits.size > 0) this.circuits.delete(routeKey(route))
      return
    }
    this.fail(routeKey(route))
  }

  /** Records that a route's upstream answered 429: it is not called for `ms`. */
  rateLimited(route: Route, ms: number): void {
    this.callsOf(route.provider).rateLimited++
    this.limited.set(routeKey(route), Date.now() + ms)
  }

  private callsOf(provider: Provider): Calls {
    let calls = this.calls.get(provider.name)
    if (!calls) {
      calls = { ok: 0, failed: 0, rateLimited: 0 }
      this.calls.set(provider.name, calls)
    }
    return calls
  }

  /**
   * When the first of a model's routes (or of `routes`, those a request may use) waiting out a
   * 429 takes requests again, in ms from now; 0 when none of them waits (an open circuit is no
   * such wait).
   */
  rateLimitedFor(m: Model, routes: readonly Route[] = m.routes): number {
    let soonest = Number.POSITIVE_INFINITY
    for (const r of routes) {
      const until = this.limited.get(routeKey(r))
      if (until !== undefined && until > Date.now()) soonest = Math.min(soonest, until)
    }
    return soonest === Number.POSITIVE_INFINITY ? 0 : soonest - Date.now()
  }

  /** Whether a route waits out a 429 now (a wait that has passed is forgotten). */
  private waiting(r: Route): boolean {
    const key = routeKey(r)
    const until = this.limited.get(key)
    if (until === undefined) return false
    if (until > Date.now()) return true
    this.limited.delete(key)
    return false
  }

  private fail(key: string): void {
    const c = this.circuits.get(key) ?? { failures: 0, openUntil: 0 }
    c.failures++
    if (c.failures >= this.options.threshold) c.openUntil = Date.now() + this.options.cooldownMs
    this.circuits.set(key, c)
  }

  /** The worse of its upstream's health and its own (see `recordRoute`). */
  private routeStatus(r: Route): Status {
    const upstream = this.circuitStatus(r.provider.name)
    if (upstream === 'unavailable') return upstream
    const own = this.circuitStatus(routeKey(r))
    return own === 'ready' ? upstream : own
  }

  private circuitStatus(key: string): Status {
    const c = this.circuits.get(key)
    if (!c || c.failures < this.options.threshold) return 'ready'
    return Date.now() < c.openUntil ? 'unavailable' : 'loading'
  }

  /** When the first of the open circuits of `routes` lets a probe through. */
  private retryInMs(routes: readonly Route[]): number {
    const soonest = Math.min(
      ...routes.map((r) =>
        Math.max(
          this.circuits.get(r.provider.name)?.openUntil ?? 0,
          this.circuits.get(routeKey(r))?.openUntil ?? 0,
        ),
      ),
    )
    return Math.max(1000, soonest - Date.now())
  }
}
