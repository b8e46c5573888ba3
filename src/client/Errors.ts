/**
 * The paying client's errors: a short message that says what to do, `details` for the rest.
 * One base class so callers can catch every client error with one `instanceof`.
 */

/** Base of every error the paying client throws. */
export class ClientError extends Error {
  override name = 'ClientError'
  readonly details: Record<string, unknown>
  constructor(message: string, details: Record<string, unknown> = {}, options?: ErrorOptions) {
    super(message, options)
    this.details = details
  }
}

/** Which spending limit stopped a signature. */
export type Limit = 'maxDeposit' | 'maxTotal'

/** Signing (or depositing) more would pass a limit the caller set; nothing was signed. */
export class LimitExceededError extends ClientError {
  override name = 'LimitExceededError'
  readonly limit: Limit
  constructor(limit: Limit, details: { limit: bigint; wanted: bigint }) {
    super(
      limit === 'maxDeposit'
        ? `The channel needs a deposit of ${details.wanted}, over maxDeposit (${details.limit}); raise limits.maxDeposit or close the channel.`
        : `The next voucher (${details.wanted}) would pass maxTotal (${details.limit}); raise limits.maxTotal to keep paying.`,
      { ...details },
    )
    this.limit = limit
  }
}

/** The step needs the chain (a transaction from the payer, or a read) and no `rpcUrl` was given. */
export class ChainRequiredError extends ClientError {
  override name = 'ChainRequiredError'
  /** What needed the chain, e.g. "requestClose". */
  readonly what: string
  constructor(what = 'This step') {
    super(
      `${what} needs the chain: pass rpcUrl (a server that pays the gas and states its token's domain needs none to open).`,
    )
    this.what = what
  }
}

/** The server's Payment challenge is not one this client may pay. */
export class ChallengeRefusedError extends ClientError {
  override name = 'ChallengeRefusedError'
  constructor(message: string, details: Record<string, unknown> = {}) {
    super(message, details)
  }
}

/** The server refused a payment the client could not repair (see `problem`). */
export class PaymentFailedError extends ClientError {
  override name = 'PaymentFailedError'
  readonly status: number
  readonly problem: Record<string, unknown> | undefined
  constructor(message: string, status: number, problem?: Record<string, unknown>) {
    super(message, { status, ...(problem ? { problem } : {}) })
    this.status = status
    this.problem = problem
  }
}
