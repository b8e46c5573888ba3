/**
 * The settlement worker (draft-evm-session-00, "Settlement Procedure"): collects what
 * delivered service cost with `Escrow.settle`, closes channels cooperatively, and settles at
 * once when a payer starts a forced close.
 *
 * What it submits: the highest accepted voucher whose amount is at most `spent` (never
 * above: the payee takes only what service cost), and, for a channel that closes, the lowest
 * voucher that covers `spent`: a cooperative or idle close closes with it (the payer's final
 * voucher, or one accepted before), and a payer's forced close is settled with it once half
 * its grace period has passed on chain with nothing held on the channel (before, the highest
 * at or below `spent`, at once). A payer signs ahead of what it spends: its last voucher at or below
 * `spent` may be far below it, or be none, and a close with it gave the rest back with the
 * deposit (a payer that signed one voucher for its whole deposit up front had all its service
 * free). Once such a voucher is settled, `spent` is raised to it (`settled <= spent` holds):
 * what the payer signed ahead of its spending is what it pays for leaving so. When: the unsettled amount reaches
 * `thresholdAmount`, or the channel has been idle for `idleMs`, or the payer asked to close
 * (then immediately, far inside the 15-minute grace period). Where: one instance at a time,
 * chosen per tick by a Postgres advisory lock (on a database this process alone uses, the
 * embedded one, a flag in memory: `Settlements.alone`). Every transaction is recorded with its hash
 * and outcome. A revert is definitive (recorded, never retried for the same amount); any
 * other failure (RPC down, network, nonce, no receipt in time) is retried with exponential
 * backoff, and its record follows the chain when the transaction proves mined after all
 * (`follow`). Nothing escapes the loop: it logs and catches up later.
 *
 * The database side is a `Store` (implemented by ledger/Settlements.ts), so chain/ does not
 * import ledger/; main.ts wires `Settlements.store(sql)` in.
 */
import {
  type Address,
  BaseError,
  type Hex,
  ResponseBodyTooLargeError,
  RpcRequestError,
  TransactionNotFoundError,
  TransactionReceiptNotFoundError,
} from 'viem'
import {
  getBlock,
  getBlockNumber,
  getTransaction,
  getTransactionReceipt,
  waitForTransactionReceipt,
} from 'viem/actions'
import type { Logger } from '../Logger.ts'
import type { WalletClient } from './Client.ts'
import * as ChainClient from './Client.ts'
import {
  ChannelBusyError,
  ChannelStateError,
  CloseBelowSpentError,
  describe,
  SettlementBusyError,
  TransactionRevertedError,
  TransactionTimeoutError,
} from './Errors.ts'
import * as Escrow from './Escrow.ts'

export type Kind = 'settle' | 'close' | 'open' | 'topUp'

/** A signed cumulative voucher. */
export type SignedVoucher = { cumulativeAmount: bigint; signature: Hex }

/** A channel's settlement state and the voucher that may be settled (the highest ≤ spent). */
export type Settleable = {
  channelId: Hex
  escrow: Address
  spent: bigint
  settled: bigint
  finalized: boolean
  closeRequested: boolean
  voucher: SignedVoucher | undefined
  /** The lowest accepted voucher at or above `spent` (and above `settled`): a close's. */
  cover: SignedVoucher | undefined
}

export type DueQuery = {
  chainId: number
  escrow: Address
  payee: Address
  thresholdAmount: bigint
  idleMs: number
  /** A request swept for lost this recently may still charge: its channel's cover waits. */
  sweptWithinMs: number
  /**
   * Half the grace period: a payer's forced close whose cover is all it has left to settle,
   * requested less than this ago by the database's clock, comes after every other channel.
   * Ordered last, never left out: the chain's clock decides (`forcedLongEnough`), and may run
   * ahead of the database's.
   */
  coverAfterMs: number
  limit: number
}

/** A channel due for settlement and the voucher to settle it with. */
export type Due = SignedVoucher & {
  channelId: Hex
  spent: bigint
  settled: bigint
  closeRequested: boolean
  /**
   * The voucher is the lowest that covers `spent` (a closing channel, nothing held on it):
   * settled only for a payer's forced close old enough on chain (`forcedLongEnough`).
   */
  cover: boolean
}

/** An error as recorded: its name and a message stripped of URLs (RPC URLs can hold keys). */
/** What a settle's failure records (`describe`). */
export type RecordedError = ReturnType<typeof describe>

export type Outcome =
  | {
      status: 'confirmed'
      hash: Hex
      /** The block its receipt was read in (looked up again while near the head: `recheck`). */
      block?: bigint | undefined
    }
  | {
      status: 'reverted'
      hash?: Hex | undefined
      error: RecordedError
      /** Its receipt was read: mined, and reverted (final; see `follow`). */
      mined?: boolean | undefined
    }
  | { status: 'failed'; hash?: undefined; error: RecordedError; retryAt: Date }

/** A row of `chain_transactions`. */
export type Recorded = {
  id: bigint
  channelId: Hex
  kind: Kind
  cumulativeAmount: bigint
  hash: Hex | undefined
  status: 'pending' | 'confirmed' | 'reverted' | 'failed'
  errorName: string | undefined
  errorMessage: string | undefined
  attempts: number
  nextAttemptAt: Date
  createdAt: Date
  updatedAt: Date
}

/** A settle or close that was sent and is not recorded confirmed (see `follow`). */
export type Unconfirmed = {
  id: bigint
  kind: 'settle' | 'close'
  cumulativeAmount: bigint
  hash: Hex
  status: 'pending' | 'reverted' | 'failed'
}

/** A settle or close to look up again on chain (see `recheck`). */
export type Rechecked = {
  id: bigint
  channelId: Hex
  kind: 'settle' | 'close'
  cumulativeAmount: bigint
  hash: Hex | undefined
  signature: Hex
  block: bigint | undefined
  /** Dropped by a reorganization already, and not confirmed again since. */
  dropped: boolean
}

/** Database operations made while holding the settlement lock (all on the lock's connection). */
export type LockedStore = {
  due(query: DueQuery): Promise<Due[]>
  settleable(channelId: Hex): Promise<Settleable | undefined>
  begin(attempt: {
    channelId: Hex
    kind: Kind
    cumulativeAmount: bigint
    leaseMs: number
    signature?: Hex | undefined
  }): Promise<{ id: bigint; attempts: number; previousHash: Hex | undefined } | undefined>
  /** Records the hash of a transaction the node accepted, before its receipt. */
  submitted(id: bigint, hash: Hex): Promise<void>
  finish(id: bigint, outcome: Outcome): Promise<void>
  settled(update: { channelId: Hex; settled: bigint; finalized?: boolean }): Promise<void>
  /** The confirmed cooperative close of a channel, if there is one. */
  confirmedClose(channelId: Hex): Promise<{ hash: Hex; cumulativeAmount: bigint } | undefined>
  /**
   * The settles and closes of this escrow and payee confirmed in a block above `above`, and
   * those `dropped` that are due again.
   */
  recent(of: {
    chainId: number
    escrow: Address
    payee: Address
    above: bigint
  }): Promise<Rechecked[]>
  /** Records a confirmed settle or close dropped by a reorganization: to be sent again. */
  dropped(id: bigint): Promise<void>
  /** The channel's settles and closes sent (with a hash) and not recorded confirmed. */
  unconfirmed(channelId: Hex): Promise<Unconfirmed[]>
  markCloseRequested: Store['markCloseRequested']
  /**
   * Takes back a payer's forced close (no cooperative close's) that the chain, read after
   * `read.readAt`, shows cancelled: the channel open, no close requested, its deposit above
   * the database's (a top-up the gateway did not hear of; the escrow clears the request on a
   * top-up). The deposit is raised to the chain's. Whether it did.
   */
  closeCancelled(channelId: Hex, read: { deposit: bigint; readAt: string }): Promise<boolean>
  clock: Store['clock']
  /** The last block whose escrow events a pass read; undefined before the first. */
  cursor(at: { chainId: number; escrow: Address }): Promise<bigint | undefined>
  advance(at: { chainId: number; escrow: Address; block: bigint }): Promise<void>
  /** The channels of this escrow and payee that are not finalized. */
  unfinalized(of: { chainId: number; escrow: Address; payee: Address }): Promise<Hex[]>
}

/** What the worker needs from the database. */
export type Store = {
  /** Runs `fn` holding the settlement lock; `{ locked: false }` at once when another holds it. */
  withLock<T>(
    fn: (store: LockedStore) => Promise<T>,
  ): Promise<{ locked: true; value: T } | { locked: false }>
  /**
   * Marks a payer's forced close (no new requests; settle at once) at the time `read` was
   * taken, before the chain showed it (see ledger/Settlements.ts); undefined when the channel
   * is unknown or finalized, or a top-up was seen since the read; `fresh` when it was open.
   */
  markCloseRequested(
    channelId: Hex,
    read?: { deposit: bigint; readAt: string },
  ): Promise<{ fresh: boolean } | undefined>
  /** The database's time, as text (a read's time for `markCloseRequested`). */
  clock(): Promise<string>
  /**
   * Marks a cooperative close under way (as markCloseRequested; no top-up clears it); the
   * mark, when this call made it (the channel was not closing), for `reopen`.
   */
  markClosing(channelId: Hex): Promise<string | undefined>
  /** Takes back the mark `markClosing` made, if it is still the channel's (nothing marked it
   * since: a forced close seen meanwhile stays). */
  reopen(channelId: Hex, mark: string): Promise<void>
  /** How many requests on the channel are under way (hold a reservation). */
  inFlight(channelId: Hex): Promise<number>
  /**
   * Channels of this escrow and payee to close: open and without activity for `idleMs`; and,
   * `retry`, those whose idle close (`markIdle`) sent a transaction that failed (or was left
   * pending) and is due again. A payer's cooperative close is the payer's to try again.
   */
  idle(query: IdleQuery): Promise<{ channelId: Hex; retry: boolean }[]>
  /**
   * Marks the channel closing for an idle close, if it is still idle (no close marked, no
   * activity for `idleMs`, no request under way): the mark, for `reopen`; else undefined.
   */
  markIdle(channelId: Hex, idleMs: number): Promise<string | undefined>
}

export type IdleQuery = {
  chainId: number
  escrow: Address
  payee: Address
  idleMs: number
  limit: number
}

type Attempted = { channelId: Hex; kind: 'settle' | 'close'; cumulativeAmount: bigint }

/** The outcome of settling (or closing) one channel. */
export type Result =
  | (Attempted & { status: 'confirmed'; hash: Hex })
  | (Attempted & { status: 'reverted'; error: TransactionRevertedError })
  | (Attempted & { status: 'failed'; error: Error; retryAt: Date })
  /** Nothing to submit: no voucher to settle above what is already settled. */
  | { status: 'nothing'; channelId: Hex }
  /** Another instance held the lock for longer than `lockWaitMs`. */
  | { status: 'busy'; channelId: Hex }

/** One pass of the loop: `locked: false` when another instance is settling. */
export type Tick = { locked: false } | { locked: true; results: Result[] }

export type Log = Pick<Logger, 'info' | 'warn' | 'error'>

export type Options = {
  store: Store
  /** The payee's client: it sends `settle` and `close`. */
  client: WalletClient
  escrow: Address
  chainId: number
  /** Settle when the settleable amount above `settled` reaches this (base units). */
  thresholdAmount: bigint
  /** Settle anything settleable on a channel without activity for this long. */
  idleMs: number
  /**
   * Close a channel without activity for this long (draft-evm-session-00, "No Voucher
   * Expiry": servers SHOULD settle and close channels inactive for extended periods), with
   * the lowest accepted voucher that covers what it spent: the payee takes that, the payer
   * gets the rest of the deposit back. Unset or 0: never.
   */
  closeIdleMs?: number | undefined
  /** Time between two passes of the loop. */
  intervalMs: number
  /** Time before the first pass (default 0: catch up at once). */
  delayMs?: number | undefined
  /** Channels per pass (default 20). */
  batch?: number | undefined
  /** Backoff after a failure that may pass: baseMs · 2^(attempts−1), at most maxMs. */
  retry?: { baseMs?: number | undefined; maxMs?: number | undefined } | undefined
  /** How long to wait for a receipt before calling the attempt failed (default 120 s). */
  txTimeoutMs?: number | undefined
  /** How long `settleNow` / `close` wait for the lock (default 30 s). */
  lockWaitMs?: number | undefined
  /** Blocks per `eth_getLogs` call when a pass reads the escrow's events (default 1,000). */
  logRange?: number | undefined
  /** Watch `CloseRequested` events (default true). */
  watch?: boolean | undefined
  /** The escrow's close grace period, seconds, when read from it (default our escrow's 15 min). */
  gracePeriod?: bigint | undefined
  log?: Log | undefined
}

export type Worker = {
  /** Runs one pass now (the loop calls it every `intervalMs`). */
  tick(): Promise<Tick>
  /** Settles one channel now, whatever the threshold, idleness or backoff (POST /admin/channels/{id}/settle). */
  settleNow(channelId: Hex): Promise<Result>
  /** Marks a payer's close request and settles the channel now. */
  closeRequested(channelId: Hex): Promise<Result>
  /** Cooperative close with the client's final voucher; see `close`. */
  close(voucher: { channelId: Hex } & SignedVoucher): Promise<Closed>
  /**
   * Closes the channels idle for `closeIdleMs` (see `Store.idle`), one at a time, each marked
   * first if still idle (`Store.markIdle`), then as `close` without a final voucher. The loop
   * starts it, without waiting for it, after a pass that held the lock, a tenth as often as
   * `closeIdleMs` (at least every 10 minutes).
   */
  closeIdle(): Promise<IdleClosed[]>
  /** Stops the loop and the event watch, and waits for work in progress. */
  stop(): Promise<void>
}

const silent: Log = { info: () => {}, warn: () => {}, error: () => {} } as unknown as Log

/** Starts the worker: a pass after `delayMs`, then every `intervalMs`, plus the `CloseRequested` watch. */
export function start(options: Options): Worker {
  const log = options.log ?? silent
  const payee = options.client.account.address
  // A CloseRequested event the watch missed (the RPC was down, the gateway restarted) is read
  // back by the next pass (`catchUp`), which must come well inside the grace period; and a
  // forced close is settled with the voucher that covers its spending by the first pass after
  // half of it.
  const grace = options.gracePeriod ?? Escrow.closeGracePeriod
  if (options.intervalMs > (Number(grace) * 1000) / 4)
    log.warn(
      { intervalMs: options.intervalMs, gracePeriodSeconds: Number(grace) },
      'intervalMs is over a quarter of the close grace period: a payer forcing a close may withdraw before the gateway settles what it spent',
    )
  const inFlight = new Set<Promise<unknown>>()
  const track = <T>(p: Promise<T>): Promise<T> => {
    inFlight.add(p)
    p.finally(() => inFlight.delete(p)).catch(() => {})
    return p
  }

  async function tick(): Promise<Tick> {
    const r = await options.store.withLock(async (store) => {
      const results: Result[] = []
      let head: bigint | undefined
      try {
        head = await catchUp(store)
      } catch (error) {
        // The chain does not answer: the cursor stays, the next pass reads from it again.
        log.warn({ error: describe(error) }, 'reading the escrow events failed')
      }
      if (head !== undefined)
        try {
          results.push(...(await recheck(store, head)))
        } catch (error) {
          // The database failed it (only the node's errors are caught row by row): the lock's
          // connection may be gone, and the lock with it, so the pass ends here; the next looks
          // again. (Going on, the pass's next statement on that connection could wait for good.)
          log.warn(
            { error: describe(error) },
            'looking again at the recent settles and closes failed',
          )
          throw error
        }
      const due = await store.due({
        chainId: options.chainId,
        escrow: options.escrow,
        payee,
        thresholdAmount: options.thresholdAmount,
        idleMs: options.idleMs,
        sweptWithinMs: Number(grace) * 1000,
        coverAfterMs: (Number(grace) * 1000) / 2,
        limit: options.batch ?? 20,
      })
      // One at a time: a failed send (e.g. a nonce gap) should not strand the others' nonces.
      for (const d of due) {
        // The cover of a forced close the payer had half its grace period to cancel; before
        // then (or for a close of another kind), what is at or below `spent`.
        if (!d.cover || (await forcedLongEnough(store, d.channelId)))
          results.push(await attempt(store, options, { kind: 'settle', ...d }, log))
        else {
          const r = await settleOne(store, options, d.channelId, log)
          if (r.status !== 'nothing') results.push(r)
        }
      }
      return results
    })
    return r.locked ? { locked: true, results: r.value } : { locked: false }
  }

  /**
   * Whether the chain shows the payer's forced close of the channel, requested at least half
   * the grace period ago by the chain's clock (the payer's time to cancel it with a top-up,
   * which the gateway may not have heard of yet). An unreadable chain says no. A close the
   * chain shows cancelled by such a top-up is taken back (`closeCancelled`): marked closing
   * still, the channel was refused to its payer, and due (its cover) and read every pass, for
   * good.
   */
  async function forcedLongEnough(store: LockedStore, channelId: Hex): Promise<boolean> {
    try {
      const readAt = await store.clock()
      const c = await Escrow.getChannel(options.client, { escrow: options.escrow, channelId })
      if (!c || c.finalized) return false
      if (c.closeRequestedAt === 0n) {
        await cancelled(store, channelId, { deposit: c.deposit, readAt })
        return false
      }
      return ((await ChainClient.now(options.client)) - c.closeRequestedAt) * 2n >= grace
    } catch {
      return false
    }
  }

  /** Takes back a forced close the chain shows cancelled (see `LockedStore.closeCancelled`). */
  async function cancelled(
    store: LockedStore,
    channelId: Hex,
    read: { deposit: bigint; readAt: string },
  ): Promise<void> {
    if (await store.closeCancelled(channelId, read))
      log.info({ channelId }, 'close request cancelled by a top-up on chain: the channel is open')
  }

  /** Blocks per `eth_getLogs`: halved each time the node refuses a range. */
  let range = BigInt(Math.max(1, options.logRange ?? 1_000))
  /**
   * What payers did on chain since the last pass (draft, "Forced Close": the server settles
   * inside the grace period): each channel with a `CloseRequested`, `CloseRequestCancelled`,
   * `Withdrawn`, `ChannelClosed` or `Settled` event in the blocks after the cursor (and the last
   * `reorgDepth` before it, again) is read back from the escrow, so a forced close is marked
   * (and settled by this pass's `due`, whatever the threshold), a withdrawal recorded, and a
   * settle the gateway lost track of learnt. The watch below sees forced closes sooner, but
   * only while this instance runs and its filter lives; this sees what happened while no
   * gateway was watching. With no cursor (a new database) or one past the chain's head (a
   * development chain started afresh), every open channel is read instead.
   */
  async function catchUp(store: LockedStore): Promise<bigint> {
    const at = { chainId: options.chainId, escrow: options.escrow }
    const head = await getBlockNumber(options.client, { cacheTime: 0 })
    const last = await store.cursor(at)
    if (last === undefined || last > head) {
      const open = await store.unfinalized({ ...at, payee })
      for (let i = 0; i < open.length; i += 16)
        await Promise.all(open.slice(i, i + 16).map((channelId) => reconcile(store, channelId)))
      await store.advance({ ...at, block: head })
      return head
    }
    // Blocks near the head may yet be reorganized (an event moved into a block already read):
    // the last `reorgDepth` are read again each pass (reading a channel again changes nothing).
    for (let from = last + 1n > reorgDepth ? last + 1n - reorgDepth : 0n; from <= head; ) {
      const to = from + range - 1n < head ? from + range - 1n : head
      let moved: Hex[]
      try {
        moved = await Escrow.closings(options.client, {
          escrow: options.escrow,
          fromBlock: from,
          toBlock: to,
        })
      } catch (error) {
        // The node answered with an error: many refuse a range over so many blocks or logs.
        // Or its answer, the logs of a busy range, is over what the client reads (10 MB):
        // read again, it would be so every pass, the cursor held there for good. Smaller
        // ranges from here on; no answer at all waits for the next pass.
        if (range > 1n && (answered(error) || tooLarge(error))) {
          range /= 2n
          log.warn(
            { blocks: Number(range) },
            answered(error)
              ? 'the node refused an eth_getLogs range: halved'
              : 'the eth_getLogs answer was too large: range halved',
          )
          continue
        }
        throw error
      }
      for (const channelId of moved) await reconcile(store, channelId)
      await store.advance({ ...at, block: to })
      from = to + 1n
    }
    return head
  }

  /**
   * Looks up again the settles and closes confirmed in the blocks a pass reads again (the last
   * `reorgDepth`): a reorganization may have replaced their block by one without them. One the
   * node has neither mined nor in its pool, at whose height the node holds a block without it
   * (not a node behind that block), (a node that does not put a dropped block's
   * transactions back) is sent again, with the voucher it carried, and so until it is confirmed
   * again (the database took it for paid: `settled`, and a closing channel's `spent` raised to
   * its cover, stayed where it had put them, the chain's lower, and a payer that forced the
   * close withdrew what it no longer had to pay). One mined again elsewhere has its block
   * recorded. A receipt the node will not give is left for the next pass.
   */
  async function recheck(store: LockedStore, head: bigint): Promise<Result[]> {
    const results: Result[] = []
    const rows = await store.recent({
      chainId: options.chainId,
      escrow: options.escrow,
      payee,
      above: head - reorgDepth,
    })
    for (const t of rows) {
      if (!(await droppedNow(t))) continue
      // Its nonce is free again: the account's nonces are asked of the node anew.
      const account = options.client.account
      account.nonceManager?.reset({ address: account.address, chainId: options.chainId })
      const { channelId, kind, cumulativeAmount, signature } = t
      results.push(
        await attempt(store, options, { channelId, kind, cumulativeAmount, signature }, log),
      )
    }
    return results

    /** Whether `t` is to be sent again: dropped by a reorganization, found now or before. */
    async function droppedNow(t: Rechecked): Promise<boolean> {
      if (!t.dropped && t.hash) {
        // A block above the head: the node asked is behind the one that gave the receipt (a
        // load-balanced RPC), or the chain was started afresh; it cannot tell either way.
        if (t.block === undefined || t.block > head) return false
        const receipt = await getTransactionReceipt(options.client, { hash: t.hash }).catch(
          (error) => {
            if (error instanceof TransactionReceiptNotFoundError) return null
            log.warn(
              { hash: t.hash, error: describe(error) },
              `${t.kind}: its receipt could not be read`,
            )
            return undefined
          },
        )
        if (receipt === undefined) return false
        if (receipt) {
          if (receipt.status === 'success' && receipt.blockNumber !== t.block)
            await store.finish(t.id, {
              status: 'confirmed',
              hash: t.hash,
              block: receipt.blockNumber,
            })
          return false
        }
        // In the pool again (put back by the node): mined in a coming block. One the node will
        // not say (it errs) is looked at again by the next pass; the others are not held up by
        // it. Only the node's error is caught here: one of the database (the settlement lock's
        // connection lost, and the lock with it) ends the pass's look at them all.
        const pooled = await known(options.client, t.hash).catch((error) => {
          log.warn(
            { channelId: t.channelId, kind: t.kind, hash: t.hash, error: describe(error) },
            `${t.kind}: whether a reorganization dropped it could not be read`,
          )
          return undefined
        })
        if (pooled !== false) return false
        // Dropped only when a node shows its block replaced: one without it at its height. A
        // node without that block (behind, or another of a load-balanced RPC) says nothing:
        // sent again on its word, the settle reverted in the simulation (mined already), and
        // its record, confirmed, was left reverted (a client retrying its close refused), or,
        // the node's state behind too, was sent with the nonce of the mined one and waited for
        // until the timeout, holding the pass.
        const block = await getBlock(options.client, { blockNumber: t.block }).catch(
          () => undefined,
        )
        if (!block || block.transactions.some((h) => h.toLowerCase() === t.hash?.toLowerCase()))
          return false
        await store.dropped(t.id)
        log.warn(
          {
            channelId: t.channelId,
            kind: t.kind,
            cumulativeAmount: t.cumulativeAmount.toString(),
            hash: t.hash,
          },
          `${t.kind} reorganized out of the chain: sending it again`,
        )
      }
      return true
    }
  }

  /** Takes the escrow's word on a channel the database has open: a forced close is marked (or
   * taken back, cancelled by a top-up the gateway did not hear of), a withdrawal or close recorded, and the records of the settles and closes sent for it follow
   * the chain (`follow`; for a finalized channel too: its close may be the event read). Channels
   * of others on the same escrow are not read. */
  async function reconcile(store: LockedStore, channelId: Hex): Promise<void> {
    const known = await store.settleable(channelId)
    if (!known || known.escrow.toLowerCase() !== options.escrow.toLowerCase()) return
    await follow(store, options.client, channelId, log)
    if (known.finalized) return
    const readAt = await store.clock()
    const c = await Escrow.getChannel(options.client, { escrow: options.escrow, channelId })
    if (!c || c.payee.toLowerCase() !== payee.toLowerCase()) return
    if (
      c.closeRequestedAt !== 0n &&
      !c.finalized &&
      (await store.markCloseRequested(channelId, { deposit: c.deposit, readAt }))?.fresh
    )
      log.info(
        { channelId },
        'close requested by the payer, read back from the chain: settling now',
      )
    else if (c.closeRequestedAt === 0n && !c.finalized && known.closeRequested)
      await cancelled(store, channelId, { deposit: c.deposit, readAt })
    if (c.finalized || c.settled > known.settled)
      await store.settled({ channelId, settled: c.settled, finalized: c.finalized })
  }

  const settleNow = (channelId: Hex): Promise<Result> =>
    track(
      exclusive(options, (store) => settleOne(store, options, channelId, log)).then(
        (r) => r ?? { status: 'busy', channelId },
      ),
    )

  async function closeRequested(channelId: Hex): Promise<Result> {
    // The event may be handled after the payer cancelled the close with a top-up (which the
    // gateway has already seen and reopened the channel for): the chain's word now decides.
    // Unreadable chain: marked all the same (stop serving and settle: the safe side).
    const readAt = await options.store.clock()
    const now = await Escrow.getChannel(options.client, {
      escrow: options.escrow,
      channelId,
    }).catch(() => undefined)
    if (now && now.closeRequestedAt === 0n && !now.finalized)
      return { status: 'nothing', channelId }
    const read = now && { deposit: now.deposit, readAt }
    if (!(await options.store.markCloseRequested(channelId, read)))
      return { status: 'nothing', channelId }
    log.info({ channelId }, 'close requested by the payer: settling now')
    return settleNow(channelId)
  }

  async function closeIdle(): Promise<IdleClosed[]> {
    if (!options.closeIdleMs) return []
    const idle = await options.store.idle({
      chainId: options.chainId,
      escrow: options.escrow,
      payee,
      idleMs: options.closeIdleMs,
      limit: options.batch ?? 20,
    })
    const out: IdleClosed[] = []
    for (const { channelId, retry } of idle) {
      if (stopped) break
      try {
        // Still idle? (It was listed before the closes before it, each a transaction.) A
        // channel that came back to life meanwhile is left alone, its stream untouched.
        const mark = retry
          ? undefined
          : await options.store.markIdle(channelId, options.closeIdleMs)
        if (!retry && mark === undefined) continue
        // A request that comes in the moment after makes the channel busy, not idle: the close
        // gives up after a moment (its mark taken back) rather than wait for it.
        const closed = await track(
          closeWithMark(options.client, { ...options, channelId, drainMs: 1_000 }, mark, log),
        )
        log.info(
          {
            channelId,
            cumulativeAmount: closed.cumulativeAmount.toString(),
            forfeited: closed.forfeited.toString(),
            hash: closed.hash,
          },
          'closed an idle channel',
        )
        out.push({ channelId, closed })
      } catch (e) {
        const error = e instanceof Error ? e : new Error(String(e))
        log.warn({ channelId, error: describe(error) }, 'closing an idle channel failed')
        out.push({ channelId, error })
      }
    }
    return out
  }

  let stopped = false
  /** When the loop last looked for idle channels, and that look while it runs. */
  let lastIdle = Number.NEGATIVE_INFINITY
  let idling: Promise<unknown> | undefined
  let timer: ReturnType<typeof setTimeout> | undefined
  let running: Promise<void> | undefined
  const loop = async () => {
    try {
      const t = await tick()
      if (t.locked && t.results.length > 0)
        log.info(
          {
            settled: t.results.filter((r) => r.status === 'confirmed').length,
            of: t.results.length,
          },
          'settlement pass',
        )
      // Idle channels, after a pass that held the lock (one instance a pass), outside it (each
      // close takes it). Looked for a tenth as often as the idleness it waits for, at least
      // every 10 minutes: the query reads every open channel (no index on the time of a row
      // updated by every charge, which would cost each charge its in-place update). Not
      // waited for: each close waits for its transaction, and the passes (which read back
      // forced closes to settle inside their grace period) go on meanwhile. One look at a time.
      const idleEvery = Math.min(600_000, (options.closeIdleMs ?? 0) / 10)
      if (
        t.locked &&
        !stopped &&
        !idling &&
        options.closeIdleMs &&
        Date.now() - lastIdle >= idleEvery
      ) {
        lastIdle = Date.now()
        idling = track(
          closeIdle()
            .catch((error) =>
              log.error({ error: describe(error) }, 'looking for idle channels failed'),
            )
            .finally(() => {
              idling = undefined
            }),
        )
      }
    } catch (error) {
      // The database is down or the lock could not be taken: the next pass catches up.
      log.error({ error: describe(error) }, 'settlement pass failed')
    }
    if (!stopped) timer = setTimeout(run, options.intervalMs)
  }
  const run = () => {
    running = loop()
  }
  timer = setTimeout(run, options.delayMs ?? 0)

  const unwatch =
    options.watch === false
      ? () => {}
      : Escrow.watchCloseRequested(options.client, {
          escrow: options.escrow,
          onCloseRequested: (request) => {
            if (stopped) return
            track(
              closeRequested(request.channelId).catch((error) =>
                log.error(
                  { channelId: request.channelId, error: describe(error) },
                  'settling a close request failed',
                ),
              ),
            )
          },
          onError: (error) =>
            log.warn({ error: describe(error) }, 'watching CloseRequested failed'),
        })
  // A payer who withdrew (the grace period over, with nothing the gateway could settle: no
  // voucher at or below spent) finalized the channel: recorded, or it would read `closing`
  // for good.
  const unwatchWithdrawn =
    options.watch === false
      ? () => {}
      : Escrow.watchWithdrawn(options.client, {
          escrow: options.escrow,
          onWithdrawn: (channelId) => {
            if (stopped) return
            track(exclusive(options, (store) => refresh(store, options, channelId, log)))
          },
          onError: (error) => log.warn({ error: describe(error) }, 'watching Withdrawn failed'),
        })

  return {
    tick,
    settleNow,
    closeRequested,
    close: (voucher) => track(close(options.client, { ...options, ...voucher })),
    closeIdle,
    async stop() {
      stopped = true
      clearTimeout(timer)
      unwatch()
      unwatchWithdrawn()
      await running
      await Promise.allSettled([...inFlight])
    },
  }
}

/** An idle channel's close: what went through, or why it did not (it is tried again later
 * when the transaction failed; a channel busy again is simply open). */
export type IdleClosed = { channelId: Hex } & ({ closed: Closed } | { error: Error })

export type Closed = {
  hash: Hex
  /** What the payee has been paid in total from the channel. */
  cumulativeAmount: bigint
  /** Delivered service the payee gave up because no voucher covered it exactly. */
  forfeited: bigint
}

/**
 * Cooperative close (draft "Cooperative Close") with the client's final voucher. It first
 * marks the channel closing (no new requests; its stream ends) and waits for the requests
 * under way to be charged, so `spent` is final; a final voucher below it is refused
 * (CloseBelowSpentError: the draft's MUST). Closing pays the payee the voucher amount and
 * refunds the rest, so the voucher submitted is the highest one at or below `spent`: the
 * final voucher when its amount is `spent`, else the highest accepted voucher ≤ spent; with
 * none above `settled`, the forfeit path (`settled`, empty signature). A final voucher above spent is not submitted
 * as is: it would pay for service never delivered. Clients get paid-for service settled in
 * full by signing exactly `spent` (their last receipt says it). A final voucher the escrow
 * rejects falls back once to the accepted one. Marks the channel close-requested first (no
 * new requests), records the transaction, and finalizes the channel on success. Throws
 * TransactionRevertedError (definitive), ChannelStateError, SettlementBusyError,
 * CloseBelowSpentError, ChannelBusyError, or the network error (recorded as failed).
 */
export async function close(
  client: WalletClient,
  parameters: {
    store: Store
    escrow: Address
    channelId: Hex
    /**
     * The client's final voucher. The close submits the lowest voucher that covers `spent`,
     * this one or one accepted before (without it, an idle channel the gateway closes on its
     * own, `closeIdle`: one accepted before).
     */
    cumulativeAmount?: bigint | undefined
    signature?: Hex | undefined
    txTimeoutMs?: number | undefined
    lockWaitMs?: number | undefined
    /** How long the close waits for the channel's requests under way to end (default 30 s). */
    drainMs?: number | undefined
    retry?: Options['retry']
    log?: Log | undefined
  },
): Promise<Closed> {
  const log = parameters.log ?? silent
  const { channelId } = parameters
  // No new requests from here on, and the channel's stream ends; the close waits for the
  // requests under way to be charged, so that the voucher it picks covers all they delivered
  // (draft, "Cooperative Close": the final voucher covers all delivered service). Before the
  // lock: its connection is the only one of the embedded database, which their charges need.
  const mark = await parameters.store.markClosing(channelId)
  return closeWithMark(client, parameters, mark, log)
}

/** `close` once the channel is marked closing; `mark`, when this close made it, taken back if
 * the close is refused before any transaction. */
async function closeWithMark(
  client: WalletClient,
  parameters: Parameters<typeof close>[1],
  mark: string | undefined,
  log: Log,
): Promise<Closed> {
  const { channelId } = parameters
  const options = { ...parameters, client }
  try {
    return await closeMarked(options, log)
  } catch (e) {
    // Refused before any transaction (a voucher that does not cover what was spent, requests
    // that did not end, the lock busy): the channel is open again, as it was (a stranger
    // sending back a public voucher as a close must not leave it closing for good).
    const refused =
      e instanceof CloseBelowSpentError ||
      e instanceof ChannelBusyError ||
      e instanceof SettlementBusyError
    if (refused && mark !== undefined) await parameters.store.reopen(channelId, mark)
    throw e
  }
}

/** `close` once the channel is marked closing. */
async function closeMarked(
  options: Parameters<typeof close>[1] & { client: WalletClient },
  log: Log,
): Promise<Closed> {
  const { channelId } = options
  const drainUntil = Date.now() + (options.drainMs ?? 30_000)
  while ((await options.store.inFlight(channelId)) > 0) {
    if (Date.now() >= drainUntil) throw new ChannelBusyError()
    await Bun.sleep(25)
  }
  const closed = await exclusive(options, async (store): Promise<Closed> => {
    const c = await store.settleable(channelId)
    if (!c) throw new ChannelStateError('unknown', channelId)
    if (c.escrow.toLowerCase() !== options.escrow.toLowerCase())
      throw new ChannelStateError('other-escrow', channelId)
    /** What of `spent` a close for `amount` leaves unpaid. */
    const forfeited = (amount: bigint) => (amount < c.spent ? c.spent - amount : 0n)
    if (c.finalized) {
      // A client retrying its close gets the close that went through.
      const done = await store.confirmedClose(channelId)
      if (done) return { ...done, forfeited: forfeited(done.cumulativeAmount) }
      throw new ChannelStateError('finalized', channelId)
    }
    const { cumulativeAmount, signature } = options
    const final =
      cumulativeAmount === undefined || signature === undefined
        ? undefined
        : { cumulativeAmount, signature }
    // Draft, "Cooperative Close": the server MUST verify cumulativeAmount >= spent. With the
    // requests under way charged (above), spent is final: a voucher below it is refused, and
    // the channel stays closing for a close that covers it (or the payer's forced close).
    if (final && final.cumulativeAmount < c.spent) throw new CloseBelowSpentError(c.spent)
    const fallback =
      c.voucher && c.voucher.cumulativeAmount > c.settled
        ? c.voucher
        : { cumulativeAmount: c.settled, signature: '0x' as Hex }
    // What is owed is closed with the lowest voucher that covers it (the draft: the close takes
    // the payer's final voucher, which covers `spent`), the payer's final one or one accepted
    // before; should it revert, the other; the highest at or below `spent` last. The requests
    // under way were charged (above) and none can start: `spent` is final, and is raised to
    // the voucher once it is settled.
    const covering =
      c.spent > c.settled
        ? [final, c.cover]
            .filter((v): v is SignedVoucher => v !== undefined && v.cumulativeAmount > c.settled)
            .sort((a, b) => (a.cumulativeAmount < b.cumulativeAmount ? -1 : 1))
        : []
    const tries = [...covering, fallback].filter(
      (v, i, all) => all.findIndex((w) => w.signature === v.signature) === i,
    )
    let result = await attempt(store, options, { kind: 'close', channelId, ...tries[0]! }, log)
    for (const next of tries.slice(1)) {
      if (result.status !== 'reverted') break
      result = await attempt(store, options, { kind: 'close', channelId, ...next }, log)
    }
    if (result.status === 'confirmed')
      return {
        hash: result.hash,
        cumulativeAmount: result.cumulativeAmount,
        forfeited: forfeited(result.cumulativeAmount),
      }
    if (result.status === 'reverted' || result.status === 'failed') throw result.error
    throw new ChannelStateError('finalized', channelId)
  })
  if (!closed) throw new SettlementBusyError()
  return closed
}

/** Runs `fn` under the lock, waiting up to `lockWaitMs` for it; undefined when it stayed busy. */
async function exclusive<T>(
  options: Pick<Options, 'store' | 'lockWaitMs'>,
  fn: (store: LockedStore) => Promise<T>,
): Promise<T | undefined> {
  const deadline = Date.now() + (options.lockWaitMs ?? 30_000)
  for (;;) {
    const r = await options.store.withLock(fn)
    if (r.locked) return r.value
    if (Date.now() >= deadline) return undefined
    await Bun.sleep(50)
  }
}

async function settleOne(
  store: LockedStore,
  options: Options,
  channelId: Hex,
  log: Log,
): Promise<Result> {
  const c = await store.settleable(channelId)
  if (
    !c ||
    c.finalized ||
    !c.voucher ||
    c.voucher.cumulativeAmount <= c.settled ||
    c.escrow.toLowerCase() !== options.escrow.toLowerCase()
  )
    return { status: 'nothing', channelId }
  return attempt(store, options, { kind: 'settle', channelId, ...c.voucher }, log)
}

/** Submits one settle or close, recording the attempt and its outcome. Never throws for chain errors. */
async function attempt(
  store: LockedStore,
  options: Pick<Options, 'client' | 'escrow' | 'retry' | 'txTimeoutMs'>,
  call: Attempted & { signature: Hex },
  log: Log,
): Promise<Result> {
  const { client, escrow } = options
  const { channelId, kind, cumulativeAmount } = call
  const timeoutMs = options.txTimeoutMs ?? 120_000
  const begun = await store.begin({
    channelId,
    kind,
    cumulativeAmount,
    leaseMs: timeoutMs * 2,
    signature: call.signature,
  })
  if (!begun) return { status: 'nothing', channelId }
  const fields = { channelId, kind, cumulativeAmount: cumulativeAmount.toString() }
  let finished = false
  const confirmed = async (hash: Hex, block: bigint): Promise<Result> => {
    await store.finish(begun.id, { status: 'confirmed', hash, block })
    await store.settled({ channelId, settled: cumulativeAmount, finalized: kind === 'close' })
    log.info({ ...fields, hash }, `${kind} confirmed`)
    return { status: 'confirmed', channelId, kind, cumulativeAmount, hash }
  }
  try {
    // An earlier attempt that ran out of time (or whose worker died) may have been mined
    // since, or still be waiting in the node's pool: then it is waited for, not sent again (a
    // second one would revert once the first is mined, recorded as the intent's outcome).
    if (begun.previousHash && (await known(client, begun.previousHash))) {
      // Mined already, or mined within the timeout.
      const receipt = await withTimeout(
        waitForTransactionReceipt(client, { hash: begun.previousHash }),
        timeoutMs,
        kind,
      )
      if (receipt.status === 'success')
        return await confirmed(begun.previousHash, receipt.blockNumber)
    }
    const sent = await withTimeout(
      (kind === 'settle' ? Escrow.settle : Escrow.close)(
        client,
        { escrow, channelId, cumulativeAmount, signature: call.signature },
        {
          // Late (after the timeout) the lock's connection is gone: the next attempt finds
          // the transaction through the escrow's state instead.
          onSubmitted: (hash) => (finished ? undefined : store.submitted(begun.id, hash)),
        },
      ),
      timeoutMs,
      kind,
    )
    return await confirmed(sent.hash, sent.receipt.blockNumber)
  } catch (error) {
    if (error instanceof TransactionRevertedError) {
      await store.finish(begun.id, {
        status: 'reverted',
        hash: error.hash,
        error: describe(error),
        mined: error.receipt !== undefined,
      })
      log.warn({ ...fields, errorName: error.errorName, hash: error.hash }, `${kind} reverted`)
      await refresh(store, options, channelId, log)
      return { status: 'reverted', channelId, kind, cumulativeAmount, error }
    }
    const retryAt = new Date(Date.now() + backoff(begun.attempts, options.retry))
    const e = error instanceof Error ? error : new Error(String(error))
    await store.finish(begun.id, { status: 'failed', error: describe(e), retryAt })
    log.warn({ ...fields, error: describe(e), retryAt }, `${kind} failed; will retry`)
    return { status: 'failed', channelId, kind, cumulativeAmount, error: e, retryAt }
  } finally {
    finished = true
  }
}

/** Whether the node knows the transaction (waiting in its pool, or mined). */
function known(client: WalletClient, hash: Hex): Promise<boolean> {
  return getTransaction(client, { hash }).then(
    () => true,
    (error) => {
      if (error instanceof TransactionNotFoundError) return false
      throw error
    },
  )
}

/**
 * Takes what the escrow says (after a revert, or a payer's withdrawal): a channel the payer
 * withdrew is finalized, an amount settled elsewhere (e.g. an attempt that was mined after
 * we lost track of it) is recorded, and so is that attempt (`follow`). Best effort.
 */
async function refresh(
  store: LockedStore,
  options: Pick<Options, 'client' | 'escrow'>,
  channelId: Hex,
  log: Log,
) {
  try {
    await follow(store, options.client, channelId, log)
    const channel = await Escrow.getChannel(options.client, { escrow: options.escrow, channelId })
    if (!channel) return
    await store.settled({ channelId, settled: channel.settled, finalized: channel.finalized })
  } catch (error) {
    log.warn({ channelId, error: describe(error) }, 'reading the channel from the escrow failed')
  }
}

/**
 * Makes the records of a channel's settles and closes follow the chain. An attempt recorded
 * failed (no receipt in time, the node's answer lost), pending (its worker died) or reverted
 * by a simulation that came after it had been mined, whose transaction was mined all the same,
 * is recorded as its receipt says: confirmed (its intent met: no retry, no backoff holding the
 * channel's next settle, and a client retrying its close gets that close), or reverted (and
 * mined: a receipt read is final, and the node is not asked for it again). A
 * transaction the node has no receipt for stays as recorded: still in the pool, or dropped
 * (its next attempt finds out). So does one whose receipt the node answers with an error
 * (logged): following is bookkeeping that the next attempt of the intent redoes (it looks up
 * the hash before sending), and must not keep its caller from what it reads the channel for
 * (a forced close to mark: geth rebuilding its transaction index errors on the oldest hashes
 * for hours). Throws only when the database does.
 */
async function follow(store: LockedStore, client: WalletClient, channelId: Hex, log: Log) {
  for (const t of await store.unconfirmed(channelId)) {
    const fields = {
      channelId,
      kind: t.kind,
      cumulativeAmount: t.cumulativeAmount.toString(),
      hash: t.hash,
    }
    const receipt = await getTransactionReceipt(client, { hash: t.hash }).catch((error) => {
      if (!(error instanceof TransactionReceiptNotFoundError))
        log.warn({ ...fields, error: describe(error) }, `${t.kind}: its receipt could not be read`)
      return undefined
    })
    if (!receipt) continue
    if (receipt.status === 'success') {
      await store.finish(t.id, { status: 'confirmed', hash: t.hash, block: receipt.blockNumber })
      log.info(fields, `${t.kind} found mined: recorded confirmed`)
    } else {
      // Final: not read again (one reverted in a simulation only was followed until now).
      const error = new TransactionRevertedError({ functionName: t.kind, hash: t.hash, receipt })
      await store.finish(t.id, {
        status: 'reverted',
        hash: t.hash,
        error: describe(error),
        mined: true,
      })
      if (t.status !== 'reverted')
        log.warn(fields, `${t.kind} found mined and reverted: recorded reverted`)
    }
  }
}

/** Blocks below the head a settlement pass reads again (see `catchUp`). */
const reorgDepth = 64n

/** Whether the node answered the call with a JSON-RPC error (it did not just fail to answer). */
function answered(error: unknown): boolean {
  return error instanceof BaseError && error.walk((e) => e instanceof RpcRequestError) !== null
}

/** Whether the node's answer was over the size the client reads (`ResponseBodyTooLargeError`). */
function tooLarge(error: unknown): boolean {
  return (
    error instanceof BaseError && error.walk((e) => e instanceof ResponseBodyTooLargeError) !== null
  )
}

/** Milliseconds before retry number `attempts` + 1. */
export function backoff(attempts: number, retry: Options['retry'] = {}): number {
  const base = retry.baseMs ?? 5_000
  const max = retry.maxMs ?? 5 * 60_000
  return Math.min(max, base * 2 ** Math.min(30, Math.max(0, attempts - 1)))
}

function withTimeout<T>(promise: Promise<T>, ms: number, functionName: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TransactionTimeoutError(functionName, ms)), ms)
  })
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer))
}
