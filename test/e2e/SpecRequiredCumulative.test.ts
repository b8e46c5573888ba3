/**
 * draft-evm-session-00, "Insufficient Balance During Streaming": `requiredCumulative` is the
 * "Minimum next voucher amount". With `minVoucherDelta` above one block of tokens, a voucher
 * for exactly requiredCumulative must be accepted, both for the 402 insufficient-balance of an
 * admission and for the `payment-need-voucher` event of a stream.
 */
import { afterAll, expect, test } from 'bun:test'
import { privateKeyToAccount } from 'viem/accounts'
import * as Token from '../../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import { read, text } from '../helpers/Sse.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: {
    challengeSecret: 'test-challenge-secret-0123456789',
    voucherTimeoutMs: 2_000,
    minVoucherDelta: '1000',
  },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const words = Array.from({ length: 400 }, (_, i) => `w${i}`).join(' ')
const body = (stream: boolean, content: string) =>
  JSON.stringify({ model: 'fake', stream, messages: [{ role: 'user', content }] })

async function session(index: number) {
  const res = await fetch(url, { method: 'POST', body: body(false, 'hi') })
  expect(res.status).toBe(402)
  const challenge = challengeOf(res.headers.get('www-authenticate'))!
  const account = privateKeyToAccount(chain.payers[index]!.privateKey)
  return new PayingSession({ account, challenge, tokenDomain })
}

test('a voucher for exactly the requiredCumulative of a 402 insufficient-balance is accepted', async () => {
  const s = await session(0)
  const open = await s.openWithAuthorization({ deposit: 1_000_000n, initial: 0n })
  expect((await fetch(url, { method: 'HEAD', headers: { authorization: open } })).status).toBe(200)
  const refused = await fetch(url, {
    method: 'POST',
    headers: { authorization: await s.voucher(0n) },
    body: body(false, 'hi'),
  })
  expect(refused.status).toBe(402)
  const problem = (await refused.json()) as { type: string; requiredCumulative: string }
  expect(problem.type).toBe('https://paymentauth.org/problems/session/insufficient-balance')
  const paid = await fetch(url, {
    method: 'POST',
    headers: { authorization: await s.voucher(BigInt(problem.requiredCumulative)) },
    body: body(false, 'hi'),
  })
  const answer = await paid.text()
  expect({ status: paid.status, answer: paid.status === 200 ? '' : answer }).toEqual({
    status: 200,
    answer: '',
  })
}, 30_000)

test('a voucher for exactly the requiredCumulative of payment-need-voucher is accepted and the stream resumes', async () => {
  const s = await session(1)
  const open = await s.openWithAuthorization({ deposit: 1_000_000n, initial: 1_000n })
  const res = await fetch(url, {
    method: 'POST',
    headers: { authorization: open },
    body: body(true, words),
  })
  expect(res.status).toBe(200)
  const answers: { status: number; required: string; accepted: string; problem?: string }[] = []
  const events = await read(res, async (need) => {
    const r = await fetch(url, {
      method: 'POST',
      headers: { authorization: await s.voucher(BigInt(need.requiredCumulative!)) },
    })
    const problem = r.status === 200 ? undefined : ((await r.json()) as { type: string }).type
    if (r.status === 200) await r.body?.cancel()
    answers.push({
      status: r.status,
      required: need.requiredCumulative!,
      accepted: need.acceptedCumulative!,
      ...(problem ? { problem } : {}),
    })
  })
  expect(answers.length).toBeGreaterThan(0)
  expect(answers.filter((a) => a.status !== 200)).toEqual([])
  expect(text(events)).toBe(words)
}, 60_000)
