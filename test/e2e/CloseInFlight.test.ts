/**
 * A cooperative close while the channel's stream is under way (draft, "Cooperative Close":
 * the server MUST verify the final voucher covers all delivered service). The close ends the
 * stream, waits for it to be charged, refuses a voucher below what was spent, and closes
 * with one that covers it: the payee receives exactly what was spent.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import type { Hex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Receipt from '../../src/payment/Receipt.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: {
    challengeSecret: 'test-challenge-secret-0123456789',
    voucherTimeoutMs: 2_000,
    settlement: { thresholdAmount: '1000000000000', idleSeconds: 3_600, intervalSeconds: 1 },
  },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const balance = (owner: Hex) =>
  Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner })
const words = Array.from({ length: 120 }, (_, i) => `w${i}`).join(' ')
/** Whether another instance's (or this one's) LISTEN ends a stream at once. */
const listens = gw.db.max > 1

async function session() {
  const res = await fetch(url, {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'x' }] }),
  })
  const payer = privateKeyToAccount(chain.payers[2]!.privateKey)
  return new PayingSession({
    account: payer,
    challenge: challengeOf(res.headers.get('www-authenticate'))!,
    tokenDomain,
  })
}

describe('cooperative close with a stream under way', () => {
  test('behavior: the stream ends, the close waits for its charge, refuses a voucher below spent, and settles exactly what was spent', async () => {
    const s = await session()
    const open = await fetch(url, {
      method: 'HEAD',
      headers: {
        authorization: await s.openWithAuthorization({ deposit: 100_000n, initial: 50_000n }),
      },
    })
    expect(open.status).toBe(200)
    const channelId = s.channelId!
    const payee = await balance(chain.payee.address)

    // A slow stream that reserves its whole answer up front (max_tokens), so it would never
    // extend: nothing but the close can stop it.
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: await s.voucher(50_000n) },
      body: JSON.stringify({
        model: 'fake-slow',
        stream: true,
        max_tokens: 200,
        messages: [{ role: 'user', content: words }],
      }),
    })
    expect(res.status).toBe(200)
    const atStart = Receipt.deserialize(res.headers.get('payment-receipt')!) as unknown as {
      spent: string
    }
    const reader = res.body!.getReader()
    await reader.read()

    // The payer closes with the spent its last receipt gave: stale, the stream has delivered
    // since. Refused (402) once the stream has ended and been charged.
    const low = await fetch(url, {
      method: 'POST',
      headers: { authorization: await s.close(BigInt(atStart.spent)) },
    })
    expect(low.status).toBe(402)
    const problem = (await low.json()) as { type: string; requiredCumulative: string }
    expect(problem.type).toContain('payment-insufficient')
    let rest = ''
    const decoder = new TextDecoder()
    for (let r = await reader.read(); !r.done; r = await reader.read())
      rest += decoder.decode(r.value)
    expect(rest).toContain('data: [DONE]')
    const charged = (await Channels.get(gw.sql, channelId))!
    expect(charged.reserved).toBe(0n)
    expect(BigInt(problem.requiredCumulative)).toBe(charged.spent)
    if (listens) {
      // Ended at the close, not after its 120 words.
      const chunks = rest.split('\n\n').filter((b) => b.startsWith('data: {"id"')).length
      expect(chunks).toBeLessThan(60)
    }
    // No request is taken on a closing channel.
    const more = await fetch(url, {
      method: 'POST',
      headers: { authorization: await s.voucher(50_000n) },
      body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'x' }] }),
    })
    expect(more.status).toBeGreaterThanOrEqual(400)

    // A close covering what was spent goes through; the payee gets exactly that.
    const ok = await fetch(url, {
      method: 'POST',
      headers: { authorization: await s.close(charged.spent) },
    })
    expect(ok.status).toBe(200)
    const closed = (await Channels.get(gw.sql, channelId))!
    expect(closed).toMatchObject({ finalized: true, settled: charged.spent, spent: charged.spent })
    expect(await balance(chain.payee.address)).toBe(payee + charged.spent)
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(onChain!.finalized).toBe(true)
  }, 60_000)
})
