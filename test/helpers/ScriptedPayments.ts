/** Scripted payment servers in tests (fakes of a gateway's payment side): the challenge they
 * answer a request without payment with. */
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Session from '../../src/payment/evm/Session.ts'

/** An evm session challenge of a scripted server for `request`, living `expiresMs`. */
export function challenge(request: Record<string, unknown>, expiresMs = 600_000) {
  return Challenge.from({
    secret: 'scripted-secret-0123456789',
    realm: 'scripted',
    method: 'evm',
    intent: 'session',
    expires: Challenge.expiresIn(expiresMs),
    request: Session.request(request as never),
  })
}
