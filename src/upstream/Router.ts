/**
 * Routing: model id → its configuration and provider, with a circuit breaker per provider.
 * A provider that fails `threshold` times in a row is `unavailable` for `cooldownMs`, then
 * `loading`: requests probe it until a success closes the circuit or a failure reopens it.
 */
import { NotFoundError, NoUpstreamError } from '../Errors.ts'
import type { Provider } from './Provider.ts'

export type Model = {
  id: string
  upstreamModel: string
  pricing: { input: bigint; output: bigint }
  contextLength: number
  minTier: number
  provider: Provider
}

export type Status = 'ready' | 'loading' | 'unavailable'

type Circuit = { failures: number; openUntil: number }

export class Router {
  private readonly byId: Map<string, Model>
  private readonly circuits = new Map<string, Circuit>()

  constructor(
    models: Model[],
    private readonly options = { threshold: 3, cooldownMs: 30_000 },
  ) {
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

  /** The model, if its provider can take a request now; else 503. */
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

  /** Health of a model's provider. */
  status(m: Model): Status {
    const c = this.circuits.get(m.provider.name)
    if (!c || c.failures < this.options.threshold) return 'ready'
    return Date.now() < c.openUntil ? 'unavailable' : 'loading'
  }

  /** Records the outcome of a call to a provider. */
  record(provider: Provider, ok: boolean): void {
    if (ok) {
      this.circuits.delete(provider.name)
      return
    }
    const c = this.circuits.get(provider.name) ?? { failures: 0, openUntil: 0 }
    c.failures++
    if (c.failures >= this.options.threshold) c.openUntil = Date.now() + this.options.cooldownMs
    this.circuits.set(provider.name, c)
  }

  private retryInMs(m: Model): number {
    return Math.max(1000, (this.circuits.get(m.provider.name)?.openUntil ?? 0) - Date.now())
  }
}
