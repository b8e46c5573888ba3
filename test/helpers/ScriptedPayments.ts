/** Scripted payment servers in tests (fakes of a gateway's payment side): the challenge they
 * answer a request without payment with, a server that speaks MPP as the drafts state it, and
 * a paying client of a fresh account against it. */
import type { Address } from 'viem'
import { generatePrivateKey } from 'viem/accounts'
import { createFetch, type Options, type PayingFetch, Store } from '../../src/client/index.ts'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Session from '../../src/payment/evm/Session.ts'

/** The escrow, token and payee of a fee-paying scripted server (anvil's first two deployments
 * and its second account; nothing is deployed: such a server pays the gas). */
export const escrow: Address = '0x5FbDB2315678afecb367f032d93F642f64180aa3'
export const currency: Address = '0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512'
export const recipient: Address = '0x70997970C51812dc3A010C7d01b50e0d17dc79C8'

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

/** The challenge of a server on chain 31337 that pays the gas (authorization credentials) for
 * 1_000_000 of `currency` into `escrow`, with `methodDetails` on top. */
export function feePaid(methodDetails: Record<string, unknown> = {}) {
  return challenge({
    amount: 1_000_000n,
    currency,
    recipient,
    methodDetails: {
      chainId: 31337,
      escrowContract: escrow,
      feePayer: true,
      credentialTypes: ['authorization'],
      ...methodDetails,
    },
  })
}

/**
 * A scripted payment server on a random loopback port (the caller stops it): channel reads
 * (`/v1/channels/…`) are a 404; a request without a Payment credential is a 402 problem with
 * `challenge()`; a paid request is answered by `paid` with the credential's payload (its body
 * already read).
 */
export function serve(
  challenge: () => Challenge.Challenge,
  paid: (payload: Record<string, unknown>, req: Request) => Response,
) {
  return Bun.serve({
    port: 0,
    hostname: '127.0.0.1',
    async fetch(req) {
      await req.arrayBuffer()
      if (new URL(req.url).pathname.startsWith('/v1/channels/'))
        return new Response(null, { status: 404 })
      const authorization = req.headers.get('authorization')
      if (!authorization?.startsWith('Payment '))
        return new Response(
          JSON.stringify({
            type: 'https://paymentauth.org/problems/payment-required',
            status: 402,
          }),
          {
            status: 402,
            headers: {
              'content-type': 'application/problem+json',
              'www-authenticate': Challenge.serialize(challenge()),
            },
          },
        )
      return paid(Credential.deserialize(authorization).payload as Record<string, unknown>, req)
    },
  })
}

/** A paying fetch of a fresh account that pays into `escrow` only (deposits of 200_000, a memory
 * store), with `options` on top. */
export function payer(options: Pick<Options, 'limits' | 'rpcUrl'>) {
  return createFetch({
    account: generatePrivateKey(),
    deposit: 200_000n,
    allow: { escrows: [escrow] },
    store: Store.memory(),
    ...options,
  })
}

/** A chat completion request of model `m` (streamed when `stream`) by `f` to `url`. */
export function chat(f: PayingFetch, url: string, stream?: boolean) {
  return f(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', stream, messages: [] }),
  })
}
