/**
 * The streams under way on this instance, and how a stop ends them: at the end of its grace,
 * each is told (its `signal`) to end as a stream the gateway ended does, with an error event
 * the client reads (code `gateway_stopping`), its usage chunk and `[DONE]`, charged what it
 * sent, before the server cuts what is left. Without it a stop's cut was a TCP reset in the
 * middle of a stream: no error, no usage, nothing a client could tell from a network fault.
 */
import { GatewayStoppingError } from '../Errors.ts'

export class Drain {
  private readonly controller = new AbortController()
  private open = 0
  private idle: (() => void) | undefined

  /** Aborted, with a GatewayStoppingError, when the streams are to end. */
  get signal(): AbortSignal {
    return this.controller.signal
  }

  /** Counts a stream under way; the returned function, called once it is over, uncounts it. */
  enter(): () => void {
    this.open++
    let left = false
    return () => {
      if (left) return
      left = true
      if (--this.open === 0) this.idle?.()
    }
  }

  /** Tells every stream to end, and waits until they have, or `ms` went by. */
  async end(ms: number): Promise<void> {
    if (!this.signal.aborted)
      this.controller.abort(
        new GatewayStoppingError(
          'The gateway is stopping (a restart); the stream ends here, charged for what it sent. Send the request again.',
        ),
      )
    if (this.open === 0) return
    const { promise, resolve } = Promise.withResolvers<void>()
    this.idle = resolve
    const timer = setTimeout(resolve, ms)
    await promise
    clearTimeout(timer)
  }
}
