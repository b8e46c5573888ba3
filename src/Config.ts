/**
 * Configuration: environment variables plus an optional JSON file (`TOLLWAY_CONFIG`),
 * validated by zod at start-up. This is the only module that reads `process.env`.
 */
import { readFileSync } from 'node:fs'
import { z } from 'zod'
import { STRATEGIES } from './upstream/Router.ts'

/** A non-negative integer amount of base units, given as a decimal string or a safe integer. */
const BaseUnits = z
  .union([z.string().regex(/^\d+$/, 'expected a decimal string of base units'), z.number().int()])
  .transform((v, ctx) => {
    if (typeof v === 'number' && (!Number.isSafeInteger(v) || v < 0)) {
      ctx.addIssue({ code: 'custom', message: 'expected a non-negative safe integer' })
      return z.NEVER
    }
    return BigInt(v)
  })

const Address = z
  .string()
  .regex(/^0x[0-9a-fA-F]{40}$/, 'expected a 0x-prefixed 20-byte hex address')

const Pricing = z.strictObject({
  /** Base units per 1,000,000 prompt tokens. */
  input: BaseUnits,
  /** Base units per 1,000,000 completion tokens. */
  output: BaseUnits,
})

const Upstream = z.strictObject({
  name: z.string().min(1),
  baseUrl: z.url(),
  /** Name of the environment variable that holds the upstream's API key. */
  apiKeyEnv: z.string().min(1).optional(),
  /** Time allowed for a stream's response headers, and between two of its chunks. */
  timeoutMs: z.number().int().positive().default(60_000),
  /**
   * Time allowed for a whole (non-streaming) completion's answer. The upstream writes it only
   * once the generation is done, so this bounds the whole generation: a reasoning model's
   * answer may take minutes (the OpenAI SDKs wait 10).
   */
  completionTimeoutMs: z.number().int().positive().default(600_000),
  /**
   * Where a limit of the gateway's own goes when the client named none (OpenAI's reasoning
   * models refuse `max_tokens`).
   */
  maxTokensParam: z.enum(['max_tokens', 'max_completion_tokens']).default('max_tokens'),
})

/** One upstream serving a model: where a request for the model can go. */
const Route = z.strictObject({
  upstream: z.string().min(1),
  upstreamModel: z.string().min(1),
  /**
   * What the upstream costs the operator, base units per 1M tokens (for the `cheapest`
   * routing strategy; clients pay the model's `pricing` whichever route serves them).
   * Unset: the model's price.
   */
  cost: Pricing.optional(),
  /**
   * An outside aggregator or marketplace (OpenRouter and the like) rather than a provider of
   * the operator's own: a request with `allow_external: false` skips it.
   */
  external: z.boolean().optional(),
})

const Model = z
  .strictObject({
    id: z.string().min(1),
    /** The one upstream serving the model (or `routes`, for several). */
    upstream: z.string().min(1).optional(),
    upstreamModel: z.string().min(1).optional(),
    /**
     * Several upstreams serving the model, in the operator's order: a request that fails on
     * one before its first token goes on to the next.
     */
    routes: z.array(Route).min(1).optional(),
    /** The order its routes are tried in when a request names no `routing_strategy`. */
    // The operator's order unless the config says otherwise: a primary and its backups, as
    // configs written before `balanced` spread requests meant.
    routing: z.enum(STRATEGIES).default('ordered'),
    pricing: Pricing,
    contextLength: z.number().int().positive(),
    /**
     * The most tokens the model writes in one answer, where it is below what the context
     * leaves (gpt-4o: 16,384 of 128,000). A request's output is capped by it (its hold with
     * it, and its `max_tokens` sent upstream, which an upstream refuses above its own limit).
     * Unset: what the context leaves.
     */
    maxOutputTokens: z.number().int().positive().optional(),
    /** Lowest plan tier allowed to use the model. */
    minTier: z.number().int().nonnegative().default(0),
  })
  .superRefine((m, ctx) => {
    const single = m.upstream !== undefined || m.upstreamModel !== undefined
    if (single && m.routes !== undefined)
      ctx.addIssue({
        code: 'custom',
        path: ['routes'],
        message: 'give either upstream and upstreamModel, or routes, not both',
      })
    else if (m.routes === undefined)
      for (const field of ['upstream', 'upstreamModel'] as const)
        if (m[field] === undefined)
          ctx.addIssue({
            code: 'custom',
            path: [field],
            message: `${field} is required (or routes, for several upstreams)`,
          })
  })

const Wallet = z
  .strictObject({
    /** Tokens a turn needs in the wallet to start. */
    floor: z.number().int().nonnegative(),
    /** Tokens added per 24 hours. */
    refillPerDay: z.number().int().positive(),
    /** Most tokens the wallet holds. */
    cap: z.number().int().positive(),
  })
  // A wallet that cannot hold its floor never lets a turn start, and its 429's Retry-After
  // (the time to refill up to the floor) would promise a refill that never comes.
  .refine((w) => w.floor <= w.cap, {
    path: ['floor'],
    message: 'above the cap: the wallet could never hold enough to start a turn',
  })

/** The most a plan's `int` column (migrations/0001_ledger.sql) holds. */
const INT_MAX = 2_147_483_647

const Plan = z.strictObject({
  tier: z.number().int().nonnegative().max(INT_MAX),
  /**
   * null: no request-rate limit. At most one a microsecond (60,000,000), the finest step the
   * ledger's rate state (a timestamp) takes: a higher limit has no period between requests.
   */
  requestsPerMinute: z.number().int().positive().max(60_000_000).nullable(),
  /** Completions in flight at once (streaming or not). null: unlimited. */
  maxConcurrent: z.number().int().positive().max(INT_MAX).nullable(),
  /** Prompt + completion tokens per calendar month (UTC). null: unlimited. */
  tokensPerMonth: z.number().int().positive().nullable(),
  /** A token wallet with a floor and a daily refill instead of (or beside) the monthly quota. */
  wallet: Wallet.nullable().default(null),
})
export type Plan = z.output<typeof Plan>

export const defaultPlans: Record<string, z.input<typeof Plan>> = {
  free: { tier: 0, requestsPerMinute: 10, maxConcurrent: 1, tokensPerMonth: 500_000 },
  pro: { tier: 1, requestsPerMinute: 60, maxConcurrent: 3, tokensPerMonth: 10_000_000 },
  wallet: {
    tier: 0,
    requestsPerMinute: 10,
    maxConcurrent: 1,
    tokensPerMonth: null,
    wallet: { floor: 500, refillPerDay: 1_000, cap: 10_000 },
  },
}

const Echo = z.strictObject({
  pricing: Pricing.prefault({ input: '1000000', output: '2000000' }),
  contextLength: z.number().int().positive().default(128_000),
  /** Pause between two streamed words, to look like a real model. */
  tokenDelayMs: z.number().int().nonnegative().default(15),
})

export const Schema = z
  .strictObject({
    port: z.number().int().min(0).max(65535).default(8787),
    host: z.string().min(1).default('127.0.0.1'),
    dataDir: z.string().min(1).default('./.tollway'),
    databaseUrl: z
      .string()
      .refine((v) => {
        try {
          return /^postgres(ql)?:$/.test(new URL(v).protocol)
        } catch {
          return false
        }
      }, 'must be a postgres:// or postgresql:// URL')
      .optional(),
    /**
     * Sent as `Authorization: Bearer <token>`, so one word of printable ASCII: a token with a
     * space inside could never be sent, and one read from a file with its line break (a
     * mounted secret) was compared with it, and every admin request was a 401. The ends are
     * trimmed, as the token kept in the data dir is.
     */
    adminToken: z
      .string()
      .trim()
      .min(16)
      .regex(
        /^[\x21-\x7e]+$/,
        'must be printable ASCII without spaces (it is sent as "Authorization: Bearer <token>")',
      )
      .optional(),
    /**
     * Serve over TLS (Bun's own): PEM files of the certificate chain and its key. Payment
     * challenges and credentials go only over TLS (or loopback, or a trusted proxy's).
     */
    tls: z.strictObject({ certFile: z.string().min(1), keyFile: z.string().min(1) }).optional(),
    /** Trust `X-Forwarded-Proto: https` from a TLS-terminating proxy in front. */
    trustProxy: z.boolean().default(false),
    /**
     * Browser origins allowed to call the gateway (CORS): `["*"]`, any (the default: keys and
     * the admin token are sent as headers, never as cookies, so a page can do only what its
     * key lets it), a list of origins (`https://app.example`), or `[]`, none.
     */
    corsOrigins: z
      .array(
        z
          .string()
          .refine(
            (o) => o === '*' || /^https?:\/\/[^/\s]+$/.test(o),
            'each origin is "*" or scheme://host[:port], with no path',
          ),
      )
      .default(['*']),
    /** Whether completions asked for with Tollway-Receipt: true get a signed receipt (see metering/Receipt.ts). */
    receipts: z.boolean().default(true),
    /**
     * The receipts' Ed25519 private key (32 bytes, hex); generated and kept in the data dir
     * when unset. Each instance publishes its public key in the database as it starts
     * (ledger/ReceiptKeys.ts), so instances with keys of their own still verify each other's.
     */
    receiptKey: z
      .string()
      .regex(/^(0x)?[0-9a-fA-F]{64}$/, 'expected a 32-byte hex Ed25519 private key')
      .optional(),
    logLevel: z
      .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
      .default('info'),
    /**
     * How long a request waits for the database to answer a step it cannot go on without (a
     * key lookup, an admission, an extension, a charge) before it is a 503
     * `database_unavailable`: a database that takes connections but does not answer would
     * otherwise hold every request until TCP gives up.
     */
    databaseTimeoutMs: z.number().int().positive().default(10_000),
    /**
     * How long a completed request's Idempotency-Key is remembered, from its admission: a
     * request sent with it within the window is refused as a repeat (409, never run or charged
     * again); after it, the key is forgotten (ledger/IdempotencyKeys.ts) and the request is a
     * new one. 0: kept for ever (the tables grow by a row a keyed request). Stripe's: 24 h.
     */
    idempotencyWindowSeconds: z
      .number()
      .int()
      .min(0)
      .max(INT_MAX)
      .default(24 * 3600),
    /** The largest request body read before its credential is checked. */
    maxBodyBytes: z
      .number()
      .int()
      .positive()
      .default(1024 * 1024),
    /**
     * The largest completion request body (inline images, audio, files): one over
     * `maxBodyBytes`, or sent without a length, is read only once its API key or Payment
     * credential proves good. Never below `maxBodyBytes`.
     */
    maxCompletionBodyBytes: z
      .number()
      .int()
      .positive()
      .default(32 * 1024 * 1024),
    /**
     * Processes serving the port (SO_REUSEPORT, Linux): one JavaScript thread each, so a
     * busy gateway uses more than one core. Each is an instance as DESIGN.md "Many
     * instances" says: they share the database and nothing else.
     */
    workers: z.number().int().min(1).max(256).default(1),
    upstreams: z.array(Upstream).default([]),
    models: z.array(Model).default([]),
    plans: z.record(z.string().min(1), Plan).prefault(defaultPlans),
    defaultPlan: z.string().min(1).default('free'),
    echo: Echo.prefault({}),
    /**
     * A real chain: all five set. None set: `npm start` runs a development chain (anvil)
     * unless `devChain` is false.
     */
    chain: z
      .strictObject({
        rpcUrl: z.url(),
        chainId: z.number().int().positive(),
        escrowAddress: Address,
        currencyAddress: Address,
        payeePrivateKey: z
          .string()
          .regex(/^0x[0-9a-fA-F]{64}$/, 'expected a 0x-prefixed 32-byte hex key'),
      })
      .optional(),
    devChain: z.boolean().default(true),
    /**
     * The development chain's port on 127.0.0.1 (anvil's usual one by default): the RPC URL
     * a wallet or `tollway channel withdraw` is given stays the same from start to start. 0:
     * a free one each start. Held by another process: a free one, and start-up says so.
     */
    devChainPort: z.number().int().min(0).max(65535).default(8545),
    /** MPP session payments (on when a chain is configured or the dev chain runs). */
    payments: z
      .strictObject({
        /** HMAC key of challenge ids; generated and kept in the data dir when unset. */
        challengeSecret: z.string().min(16).optional(),
        realm: z.string().min(1).default('tollway'),
        challengeExpiresSeconds: z.number().int().positive().default(600),
        /** How long a paused stream waits for a voucher. */
        voucherTimeoutMs: z.number().int().positive().default(60_000),
        minVoucherDelta: BaseUnits.prefault('1'),
        /** Voucher and top-up submissions a second per channel (the draft's 10). */
        voucherRatePerSecond: z.number().positive().default(10),
        /**
         * Challenges issued and credentials refused (401s, payment problems, 402s to requests
         * without a credential) a second per client address (an IPv6 /64), and as many at once
         * as `refusalBurst`;
         * past them a 429, and Payment credentials from the address are not verified meanwhile
         * (the core draft: rate limits on challenges issued and verification attempts). 0: no
         * limit. Per instance. Requests from this machine's loopback are not limited unless the
         * gateway trusts a proxy's X-Forwarded-For.
         */
        refusalRatePerSecond: z.number().min(0).default(10),
        refusalBurst: z.number().int().positive().default(100),
        suggestedDeposit: BaseUnits.prefault('10000000'),
        /**
         * The least deposit (an open) or top-up the gateway sends and pays the gas of (EIP-3009,
         * `authorization`): below it, each would cost the operator a transaction's gas for
         * nothing (the draft, "Denial of Service"). A payer that broadcasts its own (`hash`)
         * is not held to it.
         */
        minGasPaidDeposit: BaseUnits.prefault('100000'),
        /**
         * Blocks an open or a top-up needs (its own and those on top of it) before its deposit
         * counts: the evm draft asks for depth enough that a reorganization cannot take a
         * deposit back (12 or more on Ethereum mainnet; 1 on the development chain).
         */
        confirmations: z.number().int().min(1).max(1000).default(1),
        /**
         * The currency token's EIP-712 domain name and version, stated in challenges so that a
         * payer opens with a wallet key alone; unset: read from the token (ERC-5267) at start-up.
         */
        tokenDomain: z
          .strictObject({ name: z.string().min(1).max(256), version: z.string().min(1).max(256) })
          .optional(),
        settlement: z
          .strictObject({
            /** Settle a channel once this much spending is unsettled. */
            thresholdAmount: BaseUnits.prefault('1000000'),
            /** Settle whatever is settleable after this long without activity. */
            idleSeconds: z.number().int().positive().default(300),
            intervalSeconds: z.number().int().positive().default(30),
            /**
             * Close a channel after this long without activity (the draft's operational
             * guidance: 30+ days), giving the payer the rest of its deposit back; 0: never.
             */
            closeIdleSeconds: z
              .number()
              .int()
              .min(0)
              .default(30 * 24 * 3600),
          })
          .prefault({}),
      })
      .prefault({}),
    metering: z
      .strictObject({
        blockTokens: z.number().int().positive().default(64),
        leaseSeconds: z.number().int().positive().default(600),
        /**
         * Prompt tokens a content part other than text (an image, audio, a file) is reserved
         * and checked against the context as; the upstream's usage settles the charge.
         */
        mediaPartTokens: z.number().int().nonnegative().default(1_000),
        /** A stream that wrote nothing this long writes a keep-alive comment (see http/Sse.ts). */
        keepAliveSeconds: z.number().positive().default(15),
      })
      .prefault({}),
  })
  .superRefine((c, ctx) => {
    const upstreams = new Set(c.upstreams.map((u) => u.name))
    c.models.forEach((m, i) => {
      const named = m.routes
        ? m.routes.map((r, j) => ({ upstream: r.upstream, path: ['routes', j, 'upstream'] }))
        : m.upstream !== undefined
          ? [{ upstream: m.upstream, path: ['upstream'] }]
          : []
      for (const { upstream, path } of named)
        if (!upstreams.has(upstream))
          ctx.addIssue({
            code: 'custom',
            path: ['models', i, ...path],
            message: `no upstream named "${upstream}"`,
          })
    })
    if (!(c.defaultPlan in c.plans))
      ctx.addIssue({
        code: 'custom',
        path: ['defaultPlan'],
        message: `no plan named "${c.defaultPlan}"`,
      })
  })
export type Config = z.output<typeof Schema>
export type Model = z.output<typeof Model>
export type Upstream = z.output<typeof Upstream>
export type Route = z.output<typeof Route>

/** The upstreams serving a model, in the operator's order (one, unless it lists `routes`). */
export function routes(m: Model): Route[] {
  return m.routes ?? [{ upstream: m.upstream!, upstreamModel: m.upstreamModel! }]
}
export type Pricing = z.output<typeof Pricing>

/** Raised when the configuration is invalid; the message names every bad field. */
export class ConfigError extends Error {
  override name = 'ConfigError'
}

// From the environment a string: blank is no port (coerced, it was 0, a random one).
const Port = z.preprocess(
  (v) => (typeof v === 'string' && v.trim() === '' ? Number.NaN : v),
  z.coerce.number().int().min(0).max(65535),
)
// Blank is no number: coerced, it was 0, which for the Idempotency-Key window means for ever.
const Count = z.preprocess(
  (v) => (typeof v === 'string' && v.trim() === '' ? Number.NaN : v),
  z.coerce.number(),
)
const env = {
  PORT: ['port', Port],
  DEV_CHAIN_PORT: ['devChainPort', Port],
  HOST: ['host', z.string()],
  TOLLWAY_DATA_DIR: ['dataDir', z.string()],
  DATABASE_URL: ['databaseUrl', z.string()],
  ADMIN_TOKEN: ['adminToken', z.string()],
  LOG_LEVEL: ['logLevel', z.string()],
  DATABASE_TIMEOUT_MS: ['databaseTimeoutMs', z.coerce.number()],
  IDEMPOTENCY_WINDOW_SECONDS: ['idempotencyWindowSeconds', Count],
  MAX_BODY_BYTES: ['maxBodyBytes', z.coerce.number()],
  MAX_COMPLETION_BODY_BYTES: ['maxCompletionBodyBytes', z.coerce.number()],
  TOLLWAY_WORKERS: ['workers', z.coerce.number()],
  RECEIPT_KEY: ['receiptKey', z.string()],
  TRUST_PROXY: ['trustProxy', z.stringbool()],
  // A comma-separated list, or `none`.
  CORS_ORIGINS: [
    'corsOrigins',
    z.string().transform((v) =>
      v.trim() === 'none'
        ? []
        : v
            .split(',')
            .map((o) => o.trim())
            .filter((o) => o !== ''),
    ),
  ],
  TOLLWAY_RECEIPTS: ['receipts', z.stringbool()],
} as const

const paymentEnv = {
  CHALLENGE_SECRET: ['challengeSecret', z.string()],
  PAYMENT_REALM: ['realm', z.string()],
} as const

const chainEnv = {
  CHAIN_RPC_URL: ['rpcUrl', z.string()],
  CHAIN_ID: ['chainId', z.coerce.number()],
  ESCROW_ADDRESS: ['escrowAddress', z.string()],
  CURRENCY_ADDRESS: ['currencyAddress', z.string()],
  PAYEE_PRIVATE_KEY: ['payeePrivateKey', z.string()],
} as const

/** Reads the configuration from `environment` (default `process.env`) and its config file. */
export function load(environment: Record<string, string | undefined> = process.env): Config {
  let file: unknown = {}
  const path = environment.TOLLWAY_CONFIG
  if (path) {
    let text: string
    try {
      text = readFileSync(path, 'utf8')
    } catch (e) {
      throw new ConfigError(`TOLLWAY_CONFIG: cannot read ${path}: ${(e as Error).message}`)
    }
    try {
      file = JSON.parse(text)
    } catch (e) {
      throw new ConfigError(`TOLLWAY_CONFIG: ${path} is not JSON: ${(e as Error).message}`)
    }
    if (typeof file !== 'object' || file === null || Array.isArray(file))
      throw new ConfigError(`TOLLWAY_CONFIG: ${path} must hold a JSON object`)
  }
  const merged: Record<string, unknown> = { ...(file as object) }
  for (const [name, [key, schema]] of Object.entries(env)) {
    const raw = environment[name]
    if (raw === undefined || raw === '') continue
    const parsed = (schema as z.ZodType).safeParse(raw)
    if (!parsed.success) throw new ConfigError(`${name}: ${parsed.error.issues[0]?.message}`)
    merged[key] = parsed.data
  }
  for (const [name, [key, schema]] of Object.entries(paymentEnv)) {
    const raw = environment[name]
    if (raw === undefined || raw === '') continue
    const parsed = (schema as z.ZodType).safeParse(raw)
    if (!parsed.success) throw new ConfigError(`${name}: ${parsed.error.issues[0]?.message}`)
    merged.payments = { ...(merged.payments as object), [key]: parsed.data }
  }
  const cert = environment.TLS_CERT_FILE
  const key = environment.TLS_KEY_FILE
  if (cert || key) {
    if (!cert || !key)
      throw new ConfigError(
        `${cert ? 'TLS_KEY_FILE' : 'TLS_CERT_FILE'}: TLS needs both TLS_CERT_FILE and TLS_KEY_FILE`,
      )
    merged.tls = { certFile: cert, keyFile: key }
  }
  const given = Object.keys(chainEnv).filter((name) => environment[name])
  if (given.length > 0) {
    const missing = Object.keys(chainEnv).filter((name) => !environment[name])
    if (missing.length > 0)
      throw new ConfigError(
        `${missing.join(', ')}: a real chain needs all of ${Object.keys(chainEnv).join(', ')} (set: ${given.join(', ')})`,
      )
    const chain: Record<string, unknown> = {}
    for (const [name, [key, schema]] of Object.entries(chainEnv)) {
      const parsed = (schema as z.ZodType).safeParse(environment[name])
      if (!parsed.success) throw new ConfigError(`${name}: ${parsed.error.issues[0]?.message}`)
      chain[key] = parsed.data
    }
    merged.chain = chain
  }
  const config = from(merged, (p) => envName(p))
  // An upstream whose key is missing would answer every request 401, which reads as the
  // upstream failing (its circuit opens, then 503s): stop here instead, naming the variable.
  config.upstreams.forEach((u, i) => {
    if (u.apiKeyEnv && !environment[u.apiKeyEnv])
      throw new ConfigError(
        `upstreams.${i}.apiKeyEnv: ${u.apiKeyEnv} is not set (the API key of upstream "${u.name}")`,
      )
  })
  return config
}

/** Validates an already-assembled config object (tests use this). */
export function from(input: unknown, name: (path: string) => string = (p) => p): Config {
  const parsed = Schema.safeParse(input)
  if (!parsed.success) throw new ConfigError(describe(parsed.error, '', name))
  if (parsed.data.workers > 1 && !parsed.data.databaseUrl)
    throw new ConfigError(
      `${name('workers')}: more than one worker needs DATABASE_URL (the embedded database serves one process)`,
    )
  // A model no plan may use would answer every key 403 "upgrade the plan", with none to
  // upgrade to.
  const top = Math.max(...Object.values(parsed.data.plans).map((p) => p.tier))
  parsed.data.models.forEach((m, i) => {
    if (m.minTier > top)
      throw new ConfigError(
        `${name(`models.${i}.minTier`)}: ${m.minTier} is above every plan's tier (the highest is ${top}): no account could use "${m.id}"`,
      )
  })
  return parsed.data
}

/** Reads an upstream's API key from the environment it names. */
export function upstreamKey(
  upstream: Upstream,
  environment: Record<string, string | undefined> = process.env,
): string | undefined {
  return upstream.apiKeyEnv ? environment[upstream.apiKeyEnv] : undefined
}

function envName(path: string): string {
  for (const [name, [key]] of Object.entries(env)) if (key === path) return `${name} (${key})`
  for (const [name, [key]] of Object.entries(paymentEnv))
    if (`payments.${key}` === path) return `${name} (${path})`
  for (const [name, [key]] of Object.entries(chainEnv))
    if (`chain.${key}` === path) return `${name} (${path})`
  return path
}

function describe(error: z.ZodError, prefix = '', name: (p: string) => string = (p) => p) {
  return error.issues
    .map((i) => `${prefix}${name(i.path.join('.') || '(root)')}: ${i.message}`)
    .join('\n')
}
