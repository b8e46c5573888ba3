/**
 * The streams under way on this instance, and how a stop ends them: at the end of its grace,
 * each is told (its `onStop`) to end as a stream the gateway ended does, with an error event
 * the client reads (code `gateway_stopping`), its usage chunk and `[DONE]`, charged what it
 * sent, before the server cuts what is left. Without it a stop's cut was a TCP reset in the
 * middle of a stream: no error, no usage, nothing a client could tell from a network fault.
 * (A set of callbacks, not listeners on one AbortSignal: those cost each stream's start and
 * end time in the number of streams under way.)
 */
import { GatewayStoppingError } from '../Errors.ts'

export class Drain {
  private readonly open = new Set<(reason: GatewayStoppingError) => void>()
  private stopping: GatewayStoppingError | undefined
  private idle: (() => void) | undefined

  /**
   * Counts a stream under way, to be ended by `onStop` (at once if the stop has come; a
   * function of the stream's own); the returned function, called once it is over, uncounts it.
   */
  enter(onStop: (reason: GatewayStoppingError) => void): () => void {
    if (this.stopping) onStop(this.stopping)
    this.open.add(onStop)
    // The last one over lets the stop go on a turn later: a request's answer (a stop's 503 to
    // one whose upstream had not begun) is handed to the server after its handler's finally,
    // and the server's cut that follows closed its connection before it was written.
    // Only while a stop waits: at one connection every request would otherwise leave a timer.
    return () => {
      if (this.open.delete(onStop) && this.open.size === 0 && this.idle)
        setTimeout(() => {
          if (this.open.size === 0) this.idle?.()
        }, 0)
    }
  }

  /** Tells every stream to end, and waits until they have, or `ms` went by. */
  async end(ms: number): Promise<void> {
    this.stopping ??= new GatewayStoppingError(
      'The gateway is stopping (a restart); the request ends here, charged only for what it sent. Send the request again.',
    )
    for (const onStop of this.open) onStop(this.stopping)
    if (this.open.size === 0) return
    const { promise, resolve } = Promise.withResolvers<void>()
    this.idle = resolve
    const timer = setTimeout(resolve, ms)
    await promise
    clearTimeout(timer)
  }
}
