import { describe, expect, test } from 'bun:test'
import { VoucherLimiter } from '../../src/http/Payments.ts'

const channel = `0x${'ab'.repeat(32)}`

describe('VoucherLimiter', () => {
  test('behavior: perSecond submissions at once, then one per 1/perSecond', () => {
    const l = new VoucherLimiter(10)
    for (let i = 0; i < 10; i++) expect(l.take(channel, false, 1_000)).toBe(true)
    expect(l.take(channel, false, 1_000)).toBe(false)
    expect(l.take(channel, false, 1_099)).toBe(false)
    expect(l.take(channel, false, 1_100)).toBe(true)
    // Channels are separate, and ids are case-insensitive.
    expect(l.take(channel.toUpperCase().replace('0X', '0x'), false, 1_100)).toBe(false)
    expect(l.take(`0x${'cd'.repeat(32)}`, false, 1_100)).toBe(true)
  })

  test('behavior: waitMs tells how long until the next submission is allowed', () => {
    const l = new VoucherLimiter(10)
    expect(l.waitMs(channel, 1_000)).toBe(0)
    for (let i = 0; i < 10; i++) l.take(channel, false, 1_000)
    expect(l.waitMs(channel, 1_000)).toBe(100)
    expect(l.waitMs(channel, 1_060)).toBe(40)
    expect(l.waitMs(channel, 1_100)).toBe(0)
    expect(l.take(channel, false, 1_100)).toBe(true)
    expect(l.waitMs(channel, 1_100)).toBe(100)
  })

  test('behavior: a replay is not counted, over the rate or not', () => {
    const l = new VoucherLimiter(2)
    expect(l.take(channel, false, 0)).toBe(true)
    for (let i = 0; i < 100; i++) expect(l.take(channel, true, 0)).toBe(true)
    expect(l.take(channel, false, 0)).toBe(true)
    expect(l.take(channel, false, 0)).toBe(false)
    expect(l.take(channel, true, 0)).toBe(true)
  })
})
