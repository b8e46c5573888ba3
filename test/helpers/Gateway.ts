/**
 * A running gateway for a test file (create it with top-level await: teardown is registered with afterAll): its own database (see Postgres.ts), a fake upstream
 * with every behaviour as a model, logs captured in memory, and admin helpers.
 */
import { afterAll } from 'bun:test'
import OpenAI from 'openai'
import * as Config from '../../src/Config.ts'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Db from '../../src/ledger/Db.ts'
import { type Gateway, type StartOptions, start } from '../../src/main.ts'
import * as Ledger from './Ledger.ts'
import * as Postgres from './Postgres.ts'
import * as Upstream from './Upstream.ts'

export const behaviours = [
  'fake',
  'fake-slow',
  'fake-fail-mid',
  'fake-no-usage',
  'fake-500',
  'fake-hang',
  'fake-stall',
  'fake-400',
  'fake-liar',
]

export type TestGateway = Gateway & {
  upstream: Upstream.FakeUpstream
  logs: string[]
  db: Postgres.TestDb
  config: Config.Config
  admin(path: string, body?: unknown, method?: string): Promise<Response>
  /** Creates an account on `plan` with `credits` and one key; returns its id and key. */
  account(input?: {
    plan?: string
    credits?: bigint | number
  }): Promise<{ id: string; key: string }>
  openai(key: string): OpenAI
  /**
   * POST /v1/chat/completions with `body` (JSON) and the API key `key`, as a client sends it
   * (with `headers` too).
   */
  complete(
    key: string,
    body: Record<string, unknown>,
    headers?: Record<string, string>,
  ): Promise<Response>
  /** Another instance on the same database (with its own connection pool on a server). */
  another(): Promise<TestGateway>
}

/** Plans for tests: the defaults plus `unlimited` (no limits) for money-only tests. */
export const plans = {
  ...Config.defaultPlans,
  unlimited: { tier: 9, requestsPerMinute: null, maxConcurrent: null, tokensPerMonth: null },
  /** Another plan without limits, to move an account between while it is busy. */
  unlimited2: { tier: 9, requestsPerMinute: null, maxConcurrent: null, tokensPerMonth: null },
  /** A monthly quota a prompt can pass alone (the test models' context is 4,096 tokens). */
  small: { tier: 0, requestsPerMinute: 10, maxConcurrent: 1, tokensPerMonth: 200 },
}

/**
 * Creates an account on `plan` with `credits` and one key, through the admin API of the
 * gateway at `url`; returns its id and key.
 */
export async function account(
  url: string,
  adminToken: string,
  { plan = 'unlimited', credits = 1_000_000n }: { plan?: string; credits?: bigint | number } = {},
): Promise<{ id: string; key: string }> {
  const admin = async (path: string, body: unknown) =>
    (await (
      await fetch(`${url}/admin${path}`, {
        method: 'POST',
        headers: { authorization: `Bearer ${adminToken}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      })
    ).json()) as Record<string, string>
  const { id } = await admin('/accounts', { name: 'test', plan })
  if (BigInt(credits) > 0n)
    await admin(`/accounts/${id}/credits`, { amount: String(credits), note: 'test' })
  return { id: id!, key: (await admin(`/accounts/${id}/keys`, { name: 'k' })).key! }
}

export async function create(
  overrides: Record<string, unknown> = {},
  shared?: { db: Postgres.TestDb; upstream: Upstream.FakeUpstream },
  /** More of `start`'s options (the sweep's interval, say). */
  options: Pick<StartOptions, 'sweepMs' | 'deadAfterMs'> = {},
): Promise<TestGateway> {
  const upstream = shared?.upstream ?? Upstream.start()
  const input = {
    port: 0,
    adminToken: 'test-admin-token-0123456789',
    logLevel: 'info',
    // One upstream per behaviour, so their circuit breakers are apart.
    upstreams: behaviours.map((b) => ({
      name: b,
      baseUrl: upstream.url,
      timeoutMs: 1_000,
      completionTimeoutMs: 1_000,
    })),
    models: [
      ...behaviours.map((b) => ({
        id: b,
        upstream: b,
        upstreamModel: b,
        pricing: { input: '1000000', output: '2000000' },
        contextLength: 4096,
      })),
      {
        id: 'org/premium',
        upstream: 'fake',
        upstreamModel: 'fake',
        pricing: { input: '1000000', output: '2000000' },
        contextLength: 4096,
        minTier: 1,
      },
    ],
    plans,
    metering: { blockTokens: 16 },
    devChain: false,
    ...overrides,
    // Tests open channels of a few base units: no least deposit unless a test sets one.
    payments: { minGasPaidDeposit: '0', ...(overrides.payments as object | undefined) },
  }
  const config = Config.from(input)
  const db = shared?.db ?? (await Postgres.fresh(config.plans))
  const logs: string[] = []
  const gateway = await start(config, {
    sql: db.sql as Db.Sql,
    // The embedded server takes one connection: no LISTEN there.
    listen: db.max > 1,
    logDestination: { write: (line: string) => logs.push(line) },
    ...options,
  })
  afterAll(() => gateway.stop())
  const admin = (path: string, body?: unknown, method = body === undefined ? 'GET' : 'POST') =>
    fetch(`${gateway.url}/admin${path}`, {
      method,
      headers: { authorization: `Bearer ${config.adminToken}`, 'content-type': 'application/json' },
      ...(body === undefined ? {} : { body: JSON.stringify(body) }),
    })
  const t: TestGateway = {
    ...gateway,
    upstream,
    logs,
    db,
    config,
    admin,
    account: (input) => account(gateway.url, config.adminToken!, input),
    complete: (key, body, headers) =>
      fetch(`${gateway.url}/v1/chat/completions`, {
        method: 'POST',
        headers: {
          authorization: `Bearer ${key}`,
          'content-type': 'application/json',
          ...headers,
        },
        body: JSON.stringify(body),
      }),
    openai: (key) => new OpenAI({ apiKey: key, baseURL: `${gateway.url}/v1`, maxRetries: 0 }),
    async another() {
      // A server database: its own pool (and LISTEN connection), as a second process has.
      // The embedded one takes a single connection, so there the instances share it.
      if (db.max === 1) return create(overrides, { db, upstream }, options)
      const sql = Db.connect({
        url: db.url,
        max: db.max,
        ...(db.schema ? { schema: db.schema } : {}),
      })
      const other = await create(overrides, { db: { ...db, sql }, upstream }, options)
      afterAll(() => sql.end())
      return other
    },
  }
  return t
}

/**
 * An account's ledger once this instance's queued charges are written, after checking the
 * invariants of DESIGN.md a row can show (Ledger.accountState).
 */
export async function ledger(sql: Db.Sql, accountId: string) {
  // A completion's finish may still be on its way after its response (see Batch.settled).
  await Batch.settled(sql)
  const state = await Ledger.accountState(sql, accountId)
  return { ...state, open_reservations: BigInt(state.open) }
}

/**
 * `ledger`, once nothing of the account is held any more (or `ms` went by): for charges and
 * releases that follow an answer (a cut stream settling, a late admission released).
 */
export async function released(sql: Db.Sql, accountId: string, ms = 5_000) {
  const until = performance.now() + ms
  let l = await ledger(sql, accountId)
  while (l.open_reservations > 0n && performance.now() < until) {
    await Bun.sleep(20)
    l = await ledger(sql, accountId)
  }
  return l
}

/** The `chain` config of a gateway paid on a test chain (test/helpers/Anvil.ts). */
export function chainOf(chain: {
  rpcUrl: string
  chainId: number
  escrowAddress: string
  currencyAddress: string
  payee: { privateKey: string }
}) {
  return {
    rpcUrl: chain.rpcUrl,
    chainId: chain.chainId,
    escrowAddress: chain.escrowAddress,
    currencyAddress: chain.currencyAddress,
    payeePrivateKey: chain.payee.privateKey,
  }
}
