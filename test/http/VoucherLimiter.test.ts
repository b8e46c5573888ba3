import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import { Buckets, network, VoucherLimiter } from '../../src/http/Payments.ts'

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

describe('Buckets', () => {
  test('behavior: burst at once, then perSecond; keys are separate; a refund gives one back up to the burst', () => {
    const b = new Buckets(2, 5)
    for (let i = 0; i < 5; i++) expect(b.take('a', 0)).toBe(true)
    expect(b.take('a', 0)).toBe(false)
    expect(b.waitMs('a', 0)).toBe(500)
    expect(b.take('a', 499)).toBe(false)
    // 1 s refills two (what the refused take at 0.499 s had accrued counts).
    expect(b.take('a', 1_000)).toBe(true)
    expect(b.take('a', 1_000)).toBe(true)
    expect(b.take('a', 1_000)).toBe(false)
    expect(b.take('b', 1_000)).toBe(true)
    b.refund('a')
    expect(b.take('a', 1_000)).toBe(true)
    expect(b.take('a', 1_000)).toBe(false)
    // Never more than the burst, however long idle or refunded.
    for (let i = 0; i < 10; i++) b.refund('b')
    let n = 0
    while (b.take('b', 1_000_000)) n++
    expect(n).toBe(5)
  })

  test('behavior: it keeps the 10,000 keys used last; one forgotten starts full, as a new key', () => {
    const b = new Buckets(1, 2)
    b.take('first', 0)
    b.take('first', 0)
    expect(b.take('first', 0)).toBe(false)
    for (let i = 0; i < 9_999; i++) b.take(`k${i}`, 0)
    expect(b.size).toBe(10_000)
    // Used again, `first` is kept; `k0`, used least lately, is forgotten for the next key.
    expect(b.waitMs('first', 0)).toBe(1_000)
    b.take('last', 0)
    expect(b.size).toBe(10_000)
    expect(b.take('first', 0)).toBe(false)
    expect([b.take('k0', 0), b.take('k0', 0)]).toEqual([true, true])
  })
})

describe('network', () => {
  test('behavior: IPv4 as it is, IPv6 by its /64, an IPv4 address carried in IPv6 as that address, anything else as written', () => {
    expect(network('203.0.113.7')).toBe('203.0.113.7')
    expect(network('2001:db8:1:2:3:4:5:6')).toBe('2001:db8:1:2::/64')
    expect(network('2001:DB8:1:2::5')).toBe('2001:db8:1:2::/64')
    expect(network('2001:0db8:0001:0002::')).toBe('2001:db8:1:2::/64')
    expect(network('2001:db8::1')).toBe('2001:db8:0:0::/64')
    expect(network('fe80::1%eth0')).toBe('fe80:0:0:0::/64')
    // An embedded IPv4 tail is two groups.
    expect(network('::2:3:4:5:6:1.2.3.4')).toBe('0:2:3:4::/64')
    // IPv4-mapped, however written, and NAT64's prefix: each IPv4 client is its own.
    for (const a of ['::ffff:203.0.113.7', '::ffff:cb00:7107', '0:0:0:0:0:ffff:203.0.113.7'])
      expect(network(a)).toBe('203.0.113.7')
    expect(network('64:ff9b::203.0.113.7')).toBe('203.0.113.7')
    expect(network('64:ff9b::cb00:7108')).toBe('203.0.113.8')
    // As a proxy may write them: brackets, ports.
    expect(network('[2001:db8:1:2::5]')).toBe('2001:db8:1:2::/64')
    expect(network('[2001:db8:1:2::5]:443')).toBe('2001:db8:1:2::/64')
    expect(network('203.0.113.7:5678')).toBe('203.0.113.7')
    for (const a of [
      'unknown',
      'x:y',
      '1::2::3',
      ':::::',
      '',
      '[]',
      '999.1.1.1',
      'a'.repeat(10_000),
    ])
      expect(network(a)).toBe(a)
  })

  test('property: every way of writing an IPv6 address (leading zeros, a run of zeros as ::) gives its /64', () => {
    const hextet = fc.integer({ min: 0, max: 0xffff })
    fc.assert(
      fc.property(
        fc.array(hextet, { minLength: 8, maxLength: 8 }),
        fc.nat(7),
        fc.nat(8),
        fc.boolean(),
        (groups, at, length, padded) => {
          const run = Math.min(length, 8 - at)
          for (let i = at; i < at + run; i++) groups[i] = 0
          // Not one that carries an IPv4 address (IPv4-mapped, NAT64): those count as it.
          fc.pre(
            !(groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) &&
              !(
                groups[0] === 0x64 &&
                groups[1] === 0xff9b &&
                groups.slice(2, 6).every((g) => g === 0)
              ),
          )
          const text = groups.map((g) =>
            padded ? g.toString(16).padStart(4, '0') : g.toString(16),
          )
          const full = text.join(':')
          const short =
            run > 0 ? `${text.slice(0, at).join(':')}::${text.slice(at + run).join(':')}` : full
          const want = `${groups
            .slice(0, 4)
            .map((g) => g.toString(16))
            .join(':')}::/64`
          expect(network(full)).toBe(want)
          expect(network(short)).toBe(want)
          expect(network(short.toUpperCase())).toBe(want)
        },
      ),
    )
  })
})
