/**
 * Structured JSON logs (pino). What may be logged: ids, counts, money, timings, statuses.
 * Never prompt or completion text, never a raw key: callers pass only such fields.
 */
import pino from 'pino'

export type Logger = pino.Logger
export type DestinationStream = pino.DestinationStream

/** A logger at `level`, writing JSON lines to `destination` (stdout by default). */
export function create(level: string, destination?: pino.DestinationStream): Logger {
  return pino({ level, base: undefined, timestamp: pino.stdTimeFunctions.isoTime }, destination)
}
