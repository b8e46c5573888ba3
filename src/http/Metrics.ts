/**
 * Prometheus metrics (prom-client), served at GET /metrics to the admin token: HTTP answers,
 * completions by model, payer and outcome, tokens and money charged, latencies, upstream
 * health, the ledger's batching, and the process. One registry per gateway (tests run several
 * in one process). Labels are model ids, route patterns and fixed words: never a key, an
 * account or anything a client typed, so their number stays bounded.
 *
 * The hot path stays light: a completion adds to plain counts (one map lookup), which the
 * counters read when scraped; only the latency histograms are observed as they happen.
 */
import client from 'prom-client'
import * as Batch from '../ledger/Batch.ts'
import type { Sql } from '../ledger/Db.ts'
import * as Db from '../ledger/Db.ts'
import type { Outcome, Status } from '../metering/Meter.ts'
import * as Tokenizer from '../metering/Tokenizer.ts'
import type { Router } from '../upstream/Router.ts'

export type Payer = 'key' | 'channel'

/** Latency buckets, seconds: from a cache-fast answer to a long generation. */
const SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

/** What the completions of one model and payer added up to. */
type Counts = {
  model: string
  payer: Payer
  byStatus: Partial<Record<Status, number>>
  prompt: number
  completion: number
  charged: bigint
}

export class Metrics {
  readonly registry = new client.Registry()
  private readonly http: client.Counter<'method' | 'route' | 'status'>
  private readonly duration: client.Histogram<'model' | 'stream'>
  private readonly ttft: client.Histogram<'model' | 'stream'>
  private readonly refusals: client.Counter
  private readonly counts = new Map<string, Counts>()

  constructor(deps: { sql: Sql; router: Router }) {
    const registers = [this.registry]
    const counts = this.counts
    processMetrics(registers)
    this.http = new client.Counter({
      name: 'tollway_http_requests_total',
      help: 'HTTP requests answered, by method, route pattern and status code.',
      labelNames: ['method', 'route', 'status'],
      registers,
    })
    // Counters read from `counts` when scraped: reset, then set to the totals.
    new client.Counter({
      name: 'tollway_completions_total',
      help: 'Completions settled, charged or not, by model, payer (key or channel) and outcome (ok, cancelled, upstream_error, insufficient_funds, payment_timeout, superseded).',
      labelNames: ['model', 'payer', 'status'],
      registers,
      collect() {
        this.reset()
        for (const c of counts.values())
          for (const [status, n] of Object.entries(c.byStatus))
            this.inc({ model: c.model, payer: c.payer, status }, n)
      },
    })
    new client.Counter({
      name: 'tollway_tokens_total',
      help: 'Tokens charged for, by model, payer and kind (prompt or completion).',
      labelNames: ['model', 'payer', 'kind'],
      registers,
      collect() {
        this.reset()
        for (const c of counts.values()) {
          this.inc({ model: c.model, payer: c.payer, kind: 'prompt' }, c.prompt)
          this.inc({ model: c.model, payer: c.payer, kind: 'completion' }, c.completion)
        }
      },
    })
    new client.Counter({
      name: 'tollway_charged_base_units_total',
      help: "Money charged, in the payment token's base units, by model and payer.",
      labelNames: ['model', 'payer'],
      registers,
      collect() {
        this.reset()
        for (const c of counts.values())
          this.inc({ model: c.model, payer: c.payer }, Number(c.charged))
      },
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
      help: 'Time from admission to the first token sent, streams only, by model.',
      labelNames: ['model', 'stream'],
      buckets: SECONDS,
      registers,
    })
    const router = deps.router
    const up = (s: string) => (s === 'ready' ? 1 : s === 'loading' ? 0.5 : 0)
    new client.Gauge({
      name: 'tollway_upstream_up',
      help: "A model's upstream: 1 ready, 0.5 probing after an outage (loading), 0 unavailable (circuit open).",
      labelNames: ['model'],
      registers,
      collect() {
        for (const m of router.models()) {
          const s = router.status(m)
          this.set({ model: m.id }, up(s))
        }
      },
    })
    // Each upstream a model routes to (upstream names are the operator's: a bounded set).
    new client.Gauge({
      name: 'tollway_upstream_status',
      help: 'An upstream: 1 ready, 0.5 probing after an outage (loading), 0 unavailable (circuit open).',
      labelNames: ['upstream'],
      registers,
      collect() {
        this.reset()
        for (const u of router.upstreams()) this.set({ upstream: u.name }, up(u.status))
      },
    })
    new client.Counter({
      name: 'tollway_upstream_calls_total',
      help: 'Calls to an upstream until its answer began, by outcome (ok; failed: a failure that counts against its health, the request going on to the next route if it has one; rate_limited: a 429, the route waiting out the wait it asked for).',
      labelNames: ['upstream', 'outcome'],
      registers,
      collect() {
        this.reset()
        for (const u of router.upstreams()) {
          this.inc({ upstream: u.name, outcome: 'ok' }, u.ok)
          this.inc({ upstream: u.name, outcome: 'failed' }, u.failed)
          this.inc({ upstream: u.name, outcome: 'rate_limited' }, u.rateLimited)
        }
      },
    })
    new client.Gauge({
      name: 'tollway_upstream_latency_seconds',
      help: "A route's moving average latency, by upstream, upstream model and kind (first_token of a stream, answer of a whole completion): what routing_strategy fastest orders by.",
      labelNames: ['upstream', 'upstream_model', 'kind'],
      registers,
      collect() {
        this.reset()
        for (const u of router.upstreams())
          for (const l of u.latencies)
            this.set(
              { upstream: u.name, upstream_model: l.upstreamModel, kind: l.kind },
              l.ms / 1000,
            )
      },
    })
    // Token counting (Tokenizer.count): what the BPE counted, and what it did not count again
    // (a long text's count remembered, as an agent's earlier messages are on each turn).
    new client.Counter({
      name: 'tollway_counted_characters_total',
      help: 'Characters of text the gateway counted tokens of (prompts, and replies an upstream gave no usage for), by how: tokenized (run through the tokenizer) or remembered (a long text seen before, its count kept by its SHA-256). Whole process.',
      labelNames: ['how'],
      registers,
      collect() {
        this.reset()
        this.inc({ how: 'tokenized' }, Tokenizer.counted.tokenized)
        this.inc({ how: 'remembered' }, Tokenizer.counted.remembered)
      },
    })
    // The ledger's group commit (Batch.ts): statements sent and items they carried, by
    // batcher. Items per statement is how much batching saves; fallbacks are batches that
    // failed as a whole and ran item by item; behind, statements sent while others were under
    // way (pipelined, for the API-key ledger).
    const batches = (field: keyof Batch.Stats, name: string, help: string) =>
      new client.Counter({
        name,
        help,
        labelNames: ['batcher'],
        registers,
        collect() {
          this.reset()
          for (const [batcher, stats] of Object.entries(Batch.stats(deps.sql)))
            this.inc({ batcher }, stats[field])
        },
      })
    batches('statements', 'tollway_ledger_statements_total', 'Ledger batch statements sent.')
    batches('items', 'tollway_ledger_items_total', 'Ledger calls carried by batch statements.')
    batches(
      'fallbacks',
      'tollway_ledger_batch_fallbacks_total',
      'Ledger batches that failed as a whole and ran item by item.',
    )
    batches(
      'behind',
      'tollway_ledger_statements_behind_total',
      'Ledger statements sent while others of their batcher were under way.',
    )
    batches(
      'seconds',
      'tollway_ledger_statement_seconds_total',
      'Seconds from each ledger batch statement sent to its answer, summed: over tollway_ledger_statements_total, the round trip every admission waits for.',
    )
    new client.Counter({
      name: 'tollway_database_connections_lost_total',
      help: 'Database connections given up for lost after DATABASE_TIMEOUT_MS without an answer (a link lost without a reset), by connection: ordered (the API-key ledger one, replaced) or pool (closed).',
      labelNames: ['connection'],
      registers,
      collect() {
        this.reset()
        const l = Db.lostConnections(deps.sql)
        this.inc({ connection: 'ordered' }, l.ordered)
        this.inc({ connection: 'pool' }, l.pool)
      },
    })
    this.refusals = new client.Counter({
      name: 'tollway_refusals_limited_total',
      help: 'Refusals answered 429 refusal_rate_limited instead: a client address over payments.refusalRatePerSecond (challenges issued, credentials refused).',
      registers,
    })
  }

  /** Counts a refusal the per-address limit turned into a 429. */
  refusalLimited(): void {
    this.refusals.inc()
  }

  /** Counts an HTTP answer. */
  answered(method: string, route: string, status: number): void {
    this.http.inc({ method, route, status: String(status) })
  }

  /** Counts a settled completion: its outcome, tokens, money and times. */
  completed(model: string, payer: Payer, stream: boolean, o: Outcome, charged: bigint): void {
    const key = `${payer}\u0000${model}`
    let c = this.counts.get(key)
    if (!c) {
      c = { model, payer, byStatus: {}, prompt: 0, completion: 0, charged: 0n }
      this.counts.set(key, c)
    }
    c.byStatus[o.status] = (c.byStatus[o.status] ?? 0) + 1
    // Tokens charged for: none for an outcome that cost nothing (a failure before the first
    // token, a stream superseded before it began).
    if (charged > 0n) {
      c.prompt += o.promptTokens
      c.completion += o.completionTokens
      c.charged += charged
    }
    const s = stream ? 'true' : 'false'
    this.duration.observe({ model, stream: s }, o.latencyMs / 1000)
    // A whole completion's first token is its answer: only a stream's says more.
    if (stream && o.ttftMs !== null) this.ttft.observe({ model, stream: s }, o.ttftMs / 1000)
  }

  /** The text exposition format. */
  text(): Promise<string> {
    return this.registry.metrics()
  }

  get contentType(): string {
    return this.registry.contentType
  }
}

/**
 * The process, under the names prom-client's default metrics use (dashboards know them),
 * read when scraped. Not its `collectDefaultMetrics`: under Bun its event-loop monitor reads
 * nonsense (NaN, a minimum of 9·10⁹ s) and keeps a timer running, doubling an idle gateway's
 * CPU.
 */
function processMetrics(registers: client.Registry[]) {
  const started = Date.now() / 1000 - process.uptime()
  new client.Counter({
    name: 'process_cpu_seconds_total',
    help: 'Total user and system CPU time spent in seconds.',
    registers,
    collect() {
      const { user, system } = process.cpuUsage()
      this.reset()
      this.inc((user + system) / 1e6)
    },
  })
  new client.Gauge({
    name: 'process_start_time_seconds',
    help: 'Start time of the process since unix epoch in seconds.',
    registers,
    collect() {
      this.set(Math.round(started))
    },
  })
  const memory = (name: string, help: string, field: keyof NodeJS.MemoryUsage) =>
    new client.Gauge({
      name,
      help,
      registers,
      collect() {
        this.set(process.memoryUsage()[field])
      },
    })
  // Only the resident size: Bun's heapUsed and heapTotal are not what the names say (used
  // read 20 times total).
  memory('process_resident_memory_bytes', 'Resident memory size in bytes.', 'rss')
}
