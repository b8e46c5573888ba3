/**
 * A `fetch` that pays tollway (or any MPP evm/session server) per token. Hand it to the
 * `openai` SDK (`new OpenAI({ baseURL, apiKey: 'unused', fetch })`): on a 402 Payment
 * challenge it checks the challenge, opens a channel and retries; afterwards it reuses the
 * channel, answers `payment-need-voucher` mid-stream by sending a voucher to the same URI, tops
 * up when the deposit is short, and never signs past its limits. Payment events never reach the
 * caller's stream; they go to `onVoucher` / `onReceipt`.
 */
import {
  type Address,
  createClient,
  type Hex,
  http,
  isAddress,
  keccak256,
  type LocalAccount,
  toHex,
} from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as ChainClient from '../chain/Client.ts'
import { TokenDomainError } from '../chain/Errors.ts'
import * as Escrow from '../chain/Escrow.ts'
import * as Token from '../chain/Token.ts'
import type * as Challenge from '../payment/Challenge.ts'
import * as Credential from '../payment/Credential.ts'
import type * as Events from '../payment/Events.ts'
import * as Receipt from '../payment/Receipt.ts'
import {
  ChainRequiredError,
  ChallengeRefusedError,
  ChannelNotFoundError,
  ChannelStateError,
  ClientError,
  CloseNotReadyError,
  LimitExceededError,
  PaymentFailedError,
  TokenDomainUnavailableError,
} from './Errors.ts'
import { challengeOf, PayingSession } from './Session.ts'
import * as Store from './Store.ts'
import * as Stream from './Stream.ts'

export type Options = {
  /** The payer: a viem local account or its private key. */
  account: LocalAccount | Hex
  /** An RPC URL of the server's chain: to open a channel from the payer's account when the
   * server does not pay the gas, for `requestClose` / `withdraw`, and to read the token's
   * EIP-712 domain when the challenge does not state it. */
  rpcUrl?: string | undefined
  /** The token's EIP-712 domain (default: the challenge's `methodDetails.tokenDomain`, else
   * read from `rpcUrl`). */
  tokenDomain?: Token.TokenDomain | undefined
  /** Spending limits, base units. `maxDeposit`: one channel's deposit. `maxTotal`: all vouchers
   * signed, over the channels: a resumed channel counts from its start, and what closed
   * channels paid is kept in the store (per server and payer), so it survives a restart; with
   * a store that implements `reserve` (`Store.file`, `Store.memory`), it holds for all clients
   * of this wallet sharing the store together, whatever each signs meanwhile. */
  limits: { maxDeposit: bigint; maxTotal: bigint }
  /** The deposit of a new channel (default `limits.maxDeposit`). */
  deposit?: bigint | undefined
  /** Escrows (and, when given, currencies and recipients: the payees) this client pays into;
   * others are refused (the core draft: a client verifies the recipient before it pays). */
  allow: {
    escrows: readonly Address[]
    currencies?: readonly Address[] | undefined
    recipients?: readonly Address[] | undefined
  }
  /**
   * The most this client pays, base units per 1,000,000 tokens: a challenge asking more is
   * refused before anything is signed (the core draft: a client verifies the amount is
   * reasonable). `output` bounds the challenge's `amount`, `input` its `inputAmount` (tollway
   * states both per 1M tokens). Default: no bound but `limits`.
   */
  maxPrice?: { input?: bigint | undefined; output: bigint } | undefined
  /** How far ahead of need vouchers are signed, base units (default 10_000); larger means
   * fewer vouchers (the server takes at most 10 a second per channel). */
  margin?: bigint | undefined
  /** How far ahead of what was spent a whole (non-streaming) completion is authorized, base
   * units (default 16 × margin), and past what a server's 402 asks for one: without
   * `max_tokens` the server stops the completion where the authorized amount runs out, and
   * no voucher can follow mid-way. */
  completionMargin?: bigint | undefined
  /** Where channels are kept (default `Store.file('.tollway/channels.json')`). A store pays a
   * server for one client at a time: another `createFetch` on the same file (its own
   * `Store.file`) gets a StoreInUseError until this one's store is released or collected. */
  store?: Store.Store | undefined
  /** Called with each receipt: the `Payment-Receipt` header, or a stream's `payment-receipt`. */
  onReceipt?: ((receipt: Receipt.Receipt) => void) | undefined
  /** Called after the server accepted a voucher sent mid-stream or before a retry. */
  onVoucher?: ((voucher: { channelId: Hex; cumulativeAmount: bigint }) => void) | undefined
  /** How often to poll the chain for receipts when opening from the payer's account, ms
   * (default 1000). */
  pollingInterval?: number | undefined
  /** The fetch underneath (default the global one). */
  fetch?: typeof fetch | undefined
  /**
   * Pays a server over plain HTTP on another machine. The core draft forbids it (a credential
   * anyone on the path can read, they can replay); off, such a server's challenge is refused
   * before anything is signed or deposited. HTTPS and this machine (localhost, 127.0.0.0/8,
   * ::1) are always allowed. Default false.
   */
  allowInsecureHttp?: boolean | undefined
}

/** A paying `fetch`, with `close()` to close its channel. */
export type PayingFetch = typeof fetch & {
  /**
   * Asks the server to close a channel with `url`'s server (default: the last one used);
   * returns the settlement transaction hash. Which channel: `channelId`, else the one in use,
   * else the one set apart as refused, else the one under forced close (`setApart(url)`).
   */
  close(
    url?: string,
    /** Which channel: in use or set apart (default: as above). */
    options?: { channelId?: Hex },
  ): Promise<Hex>
  /** The channel in use for `url`'s origin, if any. */
  channel(url: string): Promise<Store.ChannelState | undefined>
  /**
   * For a server that stops answering: the payer's own `requestClose` on the escrow (needs
   * `rpcUrl` and gas) of the channel used with `url` (default: the last one used). The channel
   * is set apart (`closing(url)`); `withdraw` takes the unsettled deposit back after the
   * 15-minute grace period, from `withdrawableAt`.
   */
  requestClose(
    url?: string,
    /** Which channel: the one in use, or one set apart as refused (default: in use, else that). */
    options?: { channelId?: Hex },
  ): Promise<{ channelId: Hex; txHash: Hex; withdrawableAt: Date }>
  /** Takes back `deposit - settled` of the channel `requestClose` set apart (needs `rpcUrl`);
   * throws CloseNotReadyError, saying when, before the grace period has passed. */
  withdraw(
    url?: string,
    /** The channel meant (it must be the one under forced close: there is one at a time). */
    options?: { channelId?: Hex },
  ): Promise<{ channelId: Hex; txHash: Hex; refund: bigint; paid: bigint }>
  /** The channel under forced close for `url`'s origin, else one the server refused as
   * closing (set apart), if any; `setApart` names both. */
  closing(url: string): Promise<Store.ChannelState | undefined>
  /**
   * Both channels set apart for `url`'s origin: `forced`, under the payer's forced close
   * (`withdraw` takes it), and `refused`, refused by the server as closing, or on a chain the
   * server no longer asks for (`close` or `requestClose` take it).
   */
  setApart(url: string): Promise<{ forced?: Store.ChannelState; refused?: Store.ChannelState }>
  /**
   * Gives the store up (`Store.release`): another `createFetch` on the same store, in this
   * process or another, may then pay through its channels. This paying fetch is done at once:
   * any further request, close, requestClose or withdraw through it throws a ClientError. The
   * store is given up only once the work already under way through this fetch has ended: each
   * request until its response is handed back, each stream until its body is read to the end,
   * cancelled or fails (its mid-stream vouchers paid and stored), each close, requestClose or
   * withdraw until it returns. So no voucher is signed, and no store write made, by this fetch
   * after another client took the store over. Its channels stay open (and stored) for the next
   * client to resume. Calling it again returns the same wait.
   *
   * A response whose stream is never read keeps the store held: pass `signal` (e.g.
   * `AbortSignal.timeout(10_000)`) not to wait past it. When it aborts, what is under way is
   * cancelled (requests and streams reject or error with its reason, as with a request's own
   * signal) and the store given up once that has ended; what no signal stops (a signature, a
   * chain transaction already sent) is still waited for. Resolves when the store is given up.
   */
  release(options?: {
    /** Cancels what is under way when it aborts, then the store is given up. */
    signal?: AbortSignal | undefined
  }): Promise<void>
}

/** The live state of one channel. */
type Live = {
  key: string
  session: PayingSession
  state: Store.ChannelState | undefined
  /** The highest cumulative amount sent (accepted, or on its way). */
  sent: bigint
  /** What the server last said was spent: its view of a resumed channel (see `adopt`), then
   * its receipts (0 for a new channel). */
  spent: bigint
  /** Mid-stream payments, one after another. */
  queue: Promise<void>
  /** The open under way, so that concurrent first requests share one channel. */
  opening?: Promise<unknown> | undefined
  /** The stored channel being read, so that concurrent first requests resume it, not open
   * another (which would leave it open and unrecorded). */
  loading?: Promise<void> | undefined
  /** Streams under way on the channel (the server keeps one: see `paying`). */
  streams: number
  /** Whether the open credential sent last is of the payer's own mined `open` transaction,
   * until the server has taken it: the mark of an open on chain, sent again rather than a
   * second one (see `pay`). */
  mined?: boolean | undefined
}

const problemOf = async (res: Response): Promise<Record<string, unknown> | undefined> => {
  if (!res.headers.get('content-type')?.includes('json')) {
    await res.body?.cancel()
    return undefined
  }
  try {
    const body = (await res.json()) as Record<string, unknown>
    return typeof body.type === 'string' ? body : (body.error as Record<string, unknown>)
  } catch {
    return undefined
  }
}

/** The transaction hash of a close's answer (its body's `receipt.txHash`); undefined when it
 * has none (not JSON, no receipt, not a hash). */
async function closeHash(res: Response): Promise<Hex | undefined> {
  const body = (await res.json().catch(() => undefined)) as
    | { receipt?: { txHash?: unknown } }
    | undefined
  const hash = body?.receipt?.txHash
  return typeof hash === 'string' && /^0x[0-9a-fA-F]{64}$/.test(hash) ? (hash as Hex) : undefined
}

/** A challenge this close to its `expires` is taken as expired (the two clocks differ). */
const expirySkewMs = 10_000

/** What a refusal's problem says, to end a message with (its `detail`, else a pointer to it). */
const toldBy = (problem: Record<string, unknown> | undefined): string => {
  const detail = problem?.detail ?? problem?.message
  return typeof detail === 'string' && detail.length > 0
    ? `: ${detail.slice(0, 500)}`
    : '; see problem.'
}

/** The response's evm/session challenge; a malformed WWW-Authenticate is the server's failure. */
const challengeIn = (res: Response) => {
  try {
    return challengeOf(res.headers.get('www-authenticate'))
  } catch (e) {
    throw new PaymentFailedError(
      `The server sent a malformed Payment challenge (${res.status}): ${(e as Error).message}`,
      res.status,
    )
  }
}

/** Whether a credential's challenge has expired by this clock. */
const expired = (credential: string, within = 0): boolean => {
  const { expires } = Credential.deserialize(credential).challenge
  return expires !== undefined && Date.parse(expires) <= Date.now() + within
}

/** Whether `url` is over TLS or on this machine: where a credential may go (the core draft). */
export function secure(url: string): boolean {
  const u = new URL(url)
  if (u.protocol === 'https:') return true
  const host = u.hostname
  return (
    host === 'localhost' ||
    host.endsWith('.localhost') ||
    host === '[::1]' ||
    /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host)
  )
}

const kindOf = (problem: Record<string, unknown> | undefined) =>
  typeof problem?.type === 'string' ? problem.type.split('/').at(-1) : undefined

/** An option that is not what `Options` says: a ClientError naming it (`details.option`). */
const badOption = (option: string, what: string, value: unknown) =>
  new ClientError(`createFetch: ${option} ${what}.`, {
    option,
    got: typeof value === 'bigint' ? value.toString() : typeof value,
  })

/**
 * Checks what `Options` says its fields are, before anything else: a caller in plain
 * JavaScript (or one that casts) gets a ClientError naming the option, not a TypeError from
 * deep inside a request (`1000000` for `1_000_000n`: "Invalid mix of BigInt and other type"),
 * nor a limit error with made-up numbers (a negative `maxDeposit` or `margin` was reported as
 * a voucher passing maxTotal).
 */
function checkOptions(options: Options): LocalAccount {
  if (typeof options !== 'object' || options === null)
    throw badOption('options', 'must be an object (account, limits, allow)', options)
  const units = (option: string, value: unknown, least: bigint, optional = false) => {
    if (optional && value === undefined) return
    if (typeof value !== 'bigint')
      throw badOption(option, `must be a bigint of base units (e.g. 1_000_000n)`, value)
    if (value < least) throw badOption(option, `must be at least ${least}`, value)
  }
  const { limits, allow } = options
  if (typeof limits !== 'object' || limits === null)
    throw badOption('limits', 'must be given: { maxDeposit, maxTotal }, bigint base units', limits)
  units('limits.maxDeposit', limits.maxDeposit, 1n)
  units('limits.maxTotal', limits.maxTotal, 0n)
  units('deposit', options.deposit, 1n, true)
  units('margin', options.margin, 1n, true)
  units('completionMargin', options.completionMargin, 1n, true)
  if (options.maxPrice !== undefined) {
    if (typeof options.maxPrice !== 'object' || options.maxPrice === null)
      throw badOption(
        'maxPrice',
        'must be { output, input? }, bigint base units per 1M tokens',
        options.maxPrice,
      )
    units('maxPrice.output', options.maxPrice.output, 0n)
    units('maxPrice.input', options.maxPrice.input, 0n, true)
  }
  if (typeof allow !== 'object' || allow === null)
    throw badOption('allow', 'must be given: { escrows: [address, …] }', allow)
  const addresses = (option: string, value: unknown, optional = false) => {
    if (optional && value === undefined) return
    if (!Array.isArray(value)) throw badOption(option, 'must be an array of addresses', value)
    for (const a of value)
      if (typeof a !== 'string' || !isAddress(a, { strict: false }))
        throw badOption(option, `holds ${JSON.stringify(a)}, which is not an address`, a)
  }
  addresses('allow.escrows', allow.escrows)
  addresses('allow.currencies', allow.currencies, true)
  addresses('allow.recipients', allow.recipients, true)
  if (
    options.rpcUrl !== undefined &&
    (typeof options.rpcUrl !== 'string' || !URL.canParse(options.rpcUrl))
  )
    throw badOption('rpcUrl', 'must be a URL', options.rpcUrl)
  for (const f of ['fetch', 'onReceipt', 'onVoucher'] as const)
    if (options[f] !== undefined && typeof options[f] !== 'function')
      throw badOption(f, 'must be a function', options[f])
  const interval = options.pollingInterval
  if (
    interval !== undefined &&
    !(typeof interval === 'number' && interval > 0 && Number.isFinite(interval))
  )
    throw badOption('pollingInterval', 'must be a number of milliseconds above 0', interval)
  const store = options.store as Partial<Store.Store> | undefined
  if (
    store !== undefined &&
    (typeof store !== 'object' ||
      store === null ||
      (['get', 'set', 'delete', 'closedTotal', 'addClosedTotal'] as const).some(
        (m) => typeof store[m] !== 'function',
      ))
  )
    throw badOption(
      'store',
      'must be a Store (Store.file(path), Store.memory(), or one with get, set, delete, closedTotal and addClosedTotal)',
      store,
    )
  const account = options.account as unknown
  if (typeof account === 'string') {
    if (!/^0x[0-9a-fA-F]{64}$/.test(account))
      throw new ClientError(
        'createFetch: account must be a private key (0x and 64 hex digits) or a viem LocalAccount.',
        { option: 'account' },
      )
    return privateKeyToAccount(account as Hex)
  }
  if (
    typeof account !== 'object' ||
    account === null ||
    !isAddress(String((account as LocalAccount).address), { strict: false }) ||
    typeof (account as LocalAccount).signTypedData !== 'function'
  )
    throw badOption(
      'account',
      'must be a private key (0x and 64 hex digits) or a viem LocalAccount',
      account,
    )
  return account as LocalAccount
}

/** Creates a paying `fetch` (see the module doc). */
export function createFetch(options: Options): PayingFetch {
  const account = checkOptions(options)
  const given = options.fetch ?? globalThis.fetch
  /** Cancels what is under way through this fetch: fired by `release`'s signal. */
  const stop = new AbortController()
  /** Refuses to pay `url` over plain HTTP to another machine (see `allowInsecureHttp`). */
  const transport = (url: string) => {
    if (options.allowInsecureHttp || secure(url)) return
    throw new ChallengeRefusedError(
      `${new URL(url).origin} asks for payment over plain HTTP, where anyone on the way could read and replay the credential; use https (or allowInsecureHttp on a test network).`,
      { url },
    )
  }
  /** The fetch underneath, every call cancelled by `stop` too (as by its own signal). No
   * credential goes over plain HTTP to another machine, whichever path sends it. */
  const base = (url: string, init: RequestInit = {}) => {
    if (new Headers(init.headers).get('authorization')?.startsWith('Payment ')) transport(url)
    return given(url, {
      ...init,
      signal: init.signal ? AbortSignal.any([init.signal, stop.signal]) : stop.signal,
    })
  }
  const store = options.store ?? Store.file('.tollway/channels.json')
  /** Whether store key `k` is this payer's (`origin#address`, or a slot set apart under it): a
   * store other wallets share counts only ours. */
  const ours = (k: string) => k.toLowerCase().includes(`#${account.address.toLowerCase()}`)
  const margin = options.margin ?? 10_000n
  const completionMargin = options.completionMargin ?? 16n * margin
  const { maxDeposit } = options.limits
  // What closed channels took from maxTotal, per store key (kept in the store, so a restart
  // remembers them); the rest is for the open ones.
  const closedByKey = new Map<string, bigint>()
  const closedTotal = () => [...closedByKey.values()].reduce((a, b) => a + b, 0n)
  /**
   * What this client's other channels may still take: all it signed on the channels in use
   * with other servers (this run's, and those the store keeps from earlier runs), and on
   * channels set apart while they close (paid at most that).
   */
  const elsewhere = (key: string | undefined) => {
    let sum = 0n
    for (const [k, l] of lives)
      if (k !== key) sum += max(l.state ? l.session.signed : 0n, signing.get(k) ?? 0n)
    for (const [k, signed] of stored) if (k !== key && !lives.has(k)) sum += signed
    for (const signed of setApart.values()) sum += signed
    return sum
  }
  /**
   * What a channel is signing up to, counted against maxTotal from the moment it is decided
   * (before the signature, which takes a turn of the event loop): two channels deciding at
   * once each see the other's.
   */
  const signingAll = new Map<string, bigint[]>()
  const signing = {
    get: (key: string) => {
      const all = signingAll.get(key)
      return all?.length ? max(...all) : undefined
    },
  }
  /**
   * Signs `sign()`, `target` counted as signed for `key` meanwhile: in this client, and in the
   * store, whose reservation for `key` must cover it (`granted`); a store that will not grant
   * it refuses with a LimitExceededError, nothing signed. A signature that fails or is refused
   * gives back what it reserved (`giveBack`).
   */
  const counted = async <T>(key: string, target: bigint, sign: () => Promise<T>): Promise<T> => {
    const all = signingAll.get(key) ?? []
    signingAll.set(key, all)
    all.push(target)
    let failed = false
    try {
      const room = await granted(key, target)
      if (room !== undefined && room < target) throw beyond(room, target)
      return await sign()
    } catch (e) {
      failed = true
      throw e
    } finally {
      all.splice(all.indexOf(target), 1)
      // Not to hide the failure itself: a reservation that could not be lowered stays until
      // this client signs within it again or is released.
      if (failed) await giveBack(key).catch(() => {})
    }
  }
  /** The LimitExceededError of a channel allowed `room` (by the store) that wants `target`. */
  const beyond = (room: bigint, target: bigint) =>
    new LimitExceededError('maxTotal', {
      limit: options.limits.maxTotal,
      wanted: options.limits.maxTotal - room + target,
    })
  /**
   * The budget that clients of this wallet sharing the store draw on together (`Store.reserve`).
   *
   * Why reservations: a client reads once what the store holds for other servers (`loadAll`),
   * so another client of this wallet on the same store (another process, or another
   * `Store.file` on the file) signing meanwhile on its own server went unseen, and each signed
   * up to maxTotal. Before a signature goes past what this client holds reserved for its
   * channel, the store decides, under its lock, against what every other key of this wallet
   * closed, signed and holds reserved at that moment, and records what this one may sign. Each
   * reservation reaches `reserveAhead` past the amount that asked for it, so most vouchers sign
   * within one already held and cost no more than before (the store write after each
   * signature); near maxTotal a client may be refused what another holds reserved and has not
   * signed yet (at most `reserveAhead` per server), until that one signs it or gives it back
   * (this client's own, on its other channels, it gives back first: see `granted`).
   * Reading the others afresh before every signature would be exact but add a locked read and
   * write of the store to every voucher.
   */
  const budget = { limit: options.limits.maxTotal, shares: ours }
  /** How far past the amount it is asked for a reservation reaches. */
  const reserveAhead = 4n * margin
  /** What the store granted each key (`Store.reserve`), as this client last set it: the
   * reservation of a key is only ever changed by the client that owns the key. */
  const reservedByKey = new Map<string, bigint>()
  /** Reservation changes of each key, one after another: a lowering never undercuts a raise. */
  const turns = new Map<string, Promise<unknown>>()
  const inTurn = <T>(key: string, f: () => Promise<T>): Promise<T> => {
    const run = (turns.get(key) ?? Promise.resolve()).then(f)
    turns.set(
      key,
      run.catch(() => {}),
    )
    return run
  }
  /**
   * What `key` may sign up to by the store, reserving up to `wanted` (and `reserveAhead` past
   * it) when it holds less: what it holds (or its channel signed already: the store counts
   * that, and signing it again gives nothing new) when that covers `wanted`, else what the
   * store grants, which may be less. Undefined for a store without `reserve` (this client's
   * own count is all there is).
   */
  const granted = async (key: string, wanted: bigint): Promise<bigint | undefined> => {
    const reserve = store.reserve?.bind(store)
    if (!reserve) return undefined
    const ask = () =>
      inTurn(key, async () => {
        const live = lives.get(key)
        const held = max(reservedByKey.get(key) ?? 0n, live?.state ? live.session.signed : 0n)
        if (wanted <= held) return held
        const got = await reserve(key, wanted + reserveAhead, budget)
        reservedByKey.set(key, got)
        return got
      })
    const got = await ask()
    if (got >= wanted) return got
    // Short: what this client reserved ahead on its other channels and does not sign goes back
    // first, and the store is asked again. Kept, it refused this channel below maxTotal with
    // nothing else signing (one server paid once holds `reserveAhead` unsigned: with maxTotal
    // 1,000 and margin 100, a second server got 400, not 900). Outside this key's turn: each
    // give-back takes its own key's, and two channels short at once would wait on each other.
    let freed = false
    for (const [k, before] of [...reservedByKey])
      if (k !== key) {
        await giveBack(k).catch(() => {})
        if ((reservedByKey.get(k) ?? 0n) < before) freed = true
      }
    return freed ? ask() : got
  }
  /**
   * Lowers `key`'s reservation to what its channel signed and what is being signed on it (a
   * signature failed or refused, a channel forgotten), so that what was reserved for nothing is
   * not kept from the other servers.
   */
  const giveBack = (key: string): Promise<void> => {
    const reserve = store.reserve?.bind(store)
    if (!reserve) return Promise.resolve()
    return inTurn(key, async () => {
      const held = reservedByKey.get(key)
      if (held === undefined) return
      const live = lives.get(key)
      const keep = max(live?.state ? live.session.signed : 0n, signing.get(key) ?? 0n)
      if (keep >= held) return
      reservedByKey.set(key, await reserve(key, keep, budget))
    })
  }
  const lives = new Map<string, Live>()
  /** Set by `release`: the store is given up, and this paying fetch with it. */
  let released = false
  /** Work under way through this fetch (requests, streams, closes), which `release` waits for. */
  let busy = 0
  /** Called when `busy` falls to 0. */
  const onIdle: (() => void)[] = []
  /** Counts one piece of work under way; returns what ends it (once, however often called). */
  const begin = () => {
    busy++
    let ended = false
    return () => {
      if (ended) return
      ended = true
      if (--busy > 0) return
      for (const f of onIdle.splice(0)) f()
    }
  }
  /**
   * Resolves when no work is under way and every channel's payments (a mid-stream voucher of a
   * stream cancelled while it was being paid, its store write) have ended.
   */
  const idle = async () => {
    for (;;) {
      if (busy > 0) {
        const { promise, resolve } = Promise.withResolvers<void>()
        onIdle.push(resolve)
        await promise
        continue
      }
      const pending = [...lives.values()].flatMap((l) => [l.queue, l.opening, l.loading])
      await Promise.allSettled(pending)
      const now = [...lives.values()].flatMap((l) => [l.queue, l.opening, l.loading])
      if (busy === 0 && now.length === pending.length && now.every((p, i) => p === pending[i]))
        return
    }
  }
  /** Runs `fn` counted as work under way (see `release`). */
  const tracked =
    <A extends unknown[], T>(fn: (...args: A) => Promise<T>) =>
    async (...args: A): Promise<T> => {
      usable()
      const end = begin()
      try {
        return await fn(...args)
      } finally {
        end()
      }
    }
  const usable = () => {
    if (released)
      throw new ClientError(
        "This paying fetch was released (release()): its store may be another client's now. Create a new one with createFetch.",
      )
  }
  /** Channels set apart while they close (closingKey, refusedKey), by their store key: what
   * was signed on them. */
  const setApart = new Map<string, bigint>()
  /** Channels in use with servers this run has not paid yet, from the store: what was signed. */
  const stored = new Map<string, bigint>()
  /** Reads, once, what the store holds for every server (a store with `all`). */
  let loadedAll: Promise<void> | undefined
  const loadAll = () => {
    loadedAll ??= (async () => {
      const all = await store.all?.()
      if (!all) return
      for (const [k, v] of Object.entries(all.closedTotals))
        if (ours(k) && !closedByKey.has(k)) closedByKey.set(k, v)
      const bad = all.malformed?.find(ours)
      if (bad)
        throw new ClientError(
          `The channel store has a malformed channel under "${bad}"; repair it, or delete that entry to forget the channel.`,
          { key: bad },
        )
      for (const [k, state] of Object.entries(all.channels)) {
        if (!ours(k)) continue
        if (k.endsWith(CLOSING) || k.endsWith(REFUSED)) {
          if (!setApart.has(k)) setApart.set(k, BigInt(state.signed))
        } else stored.set(k, BigInt(state.signed))
      }
    })().catch((e: unknown) => {
      loadedAll = undefined
      throw e
    })
    return loadedAll
  }
  /** What channel `key` may sign up to, within maxTotal. */
  const total = (key?: string) => options.limits.maxTotal - closedTotal() - elsewhere(key)
  const loadClosed = async (key: string) => {
    if (!closedByKey.has(key)) closedByKey.set(key, await store.closedTotal(key))
  }
  const escrows = new Set(options.allow.escrows.map((a) => a.toLowerCase()))
  const currencies = options.allow.currencies?.map((a) => a.toLowerCase())
  const recipients = options.allow.recipients?.map((a) => a.toLowerCase())
  const domains = new Map<string, Promise<Token.TokenDomain>>()
  let lastUrl: string | undefined

  const keyOf = (url: string) => `${new URL(url).origin}#${account.address}`

  /** Refuses a challenge this client does not pay (before anything is signed or deposited). */
  const check = (challenge: Challenge.Challenge, url: string) => {
    transport(url)
    // The core draft: a client MUST NOT submit a credential for an expired challenge.
    const expires = challenge.expires === undefined ? Number.NaN : Date.parse(challenge.expires)
    if (expires <= Date.now())
      throw new ChallengeRefusedError(
        `The server's payment challenge expired at ${challenge.expires} (this machine's clock says ${new Date().toISOString()}); nothing was signed. If the clocks differ, set this machine's right.`,
        { expires: challenge.expires },
      )
    const session = new PayingSession({ account, challenge })
    const { escrowContract } = session.request.methodDetails
    if (!escrows.has(escrowContract.toLowerCase()))
      throw new ChallengeRefusedError(
        `The server asks for payment into escrow ${escrowContract}, which is not in allow.escrows; add it if you trust it.`,
        { escrow: escrowContract },
      )
    if (currencies && !currencies.includes(session.request.currency.toLowerCase()))
      throw new ChallengeRefusedError(
        `The server asks for currency ${session.request.currency}, which is not in allow.currencies; add it if you mean to pay in it.`,
        { currency: session.request.currency },
      )
    // The evm draft: a client MUST NOT submit a credential type the challenge leaves out.
    const types = session.request.methodDetails.credentialTypes
    if (types && !session.serverSends && !types.includes('hash'))
      throw new ChallengeRefusedError(
        `The server takes only ${types.join(', ') || 'no'} credentials for deposits, none of which this client makes (it makes authorization, with feePayer, and hash).`,
        { credentialTypes: types },
      )
    const { recipient, amount } = session.request
    if (recipients && !recipients.includes(recipient.toLowerCase()))
      throw new ChallengeRefusedError(
        `The server asks for payment to ${recipient}, which is not in allow.recipients; add it if you mean to pay it.`,
        { recipient },
      )
    const most = options.maxPrice
    if (most && amount > most.output)
      throw new ChallengeRefusedError(
        `The server asks ${amount} base units per ${session.request.unitType ?? 'unit'} (amount), over maxPrice.output (${most.output}); raise it if you mean to pay that.`,
        { amount: amount.toString(), maxPrice: most.output.toString() },
      )
    // Not in the draft's typed request: read from the challenge as sent. With a ceiling set, a
    // price the client cannot read (missing, a number, "5e7") is refused, not let through.
    const input = (challenge.request as { inputAmount?: unknown }).inputAmount
    if (most?.input !== undefined) {
      if (typeof input !== 'string' || !/^\d{1,78}$/.test(input))
        throw new ChallengeRefusedError(
          `The server states no input price in base units per 1M prompt tokens (inputAmount: ${JSON.stringify(input) ?? 'missing'}), so maxPrice.input (${most.input}) cannot be checked; not paid.`,
          { maxPrice: most.input.toString() },
        )
      if (BigInt(input) > most.input)
        throw new ChallengeRefusedError(
          `The server asks ${input} base units per 1M prompt tokens (inputAmount), over maxPrice.input (${most.input}); raise it if you mean to pay that.`,
          { inputAmount: input, maxPrice: most.input.toString() },
        )
    }
  }

  const chainClient = (chainId: number, what?: string) => {
    if (!options.rpcUrl) throw new ChainRequiredError(what)
    return createClient({
      chain: ChainClient.chain({ chainId, rpcUrl: options.rpcUrl }),
      transport: http(options.rpcUrl),
      account,
      pollingInterval: options.pollingInterval ?? 1_000,
    })
  }

  const save = async (live: Live) => {
    if (live.state) {
      live.state.signed = live.session.signed.toString()
      await store.set(live.key, live.state)
    }
  }

  /** The live channel for `url`, with `challenge` adopted; resumes a stored channel that fits. */
  const adopt = async (url: string, challenge: Challenge.Challenge): Promise<Live> => {
    const key = keyOf(url)
    let live = lives.get(key)
    if (live) {
      await live.loading
      live.session.renew(challenge)
    } else {
      const session = new PayingSession({ account, challenge, tokenDomain: options.tokenDomain })
      const l: Live = {
        key,
        session,
        state: undefined,
        sent: 0n,
        spent: 0n,
        queue: Promise.resolve(),
        streams: 0,
      }
      live = l
      lives.set(key, l)
      l.loading = (async () => {
        // Another process paying this server through this store would overwrite the channel.
        await store.own?.(key)
        await loadAll()
        await loadClosed(key)
        for (const slot of [closingKey(key), refusedKey(key)]) {
          const apart = await store.get(slot)
          if (apart) setApart.set(slot, BigInt(apart.signed))
        }
        const stored = await store.get(key)
        if (stored && fits(stored, session.request)) {
          l.state = stored
          session.channelId = stored.channelId
          session.signed = BigInt(stored.signed)
          l.spent = await spentShown(url, stored.channelId, session.signed)
        } else if (stored) await moveAside(key, stored, session.request)
      })()
      try {
        await l.loading
      } catch (e) {
        // Not loaded: the next request loads again (it would open a channel over the stored one).
        lives.delete(key)
        throw e
      } finally {
        l.loading = undefined
      }
    }
    if (live.state) live.state.url = url
    return live
  }

  /** Whether channel `state` is one the server's challenge `r` can be paid with (its chain,
   * escrow, currency and recipient). */
  const fits = (state: Store.ChannelState, r: PayingSession['request']) =>
    state.escrow.toLowerCase() === r.methodDetails.escrowContract.toLowerCase() &&
    state.currency.toLowerCase() === r.currency.toLowerCase() &&
    state.recipient.toLowerCase() === r.recipient.toLowerCase() &&
    state.chainId === r.methodDetails.chainId

  /**
   * A stored channel the server no longer takes (it asks for another chain, escrow, currency
   * or recipient) still holds its deposit: it is set apart (`closing(url)`; the slot of a
   * channel refused as closing), where what was signed on it still counts against maxTotal and
   * `requestClose(url, { channelId })` / `withdraw` reach it, not overwritten by the new
   * channel. Written there before it leaves its key, so a failed write loses nothing. One set
   * apart at a time: with another there already, the request is refused.
   */
  const moveAside = async (key: string, state: Store.ChannelState, r: PayingSession['request']) => {
    const slot = refusedKey(key)
    const earlier = await store.get(slot)
    if (earlier && earlier.channelId !== state.channelId)
      throw new ClientError(
        `The channel store holds channel ${state.channelId} for ${new URL(state.url).origin} on chain ${state.chainId} (escrow ${state.escrow}), but the server now asks for payment on chain ${r.methodDetails.chainId} (escrow ${r.methodDetails.escrowContract}), and channel ${earlier.channelId}, set apart before, still holds a deposit: take one back first (requestClose with an rpcUrl of its chain, then withdraw), or delete its entry to forget it.`,
        { channelId: state.channelId, setApart: earlier.channelId },
      )
    await store.set(slot, state)
    setApart.set(slot, BigInt(state.signed))
    await store.delete(key)
    stored.delete(key)
  }

  const forget = async (live: Live) => {
    live.state = undefined
    live.session.channelId = undefined
    live.session.signed = 0n
    live.sent = 0n
    live.spent = 0n
    await store.delete(live.key)
    // What it signed is counted where it went (a closed total, a slot set apart). A give-back
    // that fails leaves more reserved than signed, which only counts against this wallet: it
    // must not fail what was done (a close whose transaction went out).
    await giveBack(live.key).catch(() => {})
  }

  /**
   * The server refuses the channel as closed or unknown. One not shown closed is set apart
   * (`closing(url)`), not forgotten: one the server still shows `closing` (a close that was
   * refused or kept waiting, or a forced close under way) or `open` holds a deposit, and one it
   * does not know may too (the escrow shows it open, or not yet: the server's chain read behind
   * the block that opened it, an authorization it may still submit). So `close()` can be sent
   * again, or `requestClose` / `withdraw` take the deposit back, and what was signed on it
   * still counts against maxTotal. One closed (the server shows it `closed`, or, not knowing
   * it, the escrow shows it finalized) is forgotten, what it paid counted against maxTotal
   * first, as `close()` counts it: a close whose answer was lost, a store kept from before the
   * channel closed. The next request opens another channel.
   */
  const drop = async (live: Live, url: string, o: { refusedOpen?: boolean } = {}) => {
    const state = live.state
    if (state) {
      const shown = await shownChannel(url, state.channelId)
      const status = typeof shown?.view?.status === 'string' ? shown.view.status : undefined
      // What a closed channel paid: the server's settled, else spent, else all that was signed.
      let paid: bigint | undefined
      if (status === 'closed')
        paid = amount(shown?.view?.settled) ?? amount(shown?.view?.spent) ?? live.session.signed
      // Not answered (a network error, a 5xx, a 429): nothing is known, so nothing is forgotten.
      if (!shown || (shown.status !== 404 && status === undefined))
        throw new ClientError(
          `The server refused channel ${state.channelId}, and its status could not be read (${shown?.status ?? 'no answer'}); nothing was forgotten: try again.`,
          { channelId: state.channelId },
        )
      // A server that does not know the channel (it lost its database, its node is behind, it
      // never submitted the open) says nothing of its deposit: the escrow does, when there is
      // an RPC URL to ask.
      const onChain =
        status === undefined && options.rpcUrl
          ? await Escrow.getChannel(chainClient(state.chainId), {
              escrow: state.escrow,
              channelId: state.channelId,
            }).catch(() => undefined)
          : undefined
      if (onChain?.finalized) paid = onChain.settled
      // An open the server refused, which neither it nor the chain shows: forgotten, as it
      // always was (set apart, with no RPC URL nothing could ever clear it; its authorization
      // lapses within the hour).
      else if (status === undefined && !onChain && o.refusedOpen) paid = 0n
      if (paid === undefined) {
        const slot = refusedKey(live.key)
        const earlier = await store.get(slot)
        // One set apart at a time: the earlier one's record is not given up for this one's.
        if (earlier && earlier.channelId !== state.channelId)
          throw new ChannelStateError(
            status === 'closing'
              ? `Channel ${state.channelId} is closing, and channel ${earlier.channelId}, set apart before, still is: close() this one (the one in use) first, then the other.`
              : `The server refused channel ${state.channelId} (${status ? `shown ${status}` : 'unknown to it'}), which is not shown closed, and channel ${earlier.channelId}, set apart before, is not either: close(url, { channelId }) that one, or take its deposit back (requestClose, then withdraw), first.`,
            { channelId: state.channelId, setApart: earlier.channelId },
          )
        await store.set(slot, { ...state, signed: live.session.signed.toString() })
        setApart.set(slot, live.session.signed)
      }
      // Counted unless it is no longer kept here: whoever forgot it (a close of another
      // client on this store) counted it.
      if (paid !== undefined && (await store.get(live.key))?.channelId === state.channelId)
        await count(live.key, paid)
    }
    await forget(live)
  }

  /** The token's EIP-712 domain read from the chain, once per token. */
  const domainOf = (r: PayingSession['request']): Promise<Token.TokenDomain> => {
    const key = `${r.methodDetails.chainId}:${r.currency}`
    let read = domains.get(key)
    if (!read) {
      read = Token.domain(chainClient(r.methodDetails.chainId, "Reading the token's domain"), {
        token: r.currency,
      }).catch((e: unknown) => {
        const said =
          e instanceof TokenDomainError
            ? e.message
            : `The EIP-712 domain of token ${r.currency} could not be read.`
        throw new TokenDomainUnavailableError(
          `${said} An EIP-3009 authorization (a gasless open or top-up) is signed with it: check rpcUrl, or pass tokenDomain.`,
          { token: r.currency, chainId: r.methodDetails.chainId },
          { cause: e },
        )
      })
      domains.set(key, read)
      read.catch(() => domains.delete(key))
    }
    return read
  }

  /** Gives the live session the token's domain (EIP-3009 signatures need it) when neither the
   * caller nor the challenge gave one. */
  const withDomain = async (live: Live) => {
    if (live.session.hasTokenDomain) return
    const tokenDomain = await domainOf(live.session.request)
    const session = new PayingSession({ account, challenge: live.session.challenge, tokenDomain })
    session.channelId = live.session.channelId
    session.signed = live.session.signed
    live.session = session
  }

  /** The channel as the server shows it (GET /v1/channels/{id}): the answer's status, and
   * the channel when it was a 200; undefined when the server did not answer. */
  const shownChannel = async (url: string, channelId: string) => {
    const res = await base(`${new URL(url).origin}/v1/channels/${channelId}`).catch(() => undefined)
    if (!res) return undefined
    if (!res.ok) {
      await res.body?.cancel()
      return { status: res.status, view: undefined }
    }
    const view = (await res.json().catch(() => ({}))) as {
      status?: unknown
      deposit?: unknown
      spent?: unknown
      settled?: unknown
    }
    return { status: res.status, view }
  }

  /**
   * What was spent on a resumed channel, as the server shows it (0 when it cannot say, as for
   * a new channel). No receipt has said it this run, and `ahead` authorizes what was spent
   * plus the margin: taken for 0, a whole completion (which no voucher can follow) would get
   * only what is left of what was signed before, its answer cut short. Read from the server,
   * once per resume, rather than kept in the store from the last receipt: it is what the
   * server charges from, it holds what a receipt never brought (a lost answer, a process that
   * ended before its store write), a store of the caller's own needs no new field, and it
   * costs no store write per request. Never above `signed`, as for a receipt (`receive`).
   */
  const spentShown = async (url: string, channelId: string, signed: bigint): Promise<bigint> => {
    const spent = amount((await shownChannel(url, channelId))?.view?.spent)
    return spent !== undefined && spent <= signed ? spent : 0n
  }

  /** The deposit the server shows for a channel; undefined when it cannot say. */
  const depositShown = async (url: string, channelId: string): Promise<bigint | undefined> => {
    return amount((await shownChannel(url, channelId))?.view?.deposit)
  }

  /** The `open` credential of a new channel (the server pays the gas when it offers to). */
  const open = async (live: Live, url: string, ahead: bigint): Promise<string> => {
    const r = live.session.request
    closedByKey.set(live.key, await store.closedTotal(live.key))
    const room = total(live.key)
    if (room <= 0n)
      throw new LimitExceededError('maxTotal', {
        limit: options.limits.maxTotal,
        wanted: options.limits.maxTotal - room + ahead,
      })
    const deposit = min(options.deposit ?? maxDeposit, maxDeposit, room)
    let initial = min(ahead, deposit)
    // What other clients of this wallet on the store left (see `budget`).
    const allowed = await granted(live.key, initial)
    if (allowed !== undefined) {
      if (allowed <= 0n) throw beyond(allowed, initial)
      initial = min(initial, allowed)
    }
    const header = await counted(live.key, initial, async () => {
      const header = await credentialOf(live, url, r, deposit, initial)
      live.state = {
        channelId: live.session.channelId as Hex,
        chainId: r.methodDetails.chainId,
        escrow: r.methodDetails.escrowContract,
        currency: r.currency,
        recipient: r.recipient,
        deposit: deposit.toString(),
        signed: initial.toString(),
        url,
      }
      live.sent = initial
      return header
    })
    await save(live)
    return header
  }

  /** The open credential: by EIP-3009 signature when the server pays the gas, else a
   * transaction of the payer's. */
  const credentialOf = async (
    live: Live,
    url: string,
    r: PayingSession['request'],
    deposit: bigint,
    initial: bigint,
  ): Promise<string> => {
    let header: string
    if (live.session.serverSends) {
      await withDomain(live)
      header = await live.session.openWithAuthorization({ deposit, initial })
    } else {
      const salt = keccak256(toHex(`${account.address}:${Date.now()}:${Math.random()}`))
      const opened = await Escrow.open(chainClient(r.methodDetails.chainId, 'Opening a channel'), {
        escrow: r.methodDetails.escrowContract,
        payee: r.recipient,
        token: r.currency,
        deposit,
        salt,
      })
      // Mined, which may take longer than the challenge lives: the credential goes on a
      // current one (the core draft: none for an expired challenge).
      live.mined = true
      await current(live, url)
      header = await live.session.openWithHash({
        channelId: opened.channelId,
        salt,
        hash: opened.hash,
        initial,
      })
    }
    return header
  }

  /**
   * Raises the authorized amount to at least `required` (plus `by` when the limits allow: the
   * margin of the request that asked, `completionMargin` for a whole completion, which no
   * voucher can follow, else `margin`) and returns the voucher to send. When the deposit is
   * short a `topUp` goes first (HEAD to `url`), and the new deposit is recorded only once the
   * server took it: a refused top-up throws with nothing recorded and no voucher signed past
   * the deposit (recorded first, every later voucher was refused as above the deposit).
   * Throws LimitExceededError, before signing anything, when `required` passes a limit. Run
   * one at a time per channel (`serially`), so that concurrent requests do not top up, and
   * sign past the deposit, at once.
   */
  const raise = async (
    live: Live,
    url: string,
    required: bigint,
    by: bigint = margin,
  ): Promise<string> => {
    await current(live, url)
    const state = live.state as Store.ChannelState
    const maxTotal = total(live.key)
    if (required > maxTotal)
      throw new LimitExceededError('maxTotal', {
        limit: options.limits.maxTotal,
        wanted: options.limits.maxTotal - maxTotal + required,
      })
    // And by the store (other clients of this wallet, see `budget`), before any top-up.
    const allowed = await granted(live.key, required)
    if (allowed !== undefined && required > allowed) {
      await giveBack(live.key)
      throw beyond(allowed, required)
    }
    let deposit = BigInt(state.deposit)
    if (required > deposit) {
      // A top-up whose answer was lost may have gone through: the server's word on the
      // deposit first (within maxDeposit), or it would be paid again.
      const held = await depositShown(url, state.channelId)
      if (held !== undefined && held > deposit) {
        deposit = min(held, maxDeposit)
        state.deposit = deposit.toString()
        await save(live)
      }
    }
    if (required > deposit) {
      if (required > maxDeposit)
        throw new LimitExceededError('maxDeposit', { limit: maxDeposit, wanted: required })
      const next = min(maxDeposit, maxTotal, max(required + by, deposit * 2n))
      let raised = next
      // An EIP-3009 authorization the server sends, else a transaction of the payer's whose
      // hash the credential carries (a server that takes no authorization, or pays no gas).
      let topUp: () => Promise<string>
      if (live.session.serverSends) {
        await withDomain(live)
        topUp = () => live.session.topUp(next - deposit)
      } else {
        const r = live.session.request
        const sent = await Escrow.topUp(chainClient(r.methodDetails.chainId, 'A top-up'), {
          escrow: r.methodDetails.escrowContract,
          channelId: state.channelId,
          token: r.currency,
          amount: next - deposit,
        })
        await current(live, url)
        // The same transaction, however often its credential is made: never paid twice.
        topUp = () =>
          live.session.topUpWithHash({ hash: sent.hash, additionalDeposit: next - deposit })
      }
      await post(url, await topUp(), {
        live,
        // Made again only if the server does not show the deposit raised already: the late
        // refusal may be all that failed, and a second top-up would pay it twice.
        credential: async () => {
          const held = await depositShown(url, state.channelId)
          if (held === undefined || held < next) return topUp()
          raised = min(held, maxDeposit)
          return undefined
        },
      })
      deposit = raised
      state.deposit = deposit.toString()
      await save(live)
    }
    // The budget again after the top-up's wait: other channels may have signed meanwhile.
    let target = max(min(required + by, deposit, total(live.key)), live.session.signed)
    const room = await granted(live.key, target)
    if (room !== undefined) target = max(min(target, room), live.session.signed, required)
    const voucher = await counted(live.key, target, () => live.session.voucher(target))
    await save(live)
    return voucher
  }

  /** Runs `fn` after the channel's payments under way (one payment at a time per channel). */
  const serially = <T>(live: Live, fn: () => Promise<T>): Promise<T> => {
    const run = live.queue.then(fn)
    live.queue = run.then(
      () => {},
      () => {},
    )
    return run
  }

  /**
   * Sends credentials that carry no request (HEAD to the same URI): a mid-stream voucher, a
   * top-up. A refused credential whose challenge has expired is never sent again on it (the
   * core draft's MUST NOT). It expired on its way (a slow network, or a server's short-lived
   * challenges: `current` renews one only when it is about to expire, and a credential can
   * take longer than what was left): `again.credential` makes it once more on a fresh
   * challenge, once, and it is sent again; undefined from it means nothing is left to send.
   * Without `again`, or expired again, it throws a PaymentFailedError.
   */
  const post = async (
    url: string,
    credential: string,
    again?: { live: Live; credential: () => Promise<string | undefined> },
  ): Promise<void> => {
    let renewed = false
    for (let attempt = 0; ; attempt++) {
      const res = await base(url, { method: 'HEAD', headers: { authorization: credential } })
      if (res.ok) return
      // Over the per-channel voucher rate: wait as told, once, not past MAX_RETRY_AFTER_MS nor
      // past the challenge's expiry (the same credential goes again).
      const wait = res.status === 429 && attempt === 0 ? retryAfterMs(res) : undefined
      if (wait !== undefined && !expired(credential, wait + expirySkewMs)) {
        await sleep(wait, stop.signal)
        continue
      }
      // Expired by this clock: not sent again on that challenge (the core draft's MUST NOT).
      if (expired(credential)) {
        if (!again || renewed)
          throw new PaymentFailedError(
            `The server refused a payment credential (${res.status}) whose challenge expired on its way; it is not sent again on that challenge.`,
            res.status,
          )
        await current(again.live, url)
        const made = await again.credential()
        if (made === undefined) return
        credential = made
        renewed = true
        continue
      }
      // A HEAD answer has no body: the same credential again as a POST without one (the same
      // management request, idempotent) brings the server's problem, or goes through.
      const told = await base(url, { method: 'POST', headers: { authorization: credential } })
      if (told.ok) return
      const problem = await problemOf(told)
      throw new PaymentFailedError(
        `The server refused a payment credential (${told.status})${toldBy(problem)}`,
        told.status,
        problem,
      )
    }
  }

  /** Notes what a receipt says was spent, and hands it to `onReceipt`. */
  const receive = (live: Live, receipt: Receipt.Receipt) => {
    const spent = amount(receipt.spent)
    // Never above what was signed: a server cannot have spent more, and believed, a receipt
    // saying so would have the next voucher signed up to the whole deposit.
    if (spent !== undefined && spent > live.spent && spent <= live.session.signed)
      live.spent = spent
    options.onReceipt?.(receipt)
  }

  /**
   * The core draft: a client MUST NOT send a credential for an expired challenge. A channel's
   * challenge that expires within `expirySkewMs` (clocks differ) is replaced first by a fresh
   * one: the same URI asked without a credential answers 402 with one. Long streams pay many
   * vouchers on one challenge: without this, one that outlived it failed partway.
   */
  const current = async (live: Live, url: string) => {
    const expires = live.session.challenge.expires
    if (expires === undefined || Date.parse(expires) - Date.now() > expirySkewMs) return
    const res = await base(url, { method: 'POST' })
    const challenge = challengeIn(res)
    await res.body?.cancel()
    if (!challenge)
      throw new PaymentFailedError(
        `The channel's payment challenge expired and the server sent no fresh one (${res.status}).`,
        res.status,
      )
    check(challenge, url)
    live.session.renew(challenge)
  }

  /** The voucher a request starts with: what was spent plus `ahead`, within the limits. */
  const ahead = async (live: Live, url: string, by: bigint) => {
    await current(live, url)
    let cap = min(BigInt((live.state as Store.ChannelState).deposit), total(live.key))
    const signed = live.session.signed
    // What other clients of this wallet on the store left (see `budget`).
    const room = await granted(live.key, min(live.spent + by, cap))
    if (room !== undefined) cap = min(cap, room)
    let target = max(signed, min(live.spent + by, cap))
    // A raise smaller than the challenge's minVoucherDelta is refused (delta-too-small, the
    // evm draft): raise by at least that, or, where the cap leaves no room for it and what is
    // signed still covers what was spent, send what is signed again (a replay, taken as is).
    const delta = live.session.request.methodDetails.minVoucherDelta ?? 0n
    if (signed > 0n && target > signed && target - signed < delta)
      target = signed + delta <= cap ? signed + delta : live.spent < signed ? signed : target
    const credential = await counted(live.key, target, () => live.session.voucher(target))
    await save(live)
    return credential
  }

  /** Answers a `payment-need-voucher` (one payment at a time per channel). */
  const answer = (live: Live, url: string, need: Events.NeedVoucher) => {
    if (need.channelId !== live.session.channelId || need.requiredCumulative <= live.sent)
      return live.queue
    return serially(live, async () => {
      if (need.requiredCumulative <= live.sent) return
      const voucher = await raise(live, url, need.requiredCumulative)
      live.sent = live.session.signed
      // Made again on a fresh challenge for the amount it carries (`raise` stored it), not for
      // what the channel signed since: another request's voucher may be signed and its store
      // write under way, and a voucher leaves the client only once its amount is stored (what
      // makes a dead process's reservation safe to ignore). One at or below what the server
      // took is a replay it takes.
      const cumulative = BigInt(
        (Credential.deserialize(voucher).payload as { cumulativeAmount: string }).cumulativeAmount,
      )
      await post(url, voucher, {
        live,
        credential: () => live.session.voucher(cumulative),
      })
      options.onVoucher?.({
        channelId: live.session.channelId as Hex,
        cumulativeAmount: live.session.signed,
      })
    })
  }

  /**
   * The response body without payment events (those go to `answer` and `receive`), counted
   * as a stream under way on the channel until it ends, fails or is cancelled.
   */
  const filtered = (
    live: Live,
    url: string,
    body: ReadableStream<Uint8Array>,
    status: number,
    gate: Gate,
    signal?: AbortSignal,
  ) => {
    const reader = Stream.strip(
      body,
      {
        onNeedVoucher: (need) => answer(live, url, need),
        onReceipt: (receipt) => receive(live, receipt),
        settled: () => live.queue,
      },
      status,
    ).getReader()
    // Counted when the request was sent (the gate), or now (a first stream that opened the channel).
    if (gate.live === live) gate.handed = true
    else live.streams++
    // The request's work (see `release`) ends with its stream, not when its response is handed back.
    gate.streaming = true
    let ended = false
    /** Set when the signal aborted: the stream is errored with its reason. */
    let cut = false
    let out: ReadableStreamDefaultController<Uint8Array> | undefined
    const onAbort = () => {
      end()
      // Errored with the signal's reason, as fetch's own body is, not ended as if complete.
      cut = true
      out?.error(signal?.reason)
      reader.cancel(signal?.reason).catch(() => {})
    }
    const end = () => {
      if (ended) return
      ended = true
      live.streams--
      signal?.removeEventListener('abort', onAbort)
      gate.end()
    }
    signal?.addEventListener('abort', onAbort, { once: true })
    const stream = new ReadableStream<Uint8Array>(
      {
        start(controller) {
          out = controller
        },
        async pull(controller) {
          try {
            const r = await reader.read()
            if (cut) return
            if (r.done) {
              end()
              controller.close()
            } else controller.enqueue(r.value)
          } catch (e) {
            end()
            if (!cut) controller.error(e)
          }
        },
        cancel(reason) {
          end()
          return reader.cancel(reason)
        },
      },
      { highWaterMark: 0 },
    )
    // Aborted between its answer and now (a release's signal): no event will come.
    if (signal?.aborted) onAbort()
    return stream
  }

  const paying = async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    usable()
    // Work under way from now until its response is handed back, or its stream ends.
    const end = begin()
    try {
      return await payingTracked(input, init, end)
    } catch (e) {
      end()
      throw e
    }
  }

  const payingTracked = async (
    input: string | URL | Request,
    init: RequestInit | undefined,
    end: () => void,
  ): Promise<Response> => {
    const request =
      input instanceof Request ? new Request(input, init) : new Request(String(input), init)
    const url = request.url
    lastUrl = url
    const body =
      request.method === 'GET' || request.method === 'HEAD'
        ? undefined
        : await request.arrayBuffer()
    const live = lives.get(keyOf(url))
    await live?.loading
    // The server keeps one stream per channel (a new one ends the one under way, which would
    // stop mid-answer): a second stream at once is refused here, saying what to do.
    if (live?.state && live.streams > 0 && streams(body))
      throw new ClientError(
        'A stream is under way on this channel, and the server keeps one per channel (a second would end the first). Read the first to its end (or cancel it) first, or give each concurrent stream its own createFetch with its own store: its own channel.',
        { channelId: live.state.channelId },
      )
    // Counted from now, not from its answer: two streams started at once do not both pass.
    const gate: Gate = {
      live: live?.state && streams(body) ? live : undefined,
      handed: false,
      streaming: false,
      end,
    }
    if (gate.live) gate.live.streams++
    try {
      return await pay(request, url, body, live, gate)
    } finally {
      if (gate.live && !gate.handed) gate.live.streams--
      if (!gate.streaming) end()
    }
  }

  const pay = async (
    request: Request,
    url: string,
    body: ArrayBuffer | undefined,
    found: Live | undefined,
    gate: Gate,
  ): Promise<Response> => {
    let live = found
    const by = streams(body) ? margin : completionMargin
    const send = (credential: string | undefined) => {
      const headers = new Headers(request.headers)
      // The caller's Authorization (e.g. the openai SDK's API key) is replaced by the credential.
      headers.delete('authorization')
      if (credential) headers.set('authorization', credential)
      return base(url, { method: request.method, headers, body, signal: request.signal })
    }
    // A channel being opened is not the server's yet: wait for the open to be answered.
    if (live?.opening) await live.opening.catch(() => {})
    let credential = live?.state ? await ahead(live, url, by) : undefined
    // Set while this request carries an open credential: ends the wait of the others.
    let opened: (() => void) | undefined
    // The channel whose open this request sent last (until the server answers it).
    let sentOpen: Live | undefined
    // How often this request sent again an open the server could not verify, or find.
    let reopens = 0
    // The channel this request opened: one open at most per request (a second, after the
    // server did not find the first, would sign a second deposit and voucher on top of it).
    let mine: Hex | undefined
    const openOnce = async (
      l: Live,
      refused: Response,
      kind: string | undefined,
      problem: Record<string, unknown> | undefined,
    ) => {
      if (mine)
        throw new ChannelNotFoundError(
          `The server no longer takes channel ${mine}, which this request opened (${refused.status}${kind ? ` ${kind}` : ''}); no second channel is opened in one request: that one is kept, set apart and counted against maxTotal unless shown closed, and the next request opens another${toldBy(problem)}`,
          mine,
          refused.status,
          problem,
        )
      const credential = await open(l, url, by)
      mine = l.session.channelId
      return credential
    }
    /**
     * Ends the open this request holds (requests waiting for it go on), once it is answered,
     * unless the same open goes again (a 429, or not found yet): they wait for that answer too,
     * rather than find the channel unknown, set it apart and open another.
     */
    const letGo = () => {
      opened?.()
      opened = undefined
    }
    // However the tries end (12 of them, the last having just signed an open; a fetch that
    // threw before its answer), an open this request holds is ended: requests waiting for it,
    // and release(), would otherwise wait forever.
    try {
      for (let attempt = 0; attempt < 12; attempt++) {
        const res = await send(credential).catch((e: unknown) => {
          letGo()
          throw e
        })
        // Whether what was just answered was an open credential (set again when one is sent).
        const answeredOpen = sentOpen
        sentOpen = undefined
        // Over the per-channel voucher rate (many requests raising at once): wait as told, as
        // long as the request lets it (its own signal too). A longer wait is the caller's to
        // make: the 429 is its answer (the openai SDK waits out Retry-After itself).
        // Nor past its challenge's expiry: no credential goes out on an expired challenge.
        if (res.status === 429 && credential && res.headers.has('retry-after')) {
          const wait = retryAfterMs(res)
          if (wait === undefined || expired(credential, wait + expirySkewMs)) {
            letGo()
            return res
          }
          sentOpen = answeredOpen
          await res.body?.cancel()
          await sleep(wait, AbortSignal.any([stop.signal, request.signal]))
          continue
        }
        if (res.status !== 402 && res.status !== 410) {
          letGo()
          if (answeredOpen) answeredOpen.mined = undefined
          if (!live?.state || !res.body) return res
          const receipt = res.headers.get('payment-receipt')
          const sse = res.headers.get('content-type')?.includes('text/event-stream')
          if (receipt && !sse) {
            let parsed: Receipt.Receipt | undefined
            try {
              parsed = Receipt.deserialize(receipt)
            } catch {}
            if (parsed) receive(live, parsed)
          }
          if (!sse) return res
          const signal = AbortSignal.any([request.signal, stop.signal])
          return new Response(filtered(live, url, res.body, res.status, gate, signal), {
            status: res.status,
            statusText: res.statusText,
            headers: res.headers,
          })
        }
        const challenge = challengeIn(res)
        // Not a payment this client makes (no evm/session challenge, no channel): the caller's.
        if (!challenge && !live?.state) return res
        const problem = await problemOf(res)
        const kind = kindOf(problem)
        if (challenge) {
          check(challenge, url)
          live = await adopt(url, challenge)
          if (streams(body) && gate.live !== live) {
            if (live.streams > 0)
              throw new ClientError(
                'A stream is under way on this channel, and the server keeps one per channel (a second would end the first).',
                { channelId: live.state?.channelId },
              )
            gate.live = live
            live.streams++
          }
        }
        const l = live as Live
        // The open this request just sent, which the server does not find: it may be on chain
        // all the same (the server's node behind the block of its own openWithAuthorization),
        // so the same open goes again below, a few times, not a second one.
        const unseen =
          kind === 'channel-not-found' &&
          answeredOpen === l &&
          l.state !== undefined &&
          l.session.channelId === mine
        const again =
          answeredOpen === l &&
          (unseen || (l.mined && kind === 'verification-failed')) &&
          reopens < 3
        if (!again) letGo()
        if (unseen && reopens >= 3) {
          const channelId = l.session.channelId as Hex
          await drop(l, url)
          throw new ChannelNotFoundError(
            `The server does not find channel ${channelId}, which this request opened, its open sent ${reopens + 1} times; no second channel was opened, and this one is not forgotten: unless shown closed, it is set apart (setApart(url)), what was signed on it counted against maxTotal until the server or the chain shows it closed (${res.status} channel-not-found)${toldBy(problem)}`,
            channelId,
            res.status,
            problem,
          )
        }
        if (!unseen && (kind === 'channel-not-found' || kind === 'channel-finalized'))
          await drop(l, url)
        if (l.opening && !again) {
          // Another request is opening the channel: wait for it, then pay from that channel. (Its
          // state is kept before the server has answered the open: a voucher now would find no
          // channel.)
          await l.opening.catch(() => {})
          if (l.state) credential = await ahead(l, url, by)
          else {
            credential = await openOnce(l, res, kind, problem)
            sentOpen = l
          }
        } else if (!l.state) {
          // The channel exists for the server once it has answered the open: until then, other
          // requests wait (their vouchers would find no channel).
          const { promise, resolve } = Promise.withResolvers<void>()
          l.opening = promise
          opened = () => {
            if (l.opening === promise) l.opening = undefined
            resolve()
          }
          try {
            credential = await openOnce(l, res, kind, problem)
            sentOpen = l
          } catch (e) {
            opened()
            throw e
          }
        } else if (kind === 'insufficient-balance') {
          const required = amount(problem?.requiredCumulative)
          if (required === undefined)
            throw new PaymentFailedError(
              `The server asked for more (${res.status} insufficient-balance) without a requiredCumulative in base units${toldBy(problem)}`,
              res.status,
              problem,
            )
          credential = await serially(l, async () => {
            // Another request may have raised enough meanwhile: the voucher is then only signed.
            // A whole completion's answer is cut where what it was authorized runs out: raised
            // by its margin (`by`), as `ahead` authorizes it, not by a stream's.
            const voucher = await raise(l, url, required, by)
            l.sent = l.session.signed
            return voucher
          })
          options.onVoucher?.({ channelId: l.session.channelId as Hex, cumulativeAmount: l.sent })
        } else if (again) {
          // The payer's own open, mined, that the server could not verify (its node behind the
          // payer's, say), or an open the server does not find (see `unseen`). The evm draft has
          // such a client decide by the channel's state, not the refusal: the channel is on
          // chain, or may be, so the same open goes again, after a wait, rather than a second
          // channel and deposit (the server skips openWithAuthorization for a channel there).
          reopens++
          await sleep(1000 * reopens, stop.signal)
          // Requests waiting for the open wait for this sending's answer (held since the last
          // one's, or held now).
          if (!opened) {
            const { promise, resolve } = Promise.withResolvers<void>()
            l.opening = promise
            opened = () => {
              if (l.opening === promise) l.opening = undefined
              resolve()
            }
          }
          // The open just answered, on a current challenge: nothing signed anew.
          await current(l, url)
          credential = l.session.again(credential as string)
          sentOpen = l
        } else if (!challenge || (problem && kind !== 'verification-failed' && attempt > 0)) {
          // An open the server refused (a deposit below its least, say) opened nothing: its
          // state is read, and the channel set apart when the server or the chain shows it,
          // else forgotten (`drop`, `refusedOpen`).
          if (answeredOpen === l && l.state)
            await drop(l, url, { refusedOpen: true }).catch(() => {})
          throw new PaymentFailedError(
            `The server refused the payment (${res.status}${kind ? ` ${kind}` : ''})${toldBy(problem)}`,
            res.status,
            problem,
          )
        } else credential = await ahead(l, url, by)
      }
      throw new PaymentFailedError(
        'The server kept asking for payment; giving up after 12 tries.',
        402,
      )
    } finally {
      opened?.()
    }
  }

  const close = async (url = lastUrl, which: { channelId?: Hex } = {}): Promise<Hex> => {
    if (!url) throw new ClientError('Nothing to close: no request was made; pass the URL.')
    const key = keyOf(url)
    await store.own?.(key)
    // The channel named, else the one in use, else one set apart while it closes (its close
    // refused or kept waiting, then one forced): sent again, the close goes on.
    const held = lives.get(key)?.state ?? (await store.get(key))
    const found: [string | undefined, Store.ChannelState | undefined][] = [
      [undefined, held],
      [refusedKey(key), await store.get(refusedKey(key))],
      [closingKey(key), await store.get(closingKey(key))],
    ]
    const [slot, state] =
      found.find(([, c]) => c && named(c, which.channelId)) ?? ([undefined, undefined] as const)
    if (!state)
      throw new ChannelStateError(
        `No channel${which.channelId ? ` ${which.channelId}` : ''} to close for ${new URL(url).origin}${there(found.map(([, c]) => c))}.`,
        { channelId: which.channelId },
      )
    const inUse = slot === undefined ? held : undefined
    // A fresh challenge to bind the close credential to.
    const res = await base(state.url, { method: 'POST' })
    const challenge = challengeIn(res)
    await res.body?.cancel()
    if (!challenge)
      throw new PaymentFailedError(
        'The server sent no Payment challenge to close with.',
        res.status,
      )
    check(challenge, state.url)
    const live = await adopt(state.url, challenge)
    // One on another chain (escrow, currency, recipient) than the server now asks for: it
    // cannot close it, and the channel was set apart (see `moveAside`).
    if (!fits(state, live.session.request))
      throw new ClientError(
        `Channel ${state.channelId} is on chain ${state.chainId} (escrow ${state.escrow}), which the server no longer asks to be paid on, so it cannot close it; it is set apart (closing(url)): requestClose with an rpcUrl of its chain, then withdraw, takes its deposit back.`,
        { channelId: state.channelId },
      )
    let session = live.session
    if (!inUse) {
      session = new PayingSession({ account, challenge, tokenDomain: options.tokenDomain })
      session.channelId = state.channelId
      session.signed = BigInt(state.signed)
    }
    // Close at what was spent, not at what was signed ahead.
    const status = await base(`${new URL(state.url).origin}/v1/channels/${state.channelId}`)
    if (!status.ok)
      throw new PaymentFailedError(
        `Cannot read the channel (${status.status}).`,
        status.status,
        await problemOf(status),
      )
    const shown = (await status.json().catch(() => undefined)) as
      | { spent?: unknown; settled?: unknown; status?: unknown }
      | undefined
    const shownSpent = amount(shown?.spent)
    const shownSettled = shown?.settled === undefined ? shownSpent : amount(shown.settled)
    if (shownSpent === undefined || shownSettled === undefined)
      throw new PaymentFailedError(
        `The server's view of channel ${state.channelId} names no spent (and settled) amount in base units; no close signed.`,
        status.status,
      )
    let spent = shownSpent
    // Closed already (by an earlier close whose answer was lost, or by the server): what it
    // paid counts against maxTotal, and the channel is forgotten where it was kept.
    if (shown?.status === 'closed') {
      await count(key, shownSettled)
      if (inUse) await forget(live)
      else if (slot) {
        await store.delete(slot)
        setApart.delete(slot)
      }
      throw new ClientError(
        `Channel ${state.channelId} is closed already; it is forgotten, nothing more to close.`,
        { channelId: state.channelId },
      )
    }
    // A final voucher is signed for no more than this client signed (another process on the
    // same store may have signed more, and closed it: that is the case above).
    if (spent > session.signed)
      throw new PaymentFailedError(
        `The server says ${spent} was spent on channel ${state.channelId}, more than the ${session.signed} signed; no close signed (requestClose, then withdraw, takes the deposit back).`,
        status.status,
      )
    const send = async () =>
      base(state.url, {
        method: 'POST',
        headers: { authorization: await session.close(spent) },
      })
    let closed = await send()
    if (!closed.ok) {
      const problem = await problemOf(closed)
      // Spent grew since it was read (a request of ours ended meanwhile): the server says by
      // how much. Signed once more when it is within what was signed already (a voucher that
      // gives the server nothing it does not hold), or a base unit above what was spent: with
      // all that was spent settled on chain, a close for that amount is one anyone can read and
      // send, and the server takes only one above it.
      const required = amount(problem?.requiredCumulative)
      if (
        closed.status === 402 &&
        required !== undefined &&
        required > spent &&
        required <= max(session.signed, spent + 1n)
      ) {
        spent = required
        closed = await send()
      } else
        throw new PaymentFailedError(
          `The server refused to close the channel (${closed.status})${toldBy(problem)}`,
          closed.status,
          problem,
        )
    }
    if (!closed.ok) {
      const problem = await problemOf(closed)
      throw new PaymentFailedError(
        `The server refused to close the channel (${closed.status})${toldBy(problem)}`,
        closed.status,
        problem,
      )
    }
    const txHash = await closeHash(closed)
    if (!txHash)
      throw new PaymentFailedError(
        `The server answered the close (${closed.status}) without a receipt naming its transaction; the channel is kept (close again to see how it stands).`,
        closed.status,
      )
    await count(key, spent)
    if (inUse) await forget(live)
    else if (slot) {
      await store.delete(slot)
      setApart.delete(slot)
    }
    return txHash
  }

  /** Whether `state` is the channel `channelId` names (any channel when none is named). */
  const named = (state: Store.ChannelState, channelId: Hex | undefined) =>
    channelId === undefined || state.channelId.toLowerCase() === channelId.toLowerCase()
  /** The channels there are, for a message that found none that fits. */
  const there = (states: (Store.ChannelState | undefined)[]) => {
    const ids = [...new Set(states.flatMap((c) => (c ? [c.channelId] : [])))]
    return ids.length ? ` (there are ${ids.join(', ')})` : ''
  }

  /** Counts what a closed channel paid against maxTotal, in the store and here. */
  const count = async (key: string, amount: bigint) => {
    if (amount === 0n) return
    await loadClosed(key)
    await store.addClosedTotal(key, amount)
    closedByKey.set(key, (closedByKey.get(key) ?? 0n) + amount)
  }

  /** Where a channel under forced close is kept: apart, so that a new one can open meanwhile. */
  const closingKey = (key: string) => `${key}${CLOSING}`
  /** Where a channel the server refused as closing is kept (see `drop`). */
  const refusedKey = (key: string) => `${key}${REFUSED}`

  /**
   * The channel of `state` as the escrow has it, if it is still open there. One closed without
   * this store knowing is forgotten (`forgetIt`), and what the payee took still counts
   * against maxTotal.
   */
  const stillOpen = async (
    client: ReturnType<typeof chainClient>,
    key: string,
    state: Store.ChannelState,
    forgetIt: () => Promise<unknown>,
  ) => {
    const ref = { escrow: state.escrow, channelId: state.channelId }
    const onChain = await Escrow.getChannel(client, ref)
    if (!onChain || onChain.finalized) {
      await count(key, onChain?.settled ?? 0n)
      await forgetIt()
      throw new ClientError(
        `Channel ${state.channelId} is already closed on chain; it is forgotten, nothing to withdraw.`,
      )
    }
    return { ref, onChain }
  }

  const requestClose = async (url = lastUrl, options: { channelId?: Hex } = {}) => {
    if (!url) throw new ClientError('Nothing to close: no request was made; pass the URL.')
    const key = keyOf(url)
    await store.own?.(key)
    const pending = await store.get(closingKey(key))
    const refused = await store.get(refusedKey(key))
    const inUse = lives.get(key)?.state ?? (await store.get(key))
    // The channel named, else the one in use, else the one set apart as refused.
    const candidates = [inUse, refused, pending && !pending.closeRequestedAt ? pending : undefined]
    const state = candidates.find((c) => c && named(c, options.channelId))
    if (!state)
      throw new ChannelStateError(
        `No open channel${options.channelId ? ` ${options.channelId}` : ''} for ${new URL(url).origin}${there([...candidates, pending])}.`,
        { channelId: options.channelId },
      )
    // One forced close at a time per server: the store keeps one channel under it.
    if (pending && pending.channelId !== state.channelId)
      throw new ChannelStateError(
        `Channel ${pending.channelId} is under forced close already (one at a time per server); withdraw it first, then request the close of channel ${state.channelId} (or close that one through the server).`,
        { channelId: state.channelId, forced: pending.channelId },
      )
    const client = chainClient(state.chainId, 'requestClose')
    /** Forgets `state` where it is kept (in use, or set apart), but in the slot `kept`. */
    const forgetIt = async (kept?: string) => {
      const live = lives.get(key)
      if (live?.state?.channelId === state.channelId) await forget(live)
      else if ((await store.get(key))?.channelId === state.channelId) await store.delete(key)
      for (const [slot, there] of [
        [refusedKey(key), refused],
        [closingKey(key), pending],
      ] as const)
        if (slot !== kept && there?.channelId === state.channelId) {
          await store.delete(slot)
          setApart.delete(slot)
        }
    }
    const { ref } = await stillOpen(client, key, state, () => forgetIt())
    // A repeated request keeps the first timestamp (the escrow's rule), so retrying is safe.
    const sent = await Escrow.requestClose(client, ref)
    const after = await Escrow.getChannel(client, ref)
    const requestedAt = after?.closeRequestedAt ?? 0n
    // Moved to the forced-close slot from where it was (in use, or refused): written there
    // first, so that a write that fails (a full disk) leaves the channel where it was.
    await store.set(closingKey(key), { ...state, closeRequestedAt: requestedAt.toString() })
    setApart.set(closingKey(key), BigInt(state.signed))
    await forgetIt(closingKey(key))
    return {
      channelId: state.channelId,
      txHash: sent.hash,
      withdrawableAt: new Date(Number(requestedAt + Escrow.closeGracePeriod) * 1000),
    }
  }

  const withdraw = async (url = lastUrl, which: { channelId?: Hex } = {}) => {
    if (!url) throw new ClientError('Nothing to withdraw: no request was made; pass the URL.')
    const key = keyOf(url)
    await store.own?.(key)
    const state = await store.get(closingKey(key))
    if (!state)
      throw new ChannelStateError(
        `No channel with ${new URL(url).origin} is closing; call requestClose first.`,
        { channelId: which.channelId },
      )
    if (!named(state, which.channelId))
      throw new ChannelStateError(
        `Channel ${which.channelId} is not under forced close with ${new URL(url).origin} (channel ${state.channelId} is); call requestClose for it first.`,
        { channelId: which.channelId, forced: state.channelId },
      )
    const client = chainClient(state.chainId, 'withdraw')
    const { ref, onChain } = await stillOpen(client, key, state, async () => {
      await store.delete(closingKey(key))
      setApart.delete(closingKey(key))
    })
    // The escrow compares with block time, not this machine's clock: the time of the block
    // the withdraw would be mined in.
    const ready = onChain.closeRequestedAt + Escrow.closeGracePeriod
    const now = await ChainClient.now(client)
    if (onChain.closeRequestedAt === 0n || now < ready)
      throw new CloseNotReadyError(
        state.channelId,
        onChain.closeRequestedAt === 0n ? undefined : ready,
      )
    const sent = await Escrow.withdraw(client, ref)
    // The refund as the receipt's Withdrawn of this channel says, when it can be (at most what
    // was unsettled when read: the payee may have settled since); else that.
    const unsettled = onChain.deposit - onChain.settled
    const event = Escrow.events(sent.receipt, ref.escrow).find(
      (e) =>
        e.eventName === 'Withdrawn' &&
        e.args.channelId.toLowerCase() === state.channelId.toLowerCase() &&
        e.args.refund <= unsettled,
    )
    const refund = event?.eventName === 'Withdrawn' ? event.args.refund : unsettled
    // What the payee kept counts against maxTotal, as a cooperative close's `spent` does.
    const paid = onChain.deposit - refund
    await count(key, paid)
    await store.delete(closingKey(key))
    setApart.delete(closingKey(key))
    return { channelId: state.channelId, txHash: sent.hash, refund, paid }
  }

  let releasing: Promise<void> | undefined
  const release = (options: { signal?: AbortSignal | undefined } = {}) => {
    released = true
    const { signal } = options
    const cancel = () => stop.abort(signal?.reason)
    if (signal?.aborted) cancel()
    else signal?.addEventListener('abort', cancel, { once: true })
    releasing ??= (async () => {
      await idle()
      lives.clear()
      // Nothing signs through this fetch now: what it held reserved goes back to the budget
      // (a store shared by other clients in this process would keep it otherwise).
      for (const key of reservedByKey.keys()) await giveBack(key).catch(() => {})
      await store.release?.()
    })()
    return releasing.finally(() => signal?.removeEventListener('abort', cancel))
  }

  return Object.assign(paying as typeof fetch, {
    release,
    close: tracked(close),
    requestClose: tracked(requestClose),
    withdraw: tracked(withdraw),
    channel: async (url: string) => lives.get(keyOf(url))?.state ?? store.get(keyOf(url)),
    closing: async (url: string) =>
      (await store.get(closingKey(keyOf(url)))) ?? store.get(refusedKey(keyOf(url))),
    setApart: async (url: string) => {
      const forced = await store.get(closingKey(keyOf(url)))
      const refused = await store.get(refusedKey(keyOf(url)))
      return { ...(forced ? { forced } : {}), ...(refused ? { refused } : {}) }
    },
  })
}

/**
 * The stream a request counts on its channel: `handed` once its response body counts it. `end`
 * ends the request's work under way (see `release`): when its response is handed back, or, once
 * `streaming` (its body is a paying stream), when that stream ends.
 */
type Gate = { live: Live | undefined; handed: boolean; streaming: boolean; end: () => void }

/** Whether a request body asks for a stream (`"stream": true`). */
function streams(body: ArrayBuffer | undefined): boolean {
  if (!body) return false
  try {
    return (JSON.parse(new TextDecoder().decode(body)) as { stream?: unknown }).stream === true
  } catch {
    return false
  }
}

/** A server's amount (a decimal string of base units, as the draft writes them), if it is one. */
const amount = (x: unknown): bigint | undefined =>
  typeof x === 'string' && /^\d{1,78}$/.test(x) ? BigInt(x) : undefined

const min = (...xs: bigint[]) => xs.reduce((a, b) => (a < b ? a : b))
const max = (...xs: bigint[]) => xs.reduce((a, b) => (a > b ? a : b))
/** The longest Retry-After a paying request waits out by itself (the server's voucher rate
 * limit asks for about a second). */
const MAX_RETRY_AFTER_MS = 30_000

/** The wait a 429 asks for (Retry-After in seconds; 1 s when unreadable), in ms; undefined when
 * over MAX_RETRY_AFTER_MS. */
function retryAfterMs(res: Response): number | undefined {
  const seconds = Number(res.headers.get('retry-after') ?? 1)
  const ms = Number.isFinite(seconds) && seconds >= 0 ? seconds * 1000 : 1000
  return ms <= MAX_RETRY_AFTER_MS ? ms : undefined
}

/** Waits `ms`; rejects with `signal`'s reason when it aborts first. */
const sleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason)
    const onAbort = () => {
      clearTimeout(timer)
      reject(signal.reason)
    }
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort)
      resolve()
    }, ms)
    signal.addEventListener('abort', onAbort, { once: true })
  })

/** Store key suffixes of the channels set apart: under forced close, and refused as closing. */
const CLOSING = '#closing'
const REFUSED = '#refused'
