import { describe, expect, test } from 'bun:test'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import * as Config from '../src/Config.ts'

function file(contents: string): string {
  const path = join(mkdtempSync(join(tmpdir(), 'tollway-config-')), 'config.json')
  writeFileSync(path, contents)
  return path
}

describe('load', () => {
  test('behavior: embedded defaults with nothing set', () => {
    const c = Config.load({})
    expect(c).toMatchObject({ port: 8787, host: '127.0.0.1', dataDir: './.tollway', models: [] })
    // anvil's usual port: the dev chain's RPC URL the same from start to start.
    expect(c.devChainPort).toBe(8545)
    expect(Config.load({ DEV_CHAIN_PORT: '0' }).devChainPort).toBe(0)
    expect(c.databaseUrl).toBeUndefined()
    expect(c.echo.pricing).toEqual({ input: 1_000_000n, output: 2_000_000n })
    expect(c.plans.free).toMatchObject({
      tier: 0,
      requestsPerMinute: 10,
      maxConcurrent: 1,
      tokensPerMonth: 500_000,
    })
    expect(c.plans.pro).toMatchObject({
      tier: 1,
      requestsPerMinute: 60,
      maxConcurrent: 3,
      tokensPerMonth: 10_000_000,
    })
    expect(c.plans.wallet!.wallet).toEqual({ floor: 500, refillPerDay: 1_000, cap: 10_000 })
  })

  test('behavior: environment variables override the file', () => {
    const path = file(JSON.stringify({ port: 9000, host: '0.0.0.0' }))
    const c = Config.load({ TOLLWAY_CONFIG: path, PORT: '9100', DATABASE_URL: 'postgres://x/y' })
    expect(c).toMatchObject({ port: 9100, host: '0.0.0.0', databaseUrl: 'postgres://x/y' })
  })

  test('behavior: a config file adds upstreams and priced models', () => {
    const path = file(
      JSON.stringify({
        upstreams: [{ name: 'oa', baseUrl: 'https://api.example.com/v1', apiKeyEnv: 'OA_KEY' }],
        models: [
          {
            id: 'm',
            upstream: 'oa',
            upstreamModel: 'gpt-x',
            pricing: { input: '150000', output: 600000 },
            contextLength: 128000,
          },
        ],
      }),
    )
    const c = Config.load({ TOLLWAY_CONFIG: path, OA_KEY: 'sk-1' })
    expect(c.models[0]!.pricing).toEqual({ input: 150_000n, output: 600_000n })
    expect(Config.upstreamKey(c.upstreams[0]!, { OA_KEY: 'sk-1' })).toBe('sk-1')
    // Its key unset: the start stops, naming the variable (not 401s read as an upstream down).
    expect(() => Config.load({ TOLLWAY_CONFIG: path })).toThrow(
      'upstreams.0.apiKeyEnv: OA_KEY is not set (the API key of upstream "oa")',
    )
    expect(() => Config.load({ TOLLWAY_CONFIG: path, OA_KEY: '' })).toThrow(/OA_KEY is not set/)
  })

  test('error: a plan whose token wallet floor is above its cap names the field', () => {
    const plan = { tier: 0, requestsPerMinute: null, maxConcurrent: null, tokensPerMonth: null }
    const wallet = { floor: 20_000, refillPerDay: 1_000, cap: 10_000 }
    expect(() => Config.from({ plans: { free: { ...plan, wallet } } })).toThrow(
      'plans.free.wallet.floor: above the cap: the wallet could never hold enough to start a turn',
    )
    expect(
      Config.from({ plans: { free: { ...plan, wallet: { ...wallet, floor: 10_000 } } } }).plans
        .free!.wallet,
    ).toEqual({ ...wallet, floor: 10_000 })
  })

  test('error: a plan of more requests a minute than a timestamp can space apart names the field', () => {
    const plan = { tier: 0, maxConcurrent: null, tokensPerMonth: null }
    expect(() =>
      Config.from({ plans: { free: { ...plan, requestsPerMinute: 60_000_001 } } }),
    ).toThrow(/^plans\.free\.requestsPerMinute: /)
    const most = Config.from({ plans: { free: { ...plan, requestsPerMinute: 60_000_000 } } })
    expect(most.plans.free!.requestsPerMinute).toBe(60_000_000)
  })

  test('error: a plan tier or maxConcurrent past what the plans table holds names the field', () => {
    const plan = { tier: 0, requestsPerMinute: null, maxConcurrent: null, tokensPerMonth: null }
    for (const field of ['tier', 'maxConcurrent'] as const) {
      expect(() => Config.from({ plans: { free: { ...plan, [field]: 2 ** 31 } } })).toThrow(
        new RegExp(`^plans\\.free\\.${field}: `),
      )
      expect(
        Config.from({ plans: { free: { ...plan, [field]: 2 ** 31 - 1 } } }).plans.free![field],
      ).toBe(2 ** 31 - 1)
    }
  })

  test('error: a model whose minTier is above every plan, or a short CHALLENGE_SECRET, names the field', () => {
    const model = {
      id: 'gold-only',
      upstream: 'oa',
      upstreamModel: 'x',
      pricing: { input: '1', output: '1' },
      contextLength: 100,
    }
    const upstreams = [{ name: 'oa', baseUrl: 'https://api.example.com/v1' }]
    expect(() => Config.from({ upstreams, models: [{ ...model, minTier: 2 }] })).toThrow(
      `models.0.minTier: 2 is above every plan's tier (the highest is 1): no account could use "gold-only"`,
    )
    expect(Config.from({ upstreams, models: [{ ...model, minTier: 1 }] }).models[0]!.minTier).toBe(
      1,
    )
    expect(() => Config.load({ CHALLENGE_SECRET: 'short' })).toThrow(
      /^CHALLENGE_SECRET \(payments\.challengeSecret\): /,
    )
  })

  test('behavior: ADMIN_TOKEN is one word: read with a line break it is trimmed, with a space inside refused', () => {
    // A secret mounted as a file keeps its last line break: the token is what comes before it.
    expect(Config.load({ ADMIN_TOKEN: 'admin-token-0123456789\n' }).adminToken).toBe(
      'admin-token-0123456789',
    )
    expect(Config.load({ ADMIN_TOKEN: '  admin-token-0123456789 ' }).adminToken).toBe(
      'admin-token-0123456789',
    )
    // "Authorization: Bearer <token>" cannot carry these: no request could open the gateway.
    for (const token of [
      'admin token 0123456789',
      'admin-token-\n0123456789',
      'admin-tökën-0123456789',
    ])
      expect(() => Config.load({ ADMIN_TOKEN: token })).toThrow(/^ADMIN_TOKEN .*printable ASCII/)
    expect(() => Config.load({ ADMIN_TOKEN: '  short-token   \n' })).toThrow(/ADMIN_TOKEN/)
  })

  test('behavior: a model lists several upstreams as routes, with their costs', () => {
    const c = Config.from({
      upstreams: [
        { name: 'a', baseUrl: 'https://a.example.com/v1' },
        { name: 'b', baseUrl: 'https://b.example.com/v1' },
      ],
      models: [
        {
          id: 'm',
          routes: [
            { upstream: 'a', upstreamModel: 'x' },
            { upstream: 'b', upstreamModel: 'y', cost: { input: 5, output: '7' } },
          ],
          pricing: { input: 10, output: 20 },
          contextLength: 100,
        },
        {
          id: 'n',
          upstream: 'b',
          upstreamModel: 'z',
          pricing: { input: 1, output: 1 },
          contextLength: 1,
        },
      ],
    })
    expect(Config.routes(c.models[0]!)).toEqual([
      { upstream: 'a', upstreamModel: 'x' },
      { upstream: 'b', upstreamModel: 'y', cost: { input: 5n, output: 7n } },
    ])
    expect(Config.routes(c.models[1]!)).toEqual([{ upstream: 'b', upstreamModel: 'z' }])
  })

  test('error: a model with routes and an upstream, neither, or a route to no upstream names the field', () => {
    const upstreams = [{ name: 'a', baseUrl: 'https://a.example.com/v1' }]
    const base = { id: 'm', pricing: { input: 1, output: 1 }, contextLength: 1 }
    const routes = [{ upstream: 'a', upstreamModel: 'x' }]
    expect(() =>
      Config.from({ upstreams, models: [{ ...base, upstream: 'a', upstreamModel: 'x', routes }] }),
    ).toThrow(/models\.0\.routes: give either upstream and upstreamModel, or routes/)
    expect(() => Config.from({ upstreams, models: [base] })).toThrow(
      /models\.0\.upstream: upstream is required/,
    )
    expect(() => Config.from({ upstreams, models: [{ ...base, upstream: 'a' }] })).toThrow(
      /models\.0\.upstreamModel: upstreamModel is required/,
    )
    expect(() => Config.from({ upstreams, models: [{ ...base, routes: [] }] })).toThrow(
      /models\.0\.routes/,
    )
    expect(() =>
      Config.from({
        upstreams,
        models: [{ ...base, routes: [...routes, { upstream: 'ghost', upstreamModel: 'y' }] }],
      }),
    ).toThrow(/models\.0\.routes\.1\.upstream: no upstream named "ghost"/)
  })

  test('error: a bad value stops the start with a message naming the field', () => {
    expect(() => Config.load({ PORT: 'eighty' })).toThrow(/PORT/)
    expect(() => Config.load({ PORT: '70000' })).toThrow(/PORT/)
    // Blank is no port (it was 0: a random one), and a database URL must be one.
    expect(() => Config.load({ PORT: ' ' })).toThrow(/PORT/)
    expect(() => Config.load({ DEV_CHAIN_PORT: '65536' })).toThrow(/DEV_CHAIN_PORT/)
    expect(() => Config.load({ TOLLWAY_CONFIG: file('{"devChainPort": -1}') })).toThrow(
      /devChainPort/,
    )
    expect(() => Config.load({ DATABASE_URL: 'notaurl' })).toThrow(/DATABASE_URL/)
    expect(() => Config.load({ DATABASE_URL: 'mysql://x@h/db' })).toThrow(/DATABASE_URL/)
    expect(Config.load({ DATABASE_URL: 'postgresql://u@h:5432/db' }).databaseUrl).toBe(
      'postgresql://u@h:5432/db',
    )
    expect(() => Config.load({ TOLLWAY_CONFIG: file('{"port": "x"}') })).toThrow(/port/)
    expect(() => Config.load({ TOLLWAY_CONFIG: file('{"prot": 1}') })).toThrow(/prot/)
    expect(() => Config.load({ TOLLWAY_CONFIG: file('not json') })).toThrow(
      /TOLLWAY_CONFIG.*not JSON/,
    )
    expect(() => Config.load({ TOLLWAY_CONFIG: '/nonexistent/x.json' })).toThrow(/TOLLWAY_CONFIG/)
    expect(() =>
      Config.load({
        TOLLWAY_CONFIG: file(
          JSON.stringify({
            models: [
              {
                id: 'm',
                upstream: 'ghost',
                upstreamModel: 'x',
                pricing: { input: '1', output: '1' },
                contextLength: 1,
              },
            ],
          }),
        ),
      }),
    ).toThrow(/models\.0\.upstream: no upstream named "ghost"/)
    expect(() => Config.from({ models: [{ pricing: { input: '-1' } }] })).toThrow(/models\.0/)
    expect(() => Config.from({ defaultPlan: 'gold' })).toThrow(/defaultPlan/)
    // Workers share a database; the embedded one serves a single process.
    expect(() => Config.load({ TOLLWAY_WORKERS: '2' })).toThrow(/TOLLWAY_WORKERS.*DATABASE_URL/)
    expect(() => Config.load({ TOLLWAY_WORKERS: '0', DATABASE_URL: 'postgres://x/y' })).toThrow(
      /TOLLWAY_WORKERS/,
    )
    expect(Config.load({ TOLLWAY_WORKERS: '4', DATABASE_URL: 'postgres://x/y' }).workers).toBe(4)
  })

  test('behavior: completed Idempotency-Keys are kept 24 hours unless IDEMPOTENCY_WINDOW_SECONDS or the file says otherwise (0: for ever)', () => {
    expect(Config.load({}).idempotencyWindowSeconds).toBe(86_400)
    expect(Config.load({ IDEMPOTENCY_WINDOW_SECONDS: '3600' }).idempotencyWindowSeconds).toBe(3600)
    expect(Config.load({ IDEMPOTENCY_WINDOW_SECONDS: '0' }).idempotencyWindowSeconds).toBe(0)
    const path = file(JSON.stringify({ idempotencyWindowSeconds: 600 }))
    expect(Config.load({ TOLLWAY_CONFIG: path }).idempotencyWindowSeconds).toBe(600)
  })

  test('error: a bad Idempotency-Key window names the field', () => {
    // Blank too: coerced, it was 0, which keeps keys for ever.
    for (const bad of ['-1', '1.5', 'a day', ' ', '1e12'])
      expect(() => Config.load({ IDEMPOTENCY_WINDOW_SECONDS: bad })).toThrow(
        /IDEMPOTENCY_WINDOW_SECONDS/,
      )
    for (const bad of [-1, 0.5, '86400', null, 2 ** 31])
      expect(() =>
        Config.load({ TOLLWAY_CONFIG: file(JSON.stringify({ idempotencyWindowSeconds: bad })) }),
      ).toThrow(/idempotencyWindowSeconds/)
  })

  test('property: any JSON file either loads or fails with a ConfigError', () => {
    fc.assert(
      fc.property(fc.jsonValue(), (value) => {
        try {
          Config.from(value)
        } catch (e) {
          expect(e).toBeInstanceOf(Config.ConfigError)
        }
      }),
      { numRuns: 2000 },
    )
    fc.assert(
      fc.property(
        fc.dictionary(fc.constantFrom('PORT', 'HOST', 'MAX_BODY_BYTES', 'LOG_LEVEL'), fc.string()),
        (env) => {
          try {
            Config.load(env)
          } catch (e) {
            expect(e).toBeInstanceOf(Config.ConfigError)
          }
        },
      ),
      { numRuns: 2000 },
    )
  })

  test('property: any environment, every variable the gateway reads, with any config file, loads or fails with a ConfigError', () => {
    const names = [
      'PORT',
      'HOST',
      'TOLLWAY_DATA_DIR',
      'DATABASE_URL',
      'ADMIN_TOKEN',
      'LOG_LEVEL',
      'DATABASE_TIMEOUT_MS',
      'IDEMPOTENCY_WINDOW_SECONDS',
      'MAX_BODY_BYTES',
      'MAX_COMPLETION_BODY_BYTES',
      'TOLLWAY_WORKERS',
      'RECEIPT_KEY',
      'TRUST_PROXY',
      'CORS_ORIGINS',
      'TOLLWAY_RECEIPTS',
      'CHALLENGE_SECRET',
      'PAYMENT_REALM',
      'TLS_CERT_FILE',
      'TLS_KEY_FILE',
      'CHAIN_RPC_URL',
      'CHAIN_ID',
      'ESCROW_ADDRESS',
      'CURRENCY_ADDRESS',
      'PAYEE_PRIVATE_KEY',
      'UPSTREAM_KEY',
    ] as const
    const value = fc.oneof(
      fc.string({ maxLength: 12 }),
      fc.constantFrom(
        '',
        ' ',
        '0',
        '-1',
        '1e3',
        '0x10',
        '65536',
        'true',
        'false',
        'yes',
        'none',
        'http://127.0.0.1:8545',
        `0x${'ab'.repeat(20)}`,
        `0x${'cd'.repeat(32)}`,
        'toString',
        '__proto__',
      ),
    )
    // Config files: objects whose members are where the environment merges in (payments,
    // chain, tls), of any JSON, or anything at all.
    const configFile = fc.oneof(
      fc.record(
        {
          payments: fc.jsonValue({ maxDepth: 1 }),
          chain: fc.jsonValue({ maxDepth: 1 }),
          tls: fc.jsonValue({ maxDepth: 1 }),
          upstreams: fc.oneof(
            fc.constant([
              { name: 'u', baseUrl: 'http://127.0.0.1:1/v1', apiKeyEnv: 'UPSTREAM_KEY' },
            ]),
            fc.jsonValue({ maxDepth: 2 }),
          ),
          port: fc.jsonValue({ maxDepth: 0 }),
        },
        { requiredKeys: [] },
      ),
      fc.jsonValue({ maxDepth: 2 }),
    )
    const dir = mkdtempSync(join(tmpdir(), 'tollway-config-'))
    let n = 0
    fc.assert(
      fc.property(
        fc.dictionary(fc.constantFrom(...names), value),
        fc.option(configFile, { nil: undefined }),
        (environment, config) => {
          const env: Record<string, string> = { ...environment }
          if (config !== undefined) {
            const path = join(dir, `config-${n++}.json`)
            writeFileSync(path, JSON.stringify(config) ?? '')
            env.TOLLWAY_CONFIG = path
          }
          try {
            Config.load(env)
          } catch (e) {
            expect(e).toBeInstanceOf(Config.ConfigError)
          }
        },
      ),
      { numRuns: 2000, seed: 20261125 },
    )
  })
})
