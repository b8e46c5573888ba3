/**
 * The core draft's "Denial of Service": challenges issued and credential verifications are
 * limited per client address. A real gateway behind a trusted proxy (X-Forwarded-For names
 * the address), real anvil with our escrow, the client side of src/client.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { privateKeyToAccount } from 'viem/accounts'
import * as Token from '../../src/chain/Token.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'

const chain = await Anvil.start({ accounts: 3 })
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  trustProxy: true,
  payments: {
    challengeSecret: 'test-challenge-secret-0123456789',
    refusalRatePerSecond: 0.5,
    refusalBurst: 3,
  },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const body = JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] })

/**
 * A completion request from `address` (as the trusted proxy names it), with `headers`; with
 * `alone`, a credential sent without a request (a POST without a body).
 */
const from = (address: string, headers: Record<string, string> = {}, alone = false) =>
  fetch(url, {
    method: 'POST',
    headers: { 'x-forwarded-for': address, 'content-type': 'application/json', ...headers },
    ...(alone ? {} : { body }),
  })

/** The channel's accepted amount, as its payer sees it. */
const accepted = async (channelId: string) =>
  BigInt(
    (
      (await (await fetch(`${gw.url}/v1/channels/${channelId}`)).json()) as {
        acceptedCumulative: string
      }
    ).acceptedCumulative,
  )

/** A paying session of payer `index` with a channel opened (1,000,000 deposited, 1,000 paid). */
const opened = (index: number) =>
  Paid.opened(url, {
    account: privateKeyToAccount(chain.payers[index]!.privateKey),
    tokenDomain,
    deposit: 1_000_000n,
    initial: 1_000n,
  })

/** Asserts the 429 of an address over its refusals: a wait, and no challenge. */
async function limited(res: Response) {
  expect(res.status).toBe(429)
  expect(Number(res.headers.get('retry-after'))).toBeGreaterThanOrEqual(1)
  // A 429 rate_limit_exceeded says which limit and what is left of it (the rate a second).
  expect(res.headers.get('x-ratelimit-limit-requests')).toBe('0.5')
  expect(res.headers.get('x-ratelimit-remaining-requests')).toBe('0')
  expect(res.headers.get('x-ratelimit-reset-requests')).toMatch(/^\d+(\.\d+)?s$/)
  expect(res.headers.get('www-authenticate') ?? '').not.toContain('Payment')
  const e = ((await res.json()) as { error: { type: string; code: string } }).error
  expect(e).toMatchObject({ type: 'rate_limit_exceeded', code: 'refusal_rate_limited' })
}

describe('refusals per client address', () => {
  test('behavior: past its burst of challenges an address gets a 429 with a wait instead of another; other addresses do not', async () => {
    for (let i = 0; i < 3; i++) {
      const res = await from('203.0.113.7')
      expect(res.status).toBe(402)
      expect(res.headers.get('www-authenticate')).toContain('Payment ')
    }
    await limited(await from('203.0.113.7'))
    // The address is the last hop, the one the trusted proxy saw: earlier hops are the
    // client's say.
    await limited(await from('192.0.2.1, 203.0.113.7'))
    expect((await from('198.51.100.1')).status).toBe(402)
    expect((await from('203.0.113.7, 198.51.100.1')).status).toBe(402)
    // The operator sees them.
    const metrics = await (
      await fetch(`${gw.url}/metrics`, {
        headers: { authorization: `Bearer ${gw.config.adminToken}` },
      })
    ).text()
    expect(metrics).toMatch(/^tollway_refusals_limited_total [2-9]\d*$/m)
  })

  test('behavior: credentials that fail verification count; past them a good credential from that address is not verified, from another it is', async () => {
    const session = await opened(0)
    const channelId = session.channelId!
    const good = await session.voucher(2_000n)
    // The same voucher echoing a challenge id this server did not issue.
    const parsed = Credential.deserialize(good)
    const forged = Credential.serialize({
      ...parsed,
      challenge: { ...parsed.challenge, id: `${parsed.challenge.id.slice(0, -4)}AAAA` },
    })
    for (let i = 0; i < 3; i++) {
      const res = await from('192.0.2.50', { authorization: forged })
      expect(res.status).toBe(402)
    }
    await limited(await from('192.0.2.50', { authorization: good }, true))
    expect(await accepted(channelId)).toBe(1_000n)
    // Another address's credential is verified and applied.
    expect((await from('192.0.2.51', { authorization: good }, true)).status).toBe(200)
    expect(await accepted(channelId)).toBe(2_000n)
  })

  test('behavior: addresses of one IPv6 /64 share a bucket', async () => {
    for (const host of ['1', '2', '3'])
      expect((await from(`2001:db8:5:6::${host}`)).status).toBe(402)
    await limited(await from('2001:db8:5:6:ffff:1:2:3'))
    expect((await from('2001:db8:5:7::1')).status).toBe(402)
  })

  test('behavior: a Payment credential refused otherwise than with a 402 (a channel that does not exist: 410) counts too', async () => {
    const session = await opened(1)
    const good = Credential.deserialize(await session.voucher(2_000n))
    for (let i = 0; i < 3; i++) {
      // A voucher for a channel id nobody opened, on a challenge this server issued.
      const made = Credential.serialize({
        ...good,
        payload: { ...good.payload, channelId: `0x${String(i + 1).repeat(64)}` },
      })
      expect((await from('192.0.2.60', { authorization: made }, true)).status).toBe(410)
    }
    await limited(await from('192.0.2.60'))
  })

  test('behavior: a key that is no key counts (a 401), a key holder does not: its empty balance stays a 402 (a 429 would have the OpenAI SDKs send it again), its good key is served', async () => {
    const empty = await gw.account({ credits: 0 })
    const { key } = await gw.account()
    for (let i = 0; i < 6; i++)
      expect((await from('203.0.113.98', { authorization: `Bearer ${empty.key}` })).status).toBe(
        402,
      )
    expect((await from('203.0.113.98', { authorization: `Bearer ${key}` })).status).toBe(200)
    for (let i = 0; i < 3; i++)
      expect((await from('203.0.113.99', { authorization: 'Bearer tw-nothing' })).status).toBe(401)
    await limited(await from('203.0.113.99', { 'x-api-key': 'tw-other' }))
    expect((await from('203.0.113.99', { authorization: `Bearer ${key}` })).status).toBe(200)
  })

  test('behavior: a payer refused for what is not its payment (an unknown model) is not counted', async () => {
    const session = await opened(0)
    const credential = await session.voucher(5_000n)
    for (let i = 0; i < 5; i++) {
      const res = await fetch(url, {
        method: 'POST',
        headers: {
          'x-forwarded-for': '192.0.2.70',
          'content-type': 'application/json',
          authorization: credential,
        },
        body: JSON.stringify({
          model: 'no-such-model',
          messages: [{ role: 'user', content: 'hi' }],
        }),
      })
      expect(res.status).toBe(404)
    }
    expect((await from('192.0.2.70')).status).toBe(402)
  })
})
