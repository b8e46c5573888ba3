/**
 * Wakes streams waiting for a channel's next voucher. `tollway_accept_voucher` NOTIFYs
 * `tollway_channel` with the channel id, so a voucher accepted on any instance sharing
 * the database wakes the stream paused on this one. Waiters also wake on a slow poll, so a
 * lost notification (a dropped LISTEN connection) delays a stream but never strands it.
 *
 * It also ends streams another stream took their channel from: migration 0008 NOTIFYs
 * `tollway_superseded` with the replaced stream's id, and a stream started on this
 * instance replaces the one before it here at once (all there is without LISTEN). A stream
 * that hears neither learns it at its next extension, as before.
 *
 * Its LISTEN runs on a connection of its own (Db.listener). Each time that connection closes
 * (the server restarted or ended the session, the network failed), it listens again, with a
 * backoff, until it can: else, after an outage, the instance heard nothing for a long while
 * (postgres.js's own `listen` tries again only on its backoff, up to 20 s apart) and relied
 * on notifications that did not come. A connection that stopped answering without a close (a
 * link lost without a reset) is found by asking it a `select 1` now and then, and closed.
 * Nothing of this is on a request's path.
 */

import type { Sql } from './Db.ts'
import * as Db from './Db.ts'

const LISTEN = 'listen tollway_channel; listen tollway_superseded'
/** The first wait before listening again after a close, and the longest (ms). */
const RETRY_MS = { first: 100, most: 2_000 }
/** How often the LISTEN connection is asked whether it still answers (ms). */
const CHECK_MS = 15_000

export class Waker {
  private readonly waiters = new Map<string, Set<() => void>>()
  private client: Sql | undefined
  /** Whether its LISTEN stands now (the mode is `listening`, fixed at start). */
  private heard = false
  private stopped = false
  private retry: ReturnType<typeof setTimeout> | undefined
  private delay = RETRY_MS.first
  /** Streams under way on this instance: what ends each; without LISTEN, the latest by channel. */
  private readonly streams = new Map<string, () => void>()
  private readonly latest = new Map<string, string>()
  private check: ReturnType<typeof setInterval> | undefined
  private checking = false

  /**
   * Listens on the database (skip for the single-connection embedded server). `log` is told
   * once when the LISTEN is lost and once when it stands again.
   */
  static async start(
    sql: Sql,
    options: {
      listen: boolean
      pollMs?: number
      /** How often its LISTEN connection is asked whether it answers (ms); half that to. */
      checkMs?: number
      log?: (message: string) => void
    },
  ): Promise<Waker> {
    const log = options.log ?? ((m: string) => console.error(`tollway: ${m}`))
    const waker = new Waker(options.pollMs ?? 1000, options.listen, log)
    if (!options.listen) return waker
    waker.client = Db.listener(sql, {
      onnotify: (channel, payload) => {
        if (channel === 'tollway_channel') waker.wake(`0x${payload}`)
        else if (channel === 'tollway_superseded') waker.supersede(payload)
      },
      onclose: () => waker.lost(),
    })
    try {
      await waker.client.unsafe(LISTEN)
    } catch (e) {
      await waker.stop()
      throw e
    }
    waker.heard = true
    const checkMs = options.checkMs ?? CHECK_MS
    waker.check = setInterval(() => void waker.answers(checkMs / 2), checkMs)
    waker.check.unref?.()
    return waker
  }

  /**
   * Asks the LISTEN connection a `select 1`; one not answered within `ms` is closed, and
   * listened on again (`lost`). A connection lost without a reset (a failover, a NAT that
   * forgot it) is otherwise taken for open until TCP gives up, and its LISTEN hears nothing:
   * waiters wake only at the poll, and a stream another instance took the channel from runs
   * on until its next extension.
   */
  private async answers(ms: number): Promise<void> {
    const client = this.client
    if (!client || !this.heard || this.checking || this.stopped) return
    this.checking = true
    try {
      // Answered, or failed (its connection closed: `lost` listens again): either is an answer.
      const answered = await Db.within(
        ms,
        client`select 1`.then(
          () => true,
          () => true,
        ),
      )
      if (answered === undefined && !this.stopped) Db.cut(client)
    } finally {
      this.checking = false
    }
  }

  private constructor(
    private readonly pollMs: number,
    /**
     * Whether it LISTENs: then the database says which stream another replaced. Kept while the
     * LISTEN is down (a stream replaced meanwhile learns it at its next extension): the order
     * in which streams start here is not the order the database admitted them, so ending the
     * one before here could end the newer one.
     */
    private readonly listening: boolean,
    private readonly log: (message: string) => void,
  ) {}

  /** Its connection closed, and its LISTEN with it: listens again, after a wait. */
  private lost(): void {
    if (this.stopped) return
    if (this.heard) {
      this.heard = false
      this.log('lost the LISTEN connection to the database; listening again')
    }
    this.again()
  }

  /**
   * Listens again after the wait, which doubles with each attempt until one stands (one pending
   * at a time). Doubled here, where an attempt is scheduled, not where one fails: a failed
   * connect closes the connection too, and its `lost` scheduled the next attempt before the
   * failure was caught, at the wait before.
   */
  private again(): void {
    if (this.stopped || this.retry) return
    const wait = this.delay
    this.delay = Math.min(this.delay * 2, RETRY_MS.most)
    this.retry = setTimeout(async () => {
      this.retry = undefined
      if (this.stopped || !this.client) return
      try {
        await this.client.unsafe(LISTEN)
      } catch {
        return this.again()
      }
      this.delay = RETRY_MS.first
      if (this.heard || this.stopped) return
      this.heard = true
      this.log('listening on the database again')
    }, wait)
  }

  /** How many channels have a stream waiting for their next voucher. */
  get waiting(): number {
    return this.waiters.size
  }

  /** Wakes every waiter of a channel (also called locally right after accepting a voucher). */
  wake(channelId: string): void {
    const set = this.waiters.get(channelId.toLowerCase())
    if (!set) return
    this.waiters.delete(channelId.toLowerCase())
    for (const f of set) f()
  }

  /** Resolves when the channel is woken or the poll interval passes; false if `signal` aborted. */
  next(channelId: string, signal: AbortSignal): Promise<boolean> {
    const id = channelId.toLowerCase()
    return new Promise((resolve) => {
      if (signal.aborted) return resolve(false)
      const set = this.waiters.get(id) ?? new Set<() => void>()
      this.waiters.set(id, set)
      const done = (woken: boolean) => {
        clearTimeout(timer)
        signal.removeEventListener('abort', onAbort)
        set.delete(wake)
        // The last waiter of a channel takes its entry with it (a poll or an abort ended its
        // wait): kept, every channel that ever waited stayed in the map.
        if (set.size === 0 && this.waiters.get(id) === set) this.waiters.delete(id)
        resolve(woken)
      }
      const wake = () => done(true)
      const onAbort = () => done(false)
      const timer = setTimeout(wake, this.pollMs)
      set.add(wake)
      signal.addEventListener('abort', onAbort, { once: true })
    })
  }

  /**
   * A stream `id` started on `channelId`: `onSuperseded` runs once if another stream takes the
   * channel over. With LISTEN, the database says which stream that replaced, on any instance
   * (this one included), in the order it admitted them. Without (the embedded database: one
   * connection, so admissions complete in the order they ran), the one this replaces here
   * ends now. Returns what to call when the stream is over.
   */
  streamStarted(channelId: string, id: string, onSuperseded: () => void): () => void {
    this.streams.set(id, onSuperseded)
    if (this.listening) return () => this.streams.delete(id)
    const channel = channelId.toLowerCase()
    const before = this.latest.get(channel)
    if (before !== undefined && before !== id) this.supersede(before)
    this.latest.set(channel, id)
    return () => {
      this.streams.delete(id)
      if (this.latest.get(channel) === id) this.latest.delete(channel)
    }
  }

  /** Ends the stream `id` if it is under way here. */
  supersede(id: string): void {
    const end = this.streams.get(id)
    if (!end) return
    this.streams.delete(id)
    end()
  }

  async stop(): Promise<void> {
    this.stopped = true
    clearTimeout(this.retry)
    clearInterval(this.check)
    await this.client?.end({ timeout: 1 })
  }
}
