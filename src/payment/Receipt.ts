/**
 * The Payment-Receipt header (draft-httpauth-payment-00, "Payment-Receipt Header"): base64url-nopad
 * of a JSON object with `status` ("success"), `method`, `timestamp` (RFC 3339) and `reference`, plus
 * the fields the method adds (evm/session: `Session.Receipt`). Servers MUST NOT send it on errors
 * and MUST send `Cache-Control: private` with it (`headers` does both jobs' header part).
 *
 * Decisions: the JSON is emitted as JCS (the draft does not require it for receipts, and accepts
 * any JSON on input); bigints are written as decimal strings; method-specific members are kept by
 * `deserialize` for the method's schema to type.
 */
import { z } from 'zod'
import * as Challenge from './Challenge.ts'
import * as Encoding from './Encoding.ts'
import { PaymentParseError } from './Errors.ts'

/** Largest Payment-Receipt value `deserialize` reads by default. */
export const maxReceiptBytes = 8192

/** The core receipt; method-specific members pass through. */
export const Schema = z
  .object({
    status: z.literal('success'),
    method: Challenge.Method,
    timestamp: Challenge.DateTime,
    reference: z.string(),
  })
  .loose()
export type Receipt = z.output<typeof Schema>

/** The Payment-Receipt header value of a receipt (bigints as decimal strings). */
export function serialize(receipt: Record<string, unknown>): string {
  return Encoding.encodeJson(Encoding.toWire(receipt))
}

/** The response headers a receipt travels with. */
export function headers(receipt: Record<string, unknown>): Record<string, string> {
  return { 'Payment-Receipt': serialize(receipt), 'Cache-Control': 'private' }
}

export type DeserializeOptions = { maxBytes?: number | undefined }

/**
 * Parses a Payment-Receipt value (the client's side). With a method schema (e.g.
 * `Session.Receipt`), the result is typed by it. Throws PaymentParseError if invalid.
 */
export function deserialize(value: string, options?: DeserializeOptions): Receipt
export function deserialize<S extends z.ZodType>(
  value: string,
  options: DeserializeOptions & { schema: S },
): z.output<S>
export function deserialize(
  value: string,
  options: DeserializeOptions & { schema?: z.ZodType } = {},
): unknown {
  const max = options.maxBytes ?? maxReceiptBytes
  if (value.length > max)
    throw new PaymentParseError('receipt', `The Payment-Receipt value is over ${max} bytes.`)
  if (!/^[A-Za-z0-9_-]+$/.test(value.trim()))
    throw new PaymentParseError('receipt', 'Payment-Receipt must be base64url without padding.')
  let json: unknown
  try {
    json = Encoding.decodeJson(value.trim())
  } catch (cause) {
    throw new PaymentParseError('receipt', 'Payment-Receipt is not base64url JSON.', { cause })
  }
  const core = Schema.safeParse(json)
  const typed = core.success && options.schema ? options.schema.safeParse(json) : core
  if (!typed.success) {
    const issue = typed.error.issues[0]
    throw new PaymentParseError(
      'receipt',
      `Invalid receipt: ${issue?.path.join('.')}: ${issue?.message}`,
    )
  }
  return typed.data
}
