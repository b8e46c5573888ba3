/**
 * Prometheus metrics (prom-client), served at GET /metrics to the admin token: HTTP answers,
 * completions by model, payer and outcome, tokens and money charged, latencies, upstream
 * health, the ledger's batching, and the process. One registry per gateway (tests run several
 * in one process). Labels are model ids, route patterns and fixed words: never a key, an
 * account or anything a client typed, so their number stays bounded.
 */
import client from 'prom-client'
import * as Batch from '../ledger/Batch.ts'
import type { Sql } from '../ledger/Db.ts'
import type { Outcome } from '../metering/Meter.ts'
import type { Router } from '../upstream/Router.ts'

export type Payer = 'key' | 'channel'

/** Latency buckets, seconds: from a cache-fast answer to a long generation. */
const SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

/** Default process metrics Bun does not implement (they read as 0, NaN or nonsense). */
const UNSUPPORTED = [
  'nodejs_eventloop_lag_seconds',
  'nodejs_eventloop_lag_min_seconds',
  'nodejs_eventloop_lag_max_seconds',
  'nodejs_eventloop_lag_mean_seconds',
  'nodejs_eventloop_lag_stddev_seconds',
  'nodejs_eventloop_lag_p50_seconds',
  'nodejs_eventloop_lag_p90_seconds',
  'nodejs_eventloop_lag_p99_seconds',
  'nodejs_active_resources',
  'nodejs_active_resources_total',
  'nodejs_active_handles',
  'nodejs_active_handles_total',
  'nodejs_active_requests',
  'nodejs_active_requests_total',
  'process_heap_bytes',
]

export class Metrics {
  readonly registry = new client.Registry()
  private readonly http: client.Counter<'method' | 'route' | 'status'>
  private readonly completions: client.Counter<'model' | 'payer' | 'status'>
  private readonly tokens: client.Counter<'model' | 'payer' | 'kind'>
  private readonly charged: client.Counter<'model' | 'payer'>
  private readonly duration: client.Histogram<'model' | 'stream'>
  private readonly ttft: client.Histogram<'model' | 'stream'>

  constructor(deps: { sql: Sql; router: Router }) {
    const registers = [this.registry]
    client.collectDefaultMetrics({ register: this.registry })
    for (const name of UNSUPPORTED) this.registry.removeSingleMetric(name)
    this.http = new client.Counter({
      name: 'tollway_http_requests_total',
      help: 'HTTP requests answered, by method, route pattern and status code.',
      labelNames: ['method', 'route', 'status'],
      registers,
    })
    this.completions = new client.Counter({
      name: 'tollway_completions_total',
      help: 'Completions charged, by model, payer (key or channel) and outcome (ok, cancelled, upstream_error, insufficient_funds, payment_timeout, superseded).',
      labelNames: ['model', 'payer', 'status'],
      registers,
    })
    this.tokens = new client.Counter({
      name: 'tollway_tokens_total',
      help: 'Tokens charged for, by model, payer and kind (prompt or completion).',
      labelNames: ['model', 'payer', 'kind'],
      registers,
    })
    this.charged = new client.Counter({
      name: 'tollway_charged_base_units_total',
      help: "Money charged, in the payment token's base units, by model and payer.",
      labelNames: ['model', 'payer'],
      registers,
    })
    this.duration = new client.Histogram({
      name: 'tollway_completion_duration_seconds',
      help: 'Time from admission to the end of a completion, by model and stream (true or false).',
      labelNames: ['model', 'stream'],
      buckets: SECONDS,
      registers,
    })
    this.ttft = new client.Histogram({
      name: 'tollway_time_to_first_token_seconds',
      help: 'Time from admission to the first token sent, by model and stream.',
      labelNames: ['model', 'stream'],
      buckets: SECONDS,
      registers,
    })
    const router = deps.router
    new client.Gauge({
      name: 'tollway_upstream_up',
      help: "A model's upstream: 1 ready, 0.5 probing after an outage (loading), 0 unavailable (circuit open).",
      labelNames: ['model'],
      registers,
      collect() {
        for (const m of router.models()) {
          const s = router.status(m)
          this.set({ model: m.id }, s === 'ready' ? 1 : s === 'loading' ? 0.5 : 0)
        }
      },
    })
    // The ledger's group commit (Batch.ts): statements sent and items they carried, by
    // batcher. Items per statement is how much batching saves; fallbacks are batches that
    // failed as a whole and ran item by item.
    const batches = (field: keyof Batch.Stats, name: string, help: string) => {
      const seen = new Map<string, number>()
      return new client.Counter({
        name,
        help,
        labelNames: ['batcher'],
        registers,
        // A counter only grows by inc(): each scrape adds what grew since the last.
        collect() {
          for (const [batcher, stats] of Object.entries(Batch.stats(deps.sql))) {
            this.inc({ batcher }, stats[field] - (seen.get(batcher) ?? 0))
            seen.set(batcher, stats[field])
          }
        },
      })
    }
    batches('statements', 'tollway_ledger_statements_total', 'Ledger batch statements sent.')
    batches('items', 'tollway_ledger_items_total', 'Ledger calls carried by batch statements.')
    batches(
      'fallbacks',
      'tollway_ledger_batch_fallbacks_total',
      'Ledger batches that failed as a whole and ran item by item.',
    )
  }

  /** Counts an HTTP answer. */
  answered(method: string, route: string, status: number): void {
    this.http.inc({ method, route, status: String(status) })
  }

  /** Counts a settled completion: its outcome, tokens, money and times. */
  completed(model: string, payer: Payer, stream: boolean, o: Outcome, charged: bigint): void {
    this.completions.inc({ model, payer, status: o.status })
    if (o.promptTokens > 0) this.tokens.inc({ model, payer, kind: 'prompt' }, o.promptTokens)
    if (o.completionTokens > 0)
      this.tokens.inc({ model, payer, kind: 'completion' }, o.completionTokens)
    if (charged > 0n) this.charged.inc({ model, payer }, Number(charged))
    const s = stream ? 'true' : 'false'
    this.duration.observe({ model, stream: s }, o.latencyMs / 1000)
    if (o.ttftMs !== null) this.ttft.observe({ model, stream: s }, o.ttftMs / 1000)
  }

  /** The text exposition format. */
  text(): Promise<string> {
    return this.registry.metrics()
  }

  get contentType(): string {
    return this.registry.contentType
  }
}
