/**
 * MUSTs of the MPP drafts (draft-httpauth-payment-00, core; draft-evm-session-00, session)
 * an audit found unmet, each against a gateway paid on a real anvil chain: the section each
 * comes from is named in its describe.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { type Hex, keccak256, toHex } from 'viem'
import { generatePrivateKey, privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import * as Voucher from '../../src/chain/Voucher.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'
import { read, text } from '../helpers/Sse.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const payments = { challengeSecret: 'test-challenge-secret-0123456789' }
const gw = await Gateway.create({ chain: Gateway.chainOf(chain), payments })
/** A gateway whose vouchers must each add at least 1,000 base units. */
const spaced = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { ...payments, minVoucherDelta: '1000', voucherTimeoutMs: 2_000 },
})
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const problems = 'https://paymentauth.org/problems'

const completions = (g: Gateway.TestGateway) => `${g.url}/v1/chat/completions`
const body = (stream: boolean, content: string) =>
  JSON.stringify({ model: 'fake', stream, messages: [{ role: 'user', content }] })

/** A paying session of `account` on a fresh challenge of `g`. */
async function session(
  g: Gateway.TestGateway,
  account = privateKeyToAccount(chain.payers[0]!.privateKey),
) {
  const res = await fetch(completions(g), { method: 'POST', body: body(false, 'hi') })
  expect(res.status).toBe(402)
  const challenge = challengeOf(res.headers.get('www-authenticate'))!
  return new PayingSession({ account, challenge, tokenDomain })
}

const post = (g: Gateway.TestGateway, authorization: string, content?: string) =>
  fetch(completions(g), {
    method: 'POST',
    headers: { authorization },
    ...(content === undefined ? {} : { body: body(false, content) }),
  })

describe('session, Insufficient Balance During Streaming: requiredCumulative is the minimum next voucher', () => {
  test('behavior: a voucher for exactly the requiredCumulative of a 402 insufficient-balance is accepted', async () => {
    const s = await session(spaced)
    const open = await s.openWithAuthorization({ deposit: 1_000_000n, initial: 0n })
    const head = await fetch(completions(spaced), {
      method: 'HEAD',
      headers: { authorization: open },
    })
    expect(head.status).toBe(200)
    const refused = await post(spaced, await s.voucher(0n), 'hi')
    expect(refused.status).toBe(402)
    const problem = (await refused.json()) as { type: string; requiredCumulative: string }
    expect(problem.type).toBe(`${problems}/session/insufficient-balance`)
    const paid = await post(spaced, await s.voucher(BigInt(problem.requiredCumulative)), 'hi')
    const answer = await paid.text()
    expect({ status: paid.status, answer: paid.status === 200 ? '' : answer }).toEqual({
      status: 200,
      answer: '',
    })
  }, 30_000)

  test('behavior: a voucher for exactly the requiredCumulative of payment-need-voucher is accepted and the stream resumes', async () => {
    const s = await session(spaced, privateKeyToAccount(chain.payers[1]!.privateKey))
    const open = await s.openWithAuthorization({ deposit: 1_000_000n, initial: 1_000n })
    const words = Array.from({ length: 400 }, (_, i) => `w${i}`).join(' ')
    const res = await fetch(completions(spaced), {
      method: 'POST',
      headers: { authorization: open },
      body: body(true, words),
    })
    expect(res.status).toBe(200)
    const refusals: { status: number; problem: string }[] = []
    let asked = 0
    const events = await read(res, async (need) => {
      asked++
      const r = await post(spaced, await s.voucher(BigInt(need.requiredCumulative!)))
      if (r.status === 200) await r.body?.cancel()
      else refusals.push({ status: r.status, problem: ((await r.json()) as { type: string }).type })
    })
    expect(asked).toBeGreaterThan(0)
    expect(refusals).toEqual([])
    expect(text(events)).toBe(words)
  }, 60_000)
})

describe('session, Open Verification', () => {
  test('behavior: an open whose initial voucher is below minVoucherDelta is not refused once its deposit is in the escrow', async () => {
    const s = await session(spaced)
    const open = await s.openWithAuthorization({ deposit: 100_000n, initial: 500n })
    const answer = await post(spaced, open)
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: s.channelId!,
    })
    // Refused or not, the deposit is what it is on chain: a refusal here strands it.
    expect({ status: answer.status, depositOnChain: onChain?.deposit }).toEqual({
      status: 200,
      depositOnChain: 100_000n,
    })
  }, 30_000)

  test('error: a hash open whose initial voucher is not signed by the payer is refused and stores nothing (core: no side effects unpaid)', async () => {
    const payerClient = chain.payerClient(1)
    const s = await session(gw, payerClient.account as never)
    const opened = await Paid.broadcastOpen(chain, payerClient, 500_000n)
    const header = await s.openWithHash({ ...opened, initial: 0n })
    const thief = privateKeyToAccount(keccak256(toHex('thief')))
    const forged = await Voucher.sign(thief, {
      chainId: chain.chainId,
      escrow: chain.escrowAddress,
      channelId: opened.channelId,
      cumulativeAmount: 0n,
    })
    const credential = Credential.deserialize(header)
    const refused = await post(
      gw,
      Credential.serialize({
        ...credential,
        payload: { ...credential.payload, signature: forged },
      }),
    )
    expect(refused.status).toBe(402)
    expect(((await refused.json()) as { type: string }).type).toBe(
      `${problems}/session/signer-mismatch`,
    )
    expect(await Channels.get(gw.sql, opened.channelId)).toBeUndefined()
  }, 30_000)

  test('error: an authorization open naming another channelId than its parameters create moves no funds', async () => {
    const payer = privateKeyToAccount(chain.payers[0]!.privateKey)
    const s = await session(gw, payer)
    const held = () =>
      Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner: payer.address })
    const before = await held()
    const open = Credential.deserialize(
      await s.openWithAuthorization({ deposit: 100_000n, initial: 0n }),
    )
    const named = keccak256(toHex('a channelId computed wrongly')) as Hex
    const voucherSignature = await Voucher.sign(payer, {
      chainId: chain.chainId,
      escrow: chain.escrowAddress,
      channelId: named,
      cumulativeAmount: 0n,
    })
    const refused = await post(
      gw,
      Credential.serialize({
        ...open,
        payload: { ...open.payload, channelId: named, voucherSignature },
      }),
    )
    await refused.body?.cancel()
    expect(refused.status).not.toBe(200)
    expect(await held()).toBe(before)
  }, 30_000)
})

describe('session, Error Responses: the most specific problem type', () => {
  test('error: an EIP-3009 open from a wallet that lacks the deposit is 402 insufficient-balance', async () => {
    const s = await session(gw, privateKeyToAccount(generatePrivateKey()))
    const open = await s.openWithAuthorization({ deposit: 100_000n, initial: 0n })
    const refused = await post(gw, open)
    const problem = (await refused.json()) as { type: string }
    expect({ status: refused.status, type: problem.type }).toEqual({
      status: 402,
      type: `${problems}/session/insufficient-balance`,
    })
    expect(refused.headers.get('www-authenticate')).toContain('Payment ')
    expect(await Channels.get(gw.sql, s.channelId!)).toBeUndefined()
    expect(
      await Escrow.getChannel(chain.payeeClient, {
        escrow: chain.escrowAddress,
        channelId: s.channelId!,
      }),
    ).toBeUndefined()
  }, 30_000)
})

describe('session, Hexadecimal Values and Common Verification', () => {
  test('behavior: the fresh challenge of a refused credential names its channel in lowercase hex', async () => {
    const s = await session(gw)
    const channelId = keccak256(toHex('a channel named in capitals'))
    s.channelId = `0x${channelId.slice(2).toUpperCase()}`
    // A forged challenge (another amount under the same id): refused with a fresh challenge.
    s.renew({ ...s.challenge, request: { ...s.challenge.request, amount: '1' } })
    const refused = await post(gw, await s.voucher(5_000n))
    expect(refused.status).toBe(402)
    const fresh = challengeOf(refused.headers.get('www-authenticate'))!
    const named = (fresh.request as { methodDetails: { channelId?: string } }).methodDetails
      .channelId
    expect(named).toBe(channelId)
  }, 30_000)

  test('error: a credential echoing a challenge with a description the server never issued is refused', async () => {
    const s = await session(gw)
    expect(s.challenge.description).toBeUndefined()
    const open = await s.openWithAuthorization({ deposit: 100_000n, initial: 0n })
    const head = await fetch(completions(gw), { method: 'HEAD', headers: { authorization: open } })
    expect(head.status).toBe(200)
    const voucher = Credential.deserialize(await s.voucher(1_000n))
    const altered = Credential.serialize({
      ...voucher,
      challenge: { ...voucher.challenge, description: 'Pay 0.0001 USDC per token' },
    })
    const refused = await post(gw, altered)
    expect(refused.status).toBe(402)
    expect(((await refused.json()) as { type: string }).type).toBe(
      `${problems}/session/challenge-not-found`,
    )
  }, 30_000)
})

describe('core, Usage of 402: Servers MUST NOT return 402 without a Payment challenge', () => {
  test('error: a key holder without credits, over plain HTTP (X-Forwarded-Proto: http), gets a 403 insufficient_credits, not a 402 without a Payment challenge', async () => {
    const { key } = await gw.account({ credits: 0 })
    const res = await fetch(completions(gw), {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'x-forwarded-proto': 'http' },
      body: body(false, 'hi'),
    })
    const error = ((await res.json()) as { error: { type: string; code: string } }).error
    // No Payment challenge may be issued over plain HTTP ("Transport Security"), so no 402.
    expect(res.status).toBe(403)
    expect(error).toMatchObject({ type: 'insufficient_credits', code: 'insufficient_credits' })
    expect(res.headers.get('www-authenticate')).not.toMatch(/(^|,)\s*Payment\s/)
    // Over TLS (here: this machine) the same refusal is the 402 with its Payment challenge.
    const local = await fetch(completions(gw), {
      method: 'POST',
      headers: { authorization: `Bearer ${key}` },
      body: body(false, 'hi'),
    })
    await local.body?.cancel()
    expect(local.status).toBe(402)
    expect(local.headers.get('www-authenticate')).toMatch(/(^|,)\s*Payment\s/)
  }, 30_000)
})

describe('core, Status Codes: a malformed credential is a 402 malformed-credential problem with a fresh challenge', () => {
  test('error: the Payment scheme with no credential after it is a malformed credential, not a request without one', async () => {
    const res = await fetch(completions(gw), {
      method: 'POST',
      headers: { authorization: 'Payment' },
      body: body(false, 'hi'),
    })
    const problem = (await res.json()) as { type?: string }
    expect({
      status: res.status,
      contentType: res.headers.get('content-type'),
      type: problem.type,
    }).toEqual({
      status: 402,
      contentType: 'application/problem+json',
      type: `${problems}/malformed-credential`,
    })
    expect(res.headers.get('www-authenticate')).toMatch(/(^|,)\s*Payment\s/)
    expect(res.headers.get('cache-control')).toBe('no-store')
  }, 30_000)
})

describe('session, Common Verification: the action is checked (step 2) before the challenge (steps 3-5)', () => {
  test('error: an unrecognized action is refused as a malformed payload (400) even when its echoed challenge is not one the server issued', async () => {
    const s = await session(gw)
    const echo = Credential.from({ challenge: s.challenge, payload: {} }).challenge
    const credential = Credential.serialize({
      challenge: { ...echo, id: 'x'.repeat(43) },
      payload: { action: 'refund', channelId: keccak256(toHex('any')) },
    })
    const refused = await post(gw, credential, 'hi')
    const problem = (await refused.json()) as { type: string }
    expect({ status: refused.status, type: problem.type }).toEqual({
      status: 400,
      type: `${problems}/malformed-credential`,
    })
  }, 30_000)
})

describe('core, Denial of Service: a channel short of balance does not make the gateway count its long prompts', () => {
  test('behavior: once refused for want of balance, a long prompt it cannot pay for whatever its count is refused before it is counted, asking for the least; one it might pay for is counted and served once paid', async () => {
    const s = await session(gw)
    const head = await fetch(completions(gw), {
      method: 'HEAD',
      headers: { authorization: await s.openWithAuthorization({ deposit: 100_000n, initial: 0n }) },
    })
    expect(head.status).toBe(200)
    expect((await post(gw, await s.voucher(0n), 'hi')).status).toBe(402)
    // 4,000 characters: at least 32 tokens whatever they are, 38 with the framing (base units,
    // at one a token).
    const ask = (authorization: string, headers: Record<string, string> = {}) =>
      fetch(completions(gw), {
        method: 'POST',
        headers: { authorization, ...headers },
        body: JSON.stringify({
          model: 'fake',
          max_tokens: 1,
          messages: [{ role: 'user', content: '漢字'.repeat(2_000) }],
        }),
      })
    const before = Tokenizer.counted.tokenized
    const refused = await ask(await s.voucher(20n))
    expect(refused.status).toBe(402)
    const least = (await refused.json()) as { type: string; requiredCumulative: string }
    expect(least.type).toBe(`${problems}/session/insufficient-balance`)
    expect(least.requiredCumulative).toBe('38')
    expect(Tokenizer.counted.tokenized - before).toBeLessThan(4_000)
    // With an Idempotency-Key it is counted, and admission answers (a retry of a request done
    // or under way is told so first).
    const keyed = Tokenizer.counted.tokenized
    const retried = await ask(await s.voucher(20n), { 'idempotency-key': crypto.randomUUID() })
    expect(Tokenizer.counted.tokenized - keyed).toBeGreaterThanOrEqual(4_000)
    expect(retried.status).toBe(402)
    expect(
      BigInt(((await retried.json()) as { requiredCumulative: string }).requiredCumulative),
    ).toBeGreaterThan(38n)
    // A voucher for that least: counted (its count remembered now), then refused by admission
    // with what it needs.
    const counted = Tokenizer.counted.remembered
    const short = await ask(await s.voucher(38n))
    expect(Tokenizer.counted.remembered - counted).toBeGreaterThanOrEqual(4_000)
    expect(short.status).toBe(402)
    const needs = (await short.json()) as { requiredCumulative: string }
    expect(BigInt(needs.requiredCumulative)).toBeGreaterThan(38n)
    const paid = await ask(await s.voucher(BigInt(needs.requiredCumulative)))
    expect(paid.status).toBe(200)
    await paid.text()
  }, 30_000)
})
