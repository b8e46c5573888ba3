import { describe, expect, test } from 'bun:test'
import { VoucherLimiter } from '../../src/http/Payments.ts'

const channel = `0x${'ab'.repeat(32)}`

describe('VoucherLimiter', () => {
  test('behavior: perSecond submissions at once, then one per 1/perSecond', () => {
    const l = new VoucherLimiter(10)
    for (let i = 0; i < 10; i++) expect(l.take(channel, BigInt(i + 1), 1_000)).toBe(true)
    expect(l.take(channel, 11n, 1_000)).toBe(false)
    expect(l.take(channel, 11n, 1_099)).toBe(false)
    expect(l.take(channel, 11n, 1_100)).toBe(true)
    // Channels are separate, and ids are case-insensitive.
    expect(l.take(channel.toUpperCase().replace('0X', '0x'), 12n, 1_100)).toBe(false)
    expect(l.take(`0x${'cd'.repeat(32)}`, 1n, 1_100)).toBe(true)
  })

  test('behavior: a voucher no higher than an accepted one is a replay and is not counted', () => {
    const l = new VoucherLimiter(2)
    expect(l.take(channel, 5n, 0)).toBe(true)
    l.accepted(channel, 5n)
    for (let i = 0; i < 100; i++) expect(l.take(channel, i % 2 ? 5n : 3n, 0)).toBe(true)
    expect(l.take(channel, 6n, 0)).toBe(true)
    expect(l.take(channel, 7n, 0)).toBe(false)
    // A top-up (no amount) always counts.
    expect(l.take(channel, undefined, 0)).toBe(false)
  })

  test('error: a voucher let through but not accepted (a bad signature) makes nothing free', () => {
    const l = new VoucherLimiter(1)
    expect(l.take(channel, 1_000_000n, 0)).toBe(true)
    expect(l.take(channel, 1n, 0)).toBe(false)
  })
})
