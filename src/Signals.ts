/** The process's stop signals, as `serve` (main.ts) hears them. */

/**
 * Hands SIGINT and SIGTERM from the start-up's handler to the serving one: the new one is
 * added before the old one goes. Bun takes the signal's own handler back once a signal has no
 * listener left and sets it again a moment after one is added: a signal in between (the banner
 * just printed) killed the process, no stop (20 of 40 runs of a scratch script that took its
 * listener off, printed, and added another, a signal sent as it printed; none of 40 with the
 * new one added first). Both are in place only within this synchronous step, in which no
 * signal is heard.
 */
export function handOver(from: () => void, to: () => void) {
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, to)
    process.off(signal, from)
  }
}
