/**
 * Property tests of the Payment inputs a stranger sends before anything of theirs is proved:
 * credentials echoing a challenge the gateway really issued (so they pass the HMAC and reach the
 * method's checks and the chain), with payloads well-formed or not, and the headers read around
 * them (Accept-Payment, Tollway-Receipt, X-Forwarded-For/Proto). Whatever arrives, the answer is
 * a success, an OpenAI envelope or an RFC 9457 problem; never a 500. A real anvil chain answers.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import { type Hex, keccak256, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import * as Voucher from '../../src/chain/Voucher.ts'
import type * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 2_000 },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const account = privateKeyToAccount(chain.payers[0]!.privateKey)
// A real open channel, so some credentials name a channel the gateway knows.
const session = await Paid.opened(url, { account, tokenDomain, deposit: 1_000_000n, initial: 0n })
const openChannel = session.channelId!
// Mined transactions that are no open or top-up of a channel: a hash the node has never seen is
// waited for (5 s) before it is refused, too slow for a property.
const mined = [
  (
    await Token.approve(chain.payerClient(0), {
      token: chain.currencyAddress,
      spender: chain.escrowAddress,
      amount: 1n,
    })
  ).hash,
]
const body = JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] })

/** Asserts a typed answer: not a 500; an error is an OpenAI envelope or a problem document. */
async function expectTyped(res: Response) {
  const text = await res.text()
  expect(res.status).not.toBe(500)
  if (res.status < 400) return
  const parsed = JSON.parse(text) as {
    error?: { type: string; message: string; code: string }
    type?: string
    title?: string
    status?: number
  }
  if (parsed.error) {
    expect(typeof parsed.error.type).toBe('string')
    expect(typeof parsed.error.message).toBe('string')
    expect(typeof parsed.error.code).toBe('string')
  } else {
    expect(typeof parsed.type).toBe('string')
    expect(typeof parsed.title).toBe('string')
    expect(parsed.status).toBe(res.status)
  }
}

const hex = (n: number) =>
  fc.uint8Array({ minLength: n, maxLength: n }).map((b) => `0x${Buffer.from(b).toString('hex')}`)
const amount = fc.oneof(
  fc.bigInt({ min: 0n, max: 10n ** 7n }),
  fc.bigInt({ min: 0n, max: (1n << 128n) - 1n }),
  fc.constantFrom(0n, (1n << 128n) - 1n, (1n << 96n) - 1n),
)
const channel = fc.oneof(hex(32), fc.constant(openChannel))
const address = fc.oneof(
  hex(20),
  fc.constantFrom(account.address, chain.escrowAddress, chain.currencyAddress),
)
const signature = fc.oneof(
  hex(65),
  hex(64).map((h) => `${h}1b`),
  hex(64).map((h) => `${h}1c`),
  fc.constant(`0x${'00'.repeat(65)}`),
)
const time = fc.oneof(fc.bigInt({ min: 0n, max: (1n << 256n) - 1n }), fc.constant(0n))
const eip3009 = fc.record({
  from: address,
  to: address,
  value: amount,
  validAfter: time,
  validBefore: fc.oneof(time, fc.constant(BigInt(Math.floor(Date.now() / 1000) + 3600))),
  nonce: hex(32),
})
const str = (a: fc.Arbitrary<bigint>) => a.map(String)

/** Payloads the evm/session schema takes (so they reach the checks past parsing), random values. */
const wellFormed = fc.oneof(
  fc.record({
    action: fc.constant('voucher'),
    channelId: channel,
    cumulativeAmount: str(amount),
    signature,
  }),
  fc.record({
    action: fc.constant('close'),
    channelId: channel,
    cumulativeAmount: str(amount),
    signature,
  }),
  fc.record({
    action: fc.constant('open'),
    type: fc.constant('authorization'),
    channelId: channel,
    authorization: eip3009
      .map((a) => ({ ...a, value: String(a.value) }))
      .map((a) => ({
        ...a,
        validAfter: String(a.validAfter),
        validBefore: String(a.validBefore),
      })),
    signature,
    cumulativeAmount: str(amount),
    voucherSignature: signature,
    authorizedSigner: address,
    salt: hex(32),
  }),
  fc.record({
    action: fc.constant('topUp'),
    type: fc.constant('authorization'),
    channelId: channel,
    salt: hex(32),
    authorization: eip3009.map((a) => ({
      ...a,
      value: String(a.value),
      validAfter: String(a.validAfter),
      validBefore: String(a.validBefore),
    })),
    signature,
    additionalDeposit: str(amount),
  }),
  fc.record({
    action: fc.constantFrom('open', 'topUp'),
    type: fc.constant('hash'),
    channelId: channel,
    hash: fc.constantFrom(...mined),
    cumulativeAmount: str(amount),
    additionalDeposit: str(amount),
    signature,
    authorizedSigner: address,
    salt: hex(32),
  }),
)
const payload = fc.oneof(
  { weight: 4, arbitrary: wellFormed as fc.Arbitrary<Record<string, unknown>> },
  fc.dictionary(fc.string({ maxLength: 12 }), fc.jsonValue({ maxDepth: 2 })),
)

let fresh: Challenge.Challenge = await Paid.challenge(url)

describe('Payment credentials on a real challenge', () => {
  test('property: any payload, any source, on a challenge the gateway issued, gets a typed answer', async () => {
    await fc.assert(
      fc.asyncProperty(
        payload,
        fc.option(
          fc.oneof(
            fc.constant(`did:pkh:eip155:${chain.chainId}:${account.address}`),
            address.map((a) => `did:pkh:eip155:${chain.chainId}:${a}`),
            fc.string({ maxLength: 40 }),
          ),
          { nil: undefined },
        ),
        fc.constantFrom('POST', 'HEAD'),
        async (p, source, method) => {
          const authorization = Credential.serialize(
            Credential.from({ challenge: fresh, payload: p, source }),
          )
          const res = await fetch(url, {
            method,
            headers: { authorization, 'content-type': 'application/json' },
            ...(method === 'POST' ? { body } : {}),
          })
          if (method === 'HEAD') {
            expect(res.status).not.toBe(500)
            await res.text()
          } else await expectTyped(res)
          // A refusal (or a 402) states a fresh challenge: use it, as a client would.
          const again = res.headers.get('www-authenticate')
          if (again?.includes('Payment ')) fresh = await Paid.challenge(url)
        },
      ),
      { numRuns: 100, seed: 20261125 },
    )
  }, 60_000)

  test('property: mangled credential text, on a challenge the gateway issued, gets a typed answer', async () => {
    const valid = Credential.serialize(
      Credential.from({
        challenge: fresh,
        payload: {
          action: 'voucher',
          channelId: openChannel,
          cumulativeAmount: '1',
          signature: `0x${'ab'.repeat(65)}`,
        },
      }),
    )
    const token = valid.slice('Payment '.length)
    await fc.assert(
      fc.asyncProperty(
        fc.nat({ max: token.length }),
        fc.nat({ max: 8 }),
        fc.string({ unit: 'grapheme-ascii', maxLength: 8 }),
        async (at, cut, insert) => {
          const mangled = `Payment ${token.slice(0, at)}${insert}${token.slice(at + cut)}`
          if (!/^[\t\x20-\x7e]*$/.test(mangled)) return
          await expectTyped(
            await fetch(url, {
              method: 'POST',
              headers: { authorization: mangled, 'content-type': 'application/json' },
              body,
            }),
          )
        },
      ),
      { numRuns: 100, seed: 20261125 },
    )
  }, 60_000)
})

describe('signed vouchers and top-ups on the open channel', () => {
  test('property: any cumulative amount or top-up, signed by the payer, gets a typed answer; a voucher within the deposit above the last is served', async () => {
    let accepted = 0n
    let deposit = 1_000_000n
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          amount.map((a) => ({ voucher: a })),
          fc.bigInt({ min: 0n, max: 2_000_000n }).map((a) => ({ voucher: a })),
          fc.oneof(fc.bigInt({ min: 0n, max: 1_000n }), amount).map((a) => ({ topUp: a })),
        ),
        async (step) => {
          session.renew(await Paid.challenge(url))
          const authorization =
            'voucher' in step
              ? await session.voucher(step.voucher)
              : await session.topUp(step.topUp)
          const res = await fetch(url, {
            method: 'POST',
            headers: { authorization, 'content-type': 'application/json' },
            body,
          })
          const status = res.status
          await expectTyped(res)
          if ('voucher' in step && step.voucher <= deposit && step.voucher > accepted + 100_000n)
            expect(status).toBe(200)
          if (status === 200 && 'voucher' in step && step.voucher > accepted)
            accepted = step.voucher
          if (status === 200 && 'topUp' in step) deposit += step.topUp
        },
      ),
      { numRuns: 40, seed: 20261125 },
    )
  }, 60_000)
})

describe('signed EIP-3009 opens the gateway submits', () => {
  test('property: an open authorization signed by a funded payer, with any value, validity window, nonce, channel and initial voucher, gets a typed answer', async () => {
    const payer = privateKeyToAccount(chain.payers[1]!.privateKey)
    const now = BigInt(Math.floor(Date.now() / 1000))
    const uint256 = (1n << 256n) - 1n
    let n = 0
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          deposit: fc.oneof(
            fc.bigInt({ min: 0n, max: 2_000_000n }),
            fc.constantFrom(10n ** 13n, (1n << 128n) - 1n, 1n << 128n),
          ),
          initial: fc.oneof(
            fc.bigInt({ min: 0n, max: 2_000_000n }),
            fc.constant((1n << 128n) - 1n),
          ),
          validAfter: fc.constantFrom(0n, now - 60n, now + 3600n, uint256),
          validBefore: fc.constantFrom(0n, now - 60n, now + 5n, now + 3600n, uint256),
          nonceRight: fc.oneof(fc.constant(true), fc.constant(true), fc.constant(false)),
          channelRight: fc.oneof(fc.constant(true), fc.constant(true), fc.constant(false)),
          // Mostly none: a voucher signed by the payer for another signer is refused early.
          signer: fc.option(hex(20), { nil: undefined, freq: 1 }),
        }),
        async (o) => {
          const salt = keccak256(toHex(`fuzz-open-${n++}-${Date.now()}`))
          const authorizedSigner = o.signer as Hex | undefined
          const payee = chain.payee.address
          const token = chain.currencyAddress
          const channelId = o.channelRight
            ? Escrow.computeChannelId({
                payer: payer.address,
                payee,
                token,
                salt,
                authorizedSigner,
                chainId: chain.chainId,
                escrow: chain.escrowAddress,
              })
            : keccak256(salt)
          const nonce = o.nonceRight
            ? Escrow.openNonce({ from: payer.address, payee, token, salt, authorizedSigner })
            : keccak256(toHex(`nonce-${salt}`))
          const authorization = {
            from: payer.address.toLowerCase() as Hex,
            to: chain.escrowAddress.toLowerCase() as Hex,
            value: o.deposit,
            validAfter: o.validAfter,
            validBefore: o.validBefore,
            nonce,
          }
          const fresh = await Paid.challenge(url)
          const credential = Credential.serialize(
            Credential.from({
              challenge: fresh,
              payload: {
                action: 'open',
                type: 'authorization',
                channelId,
                salt,
                cumulativeAmount: o.initial,
                ...(authorizedSigner ? { authorizedSigner } : {}),
                authorization,
                signature: await Token.signReceiveAuthorization(payer, {
                  domain: tokenDomain,
                  ...authorization,
                }),
                voucherSignature: await Voucher.sign(payer, {
                  chainId: chain.chainId,
                  escrow: chain.escrowAddress,
                  channelId,
                  cumulativeAmount: o.initial,
                }),
              },
              source: `did:pkh:eip155:${chain.chainId}:${payer.address}`,
            }),
          )
          await expectTyped(
            await fetch(url, {
              method: 'POST',
              headers: { authorization: credential, 'content-type': 'application/json' },
              body,
            }),
          )
        },
      ),
      { numRuns: 30, seed: 20261125 },
    )
  }, 60_000)
})

describe('headers read before any credential', () => {
  test('property: any Accept-Payment, Tollway-Receipt and forwarding headers get a typed answer', async () => {
    const headerValue = fc
      .string({ unit: 'binary-ascii', maxLength: 60 })
      .filter((s) => /^[\t\x20-\x7e]*$/.test(s))
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          headerValue,
          fc.constantFrom('evm/session', 'evm/session;q=0', '*/*;q=0.5, evm/*;q=1'),
        ),
        fc.oneof(headerValue, fc.constantFrom('true', 'false', '1', '0')),
        headerValue,
        fc.oneof(headerValue, fc.constantFrom('https', 'http', 'https, http')),
        fc.constantFrom(undefined, 'Bearer tw_not_a_key', 'Payment', 'Payment x'),
        async (accept, receipt, forwardedFor, proto, authorization) => {
          const headers: Record<string, string> = {
            'accept-payment': accept,
            'tollway-receipt': receipt,
            'x-forwarded-for': forwardedFor,
            'x-forwarded-proto': proto,
            'content-type': 'application/json',
          }
          if (authorization) headers.authorization = authorization
          let res: Response
          try {
            res = await fetch(url, { method: 'POST', headers, body })
          } catch {
            return // a header the fetch client itself refuses to send
          }
          await expectTyped(res)
        },
      ),
      { numRuns: 120, seed: 20261125 },
    )
  }, 60_000)
})
