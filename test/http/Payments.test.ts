/** Payment credentials at the HTTP layer: parsed once per header text, checked every time. */
import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Payments from '../../src/http/Payments.ts'
import * as Credential from '../../src/payment/Credential.ts'
import type * as Method from '../../src/payment/Method.ts'

const channelId = `0x${'ab'.repeat(32)}` as const
const price = { input: 1_000_000n, output: 2_000_000n }

/** A method that records what it was asked to check. */
function recording() {
  const seen: Credential.Credential[] = []
  const method: Method.Method = {
    method: 'evm',
    intent: 'session',
    request: () => ({ amount: '2000000', currency: '0x0', recipient: '0x0' }),
    check(credential) {
      seen.push(credential)
      return { action: 'voucher', channelId, price, payload: credential }
    },
    apply: async () => ({}),
    receipt: () => ({}),
  }
  return { method, seen }
}

function payments(method: Method.Method, expiresMs: number): Payments.Payments {
  return {
    secret: 'test-secret-0123456789',
    realm: 'tollway',
    expiresMs,
    methods: [method],
    voucherTimeoutMs: 1000,
    wake: () => {},
    limiter: new Payments.VoucherLimiter(10),
  }
}

function header(p: Payments.Payments, method: Method.Method, amount: string, pad = ''): string {
  const challenge = Payments.challenge(p, method, price, channelId)
  return Credential.serialize(
    Credential.from({
      challenge,
      payload: { action: 'voucher', channelId, cumulativeAmount: amount, ...(pad ? { pad } : {}) },
    }),
  )
}

describe('Payments.verify', () => {
  test('behavior: the same header text is parsed once; its objects are shared, frozen', () => {
    const { method, seen } = recording()
    const p = payments(method, 60_000)
    const h = header(p, method, '100')
    const first = Payments.verify(p, h)
    const again = Payments.verify(p, h)
    expect(again.challenge).toBe(first.challenge)
    expect(seen[1]).toBe(seen[0]!)
    expect(Object.isFrozen(seen[0])).toBe(true)
    expect(Object.isFrozen(first.challenge.request)).toBe(true)
    // Another voucher is another text: parsed afresh.
    Payments.verify(p, header(p, method, '200'))
    expect(seen[2]).not.toBe(seen[0]!)
    expect((seen[2]!.payload as { cumulativeAmount: string }).cumulativeAmount).toBe('200')
  })

  test('behavior: a credential over 4 KB is served but not kept', () => {
    const { method, seen } = recording()
    const p = payments(method, 60_000)
    const h = header(p, method, '100', 'x'.repeat(5000))
    Payments.verify(p, h)
    Payments.verify(p, h)
    expect(seen[1]).not.toBe(seen[0]!)
    expect(seen[1]).toEqual(seen[0]!)
  })

  test('behavior: a kept credential whose challenge has expired since is refused', async () => {
    const { method } = recording()
    const p = payments(method, 1500)
    const h = header(p, method, '100')
    expect(Payments.verify(p, h).checked.action).toBe('voucher')
    const { expires } = Credential.deserialize(h).challenge
    await Bun.sleep(Date.parse(expires!) - Date.now() + 50)
    expect(() => Payments.verify(p, h)).toThrow(/expired/)
  })

  test('behavior: a challenge lives at least its configured time (Challenge.expiresIn)', () => {
    const { method } = recording()
    const before = Date.now()
    const { expires } = Payments.challenge(payments(method, 1000), method, price, channelId)
    expect(Date.parse(expires!)).toBeGreaterThanOrEqual(before + 1000)
    expect(Date.parse(expires!)).toBeLessThan(Date.now() + 2000)
  })

  test('error: a malformed or forged credential is refused every time and never reaches the method', () => {
    const { method, seen } = recording()
    const p = payments(method, 60_000)
    const bad = 'Payment not-base64url-json!'
    for (let i = 0; i < 2; i++) expect(() => Payments.verify(p, bad)).toThrow(/base64url/)
    // A challenge bound under another secret.
    const other = { ...payments(method, 60_000), secret: 'another-secret-0123456789' }
    const forged = header(other, method, '100')
    for (let i = 0; i < 2; i++)
      expect(() => Payments.verify(p, forged)).toThrow(/not one this server issued/)
    expect(seen).toEqual([])
  })

  test('error: a kept credential is checked against the secrets of the day: rotated out, refused', () => {
    const { method } = recording()
    const p = payments(method, 60_000)
    const h = header(p, method, '100')
    expect(Payments.verify(p, h).checked.action).toBe('voucher')
    expect(Payments.verify(p, h).checked.action).toBe('voucher')
    const rotated = { ...p, secret: 'rotated-secret-0123456789' }
    expect(() => Payments.verify(rotated, h)).toThrow(/not one this server issued/)
  })
})

describe('Payments.channelNamed', () => {
  test('behavior: the channel a credential names, read without verifying it', () => {
    const credential = (payload: Record<string, unknown>) =>
      Credential.serialize(
        Credential.from({
          challenge: {
            id: 'x',
            realm: 'tollway',
            method: 'evm',
            intent: 'session',
            request: {},
          },
          payload,
        }),
      )
    expect(Payments.channelNamed(credential({ action: 'voucher', channelId }))).toBe(channelId)
    expect(Payments.channelNamed(credential({ action: 'voucher', channelId: '0x12' }))).toBe(
      undefined,
    )
    expect(Payments.channelNamed(credential({ action: 'open' }))).toBe(undefined)
    expect(Payments.channelNamed('Bearer tw_key')).toBe(undefined)
    expect(Payments.channelNamed(undefined)).toBe(undefined)
  })

  test('property: any header gives a channel id or undefined, never an exception', () => {
    fc.assert(
      fc.property(
        fc.oneof(
          fc.string(),
          fc.string().map((s) => `Payment ${s}`),
          fc.json().map((j) => `Payment ${Buffer.from(j).toString('base64url')}`),
        ),
        (header) => {
          const id = Payments.channelNamed(header)
          if (id !== undefined) expect(id).toMatch(/^0x[0-9a-fA-F]{64}$/)
        },
      ),
      { numRuns: 3_000 },
    )
  })
})
