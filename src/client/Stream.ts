/**
 * An SSE response body with the payment events taken out: `payment-need-voucher` and
 * `payment-receipt` go to handlers, every other event passes through (re-serialized, same
 * `id`, `event` and `data`). The reader is never held up by a payment: a need-voucher handler
 * runs on its own, and its failure ends the stream with its error.
 */
import { createParser } from 'eventsource-parser'
import * as Events from '../payment/Events.ts'
import type * as Receipt from '../payment/Receipt.ts'
import { PaymentFailedError } from './Errors.ts'

export type Handlers = {
  /** Called for each `payment-need-voucher`; a rejection ends the stream with its reason. */
  onNeedVoucher(need: Events.NeedVoucher): Promise<void>
  /** Called for each `payment-receipt`. */
  onReceipt(receipt: Receipt.Receipt): void
  /** Resolves when the payments started so far are done (awaited before the stream ends). */
  settled?(): Promise<void>
}

/** The SSE text of one event. */
export function serialize(e: {
  id?: string | undefined
  event?: string | undefined
  data: string
}) {
  let block = ''
  if (e.id !== undefined) block += `id: ${e.id}\n`
  if (e.event !== undefined) block += `event: ${e.event}\n`
  for (const line of e.data.split('\n')) block += `data: ${line}\n`
  return `${block}\n`
}

/**
 * `body` without payment events (see the module doc). A payment's failure ends the stream
 * after the events that came before it: what the reader was already sent (and paid for) is
 * never dropped for an error that came later.
 */
export function strip(
  body: ReadableStream<Uint8Array>,
  handlers: Handlers,
  /** The response's status, for the error of an event that cannot be read. */
  status = 200,
): ReadableStream<Uint8Array> {
  const encoder = new TextEncoder()
  const decoder = new TextDecoder()
  const reader = body.getReader()
  /** Events parsed, not yet handed to the reader. */
  let pending = ''
  let failed: { reason: unknown } | undefined
  let woken: () => void = () => {}
  const failure = new Promise<void>((resolve) => {
    woken = resolve
  })
  const fail = (reason: unknown) => {
    if (failed) return
    failed = { reason }
    woken()
    reader.cancel(reason).catch(() => {})
  }
  const parser = createParser({
    onEvent(e) {
      if (e.event === Events.needVoucherEvent || e.event === Events.receiptEvent) {
        let parsed: Events.Event | undefined
        try {
          parsed = Events.deserialize(e.event, e.data)
        } catch (cause) {
          // A receipt is for the record, as a malformed Payment-Receipt header is ignored: the
          // answer already paid for is not failed over it. A request for a voucher that cannot
          // be read leaves the stream unable to go on: the server's failure, a client error as a
          // malformed challenge is (the parser's own error is the gateway's, a 400 of its wire).
          if (e.event === Events.receiptEvent) return
          return fail(
            new PaymentFailedError(
              `The server sent a payment-need-voucher event that cannot be read: ${(cause as Error).message}`,
              status,
            ),
          )
        }
        if (parsed?.event === Events.needVoucherEvent)
          handlers.onNeedVoucher(parsed.data).catch(fail)
        else if (parsed?.event === Events.receiptEvent) handlers.onReceipt(parsed.data)
        return
      }
      pending += serialize(e)
    },
  })
  let ended = false
  return new ReadableStream<Uint8Array>(
    {
      async pull(controller) {
        while (true) {
          // What came before a failure goes out first; the failure, on the next pull.
          if (pending.length > 0) {
            controller.enqueue(encoder.encode(pending))
            pending = ''
            return
          }
          if (failed) return controller.error(failed.reason)
          if (ended) return controller.close()
          const next = await Promise.race([reader.read(), failure.then(() => undefined)])
          if (next === undefined) continue
          if (next.done) {
            parser.feed(decoder.decode())
            // The stream ended: a payment still on its way must not be lost, nor its error.
            await handlers.settled?.().catch(fail)
            ended = true
            continue
          }
          parser.feed(decoder.decode(next.value, { stream: true }))
        }
      },
      cancel(reason) {
        return reader.cancel(reason)
      },
    },
    { highWaterMark: 0 },
  )
}
