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
 */
import type { Sql } from './Db.ts'

export class Waker {
  private readonly waiters = new Map<string, Set<() => void>>()
  private unlisten: (() => Promise<void>)[] = []
  private listening = false
  /** Streams under way on this instance: what ends each; without LISTEN, the latest by channel. */
  private readonly streams = new Map<string, () => void>()
  private readonly latest = new Map<string, string>()

  /** Listens on the database (skip for the single-connection embedded server). */
  static async start(sql: Sql, options: { listen: boolean; pollMs?: number }): Promise<Waker> {
    const waker = new Waker(options.pollMs ?? 1000)
    if (options.listen) {
      const vouchers = await sql.listen('tollway_channel', (payload) => waker.wake(`0x${payload}`))
      const streams = await sql.listen('tollway_superseded', (id) => waker.supersede(id))
      waker.unlisten = [vouchers.unlisten, streams.unlisten]
      waker.listening = true
    }
    return waker
  }

  private constructor(private readonly pollMs: number) {}

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
    await Promise.all(this.unlisten.map((f) => f()))
  }
}
