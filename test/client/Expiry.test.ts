/**
 * Challenges that expire (the core draft: a client MUST NOT send a credential for an expired
 * challenge): the paying fetch takes a fresh one first, for a request as for the vouchers a
 * long stream pays mid-way. Against a gateway whose challenges live one second.
 */
import { afterAll, expect, test } from 'bun:test'
import type { Hex } from 'viem'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Payer from '../helpers/Payer.ts'

const chain = await Anvil.start({ accounts: 6 })
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: {
    challengeSecret: 'test-challenge-secret-0123456789',
    voucherTimeoutMs: 5_000,
    challengeExpiresSeconds: 1,
  },
})
const words = Array.from({ length: 80 }, (_, i) => `w${i}`).join(' ')
const messages = [{ role: 'user' as const, content: words }]

/**
 * A fetch that records the `expires` of every credential sent on an expired challenge, then
 * hands it to `inner`.
 */
function watching(expired: string[], inner: typeof fetch = globalThis.fetch): typeof fetch {
  const f = async (input: string | URL | Request, init?: RequestInit) => {
    const authorization = new Headers(init?.headers).get('authorization')
    if (authorization?.startsWith('Payment ')) {
      const { challenge } = Credential.deserialize(authorization)
      if (challenge.expires && Date.parse(challenge.expires) <= Date.now())
        expired.push(challenge.expires)
    }
    return inner(input, init)
  }
  return Object.assign(f, { preconnect: globalThis.fetch.preconnect }) as typeof fetch
}

/**
 * A fetch that hands the first credential of `action` sent alone (a HEAD: a mid-stream
 * voucher, a top-up) to `handle`, with the call that sends it; `caught` counts it.
 */
function onFirst(
  action: 'voucher' | 'topUp',
  handle: (send: () => Promise<Response>) => Promise<Response>,
): typeof fetch & { caught: number } {
  const f = Object.assign(
    async (input: string | URL | Request, init?: RequestInit) => {
      const send = () => globalThis.fetch(input, init)
      const authorization = new Headers(init?.headers).get('authorization')
      if (
        f.caught === 0 &&
        init?.method === 'HEAD' &&
        authorization?.startsWith('Payment ') &&
        Credential.deserialize(authorization).payload.action === action
      ) {
        f.caught++
        return handle(send)
      }
      return send()
    },
    { preconnect: globalThis.fetch.preconnect, caught: 0 },
  )
  return f as typeof fetch & { caught: number }
}

/** A fetch whose first credential of `action` sent alone takes `ms` on its way. */
const slowFirst = (action: 'voucher' | 'topUp', ms: number) =>
  onFirst(action, async (send) => {
    await Bun.sleep(ms)
    return send()
  })

test('behavior: a request after the channel challenge expired sends no credential on it', async () => {
  const expired: string[] = []
  const { openai } = Payer.client(chain, gw.url, 0, { fetch: watching(expired) })
  const ask = () => openai.chat.completions.create({ model: 'fake', messages, max_tokens: 20 })
  await ask()
  await Bun.sleep(2_100)
  const again = await ask()
  expect(again.choices[0]!.message.content).toBeString()
  expect(expired).toEqual([])
}, 30_000)

/**
 * A slow stream of `words` paid by payer `index` through `inner`: its text, and the expiries
 * of any credential sent on an expired challenge.
 */
async function slowStream(index: number, inner?: typeof fetch) {
  const expired: string[] = []
  const { openai } = Payer.client(chain, gw.url, index, { fetch: watching(expired, inner) })
  const stream = await openai.chat.completions.create({
    model: 'fake-slow',
    messages,
    stream: true,
  })
  let text = ''
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? ''
  return { text, expired }
}

test('behavior: a stream that outlives its challenge pays its mid-stream vouchers on fresh ones and is delivered whole', async () => {
  const { text, expired } = await slowStream(1)
  expect(text).toBe(words)
  expect(expired).toEqual([])
}, 30_000)

test('behavior: a mid-stream voucher whose challenge expires on its way is sent again on the fresh one, and the stream is delivered whole', async () => {
  // Sent with its challenge live, the voucher arrives after the one to two seconds it had.
  const slow = slowFirst('voucher', 2_100)
  const { text, expired } = await slowStream(2, slow)
  expect(slow.caught).toBe(1)
  expect(text).toBe(words)
  expect(expired).toEqual([])
}, 30_000)

/**
 * A request of payer `index` through `inner` (which catches the channel's top-up) on a channel
 * of 300, so that it tops up: it is served, the top-up was caught once, no credential went out
 * on an expired challenge, and the deposit on chain is the one the client recorded (one top-up
 * went through, not two).
 */
async function toppedUpOnce(index: number, inner: typeof fetch & { caught: number }) {
  const expired: string[] = []
  const { fetch, openai } = Payer.client(chain, gw.url, index, {
    fetch: watching(expired, inner),
    deposit: 300n,
    limits: { maxDeposit: 100_000n, maxTotal: 1_000_000n },
  })
  const answer = await openai.chat.completions.create({ model: 'fake', messages, max_tokens: 100 })
  expect(answer.choices[0]!.message.content).toBeString()
  expect(inner.caught).toBe(1)
  expect(expired).toEqual([])
  const state = (await fetch.channel(gw.url))!
  expect(BigInt(state.deposit)).toBeGreaterThan(300n)
  const onChain = (await Escrow.getChannel(chain.payeeClient, {
    escrow: chain.escrowAddress,
    channelId: state.channelId as Hex,
  }))!
  expect(onChain.deposit).toBe(BigInt(state.deposit))
}

test('behavior: a top-up whose challenge expires on its way is made again on a fresh one: the request is served, no credential goes on an expired challenge, the deposit rises once', async () => {
  await toppedUpOnce(3, slowFirst('topUp', 2_100))
}, 30_000)

test('behavior: a top-up the server took whose answer comes back after its challenge expired is not paid again: the deposit rises once', async () => {
  // The server takes the top-up; its answer, a refusal, arrives after the challenge expired.
  const late = onFirst('topUp', async (send) => {
    await send()
    await Bun.sleep(2_100)
    return new Response(null, { status: 402 })
  })
  await toppedUpOnce(4, late)
}, 30_000)
