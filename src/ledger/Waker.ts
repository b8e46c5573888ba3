/**
 * Wakes streams waiting for a channel's next voucher. `tollway_accept_voucher` NOTIFYs
 * `tollway_channel` with the channel id, so a voucher accepted on any instance sharing
 * the database wakes the stream paused on this one. Waiters also wake on a slow poll, so a
 * lost notification (a dropped LISTEN connection) delays a stream but never strands it.
 */
import type { Sql } from './Db.ts'

export class Waker {
  private readonly waiters = new Map<string, Set<() => void>>()
  private unlisten: (() => Promise<void>) | undefined

  /** Listens on the database (skip for the single-connection embedded server). */
  static async start(sql: Sql, options: { listen: boolean; pollMs?: number }): Promise<Waker> {
    const waker = new Waker(options.pollMs ?? 1000)
    if (options.listen) {
      const meta = await sql.listen('tollway_channel', (payload) => waker.wake(`0x${payload}`))
      waker.unlisten = meta.unlisten
    }
    return waker
  }

  private constructor(private readonly pollMs: number) {}

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
        resolve(woken)
      }
      const wake = () => done(true)
      const onAbort = () => done(false)
      const timer = setTimeout(wake, this.pollMs)
      set.add(wake)
      signal.addEventListener('abort', onAbort, { once: true })
    })
  }

  async stop(): Promise<void> {
    await this.unlisten?.()
  }
}
