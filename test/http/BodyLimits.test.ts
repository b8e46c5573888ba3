/**
 * Body limits: a completion request may carry inline images, audio and files up to
 * `maxCompletionBodyBytes`, but a body over `maxBodyBytes` (or sent without a declared length)
 * is read only once its API key or Payment credential proves good: a stranger's is refused
 * while it is still being sent. Every other route keeps `maxBodyBytes`. A real anvil chain
 * pays the channel cases.
 */
import { afterAll, expect, test } from 'bun:test'
import type OpenAI from 'openai'
import { decodeFunctionData, type Hex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import { getTransaction } from 'viem/actions'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { PayingSession } from '../../src/client/Session.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'
import * as Raw from '../helpers/Raw.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const MiB = 1024 * 1024
const gw = await Gateway.create({
  maxCompletionBodyBytes: 4 * MiB,
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 2_000 },
})
const url = `${gw.url}/v1/chat/completions`
const { port } = new URL(gw.url)
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })

/** A completion request with an inline image of `bytes` base64 characters. */
function withImage(bytes: number) {
  const content: OpenAI.ChatCompletionContentPart[] = [
    { type: 'text', text: 'what is in this picture' },
    { type: 'image_url', image_url: { url: `data:image/png;base64,${'A'.repeat(bytes)}` } },
  ]
  return JSON.stringify({ model: 'fake', messages: [{ role: 'user', content }] })
}

const code = (body: string) => (JSON.parse(body) as { error: { code: string } }).error.code

const head = (authorization: string | undefined, length: number | 'chunked') => [
  'POST /v1/chat/completions HTTP/1.1',
  'Host: 127.0.0.1',
  'Content-Type: application/json',
  ...(authorization ? [`Authorization: ${authorization}`] : []),
  length === 'chunked' ? 'Transfer-Encoding: chunked' : `Content-Length: ${length}`,
]

test('a key holder sends an inline image over MAX_BODY_BYTES: served, the image reaches the upstream whole', async () => {
  const { key } = await gw.account()
  const body = withImage(2 * MiB)
  expect(body.length).toBeGreaterThan(gw.config.maxBodyBytes)
  const before = gw.upstream.received.length
  const res = await fetch(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body,
  })
  expect(res.status).toBe(200)
  expect(((await res.json()) as { object: string }).object).toBe('chat.completion')
  const sent = gw.upstream.received[before]!.body.messages as {
    content: { image_url?: { url: string } }[]
  }[]
  expect(sent[0]!.content[1]!.image_url!.url.length).toBe(2 * MiB + 'data:image/png;base64,'.length)
})

test('a key holder sends a body over MAX_COMPLETION_BODY_BYTES: 413, declared or chunked', async () => {
  const { key } = await gw.account()
  const body = withImage(5 * MiB)
  const declared = await fetch(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body,
  })
  expect(declared.status).toBe(413)
  expect(code(await declared.text())).toBe('body_too_large')
  const bytes = new TextEncoder().encode(body)
  const chunked = await fetch(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: new ReadableStream({
      start(controller) {
        for (let i = 0; i < bytes.length; i += 65536)
          controller.enqueue(bytes.subarray(i, i + 65536))
        controller.close()
      },
    }),
  })
  expect(chunked.status).toBe(413)
  expect(code(await chunked.text())).toBe('body_too_large')
})

test('a long body with an unknown key, or no credential, is refused while it is still being sent', async () => {
  const first = new Uint8Array(65536).fill(0x20)
  const unknown = await Raw.answeredEarly(
    port,
    head('Bearer tw_unknown_key_0123456789', 2 * MiB),
    first,
  )
  expect(unknown.status).toBe(401)
  expect(code(unknown.body)).toBe('invalid_api_key')
  // Payments on: a request without credentials gets a 402 with the Payment challenge.
  const none = await Raw.answeredEarly(port, head(undefined, 2 * MiB), first)
  expect(none.status).toBe(402)
  expect(none.head.toLowerCase()).toMatch(/www-authenticate: .*payment id=/)
  // A body without a declared length may be long: the same.
  const chunk = new TextEncoder().encode(`10000\r\n${' '.repeat(65536)}\r\n`)
  const chunked = await Raw.answeredEarly(
    port,
    head('Bearer tw_unknown_key_0123456789', 'chunked'),
    chunk,
  )
  expect(chunked.status).toBe(401)
})

test('a key holder sends a chunked body under the limit: served (its key was looked up first)', async () => {
  const { key } = await gw.account()
  const bytes = new TextEncoder().encode(withImage(1000))
  const res = await fetch(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: new ReadableStream({
      start(controller) {
        controller.enqueue(bytes)
        controller.close()
      },
    }),
  })
  expect(res.status).toBe(200)
})

test('routes other than completions keep MAX_BODY_BYTES, for the admin too', async () => {
  const res = await gw.admin('/accounts', { name: 'x'.repeat(2 * MiB), plan: 'free' })
  expect(res.status).toBe(413)
  expect(code(await res.text())).toBe('body_too_large')
})

test('a channel payer sends an inline image over MAX_BODY_BYTES: served and paid; a forged voucher with a long body is refused before the body is read', async () => {
  const account = privateKeyToAccount(chain.payers[0]!.privateKey)
  const session = await Paid.opened(url, { account, tokenDomain, deposit: 1_000_000n, initial: 0n })
  const body = withImage(2 * MiB)
  const res = await fetch(url, {
    method: 'POST',
    headers: { authorization: await session.voucher(100_000n), 'content-type': 'application/json' },
    body,
  })
  expect(res.status).toBe(200)
  expect(((await res.json()) as { object: string }).object).toBe('chat.completion')
  expect(res.headers.get('payment-receipt')).toBeTruthy()

  // Someone else names the payer's (public) channel with a voucher of their own signing.
  const forger = new PayingSession({
    account: privateKeyToAccount(chain.payers[1]!.privateKey),
    challenge: await Paid.challenge(url),
    tokenDomain,
  })
  forger.channelId = session.channelId
  const forged = await Raw.answeredEarly(
    port,
    head(await forger.voucher(200_000n), 2 * MiB),
    new Uint8Array(65536).fill(0x20),
  )
  expect(forged.status).toBe(402)
  expect(forged.body).toContain('signer-mismatch')
})

test('a voucher the gateway made public (in a settle transaction), shown by anyone with a long body: refused before the body is read', async () => {
  const account = privateKeyToAccount(chain.payers[2]!.privateKey)
  const session = await Paid.opened(url, {
    account,
    tokenDomain,
    deposit: 1_000_000n,
    initial: 10n,
  })
  const served = await fetch(url, {
    method: 'POST',
    headers: { authorization: await session.voucher(50_000n), 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'one two' }] }),
  })
  expect(served.status).toBe(200)
  await served.text()
  const settled = (await (await gw.admin(`/channels/${session.channelId}/settle`, {})).json()) as {
    result: { status: string; txHash: Hex }
  }
  expect(settled.result.status).toBe('confirmed')
  // The settle's calldata: the voucher, for anyone to read.
  const tx = await getTransaction(chain.payeeClient, { hash: settled.result.txHash })
  const [, amount, signature] = decodeFunctionData({ abi: Escrow.abi, data: tx.input }).args as [
    Hex,
    bigint,
    Hex,
  ]
  const shown = Credential.serialize(
    Credential.from({
      challenge: await Paid.challenge(url),
      payload: {
        action: 'voucher',
        channelId: session.channelId!,
        cumulativeAmount: amount.toString(),
        signature,
      },
    }),
  )
  const res = await Raw.answeredEarly(port, head(shown, 2 * MiB), new Uint8Array(65536).fill(0x20))
  expect(res.status).toBe(413)
  expect(code(res.body)).toBe('body_too_large')
})
