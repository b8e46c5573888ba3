/**
 * Structured JSON logs (pino). What may be logged: ids, counts, money, timings, statuses.
 * Never prompt or completion text, never a raw key: callers pass only such fields.
 */
import pino from 'pino'

export type Logger = pino.Logger
export type DestinationStream = pino.DestinationStream

/** A logger at `level`, writing JSON lines to `destination` (stdout by default: `stdout()`). */
export function create(level: string, destination?: pino.DestinationStream): Logger {
  return pino({ level, base: undefined, timestamp: isoTime }, destination ?? stdout())
}

let ms = 0
let time = ''
/**
 * pino's `isoTime`, its text made once a millisecond: a busy gateway writes a line a request,
 * several a millisecond, and formatting the date was a third of a line's cost.
 */
export function isoTime(): string {
  const now = Date.now()
  if (now !== ms) {
    ms = now
    time = `,"time":"${new Date(now).toISOString()}"`
  }
  return time
}

/**
 * Standard output, written once an event-loop turn (`batched`): pino's own destination wrote
 * each line as it came, a system call a request. The writes are pino's (sonic-boom,
 * synchronous: a full pipe is waited for, a short write finished); the lines still waiting
 * when the process exits are written then. One for every logger of the process, so their lines
 * keep their order.
 */
export function stdout(): pino.DestinationStream {
  if (!out) {
    out = batched(pino.destination({ dest: 1, sync: true }))
    process.on('exit', () => out!.flush())
  }
  return out
}
let out: ReturnType<typeof batched> | undefined

/**
 * Lines to `sink` once an event-loop turn: the lines of a turn (a busy gateway's requests
 * finish many to a turn) go in as few writes as whole lines of at most `PIPE_BUF` bytes make,
 * not one each, and a line waits for the end of its turn at most. A write of at most PIPE_BUF
 * bytes to a pipe is never interleaved with another process's (workers share standard
 * output): a line alone was, a longer batch may not be. `flush` writes what waits now (then
 * calls `done`, as pino's `logger.flush(cb)` asks). A process killed outright (SIGKILL, out of
 * memory) loses the lines of the turn it was in.
 */
export function batched(sink: { write(text: string): unknown }) {
  let lines: string[] = []
  let due = false
  const flush = (done?: (e?: Error) => void) => {
    due = false
    const all = lines
    lines = []
    let from = 0
    let bytes = 0
    for (let i = 0; i < all.length; i++) {
      const n = Buffer.byteLength(all[i]!)
      if (i > from && bytes + n > PIPE_BUF) {
        sink.write(all.slice(from, i).join(''))
        from = i
        bytes = 0
      }
      bytes += n
    }
    if (from < all.length)
      sink.write(from === all.length - 1 ? all[from]! : all.slice(from).join(''))
    done?.()
  }
  return {
    write(line: string) {
      lines.push(line)
      if (!due) {
        due = true
        setImmediate(flush)
      }
    },
    flush,
  }
}

/** The most bytes a write to a pipe puts in at once, whatever other writers do (Linux). */
export const PIPE_BUF = 4096
