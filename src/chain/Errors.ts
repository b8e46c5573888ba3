/**
 * Typed failures of the chain layer, in the spirit of viem's BaseError: a short message that says
 * what to do, `details` for the operator, the original `cause`. They extend Error until the
 * gateway's GatewayError base (src/Errors.ts) exists; then they rebase onto it.
 */
import { BaseError, type Hex, type TransactionReceipt } from 'viem'
import { withoutUrls } from '../Errors.ts'

export type ChainErrorOptions = { details?: string | undefined; cause?: unknown }

/** Base class of every chain-layer error. */
export class ChainError extends Error {
  override name = 'ChainError'
  readonly details: string | undefined

  constructor(message: string, options: ChainErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause })
    this.details = options.details
  }
}

/**
 * A transaction reverted: either its simulation reverted (nothing was sent) or it was mined with
 * `status: reverted`. Definite: retrying the same call will not make it succeed.
 */
/**
 * What a revert whose cause is not the caller's arguments says instead. Looked up by own keys
 * only: the name is the node's (a revert without data is named by its message), and `toString`
 * or `constructor` would find Object's functions.
 */
const causes: Record<string, string> = {
  DepositNotReceived:
    'The token delivered less to the escrow than the deposit (it takes a fee on transfer, or moved nothing): it cannot fund channels on this escrow, whatever the arguments.',
  ReentrancyGuardReentrantCall:
    'The token called back into the escrow during its transfer: it cannot fund or pay out channels on this escrow, whatever the arguments.',
}

export class TransactionRevertedError extends ChainError {
  override name = 'TransactionRevertedError'
  /** The contract's custom error name when it could be decoded, e.g. `AmountNotIncreasing`. */
  readonly errorName: string | undefined
  readonly hash: Hex | undefined
  readonly receipt: TransactionReceipt | undefined

  constructor(
    options: {
      functionName: string
      errorName?: string | undefined
      hash?: Hex | undefined
      receipt?: TransactionReceipt | undefined
    } & ChainErrorOptions,
  ) {
    const reason = options.errorName ? ` with ${options.errorName}` : ''
    super(
      `${options.functionName} reverted${reason}. ${
        (options.errorName && Object.hasOwn(causes, options.errorName)
          ? causes[options.errorName]
          : undefined) ??
        'Check the channel state and arguments; retrying the same call will fail again.'
      }`,
      options,
    )
    this.errorName = options.errorName
    this.hash = options.hash
    this.receipt = options.receipt
  }
}

/** A write was attempted with a client that has no account. */
export class AccountRequiredError extends ChainError {
  override name = 'AccountRequiredError'
  constructor(functionName: string) {
    super(`${functionName} sends a transaction: create the client with a private key.`)
  }
}

export type InvalidVoucherReason = 'malformed' | 'high-s' | 'bad-v' | 'signer-mismatch' | 'invalid'

/** A voucher signature that the escrow would reject. */
export class InvalidVoucherSignatureError extends ChainError {
  override name = 'InvalidVoucherSignatureError'
  readonly reason: InvalidVoucherReason

  constructor(reason: InvalidVoucherReason, options: ChainErrorOptions = {}) {
    const what = {
      malformed: 'is not a 65-byte r||s||v signature',
      'high-s': 'has a high s value (non-canonical)',
      'bad-v': 'has a v other than 27 or 28',
      'signer-mismatch': "was not signed by the channel's signer",
      invalid: 'does not verify',
    }[reason]
    super(
      `The voucher signature ${what}. Sign the Voucher typed data with the channel's signer.`,
      options,
    )
    this.reason = reason
  }
}

/** The development chain (anvil) could not be started or set up. */
export class DevChainError extends ChainError {
  override name = 'DevChainError'
}

/** No receipt within the settlement worker's timeout. Unknown outcome: retried later. */
export class TransactionTimeoutError extends ChainError {
  override name = 'TransactionTimeoutError'
  constructor(functionName: string, timeoutMs: number) {
    super(
      `${functionName} got no receipt within ${timeoutMs} ms. It may still be mined; the worker checks the chain and retries later.`,
    )
  }
}

/** Another instance held the settlement lock for longer than the caller was willing to wait. */
export class SettlementBusyError extends ChainError {
  override name = 'SettlementBusyError'
  constructor() {
    super('Another instance is settling right now. Try again in a few seconds.')
  }
}

/** A close voucher below what the channel has spent (draft: it MUST cover all delivered service). */
export class CloseBelowSpentError extends ChainError {
  override name = 'CloseBelowSpentError'
  constructor(readonly spent: bigint) {
    super(
      `The close voucher must cover all delivered service: sign a cumulative amount of at least ${spent}.`,
    )
  }
}

/** A close waited too long for the channel's requests under way to end. */
export class ChannelBusyError extends ChainError {
  override name = 'ChannelBusyError'
  constructor() {
    super(
      'Requests on this channel are still under way; the close waits for them to be charged. Try again in a few seconds.',
    )
  }
}

/** A close or settlement was asked for a channel that is unknown here or already finalized. */
export class ChannelStateError extends ChainError {
  override name = 'ChannelStateError'
  readonly reason: 'unknown' | 'finalized' | 'other-escrow'
  constructor(reason: 'unknown' | 'finalized' | 'other-escrow', channelId: Hex) {
    const what = {
      unknown: 'is not known to this gateway',
      finalized: 'is already finalized',
      'other-escrow': "belongs to another escrow than this worker's",
    }[reason]
    super(`Channel ${channelId} ${what}; there is nothing to settle or close.`)
    this.reason = reason
  }
}

/**
 * The token's EIP-712 domain (ERC-5267 `eip712Domain()`) could not be read, or is not the
 * token's on this chain: another chain id or verifying contract, with which EIP-3009
 * authorizations would be signatures the token rejects. The message names the token and the
 * problem (no RPC URL, no viem dump); the node's error is the `cause`.
 */
export class TokenDomainError extends ChainError {
  override name = 'TokenDomainError'
  readonly token: Hex
  constructor(token: Hex, problem: string, options: ChainErrorOptions = {}) {
    super(`The EIP-712 domain of token ${token} ${problem}.`, options)
    this.token = token
  }
}

/**
 * An error's name and a short message without URLs (an RPC URL may carry an API key): viem's
 * short message, not its page of request body, arguments and docs link.
 */
export function describe(error: unknown): { name: string; message: string } {
  if (!(error instanceof Error)) return { name: 'Error', message: String(error).slice(0, 500) }
  const message = error instanceof BaseError ? error.shortMessage : error.message
  return { name: error.name, message: withoutUrls(message).slice(0, 500) }
}
