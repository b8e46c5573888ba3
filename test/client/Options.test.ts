/**
 * `createFetch` checks its options as it is called: what is not what `Options` says (a number
 * for a bigint, a negative budget, a missing `allow`) is a ClientError naming the option, with
 * nothing sent. Unchecked, such options failed later, inside a request: a TypeError ("Invalid
 * mix of BigInt and other type"), a viem error, or a LimitExceededError with made-up numbers
 * (a negative maxDeposit was reported as "the next voucher (999999) would pass maxTotal").
 */
import { describe, expect, test } from 'bun:test'
import { privateKeyToAccount } from 'viem/accounts'
import { ClientError, createFetch, type Options, Store } from '../../src/client/index.ts'

const key = '0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d' as const
const escrow = '0x5FbDB2315678afecb367f032d93F642f64180aa3' as const
let sent = 0
const good = (): Options => ({
  account: key,
  limits: { maxDeposit: 100_000n, maxTotal: 1_000_000n },
  allow: { escrows: [escrow] },
  store: Store.memory(),
  fetch: (async () => {
    sent++
    return new Response('no', { status: 500 })
  }) as unknown as typeof fetch,
})

const bad: [string, string, (o: Options) => unknown][] = [
  ['options', 'not an object', () => undefined],
  ['limits', 'missing', (o) => ({ ...o, limits: undefined })],
  [
    'limits.maxDeposit',
    'a number',
    (o) => ({ ...o, limits: { ...o.limits, maxDeposit: 100_000 } }),
  ],
  ['limits.maxTotal', 'a string', (o) => ({ ...o, limits: { ...o.limits, maxTotal: '1000000' } })],
  ['limits.maxTotal', 'negative', (o) => ({ ...o, limits: { ...o.limits, maxTotal: -5n } })],
  ['limits.maxDeposit', 'negative', (o) => ({ ...o, limits: { ...o.limits, maxDeposit: -1n } })],
  ['limits.maxDeposit', 'zero', (o) => ({ ...o, limits: { ...o.limits, maxDeposit: 0n } })],
  ['deposit', 'negative', (o) => ({ ...o, deposit: -5n })],
  ['margin', 'negative', (o) => ({ ...o, margin: -100n })],
  ['margin', 'zero', (o) => ({ ...o, margin: 0n })],
  ['margin', 'a number', (o) => ({ ...o, margin: 100 })],
  ['completionMargin', 'negative', (o) => ({ ...o, completionMargin: -1n })],
  ['maxPrice.output', 'negative', (o) => ({ ...o, maxPrice: { output: -1n } })],
  ['maxPrice.input', 'a number', (o) => ({ ...o, maxPrice: { output: 1n, input: 3 } })],
  ['allow', 'missing', (o) => ({ ...o, allow: undefined })],
  ['allow.escrows', 'missing', (o) => ({ ...o, allow: {} })],
  ['allow.escrows', 'a string', (o) => ({ ...o, allow: { escrows: escrow } })],
  ['allow.escrows', 'not addresses', (o) => ({ ...o, allow: { escrows: ['nope'] } })],
  ['allow.recipients', 'not addresses', (o) => ({ ...o, allow: { ...o.allow, recipients: [1] } })],
  ['account', 'a short key', (o) => ({ ...o, account: '0x1234' })],
  ['account', 'a number', (o) => ({ ...o, account: 5 })],
  ['rpcUrl', 'not a URL', (o) => ({ ...o, rpcUrl: 'not a url' })],
  ['store', 'a path', (o) => ({ ...o, store: 'channels.json' })],
  ['pollingInterval', 'negative', (o) => ({ ...o, pollingInterval: -1 })],
  ['onReceipt', 'not a function', (o) => ({ ...o, onReceipt: 'log' })],
]

describe('createFetch options', () => {
  for (const [option, what, make] of bad)
    test(`${option} ${what}: a ClientError naming it, nothing sent`, () => {
      sent = 0
      let error: unknown
      try {
        createFetch(make(good()) as Options)
      } catch (e) {
        error = e
      }
      expect(error).toBeInstanceOf(ClientError)
      expect((error as ClientError).details.option).toBe(option)
      expect((error as Error).message).toContain(option)
      expect(sent).toBe(0)
    })

  test('good options, a LocalAccount too, are taken', () => {
    expect(typeof createFetch(good())).toBe('function')
    expect(typeof createFetch({ ...good(), account: privateKeyToAccount(key) })).toBe('function')
    // maxTotal 0 is a budget of nothing (as the CLI's --max-total 0), not a bad option.
    expect(typeof createFetch({ ...good(), limits: { maxDeposit: 1n, maxTotal: 0n } })).toBe(
      'function',
    )
  })
})
