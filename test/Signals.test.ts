/**
 * The stop signals handed over from `serve`'s start-up handler to its serving one: never a
 * moment without a listener, in which Bun takes its own handler back and a signal kills the
 * process outright (the banner just printed, a SIGINT: exit 130, no stop).
 */
import { afterEach, expect, test } from 'bun:test'
import { handOver } from '../src/Signals.ts'

const signals = ['SIGINT', 'SIGTERM'] as const
const mine: [string, () => void][] = []
afterEach(() => {
  for (const [signal, f] of mine.splice(0)) process.off(signal, f)
})

test('behavior: handing the handlers over leaves each signal with a listener at every step, and the new one alone at the end', () => {
  const early = () => {}
  const serving = () => {}
  const before = Object.fromEntries(signals.map((s) => [s, process.listenerCount(s)]))
  for (const s of signals) {
    process.on(s, early)
    mine.push([s, early], [s, serving])
  }
  // Each listener count as every on and off of the hand-over leaves it.
  const counts: number[] = []
  const { on, off } = process
  const noted = (f: typeof process.on) => (signal: string, listener: () => void) => {
    const r = f.call(process, signal as never, listener)
    if ((signals as readonly string[]).includes(signal)) counts.push(process.listenerCount(signal))
    return r
  }
  process.on = noted(on) as typeof process.on
  process.off = noted(off) as typeof process.off
  try {
    handOver(early, serving)
  } finally {
    process.on = on
    process.off = off
  }
  expect(counts.length).toBe(4)
  // On, off for SIGINT, then for SIGTERM: none leaves a signal without a listener of the test.
  for (const [i, n] of counts.entries()) expect(n).toBeGreaterThan(before[signals[i >> 1]!] ?? 0)
  for (const s of signals) {
    expect(process.listeners(s)).toContain(serving)
    expect(process.listeners(s)).not.toContain(early)
  }
})
