/**
 * The one error the pure wire-format layer throws for outside input it cannot accept. Parsers never
 * throw anything else; a route turns it into the matching RFC 9457 problem (usually
 * `malformed-credential`, see Problem.ts).
 */
import { type ErrorOptions, GatewayError } from '../Errors.ts'

/** Which wire element failed to parse. */
export type Element =
  | 'base64url'
  | 'json'
  | 'challenge'
  | 'credential'
  | 'receipt'
  | 'accept-payment'
  | 'payload'
  | 'event'

/** 400: a Payment header, credential, receipt or payload is malformed; `element` says which. */
export class PaymentParseError extends GatewayError {
  override name = 'PaymentParseError'
  override readonly status = 400
  override readonly type = 'invalid_request_error'
  readonly element: Element

  constructor(element: Element, message: string, options: ErrorOptions = {}) {
    super(message, `malformed-${element}`, options)
    this.element = element
  }
}
