/**
 * Payment failures as RFC 9457 problem details (`application/problem+json`), with the type URIs,
 * titles and statuses of draft-httpauth-payment-00 ("Error Codes") and draft-evm-session-00
 * ("Problem Type Registration"). Handlers throw them; `onError` renders `toProblem()` with
 * `contentType`, the error's `headers`, and (for 402) the fresh challenge attached by the route.
 */
import { type ErrorOptions, GatewayError } from '../Errors.ts'

/** The canonical base URI of problem types. */
export const baseUri = 'https://paymentauth.org/problems/'

/** The media type of a problem body. */
export const contentType = 'application/problem+json'

/** Every problem type of the core draft and the evm session draft: slug → title and status. */
export const kinds = {
  // draft-httpauth-payment-00, "Error Codes"
  'payment-required': { title: 'Payment Required', status: 402 },
  'payment-insufficient': { title: 'Payment Insufficient', status: 402 },
  'payment-expired': { title: 'Payment Expired', status: 402 },
  'verification-failed': { title: 'Payment Verification Failed', status: 402 },
  'method-unsupported': { title: 'Method Unsupported', status: 400 },
  'malformed-credential': { title: 'Malformed Credential', status: 402 },
  'invalid-challenge': { title: 'Invalid Challenge', status: 402 },
  // draft-evm-session-00, "Problem Type Registration"
  'session/invalid-signature': { title: 'Invalid Signature', status: 402 },
  'session/signer-mismatch': { title: 'Signer Mismatch', status: 402 },
  'session/amount-exceeds-deposit': { title: 'Amount Exceeds Deposit', status: 402 },
  'session/delta-too-small': { title: 'Delta Too Small', status: 402 },
  'session/channel-not-found': { title: 'Channel Not Found', status: 410 },
  'session/channel-finalized': { title: 'Channel Finalized', status: 410 },
  'session/challenge-not-found': { title: 'Challenge Not Found', status: 402 },
  'session/insufficient-balance': { title: 'Insufficient Balance', status: 402 },
  'session/transaction-reverted': { title: 'Transaction Reverted', status: 409 },
} as const satisfies Record<string, { title: string; status: number }>

export type Kind = keyof typeof kinds

/** Extension members of a problem body; bigints are rendered as decimal strings. */
export type Extensions = Record<string, string | number | boolean | bigint | null | undefined>

/** The RFC 9457 body. */
export type Body = {
  type: string
  title: string
  status: number
  detail: string
  [extension: string]: unknown
}

export type ProblemOptions = ErrorOptions & {
  /**
   * Overrides the kind's status where a method draft says so: draft-evm-session-00 answers a
   * malformed session payload with 400, the core draft a malformed credential with 402.
   */
  status?: number | undefined
}

const RESERVED = new Set(['type', 'title', 'status', 'detail', 'instance'])

/**
 * A payment failure. `code` and OpenAI-envelope `type` are the slug (e.g. `session/delta-too-small`)
 * so `toJSON()` keeps GatewayError's envelope; `toProblem()` is the RFC 9457 body to send.
 */
export class PaymentProblem extends GatewayError {
  override name = 'PaymentProblem'
  override readonly status: number
  override readonly type: string
  readonly kind: Kind
  /** The problem type URI. */
  readonly problemType: string
  readonly title: string
  /** Extension members (e.g. `channelId`, `requiredCumulative`, `challengeId`). */
  readonly extensions: Extensions
  /**
   * The `WWW-Authenticate` value (one or more serialized challenges) to send with a 402; the route
   * attaches it with `withChallenge` since only it knows the request being priced.
   */
  challenge: string | undefined

  constructor(
    kind: Kind,
    detail: string,
    extensions: Extensions = {},
    options: ProblemOptions = {},
  ) {
    super(detail, kind, options)
    const { title, status } = kinds[kind]
    this.kind = kind
    this.type = kind
    this.status = options.status ?? status
    this.title = title
    this.problemType = `${baseUri}${kind}`
    this.extensions = extensions
    this.challenge = undefined
  }

  /**
   * Attaches the fresh challenge(s) a 402 carries and the caching rule of the draft ("Caching":
   * 402 responses MUST be `Cache-Control: no-store`). Returns `this` for `throw p.withChallenge(c)`.
   */
  withChallenge(challenge: string): this {
    this.challenge = challenge
    this.headers['WWW-Authenticate'] = challenge
    this.headers['Cache-Control'] = 'no-store'
    return this
  }

  /** The RFC 9457 body: type, title, status, detail, then the extension members. */
  toProblem(): Body {
    const body: Body = {
      type: this.problemType,
      title: this.title,
      status: this.status,
      detail: this.message,
    }
    for (const [name, value] of Object.entries(this.extensions)) {
      // Extensions never shadow the standard members.
      if (value === undefined || RESERVED.has(name)) continue
      body[name] = typeof value === 'bigint' ? value.toString() : value
    }
    return body
  }
}

/** Makes a problem of one kind: `Problem.create('session/delta-too-small', 'detail', { ... })`. */
export function create(
  kind: Kind,
  detail?: string,
  extensions?: Extensions,
  options?: ProblemOptions,
): PaymentProblem {
  return new PaymentProblem(kind, detail ?? kinds[kind].title, extensions, options)
}

type Factory = (
  detail?: string,
  extensions?: Extensions,
  options?: ProblemOptions,
) => PaymentProblem

function factory(kind: Kind): Factory {
  return (detail, extensions, options) => create(kind, detail, extensions, options)
}

/** 402: the resource requires payment (no credential). */
export const paymentRequired = factory('payment-required')
/** 402: the amount paid is too low. */
export const paymentInsufficient = factory('payment-insufficient')
/** 402: the challenge or an authorization expired. */
export const paymentExpired = factory('payment-expired')
/** 402: the payment proof is invalid. */
export const verificationFailed = factory('verification-failed')
/** 400: the payment method is not accepted. */
export const methodUnsupported = factory('method-unsupported')
/** 402: the credential is not valid base64url JSON of the right shape. */
export const malformedCredential = factory('malformed-credential')
/** 402: the challenge id is unknown, forged, expired or already used. */
export const invalidChallenge = factory('invalid-challenge')
/** 402: the voucher signature could not be verified. */
export const invalidSignature = factory('session/invalid-signature')
/** 402: the voucher was signed by someone other than the channel's signer. */
export const signerMismatch = factory('session/signer-mismatch')
/** 402: the voucher exceeds the channel deposit. */
export const amountExceedsDeposit = factory('session/amount-exceeds-deposit')
/** 402: the voucher increases by less than `minVoucherDelta`. */
export const deltaTooSmall = factory('session/delta-too-small')
/** 410: no channel has this id. */
export const channelNotFound = factory('session/channel-not-found')
/** 410: the channel is closed. */
export const channelFinalized = factory('session/channel-finalized')
/** 402: the challenge is unknown or expired. */
export const challengeNotFound = factory('session/challenge-not-found')
/** 402: the authorized balance does not cover the request. */
export const insufficientBalance = factory('session/insufficient-balance')
/** 409: an on-chain open/topUp/settle/close transaction reverted. */
export const transactionReverted = factory('session/transaction-reverted')
