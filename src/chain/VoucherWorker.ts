/**
 * The voucher verifier on a worker thread (see Voucher.createThreadedVerifier): signature
 * checks are the main thread's largest cost per voucher, and this moves them to another core.
 * Messages: `{ scope }` once, then `{ id, voucher }`; replies `{ id }` when valid, else
 * `{ id, reason }` (an InvalidVoucherSignatureError's reason) or `{ id, message }`.
 */
import { InvalidVoucherSignatureError } from './Errors.ts'
import * as Voucher from './Voucher.ts'

declare const self: Worker

let verifier: Voucher.Verifier | undefined

self.onmessage = (event: MessageEvent) => {
  const m = event.data as
    | { scope: Voucher.Scope }
    | { id: number; voucher: Parameters<Voucher.Verifier['verify']>[0] }
  if ('scope' in m) {
    // Verified vouchers are remembered on the main thread, which answers their replays
    // without asking: a second cache here would hold the same keys.
    verifier = Voucher.createVerifier({ ...m.scope, cacheSize: 0 })
    return
  }
  try {
    verifier!.verify(m.voucher)
    self.postMessage({ id: m.id })
  } catch (e) {
    self.postMessage(
      e instanceof InvalidVoucherSignatureError
        ? { id: m.id, reason: e.reason }
        : { id: m.id, message: (e as Error).message },
    )
  }
}
