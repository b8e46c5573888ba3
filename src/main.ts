/**
 * Wires the concrete pieces and serves. With nothing configured: embedded PGlite, a
 * generated admin token, and the built-in echo model.
 */
import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import type { Hex } from 'viem'
import * as Config from './Config.ts'
import * as Client from './chain/Client.ts'
import * as DevChain from './chain/DevChain.ts'
import { DevChainError } from './chain/Errors.ts'
import * as Escrow from './chain/Escrow.ts'
import * as Settlement from './chain/Settlement.ts'
import * as Token from './chain/Token.ts'
import * as Transaction from './chain/Transaction.ts'
import * as App from './http/App.ts'
import { Drain } from './http/Drain.ts'
import { Metrics } from './http/Metrics.ts'
import { Buckets, type Payments, VoucherLimiter } from './http/Payments.ts'
import * as Logger from './Logger.ts'
import * as Accounts from './ledger/Accounts.ts'
import * as ApiKeys from './ledger/ApiKeys.ts'
import * as Batch from './ledger/Batch.ts'
import * as Channels from './ledger/Channels.ts'
import * as Credits from './ledger/Credits.ts'
import * as Db from './ledger/Db.ts'
import * as Embedded from './ledger/Embedded.ts'
import * as IdempotencyKeys from './ledger/IdempotencyKeys.ts'
import * as Instances from './ledger/Instances.ts'
import * as ReceiptKeys from './ledger/ReceiptKeys.ts'
import * as Reservations from './ledger/Reservations.ts'
import * as Settlements from './ledger/Settlements.ts'
import { Waker } from './ledger/Waker.ts'
import * as Receipt from './metering/Receipt.ts'
import * as Tokenizer from './metering/Tokenizer.ts'
import * as ChainEscrow from './payment/evm/ChainEscrow.ts'
import * as Server from './payment/evm/Server.ts'
import { handOver } from './Signals.ts'
import * as EchoModel from './upstream/EchoModel.ts'
import * as OpenAICompatible from './upstream/OpenAICompatible.ts'
import { type Model, Router } from './upstream/Router.ts'

export type Gateway = {
  url: string
  /** The chain payments settle on: the configured one, or the development chain. */
  chain: Chain | undefined
  /** The development chain, when this gateway started one. */
  devChain: DevChain.DevChain | undefined
  adminToken: string
  /** True when the database is the embedded PGlite. */
  embedded: boolean
  sql: Db.Sql
  /**
   * Stops: no new connections; requests under way get up to `graceMs` (default 0) to
   * finish, then are cut (a cut stream is charged what it sent). Called again while a stop
   * waits, it cuts them at once.
   */
  stop(graceMs?: number): Promise<void>
}

export type Chain = NonNullable<Config.Config['chain']>

export type StartOptions = {
  /** Where logs go (tests capture them). */
  logDestination?: Logger.DestinationStream
  /** Environment for upstream API keys. */
  environment?: Record<string, string | undefined>
  /** Use this connection instead of opening one (tests; it is not closed on stop). */
  sql?: Db.Sql
  /** LISTEN for vouchers accepted by other instances (default: with DATABASE_URL). */
  listen?: boolean
  /** Release dead instances' reservations this often. */
  sweepMs?: number
  /** An instance whose heartbeat is this old is dead (default 90 s; see Instances.ts). */
  deadAfterMs?: number
  /** Share the port with other processes (SO_REUSEPORT): the `workers` of one gateway. */
  reusePort?: boolean
}

/** Starts a gateway from a validated config. */
export async function start(config: Config.Config, options: StartOptions = {}): Promise<Gateway> {
  const log = Logger.create(config.logLevel, options.logDestination)
  const stops: (() => Promise<void>)[] = []
  // This process's own embedded database (not one handed in, which others may share).
  const embedded = !options.sql && !config.databaseUrl
  try {
    let sql = options.sql
    if (!sql) {
      let url = config.databaseUrl
      if (!url) {
        mkdirSync(join(config.dataDir, 'pgdata'), { recursive: true })
        const pglite = await Embedded.start({ dataDir: resolve(config.dataDir, 'pgdata') })
        stops.push(pglite.stop)
        url = pglite.url
      }
      const own = Db.connect({ url, max: config.databaseUrl ? 10 : 1 })
      stops.push(() => own.end({ timeout: 5 }))
      sql = own
      if (embedded) {
        const stopFlushing = Embedded.flushWal(own)
        const stopCheckpoints = Embedded.checkpoints(own)
        stops.push(async () => {
          stopFlushing()
          stopCheckpoints()
        })
      }
    }
    if (config.databaseUrl && !options.sql) await reachable(sql, config.databaseUrl)
    Db.deadline(sql, config.databaseTimeoutMs, (which) =>
      log.warn(
        { databaseTimeoutMs: config.databaseTimeoutMs },
        which === 'ordered'
          ? 'the ledger connection did not answer within DATABASE_TIMEOUT_MS: replaced by a new one'
          : 'database connections that did not answer within DATABASE_TIMEOUT_MS were closed (new ones are opened as needed)',
      ),
    )
    await Db.migrate(sql)
    const ahead = await Db.newer(sql)
    if (ahead.length > 0)
      log.warn(
        { migrations: ahead },
        'the database has migrations of a newer release than this one: it serves on, but may not know what they changed; upgrade it',
      )
    await Accounts.syncPlans(sql, config.plans)
    const unconfigured = await Accounts.unconfiguredPlans(sql, config.plans)
    if (unconfigured.length > 0)
      log.warn(
        { plans: unconfigured, configured: Object.keys(config.plans) },
        `accounts are on plans the configuration no longer has (${unconfigured.map((p) => `${p.plan}: ${p.accounts}`).join(', ')}): they are still served on the limits last configured for them, and no account can be moved to them; move them to a configured plan (PATCH /admin/accounts/{id}, tollway accounts set <id> --plan P)`,
      )

    let devChain: DevChain.DevChain | undefined
    let chain: Chain | undefined = config.chain
    if (!chain && config.devChain) {
      // Kept in the data dir, as the database is: a restart finds the channels it knows of.
      mkdirSync(config.dataDir, { recursive: true })
      devChain = await DevChain.start({
        stateFile: resolve(config.dataDir, 'anvil-state.json'),
        // Not the gateway's own port (PORT=8545 say): a free one, or anvil would take it first.
        port: config.devChainPort === config.port ? 0 : config.devChainPort,
      })
      stops.push(devChain.stop)
      chain = {
        rpcUrl: devChain.rpcUrl,
        chainId: devChain.chainId,
        escrowAddress: devChain.escrowAddress,
        currencyAddress: devChain.currencyAddress,
        payeePrivateKey: devChain.payee.privateKey,
      }
    }

    const adminToken = config.adminToken ?? kept(config.dataDir, 'admin-token', 'twadm_')
    if (config.adminToken && keptOther(config.dataDir, 'admin-token', config.adminToken))
      log.warn(
        { path: join(config.dataDir, 'admin-token') },
        'ADMIN_TOKEN is set: the admin token kept in the data dir (from a start without it) does not open this gateway',
      )
    const router = new Router(models(config, options.environment ?? process.env))
    let payments: Payments | undefined
    let waker: Waker | undefined
    let settlement: Settlement.Worker | undefined
    if (chain) {
      const db = sql
      const client = Client.from({
        rpcUrl: chain.rpcUrl,
        chainId: chain.chainId,
        privateKey: chain.payeePrivateKey as Hex,
      })
      if (devChain) {
        if (devChain.portTaken !== undefined)
          log.warn(
            { port: devChain.portTaken, rpcUrl: chain.rpcUrl },
            'the development chain port (DEV_CHAIN_PORT) is held by another process: anvil is on a free one, so its RPC URL (rpcUrl) is not the usual one: give that to TOLLWAY_RPC_URL and wallets, or free the port and restart',
          )
        if (devChain.setAside)
          log.warn(
            { file: devChain.setAside },
            'the development chain state could not be loaded: set aside, the chain started afresh',
          )
        // A development chain started afresh (its state lost) has none of the channels the
        // database may keep: they are closed here, not served unfunded.
        const missing = await Channels.closeMissing(
          sql,
          chain.escrowAddress as Hex,
          async (channelId) =>
            (await Escrow.getChannel(client, {
              escrow: chain!.escrowAddress as Hex,
              channelId,
            })) !== undefined,
        )
        if (missing.length > 0)
          log.warn(
            { channels: missing.length },
            'closed channels the development chain does not have (its state was lost)',
          )
      }
      // Instances share the payee's key: their transactions take turns (nonces), see Transaction.
      Transaction.exclusive(
        client,
        Db.exclusive(sql, `tollway.send.${chain.chainId}.${client.account.address.toLowerCase()}`),
      )
      // The draft: no channel on an escrow whose close grace period is under 10 minutes. A
      // chain that does not answer now is checked again before the first open.
      const grace = await Escrow.gracePeriod(client, { escrow: chain.escrowAddress as Hex }).catch(
        (e) => {
          log.warn(
            { err: (e as Error).message },
            "cannot read the escrow's CLOSE_GRACE_PERIOD now; it is checked before the first channel opens",
          )
          return undefined
        },
      )
      if (grace !== undefined && grace < Escrow.minCloseGracePeriod)
        throw new Config.ConfigError(
          `ESCROW_ADDRESS: ${new ChainEscrow.EscrowGraceError(chain.escrowAddress as Hex, grace).message}`,
        )
      const s = config.payments.settlement
      const worker = Settlement.start({
        // The embedded database is this process's alone: no connection held through a pass.
        store: Settlements.store(sql, { alone: embedded }),
        client,
        escrow: chain.escrowAddress as Hex,
        chainId: chain.chainId,
        thresholdAmount: s.thresholdAmount,
        idleMs: s.idleSeconds * 1000,
        closeIdleMs: s.closeIdleSeconds * 1000,
        intervalMs: s.intervalSeconds * 1000,
        gracePeriod: grace,
        log,
      })
      // A database that does not answer holds none of these stops past its deadline.
      stops.push(() => Db.answered(sql, worker.stop()))
      settlement = worker
      // Stated in every challenge, so a payer opens with a wallet key alone (no RPC URL).
      const tokenDomain =
        config.payments.tokenDomain ??
        (await Token.domain(client, { token: chain.currencyAddress as Hex }).then(
          (d) => ({ name: d.name, version: d.version }),
          (e) => {
            log.warn(
              { err: (e as Error).message },
              'cannot read the currency token EIP-712 domain (ERC-5267): set payments.tokenDomain, or payers need an RPC URL to open channels',
            )
            return undefined
          },
        ))
      // The draft: `feePayer: true` only for a currency whose EIP-3009 path the escrow can use.
      const eip3009 = await ChainEscrow.hasEip3009(
        client,
        chain.currencyAddress as Hex,
        chain.escrowAddress as Hex,
      )
      if (eip3009 === false)
        log.warn(
          { token: chain.currencyAddress },
          'the currency token has no EIP-3009 with the bytes-signature receiveWithAuthorization the escrow calls: payers open and top up channels themselves (feePayer false)',
        )
      const escrow = ChainEscrow.create({
        client,
        escrow: chain.escrowAddress as Hex,
        currency: chain.currencyAddress as Hex,
        chainId: chain.chainId,
        confirmations: config.payments.confirmations,
        close: (v) => worker.close(v),
      })
      stops.push(async () => escrow.stop())
      const method = Server.create({
        chainId: chain.chainId,
        escrow: chain.escrowAddress as Hex,
        currency: chain.currencyAddress as Hex,
        recipient: client.account.address,
        minVoucherDelta: config.payments.minVoucherDelta,
        suggestedDeposit: config.payments.suggestedDeposit,
        minGasPaidDeposit: config.payments.minGasPaidDeposit,
        tokenDomain,
        feePayer: eip3009 !== false,
        store: {
          get: (id) => Channels.get(db, id),
          observe: (state, options) => Channels.observe(db, state, options),
          clock: () => Channels.clock(db),
          acceptVoucher: (v) => Db.answered(db, Channels.acceptVoucher(db, v)),
          sent: (t) => Settlements.sentForPayer(db, t),
          settledPublicly: (id) => Channels.settledPublicly(db, id),
        },
        chain: escrow,
      })
      // LISTEN needs a connection of its own, which the embedded server cannot give.
      const w = await Waker.start(sql, { listen: options.listen ?? Boolean(config.databaseUrl) })
      stops.push(() => Db.answered(sql, w.stop()))
      waker = w
      payments = {
        secret: config.payments.challengeSecret ?? kept(config.dataDir, 'challenge-secret', ''),
        realm: config.payments.realm,
        expiresMs: config.payments.challengeExpiresSeconds * 1000,
        methods: [method],
        voucherTimeoutMs: config.payments.voucherTimeoutMs,
        wake: (id) => w.wake(id),
        limiter: new VoucherLimiter(config.payments.voucherRatePerSecond),
        refusals:
          config.payments.refusalRatePerSecond > 0
            ? new Buckets(config.payments.refusalRatePerSecond, config.payments.refusalBurst)
            : undefined,
      }
    }
    const metrics = new Metrics({ sql, router })
    const drain = new Drain()
    const receipts = config.receipts ? new Receipt.Signer(receiptKey(config)) : undefined
    // Published before it signs a thing: any instance then gives its key (GET /v1/receipts/key).
    if (receipts) await ReceiptKeys.publish(sql, receipts)
    const app = App.create({
      config,
      sql,
      router,
      log,
      adminToken,
      metrics,
      payments,
      waker,
      settlement,
      receipts,
      drain,
    })
    const tls = config.tls ? tlsFiles(config.tls) : undefined
    let server: ReturnType<typeof Bun.serve>
    try {
      server = Bun.serve({
        port: config.port,
        hostname: config.host,
        fetch: app.fetch,
        idleTimeout: 255,
        reusePort: options.reusePort ?? false,
        ...(tls ? { tls } : {}),
      })
    } catch (e) {
      // A port in use, a host that does not resolve or is not this machine's: named.
      throw new Config.ConfigError(
        `HOST / PORT: cannot listen on ${config.host} port ${config.port}: ${(e as Error).message}`,
      )
    }
    // Runs after the server stopped (stops run in reverse): the charges of answered requests,
    // and of streams the stop cut, are written before the database goes.
    stops.push(async () => {
      await Bun.sleep(20) // cut streams settle as their generators unwind
      // A database that does not answer holds the stop no longer than it would a request.
      await Db.answered(sql, Batch.settled(sql)).catch(() => {})
      // Charges still being tried (the database was out of reach): a while longer.
      await Reservations.drained(10_000)
    })
    // A graceful stop's wait for the requests under way: ends when they have, or its grace
    // runs out, or a second stop cuts it short.
    let grace: { ms: number; cut: () => void } = { ms: 0, cut: () => {} }
    stops.push(async () => {
      if (grace.ms > 0) {
        const { promise, resolve } = Promise.withResolvers<void>()
        grace.cut = resolve
        const timer = setTimeout(resolve, grace.ms)
        await Promise.race([server.stop(false), promise])
        clearTimeout(timer)
      }
      // The streams still under way end with an error event a client can read (and their
      // charges), then the server cuts what is left.
      await drain.end(1_000)
      await server.stop(true)
    })

    // The embedded database is this gateway's alone (its data dir is locked): what it finds
    // under way is a dead process's, released now rather than after its lease.
    if (embedded) {
      const released = await Reservations.releaseAll(sql)
      if (released > 0) log.warn({ released }, 'released reservations of a gateway that died')
      // Vacuumed before serving: on its one connection a first vacuum of a table grown by a
      // release that did not vacuum it would hold up every request meanwhile.
      await Reservations.vacuum(sql)
    }
    // Reservations are written and deleted a request, and a channel's row updated: where no
    // autovacuum runs, the sweep vacuums them (Reservations.vacuum). A server's operator is
    // told once; the embedded database never has one.
    if (!embedded && !(await Reservations.autovacuumRuns(sql)))
      log.warn(
        'PostgreSQL runs no autovacuum (autovacuum = off): this gateway vacuums its reservations and channels tables itself with each lease sweep; every other table needs VACUUM from you',
      )
    // On a database other instances share, each beats (Instances.ts), and the sweep releases
    // the reservations of one whose heartbeat stopped (killed: its requests will never
    // finish) rather than after their lease.
    const deadAfterMs = options.deadAfterMs ?? 90_000
    const name =
      (options.listen ?? Boolean(config.databaseUrl)) ? await Instances.nameOf(sql) : undefined
    if (name) {
      await Instances.beat(sql, name)
      // One beat at a time: a database that does not answer gets no pile of them.
      let beating = false
      const heart = setInterval(
        () => {
          if (beating) return
          beating = true
          Instances.beat(sql, name)
            .catch((e) => log.warn({ err: (e as Error).message }, 'heartbeat failed'))
            .finally(() => {
              beating = false
            })
        },
        Math.min(10_000, deadAfterMs / 6),
      )
      stops.push(async () => clearInterval(heart))
    }
    let stopping: Promise<void> | undefined
    // One sweep at a time: one still under way when the timer fires again (a database slow to
    // answer, a lock its release waits for) was joined by another each interval, each on a
    // connection of the pool (all ten of them, ten intervals on), running the same releases
    // again. Ending the sessions of dead instances is not held up by it (one call at a time of
    // its own): a lock such a session holds may be what the sweep under way waits for.
    let ending = false
    let releasing = false
    /** Whether the instance is stopping: a sweep under way makes no more calls. */
    let stopped = false
    // Each of its calls within the database deadline (Db.answered: one past it is cut, its
    // connection closed if it waited that long): one at a time, a sweep that never heard back
    // (a connection lost without a reset, a lock held by a session that does not end) held
    // its turn, and no sweep ran again until TCP gave up, a quarter of an hour later, if ever.
    // The vacuum is not cut: one that takes longer on a large table must be let finish.
    const within = <T>(call: PromiseLike<T>) => Db.answered(sql, call)
    const sweepOnce = async () => {
      // Their sessions first, with the locks they may hold (the settlement's among them).
      // Ending one may be refused (a role that may not signal it): that must not keep their
      // reservations held, so it fails alone.
      if (name && !ending) {
        ending = true
        const ended = await within(Instances.endSessions(sql, deadAfterMs))
          .catch((e: unknown) => {
            log.warn(
              { err: (e as Error).message },
              'ending the sessions of instances that are gone failed',
            )
            return []
          })
          .finally(() => {
            ending = false
          })
        if (ended.length > 0)
          log.warn(
            { instances: ended },
            'ended the database sessions of instances that are gone (their heartbeat stopped)',
          )
      }
      // A stop that came meanwhile: no more calls (the release is another instance's).
      if (releasing || stopped) return
      releasing = true
      try {
        const dead = name ? await within(Instances.dead(sql, deadAfterMs)) : []
        // A hundred a call: called again until none is left, so an instance that died with
        // more under way has them all released now, not a hundred a sweep (minutes for a
        // thousand, holding their accounts' credits and concurrency).
        const more = () => within(Reservations.sweep(sql, undefined, dead))
        let n = 0
        for (let k = await more(); k > 0; k = stopped ? 0 : await more()) n += k
        if (n > 0)
          log.warn(
            { released: n, ...(dead.length > 0 ? { instances: dead } : {}) },
            dead.length > 0
              ? 'released reservations of dead requests and of instances that are gone'
              : 'released reservations of dead requests',
          )
        if (stopped) return
        await Reservations.vacuum(sql)
        if (name) await within(Instances.forget(sql))
      } catch (e) {
        log.error({ err: (e as Error).message }, 'sweep failed')
      } finally {
        releasing = false
      }
    }
    // Completed Idempotency-Keys older than the window are forgotten (IdempotencyKeys.ts), with
    // each sweep, a chunk a transaction, each chunk within the database deadline. A turn of its
    // own, apart from the release's: a long backlog (the first prune of a database that kept
    // every key) must not hold up the release of dead requests' reservations. Among instances
    // sharing the database, one prunes at a time (an advisory lock, not waited for).
    let pruning = false
    const pruneOnce = async () => {
      if (pruning || stopped || config.idempotencyWindowSeconds === 0) return
      pruning = true
      try {
        const pruned = await IdempotencyKeys.prune(sql, config.idempotencyWindowSeconds, {
          call: within,
          stopped: () => stopped,
        })
        if (pruned > 0)
          log.debug({ pruned }, 'forgot completed Idempotency-Keys older than the window')
      } catch (e) {
        log.warn({ err: (e as Error).message }, 'forgetting old Idempotency-Keys failed')
      } finally {
        pruning = false
      }
    }
    // The sweeps under way: a stop lets the call each has under way finish (SWEEP_STOP_MS at
    // most: a database that does not answer must not hold the stop), and none makes another
    // (the rest is another instance's next sweep). The pool ended under them failed their next
    // call ("sweep failed").
    const sweeping = new Set<Promise<void>>()
    const sweep = setInterval(() => {
      for (const under of [sweepOnce(), pruneOnce()]) {
        sweeping.add(under)
        void under.finally(() => sweeping.delete(under))
      }
    }, options.sweepMs ?? 30_000)
    stops.push(async () => {
      stopped = true
      clearInterval(sweep)
      await Db.within(SWEEP_STOP_MS, Promise.all(sweeping))
    })

    return {
      // An IPv6 address goes in brackets.
      url: `${tls ? 'https' : 'http'}://${config.host.includes(':') ? `[${config.host}]` : config.host}:${server.port}`,
      adminToken,
      chain,
      devChain,
      embedded: !config.databaseUrl,
      sql,
      async stop(graceMs = 0) {
        if (stopping) {
          grace.cut()
          return stopping
        }
        grace = { ms: graceMs, cut: () => {} }
        stopping = (async () => {
          for (const s of stops.reverse()) await s().catch(() => {})
        })()
        return stopping
      },
    }
  } catch (e) {
    for (const s of stops.reverse()) await s().catch(() => {})
    throw e
  }
}

/** The models: the configured ones, or the built-in echo model when none are. */
function models(config: Config.Config, environment: Record<string, string | undefined>): Model[] {
  if (config.models.length === 0) {
    return [
      {
        id: EchoModel.id,
        pricing: config.echo.pricing,
        contextLength: config.echo.contextLength,
        minTier: 0,
        routing: 'ordered',
        routes: [
          {
            provider: EchoModel.create({
              tokenDelayMs: config.echo.tokenDelayMs,
              tokens: Tokenizer,
            }),
            upstreamModel: EchoModel.id,
            cost: config.echo.pricing,
          },
        ],
      },
    ]
  }
  const providers = new Map(
    config.upstreams.map((u) => [
      u.name,
      OpenAICompatible.create({
        name: u.name,
        baseUrl: u.baseUrl,
        apiKey: Config.upstreamKey(u, environment),
        timeoutMs: u.timeoutMs,
        completionTimeoutMs: u.completionTimeoutMs,
        maxTokensParam: u.maxTokensParam,
      }),
    ]),
  )
  return config.models.map((m) => ({
    id: m.id,
    pricing: m.pricing,
    contextLength: m.contextLength,
    maxOutputTokens: m.maxOutputTokens,
    minTier: m.minTier,
    routing: m.routing,
    routes: Config.routes(m).map((r) => ({
      provider: providers.get(r.upstream)!,
      upstreamModel: r.upstreamModel,
      cost: r.cost ?? m.pricing,
      external: r.external ?? false,
    })),
  }))
}

/**
 * A secret kept in the data dir (the admin token, the challenge secret), made on first start.
 * One found there must still be a secret: 16 characters at least (as ADMIN_TOKEN must be).
 */
function kept(dataDir: string, name: string, prefix: string): string {
  const path = join(dataDir, name)
  if (existsSync(path)) {
    const value = readFileSync(path, 'utf8').trim()
    if (value.length < 16)
      throw new Config.ConfigError(
        `${path}: the kept ${name} is ${value.length === 0 ? 'empty' : 'shorter than 16 characters'}; delete the file to have a new one made, or set it right`,
      )
    return value
  }
  mkdirSync(dataDir, { recursive: true })
  const value = `${prefix}${randomBytes(32).toString('base64url')}`
  writeFileSync(path, `${value}\n`, { mode: 0o600 })
  return value
}

/** Errors of the file system that make a data dir unusable (ENOENT from mkdir: a directory on the
 * path cannot be made where it should be, as under /proc). */
const DATA_DIR_ERRORS = new Set([
  'EACCES',
  'EPERM',
  'EROFS',
  'ENOSPC',
  'ENOTDIR',
  'EEXIST',
  'EISDIR',
  'EDQUOT',
  'ENOENT',
])

/**
 * What is wrong with the data dir, when `e` is a file system error of a path in it (read-only,
 * full, not a directory, not ours to write): said as a configuration error naming
 * TOLLWAY_DATA_DIR, not a stack trace.
 */
function dataDirProblem(e: unknown, dataDir: string): string | undefined {
  const { code, path } = (e ?? {}) as { code?: unknown; path?: unknown }
  if (typeof code !== 'string' || typeof path !== 'string') return undefined
  if (!DATA_DIR_ERRORS.has(code)) return undefined
  const dir = resolve(dataDir)
  if (resolve(path) !== dir && !resolve(path).startsWith(`${dir}/`)) return undefined
  return `TOLLWAY_DATA_DIR / dataDir: cannot use ${dir}: ${(e as Error).message}`
}

/** Stops the start with an error naming DATABASE_URL (its password left out) if the
 * server cannot be reached or refuses the connection. */
async function reachable(sql: Db.Sql, url: string): Promise<void> {
  try {
    await sql`select 1`
  } catch (e) {
    const shown = new URL(url)
    if (shown.password) shown.password = '***'
    throw new Config.ConfigError(`DATABASE_URL: cannot use ${shown}: ${(e as Error).message}`)
  }
}

/**
 * Whether the data dir keeps a `name` other than the configured `value` (an earlier start's,
 * or another gateway's on the same data dir: left alone, and said).
 */
function keptOther(dataDir: string, name: string, value: string): boolean {
  const path = join(dataDir, name)
  return existsSync(path) && readFileSync(path, 'utf8').trim() !== value
}

/** The TLS certificate chain and key, read now so that a missing file names itself. */
function tlsFiles(tls: { certFile: string; keyFile: string }): { cert: string; key: string } {
  const read = (path: string, name: string) => {
    try {
      return readFileSync(path, 'utf8')
    } catch (e) {
      throw new Config.ConfigError(`${name}: cannot read ${path}: ${(e as Error).message}`)
    }
  }
  return {
    cert: read(tls.certFile, 'TLS_CERT_FILE (tls.certFile)'),
    key: read(tls.keyFile, 'TLS_KEY_FILE (tls.keyFile)'),
  }
}

/** The receipts' Ed25519 key: the configured one, else one kept in the data dir. */
function receiptKey(config: Config.Config): Uint8Array {
  if (config.receiptKey) return Buffer.from(config.receiptKey.replace(/^0x/, ''), 'hex')
  const seed = Buffer.from(kept(config.dataDir, 'receipt-key', ''), 'base64url')
  if (seed.length !== 32)
    throw new Config.ConfigError(
      `${join(config.dataDir, 'receipt-key')}: the kept receipt key is not 32 bytes (base64url); delete the file to have a new one made, or set RECEIPT_KEY`,
    )
  return seed
}

/**
 * The embedded database's development key: an account "dev" on the highest-tier plan with
 * 10,000,000 base units, made on first start; its key is kept in the data dir. The account,
 * its credits and its key are made in one transaction: a start stopped (or failing) between
 * them left an account "dev" without a key, and the next start made another.
 */
export async function devKey(
  sql: Db.Sql,
  config: Pick<Config.Config, 'dataDir' | 'plans'>,
): Promise<string> {
  const path = join(config.dataDir, 'dev-key')
  // Kept, and still a key of this database (one made anew, pgdata deleted, has none of it).
  if (existsSync(path)) {
    const key = readFileSync(path, 'utf8').trim()
    if (await ApiKeys.authenticate(sql, key)) return key
  }
  const [plan] = Object.entries(config.plans).sort(([, a], [, b]) => b.tier - a.tier)[0]!
  const created = await sql.begin(async (tx) => {
    const t = tx as unknown as Db.Sql
    const accountId = await Accounts.create(t, { name: 'dev', plan })
    await Credits.grant(t, { accountId, amount: 10_000_000n, note: 'development credits' })
    return (await ApiKeys.create(t, { accountId, name: 'dev', max: 10 }))!
  })
  writeFileSync(path, `${created.key}\n`, { mode: 0o600 })
  return created.key
}

/**
 * The model of the start-up banner's curl command: the first configured one that the plan of
 * `key` (the development key) may use, the first configured one without a key, the echo model
 * when none is configured. A development account made before a config gave a model a higher
 * tier stays on its plan, and the first model would answer its curl 403.
 */
export async function tryModel(
  sql: Db.Sql,
  config: Pick<Config.Config, 'models'>,
  key: string | undefined,
): Promise<string> {
  const first = config.models[0]
  if (!first) return EchoModel.id
  const funds = key ? await ApiKeys.funds(sql, ApiKeys.hash(key)) : undefined
  return (funds && config.models.find((m) => m.minTier <= funds.tier))?.id ?? first.id
}

/** Set in the environment of the worker processes a gateway starts (`workers` > 1). */
const WORKER = 'TOLLWAY_WORKER'

/**
 * `npm start` and `tollway serve`: loads the config, serves, and stops on SIGINT/SIGTERM.
 * With `workers` > 1 this process serves and starts the others on the same port; they stop
 * when it does.
 */
export async function serve(): Promise<void> {
  if (!process.env.BUN_CONFIG_MAX_HTTP_REQUESTS)
    console.error(
      "tollway: warning: Bun's fetch holds at most 256 upstream requests at once and queues the rest; start with `npm start` or `tollway serve`, or set BUN_CONFIG_MAX_HTTP_REQUESTS (up to 65535)",
    )
  let config: Config.Config
  try {
    config = Config.load()
  } catch (e) {
    console.error(`tollway: configuration error\n${(e as Error).message}`)
    process.exit(1)
  }
  // A stop asked for while the gateway starts (the database, the development chain) is done
  // once the start is: it stops before it serves, its children with it. Without these
  // handlers a SIGINT killed the process mid-start, and a process started with SIGINT ignored
  // (a shell's background job) went on to serve. A second signal quits at once.
  let stopAsked = false
  const early = () => {
    if (stopAsked) process.exit(130)
    stopAsked = true
    console.error('tollway: stopping once start-up is done (signal again to quit now)')
  }
  process.on('SIGINT', early)
  process.on('SIGTERM', early)
  if (!process.env[WORKER]) console.error('tollway: starting')
  let gateway: Gateway
  try {
    gateway = await start(config, { reusePort: config.workers > 1 })
  } catch (e) {
    // The development chain would not start: say what anvil said.
    if (e instanceof DevChainError) {
      console.error(`tollway: ${e.message}${e.details ? `\n${e.details.trim()}` : ''}`)
      process.exit(1)
    }
    // What the configuration points at is unusable (a kept secret, the escrow, the data dir).
    const message =
      e instanceof Config.ConfigError ||
      e instanceof Embedded.InUseError ||
      e instanceof Embedded.OpenError
        ? e.message
        : dataDirProblem(e, config.dataDir)
    if (message === undefined) throw e
    console.error(`tollway: configuration error\n${message}`)
    process.exit(1)
  }
  if (stopAsked) {
    await gateway.stop()
    process.exit(0)
  }
  if (process.env[WORKER]) {
    // A Ctrl-C reaches the whole process group, and the first process then signals its
    // workers too: one stop reaching twice, within a second, is one stop (its grace kept).
    // A signal later than that is a second stop: it cuts what is left.
    let first: number | undefined
    const shutdown = async () => {
      if (first !== undefined) {
        if (Date.now() - first >= 1_000) await gateway.stop()
        return
      }
      first = Date.now()
      await gateway.stop(SHUTDOWN_GRACE_MS)
      process.exit(0)
    }
    handOver(early, shutdown)
    // The first process holds this one's stdin open: when it ends, however it ends, so
    // does this one.
    ;(async () => {
      for await (const _ of Bun.stdin.stream()) {
      }
      await shutdown()
    })()
    return
  }
  const workers = startWorkers(config, gateway)
  // With the embedded defaults, a development account with credits is ready to use.
  const dev = gateway.embedded ? await devKey(gateway.sql, config) : undefined
  const key = dev ?? '<your API key>'
  const model = await tryModel(gateway.sql, config, dev)
  // Until the banner a signal is still one while it starts: without a handler while the
  // development key was made, a SIGINT or SIGTERM killed the process outright (no stop, its
  // workers and the embedded database left as a kill leaves them).
  if (stopAsked) {
    await Promise.all([workers.stop(), gateway.stop()])
    process.exit(0)
  }
  console.log(`tollway is serving at ${gateway.url}
  database:    ${gateway.embedded ? `embedded PGlite in ${resolve(config.dataDir, 'pgdata')}` : 'DATABASE_URL'}
  admin token: ${config.adminToken ? '(as configured: ADMIN_TOKEN or the config file; not printed)' : gateway.adminToken}
  models:      ${[...new Set([model, ...config.models.map((m) => m.id)])].join(', ')}
  chain:       ${gateway.chain ? `${gateway.chain.rpcUrl} (chain id ${gateway.chain.chainId}), escrow ${gateway.chain.escrowAddress}` : 'none'}${config.workers > 1 ? `\n  workers:     ${config.workers} processes share the port` : ''}
${gateway.devChain ? `\n${DevChain.summary(gateway.devChain).join('\n')}\n` : ''}
Try it:
  curl -N ${gateway.url}/v1/chat/completions -H "Authorization: Bearer ${key}" -d '{"model":"${model}","stream":true,"messages":[{"role":"user","content":"hello from tollway"}]}'
`)
  let signals = 0
  const shutdown = async () => {
    signals++
    // A third signal quits at once, whatever the stop still waits for.
    if (signals > 2) process.exit(130)
    if (signals === 2) {
      console.error('tollway: cutting the requests under way (signal again to quit at once)')
      await Promise.all([workers.stop(), gateway.stop()])
      return
    }
    console.error(
      `tollway: stopping; requests under way have ${SHUTDOWN_GRACE_MS / 1000} s to finish (signal again to cut them now)`,
    )
    await Promise.all([workers.stop(), gateway.stop(SHUTDOWN_GRACE_MS)])
    process.exit(0)
  }
  handOver(early, shutdown)
}

/** How long a stopping gateway lets the requests under way finish before it cuts them. */
const SHUTDOWN_GRACE_MS = 10_000

/** How long a stop waits for the lease sweep under way (ms). */
const SWEEP_STOP_MS = 2_000

/**
 * Starts `config.workers − 1` more processes serving this gateway's port, each a gateway of
 * its own on the same database. They read the same configuration, and get what this one
 * chose: the port (when it was 0), the admin token and the development chain it started (a
 * configured chain's key is not copied into their environment). One that dies is started
 * again, after 1 s, doubling up to 30 s while they keep dying within a minute.
 */
function startWorkers(config: Config.Config, gateway: Gateway) {
  const dev = gateway.devChain
  const env: Record<string, string | undefined> = {
    ...process.env,
    [WORKER]: '1',
    PORT: new URL(gateway.url).port,
    ADMIN_TOKEN: gateway.adminToken,
    ...(dev && DevChain.env(dev)),
  }
  let stopping = false
  let failures = 0
  const running = new Set<ReturnType<typeof Bun.spawn>>()
  const spawn = () => {
    const started = Date.now()
    const proc = Bun.spawn([process.execPath, join(import.meta.dir, 'main.ts')], {
      env,
      stdin: 'pipe',
      stdout: 'inherit',
      stderr: 'inherit',
    })
    running.add(proc)
    proc.exited.then((code) => {
      running.delete(proc)
      if (stopping) return
      failures = Date.now() - started > 60_000 ? 0 : failures + 1
      const delay = Math.min(30_000, 1000 * 2 ** Math.max(0, failures - 1))
      console.error(
        `tollway: a worker process exited (code ${code}); starting another in ${delay / 1000} s`,
      )
      setTimeout(() => stopping || spawn(), delay)
    })
  }
  for (let i = 1; i < config.workers; i++) spawn()
  return {
    /** Asks each to stop (called again: to cut what it still serves) and waits for them. */
    async stop() {
      stopping = true
      const all = [...running]
      for (const p of all) p.kill('SIGTERM')
      await Promise.all(all.map((p) => p.exited))
    },
  }
}

if (import.meta.main) await serve()
