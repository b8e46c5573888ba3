/**
 * The CLI's failures, each with its exit code: 2 a usage error (the gateway's refusals of the
 * request itself, 4xx, too), 3 a payment refused (402, a client limit, an escrow not
 * trusted), 4 a server or network error (5xx, 408, 429, no answer).
 */
export const exitCodes = { ok: 0, usage: 2, payment: 3, server: 4 } as const

export class CliError extends Error {
  override name = 'CliError'
  constructor(
    message: string,
    readonly code: number,
    readonly details?: unknown,
  ) {
    super(message)
  }
}

export class UsageError extends CliError {
  override name = 'UsageError'
  constructor(message: string, details?: unknown) {
    super(message, exitCodes.usage, details)
  }
}

export class PaymentError extends CliError {
  override name = 'PaymentError'
  constructor(message: string, details?: unknown) {
    super(message, exitCodes.payment, details)
  }
}

export class ServerError extends CliError {
  override name = 'ServerError'
  constructor(message: string, details?: unknown) {
    super(message, exitCodes.server, details)
  }
}
