/** How the CLI words the paying client's failures: what to change, in this command's terms. */
import { describe, expect, test } from 'bun:test'
import { PaymentError, UsageError } from '../../src/cli/Errors.ts'
import { classify } from '../../src/cli/Wallet.ts'
import {
  ChallengeRefusedError,
  PaymentFailedError,
  StoreInUseError,
} from '../../src/client/index.ts'

describe('classify', () => {
  test('error: another process holding the channel store is a usage error pointing at TOLLWAY_DATA_DIR', () => {
    const e = classify(
      new StoreInUseError(
        'Another process (pid 7) pays http://x from this wallet through the channel store /d/channels.json; two processes cannot use one channel. Give this one a store of its own, or wait for that one to end.',
        { pid: 7 },
      ),
    )
    expect(e).toBeInstanceOf(UsageError)
    expect(e.message).toContain('Run this one with another TOLLWAY_DATA_DIR')
    expect(e.message).toContain('pid 7')
  })

  test('error: a deposit below what the gateway takes names the options that set it', () => {
    const e = classify(
      new PaymentFailedError(
        'The server refused the payment (402 payment-insufficient): A deposit the gateway sends (and pays the gas of) must be at least 100000; this one is 5000.',
        402,
        { type: 'https://paymentauth.org/problems/payment-insufficient', minimum: '100000' },
      ),
    )
    expect(e).toBeInstanceOf(PaymentError)
    expect(e.message).toContain('must be at least 100000')
    expect(e.message).toContain(
      'Raise --max-deposit (and --max-total, which bounds it) to at least 100000.',
    )
    // Another refusal says what the server said, and no more.
    const other = classify(new PaymentFailedError('The server refused the payment (402).', 402))
    expect(other.message).toBe('The server refused the payment (402).')
  })

  test('error: a gateway on another machine over plain HTTP names the option that allows it', () => {
    const e = classify(
      new ChallengeRefusedError(
        'http://10.0.0.5:8787 asks for payment over plain HTTP, where anyone on the way could read and replay the credential; use https (or allowInsecureHttp on a test network).',
        { url: 'http://10.0.0.5:8787/v1/chat/completions' },
      ),
    )
    expect(e).toBeInstanceOf(PaymentError)
    expect(e.message).toContain('use https (or --insecure-http on a test network)')
  })
})
