/**
 * Closes and what runs beside them. A cooperative close while the channel's stream is under
 * way (draft, "Cooperative Close": the server MUST verify the final voucher covers all
 * delivered service): the close ends the stream, waits for it to be charged, refuses a voucher
 * below what was spent, and closes with one that covers it. And a payer's forced close that a
 * top-up cancels on chain (the draft: topUp MUST reset closeRequestedAt) is cancelled here.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { type Hex, keccak256, parseAbi, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import { readContract } from 'viem/actions'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Credential from '../../src/payment/Credential.ts'
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
const authorizationStateAbi = parseAbi([
  'function authorizationState(address authorizer, bytes32 nonce) view returns (bool)',
])
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

/** The escrow's `closeRequestedAt` of a channel (unix seconds; 0 when no close is pending). */
const closeRequestedAt = async (channelId: Hex) =>
  (await Escrow.getChannel(chain.payeeClient, { escrow: chain.escrowAddress, channelId }))!
    .closeRequestedAt

/**
 * The payer's forced close of its channel; its `closeRequestedAt`. A top-up that cancels it is
 * valid only after the request's second, in a later block: anvil gives blocks of one second the
 * same time (a real chain's next block is later), so a second passes on its clock.
 */
async function forceClose(payerIndex: number, channelId: Hex) {
  await Escrow.requestClose(chain.payerClient(payerIndex), {
    escrow: chain.escrowAddress,
    channelId,
  })
  const requestedAt = await closeRequestedAt(channelId)
  expect(requestedAt).not.toBe(0n)
  await chain.increaseTime(1)
  return requestedAt
}

/** Waits until the gateway's ledger shows the channel's close request. */
async function closeSeen(channelId: Hex) {
  const deadline = Date.now() + 15_000
  while (!(await Channels.get(gw.sql, channelId))!.closeRequestedAt && Date.now() < deadline)
    await Bun.sleep(50)
  expect((await Channels.get(gw.sql, channelId))!.closeRequestedAt).not.toBeNull()
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
    const requestedAt = await forceClose(1, channelId)
    await closeSeen(channelId)
    const refused = await post(await s.voucher(2_000n), ask)
    expect(refused.status).toBe(410)

    // The payer changes its mind: a top-up authorized from the close request on, which the
    // escrow takes as cancelling the close.
    const top = await post(await s.topUp(5_000n, { closeRequestedAt: requestedAt }))
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
    const requestedAt = await forceClose(4, channelId)
    await closeSeen(channelId)
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
    // It names the close time a cancelling top-up's authorization must be valid from.
    const problem = (await refused.json()) as { detail: string; closeRequestedAt: string }
    expect(problem.detail).toContain('topUp credential')
    expect(problem.closeRequestedAt).toBe(requestedAt.toString())
    const still = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(still!.closeRequestedAt).not.toBe(0n)
    expect(still!.deposit).toBe(10_000n)
    expect((await Channels.get(gw.sql, channelId))!.closeRequestedAt).not.toBeNull()

    // The top-up as a credential of its own, valid from the close request on, cancels the
    // close; then the voucher pays.
    const top = await post(
      await s.topUp(5_000n, { closeRequestedAt: BigInt(problem.closeRequestedAt) }),
    )
    expect(top.status).toBe(200)
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

  test('error: a voucher that carries a top-up, sent right after a forced close the gateway has not yet heard of, is refused from the chain before its top-up is sent', async () => {
    const { channelId } = await opened(7, 10_000n, 1_000n)
    const s = await session(7)
    s.channelId = channelId
    const payer = privateKeyToAccount(chain.payers[7]!.privateKey)
    // The header signed first: the close request then goes out right before it is sent, ahead
    // of the gateway's next look at the chain.
    const header = await Paid.voucherWithTopUp(payer, {
      challenge: s.challenge,
      chain,
      tokenDomain,
      channelId,
      cumulative: 12_000n,
      additional: 5_000n,
      salt: keccak256(toHex(`unheard-close:${channelId}`)),
    })
    await Escrow.requestClose(chain.payerClient(7), { escrow: chain.escrowAddress, channelId })
    const requestedAt = await closeRequestedAt(channelId)
    const refused = await post(header, ask)
    expect(refused.status).toBe(410)
    const problem = (await refused.json()) as { closeRequestedAt: string }
    expect(problem.closeRequestedAt).toBe(requestedAt.toString())
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(onChain!.deposit).toBe(10_000n)
    expect(onChain!.closeRequestedAt).toBe(requestedAt)
  }, 60_000)

  test('behavior: a CloseRequested event handled after the top-up that cancelled it does not close the channel again', async () => {
    const { s, channelId } = await opened(3, 10_000n, 1_000n)
    // The top-up right after the close request: the watcher (polling) sees the event later.
    const requestedAt = await forceClose(3, channelId)
    const top = await post(await s.topUp(5_000n, { closeRequestedAt: requestedAt }))
    expect(top.status).toBe(200)
    await Bun.sleep(2_500)
    expect((await Channels.get(gw.sql, channelId))!.closeRequestedAt).toBeNull()
    const served = await post(await s.voucher(6_000n), ask)
    expect(served.status).toBe(200)
    await served.text()
  }, 60_000)
  test('error: a top-up authorization the payer signed before its forced close is refused by the gateway before any transaction (the escrow would not cancel the close with it); the close stands on chain', async () => {
    const { s, channelId } = await opened(5, 10_000n, 1_000n)
    const payer = chain.payers[5]!.address
    // Signed before the close request (validAfter 0), as one the gateway was given and never
    // used: submitted after the request, it would only lock more tokens in a closing channel.
    const early = await s.topUp(5_000n)
    const { nonce } = (Credential.deserialize(early).payload as { authorization: { nonce: Hex } })
      .authorization
    const requestedAt = await forceClose(5, channelId)
    const before = await balance(payer)
    const strangerBefore = await balance(chain.payers[6]!.address)

    const refused = await post(early)
    expect(refused.status).toBe(402)
    const problem = (await refused.json()) as {
      type: string
      detail: string
      closeRequestedAt: string
    }
    expect(problem.type).toContain('verification-failed')
    expect(problem.detail).toContain('predates')
    expect(problem.closeRequestedAt).toBe(requestedAt.toString())

    // Nothing sent: the authorization unused, the deposit and the payer's balance as they were,
    // no top-up recorded, and the close still standing.
    const used = await readContract(chain.payeeClient, {
      address: chain.currencyAddress,
      abi: authorizationStateAbi,
      functionName: 'authorizationState',
      args: [payer, nonce],
    })
    expect(used).toBe(false)
    expect(await balance(payer)).toBe(before)
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(onChain!.deposit).toBe(10_000n)
    expect(onChain!.closeRequestedAt).toBe(requestedAt)
    const [row] = await gw.sql`select count(*)::int as n from chain_transactions
      where channel_id = ${Buffer.from(channelId.slice(2), 'hex')} and kind = 'topUp'`
    expect(row!.n).toBe(0)
    await closeSeen(channelId)
    expect((await Channels.get(gw.sql, channelId))!.deposit).toBe(10_000n)

    // Nor does another account's top-up, whenever it is valid from (the escrow never lets it
    // cancel a close): refused the same way, nothing sent.
    const stranger = await session(6)
    stranger.channelId = channelId
    const sponsored = await post(await stranger.topUp(5_000n, { closeRequestedAt: requestedAt }))
    expect(sponsored.status).toBe(402)
    expect(((await sponsored.json()) as { detail: string }).detail).toContain(
      'only a top-up from its payer',
    )
    expect(await balance(chain.payers[6]!.address)).toBe(strangerBefore)

    // One signed for after the request cancels it.
    const top = await post(await s.topUp(5_000n, { closeRequestedAt: requestedAt }))
    expect(top.status).toBe(200)
    expect(await closeRequestedAt(channelId)).toBe(0n)
    expect((await Channels.get(gw.sql, channelId))!.closeRequestedAt).toBeNull()
  }, 60_000)
})
