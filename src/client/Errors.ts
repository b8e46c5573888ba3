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

/** `withdraw` before the escrow allows it: no close was requested, or the grace period runs. */
export class CloseNotReadyError extends ClientError {
  override name = 'CloseNotReadyError'
  /** When the withdraw becomes possible (block time); undefined when no close was requested. */
  readonly withdrawableAt: Date | undefined
  constructor(channelId: string, ready: bigint | undefined) {
    const at = ready === undefined ? undefined : new Date(Number(ready) * 1000)
    super(
      at
        ? `Channel ${channelId} can be withdrawn from ${at.toISOString()} (the 15-minute grace period after requestClose); try again then.`
        : `Channel ${channelId} has no close request on chain; call requestClose first.`,
      { channelId, ...(at ? { withdrawableAt: at.toISOString() } : {}) },
    )
    this.withdrawableAt = at
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

/**
 * The server does not find the channel this request opened, or no longer takes it: it answered
 * the open, sent again a few times, channel-not-found (its chain read behind the block that
 * opened it, or an open it never submitted), or refused the channel after the open. No second
 * channel was opened within the request, and the channel is not forgotten: unless the server
 * or the chain shows it closed, it is set apart (`setApart(url)`), what was signed on it still
 * counted against maxTotal. The next request opens another channel.
 */
export class ChannelNotFoundError extends PaymentFailedError {
  override name = 'ChannelNotFoundError'
  readonly channelId: string
  constructor(
    message: string,
    channelId: string,
    status: number,
    problem?: Record<string, unknown>,
  ) {
    super(message, status, problem)
    this.channelId = channelId
    this.details.channelId = channelId
  }
}

/**
 * The store holds no channel this step can take: none at all, none with the id named, or
 * another channel of the server under forced close already (one at a time). Nothing was sent;
 * `details` names the channels there are.
 */
export class ChannelStateError extends ClientError {
  override name = 'ChannelStateError'
}

/** Another process holds the store's channel for this server and wallet (see `Store.own`). */
export class StoreInUseError extends ClientError {
  override name = 'StoreInUseError'
}

/**
 * The token's EIP-712 domain, read from `rpcUrl` for an EIP-3009 authorization (a gasless open
 * or top-up), could not be read, or is not the token's on the challenge's chain (signed with,
 * the authorization would be one the token rejects). Nothing was signed. `details`: the token
 * and chain.
 */
export class TokenDomainUnavailableError extends ClientError {
  override name = 'TokenDomainUnavailableError'
}
