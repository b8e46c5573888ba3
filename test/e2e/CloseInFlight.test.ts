/**
 * Closes and what runs beside them. A cooperative close while the channel's stream is under
 * way (draft, "Cooperative Close": the server MUST verify the final voucher covers all
 * delivered service): the close ends the stream, waits for it to be charged, refuses a voucher
 * below what was spent, and closes with one that covers it. And a payer's forced close that a
 * top-up cancels on chain (the draft: topUp MUST reset closeRequestedAt) is cancelled here.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { type Hex, keccak256, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Receipt from '../../src/payment/Receipt.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Paid from '../helpers/Paid.ts'

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

async function session(payerIndex = 2) {
  const res = await fetch(url, {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'x' }] }),
  })
  const payer = privateKeyToAccount(chain.payers[payerIndex]!.privateKey)
  return new PayingSession({
    account: payer,
    challenge: challengeOf(res.headers.get('www-authenticate'))!,
    tokenDomain,
  })
}

/** A channel of payer `payerIndex` opened through the gateway (HEAD, EIP-3009). */
async function opened(payerIndex: number, deposit: bigint, initial: bigint) {
  const s = await session(payerIndex)
  const open = await fetch(url, {
    method: 'HEAD',
    headers: { authorization: await s.openWithAuthorization({ deposit, initial }) },
  })
  expect(open.status).toBe(200)
  return { s, channelId: s.channelId! }
}

/** POSTs a Payment credential, with `body` (a completion) or none (management). */
const post = (authorization: string, body?: string) =>
  fetch(url, { method: 'POST', headers: { authorization }, ...(body ? { body } : {}) })

const ask = JSON.stringify({
  model: 'fake',
  max_tokens: 20,
  messages: [{ role: 'user', content: 'hello there world' }],
})

describe('cooperative close with a stream under way', () => {
  test('behavior: the stream ends, the close waits for its charge, refuses a voucher below spent (the channel open again), and settles exactly what was spent', async () => {
    const { s, channelId } = await opened(2, 100_000n, 50_000n)
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
    const low = await post(await s.close(BigInt(atStart.spent)))
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
    // A refused close leaves the channel open (anyone may send one: a voucher the gateway
    // settled is public), its stream already ended.
    expect(charged).toMatchObject({ closeRequestedAt: null, cooperativeClose: false })

    // A close covering what was spent goes through; the payee gets exactly that.
    const final = await s.close(charged.spent)
    const ok = await post(final)
    expect(ok.status).toBe(200)
    // The same close sent again (its answer lost) gets the close that went through.
    const again = await post(final)
    expect(again.status).toBe(200)
    expect(again.headers.get('payment-receipt')).toBeString()
    const receipt = (h: Response) =>
      (Receipt.deserialize(h.headers.get('payment-receipt')!) as unknown as { txHash: string })
        .txHash
    expect(receipt(again)).toBe(receipt(ok))
    await Ledger.channelState(gw.sql, channelId)
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

describe('forced close and top-up', () => {
  test('behavior: a top-up that cancels a forced close of the payer on chain makes the channel usable again; a cooperative close is not reopened', async () => {
    const { s, channelId } = await opened(1, 10_000n, 1_000n)
    await Escrow.requestClose(chain.payerClient(1), { escrow: chain.escrowAddress, channelId })
    const deadline = Date.now() + 15_000
    while (!(await Channels.get(gw.sql, channelId))!.closeRequestedAt && Date.now() < deadline)
      await Bun.sleep(50)
    expect((await Channels.get(gw.sql, channelId))!.closeRequestedAt).not.toBeNull()
    const refused = await post(await s.voucher(2_000n), ask)
    expect(refused.status).toBe(410)

    // The payer changes its mind: a top-up, which the escrow takes as cancelling the close.
    const top = await post(await s.topUp(5_000n))
    expect(top.status).toBe(200)
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(onChain!.closeRequestedAt).toBe(0n)
    expect((await Channels.get(gw.sql, channelId))!.closeRequestedAt).toBeNull()
    const served = await post(await s.voucher(6_000n), ask)
    expect(served.status).toBe(200)
    await served.text()
    await Ledger.channelState(gw.sql, channelId)

    // A cooperative close under way is no forced close: a top-up is refused before any
    // transaction (no gas paid to lock more tokens in a closing channel), and reopens nothing.
    await gw.sql`update channels set cooperative_close = true, close_requested_at = now() where channel_id = ${Buffer.from(channelId.slice(2), 'hex')}`
    const deposit = (await Channels.get(gw.sql, channelId))!.deposit
    const again = await post(await s.topUp(1_000n))
    expect(again.status).toBe(410)
    const after = (await Channels.get(gw.sql, channelId))!
    expect(after.closeRequestedAt).not.toBeNull()
    expect(after.deposit).toBe(deposit)
    const unchanged = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(unchanged!.deposit).toBe(deposit)
  }, 60_000)

  test('error: a voucher that carries a top-up (EIP-3009) during a forced close is refused before its top-up is sent (the draft, Voucher Verification step 1); a topUp credential cancels the close, then the voucher pays for its request', async () => {
    const { s, channelId } = await opened(4, 10_000n, 1_000n)
    const payer = privateKeyToAccount(chain.payers[4]!.privateKey)
    await Escrow.requestClose(chain.payerClient(4), { escrow: chain.escrowAddress, channelId })
    const deadline = Date.now() + 15_000
    while (!(await Channels.get(gw.sql, channelId))!.closeRequestedAt && Date.now() < deadline)
      await Bun.sleep(50)
    expect((await Channels.get(gw.sql, channelId))!.closeRequestedAt).not.toBeNull()
    // A plain voucher is refused while the close is pending.
    expect((await post(await s.voucher(2_000n), ask)).status).toBe(410)

    // A voucher above the deposit, with the top-up that makes room for it: refused as a plain
    // one is, and its top-up not sent (the close stands, on chain and here).
    const cumulative = 12_000n
    const header = await Paid.voucherWithTopUp(payer, {
      challenge: s.challenge,
      chain,
      tokenDomain,
      channelId,
      cumulative,
      additional: 5_000n,
      salt: keccak256(toHex(`close-top-up:${channelId}`)),
    })
    const refused = await post(header, ask)
    expect(refused.status).toBe(410)
    expect(await refused.text()).toContain('topUp credential')
    const still = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(still!.closeRequestedAt).not.toBe(0n)
    expect(still!.deposit).toBe(10_000n)
    expect((await Channels.get(gw.sql, channelId))!.closeRequestedAt).not.toBeNull()

    // The top-up as a credential of its own cancels the close; then the voucher pays.
    expect((await post(await s.topUp(5_000n))).status).toBe(200)
    const served = await post(await s.voucher(cumulative), ask)
    expect(served.status).toBe(200)
    await served.text()
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(onChain!.closeRequestedAt).toBe(0n)
    expect(onChain!.deposit).toBe(15_000n)
    const after = (await Channels.get(gw.sql, channelId))!
    expect(after.closeRequestedAt).toBeNull()
    expect(after.acceptedCumulative).toBe(cumulative)
    expect(after.deposit).toBe(15_000n)
    expect(after.spent).toBeGreaterThan(0n)
  }, 60_000)

  test('behavior: a CloseRequested event handled after the top-up that cancelled it does not close the channel again', async () => {
    const { s, channelId } = await opened(3, 10_000n, 1_000n)
    // The top-up right after the close request: the watcher (polling) sees the event later.
    await Escrow.requestClose(chain.payerClient(3), { escrow: chain.escrowAddress, channelId })
    const top = await post(await s.topUp(5_000n))
    expect(top.status).toBe(200)
    await Bun.sleep(2_500)
    expect((await Channels.get(gw.sql, channelId))!.closeRequestedAt).toBeNull()
    const served = await post(await s.voucher(6_000n), ask)
    expect(served.status).toBe(200)
    await served.text()
  }, 60_000)
})
