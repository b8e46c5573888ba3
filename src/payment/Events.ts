/**
 * The SSE events of draft-evm-session-00 ("Insufficient Balance During Streaming", "Receipt
 * Generation"): `payment-need-voucher` when the authorized balance runs out mid-stream, and
 * `payment-receipt` as the stream's last event. Builders return `{ event, data }` with amounts as
 * decimal strings; the SSE writer JSON-encodes `data`. Event names are constants, never user input.
 */
import { z } from 'zod'
import * as Encoding from './Encoding.ts'
import { PaymentParseError } from './Errors.ts'
import * as Session from './evm/Session.ts'
import * as Receipt from './Receipt.ts'

export const needVoucherEvent = 'payment-need-voucher'
export const receiptEvent = 'payment-receipt'

/** The `payment-need-voucher` data on the wire. */
export type NeedVoucherData = {
  channelId: Session.Hex
  requiredCumulative: string
  acceptedCumulative: string
  deposit: string
}

/**
 * `payment-need-voucher`: the next voucher must reach `requiredCumulative`; when that exceeds
 * `deposit` the client must top up first.
 */
export function needVoucher(parameters: {
  channelId: Session.Hex
  requiredCumulative: bigint
  acceptedCumulative: bigint
  deposit: bigint
}): { event: typeof needVoucherEvent; data: NeedVoucherData } {
  return {
    event: needVoucherEvent,
    data: {
      channelId: parameters.channelId,
      requiredCumulative: parameters.requiredCumulative.toString(),
      acceptedCumulative: parameters.acceptedCumulative.toString(),
      deposit: parameters.deposit.toString(),
    },
  }
}

/** `payment-receipt`: the receipt (e.g. `Session.receipt(...)`) with amounts as decimal strings. */
export function receipt(value: Record<string, unknown>): {
  event: typeof receiptEvent
  data: Record<string, unknown>
} {
  return { event: receiptEvent, data: Encoding.toWire(value) as Record<string, unknown> }
}

/** `payment-need-voucher` data, typed (client side). */
export const NeedVoucher = z.object({
  channelId: Session.Bytes32,
  requiredCumulative: Session.Uint128,
  acceptedCumulative: Session.Uint128,
  deposit: Session.Uint128,
})
export type NeedVoucher = z.output<typeof NeedVoucher>

export type Event =
  | { event: typeof needVoucherEvent; data: NeedVoucher }
  | { event: typeof receiptEvent; data: Receipt.Receipt }

/**
 * Parses one of these events from an SSE stream (the client's side); `undefined` for other event
 * names. Throws PaymentParseError when the data is not JSON of the event's shape.
 */
export function deserialize(event: string, data: string): Event | undefined {
  if (event !== needVoucherEvent && event !== receiptEvent) return undefined
  let json: unknown
  try {
    json = JSON.parse(data)
  } catch (cause) {
    throw new PaymentParseError('event', `The ${event} data is not JSON.`, { cause })
  }
  const parsed =
    event === needVoucherEvent ? NeedVoucher.safeParse(json) : Receipt.Schema.safeParse(json)
  if (!parsed.success) {
    const issue = parsed.error.issues[0]
    throw new PaymentParseError(
      'event',
      `Invalid ${event}: ${issue?.path.join('.')}: ${issue?.message}`,
    )
  }
  return { event, data: parsed.data } as Event
}
