/**
 * Strangers and public vouchers: a voucher a settle transaction put in public calldata (signed by
 * the payer, so its signature verifies) pays for no request and closes no channel, vouchers a
 * stranger forges for a public channel id do not use up its payer's voucher rate, and a top-up
 * transaction (public) pays for no request.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { decodeFunctionData, type Hex, keccak256, toHex } from 'viem'
import { generatePrivateKey, privateKeyToAccount } from 'viem/accounts'
import { getBalance, getTransaction } from 'viem/actions'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Reservations from '../../src/ledger/Reservations.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Session from '../../src/payment/evm/Session.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Ledger from '../helpers/Ledger.ts'
import * as Paid from '../helpers/Paid.ts'
import * as Payer from '../helpers/Payer.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 2_000 },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const payer = privateKeyToAccount(chain.payers[0]!.privateKey)

const freshChallenge = () => Paid.challenge(url)

/** A completion request paid with the credential `authorization`. */
const completion = (authorization: string) =>
  fetch(url, {
    method: 'POST',
    headers: { authorization, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'one two three' }] }),
  })

/** A close credential anyone can make of a voucher a settle transaction made public. */
async function publicClose(channelId: Hex, amount: bigint, signature: Hex) {
  return Credential.serialize(
    Credential.from({
      challenge: await freshChallenge(),
      payload: { action: 'close', channelId, cumulativeAmount: amount.toString(), signature },
    }),
  )
}

/** A channel the payer opened (HEAD, no request) with an initial voucher for `initial`. */
const opened = (initial: bigint) =>
  Paid.opened(url, { account: payer, tokenDomain, deposit: 100_000n, initial })

/** Holds `held` of the channel for a request, as its admission does; charges it with `settle`. */
async function underWay(channelId: Hex, held: bigint) {
  const id = crypto.randomUUID()
  const admitted = await Ledger.hold(gw.sql, channelId, {
    want: held,
    need: held,
    stream: true,
    requestId: id,
  })
  expect(admitted.status).toBe('ok')
  const r = Reservations.reservation(gw.sql, { id, held, leaseSeconds: 60, channelId })
  const outcome = { promptTokens: 1, completionTokens: 1, status: 'ok' as const, latencyMs: 1 }
  return { settle: (cost: bigint) => r.settle({ ...outcome, cost, ttftMs: 1 }) }
}

/** Settles the channel (the admin's settle, mined) and reads what anyone can of it: the
 * voucher its settle transaction carries. */
async function settleVoucher(channelId: Hex) {
  const settled = (await (await gw.admin(`/channels/${channelId}/settle`, {})).json()) as {
    result: { status: string; txHash: Hex }
  }
  expect(settled.result.status).toBe('confirmed')
  const tx = await getTransaction(chain.payeeClient, { hash: settled.result.txHash })
  const { functionName, args } = decodeFunctionData({ abi: Escrow.abi, data: tx.input })
  expect(functionName).toBe('settle')
  const [id, amount, signature] = args as [Hex, bigint, Hex]
  expect(id.toLowerCase()).toBe(channelId.toLowerCase())
  return { amount, signature }
}

/**
 * A channel whose payer signed ahead (a voucher for 50,000, as createFetch does by its margin)
 * and was served `requests` times, then settled by the gateway (the highest voucher at or
 * below spent: the initial 10, on chain); what anyone reads in the settle's calldata.
 */
async function settledChannel(requests: number) {
  const session = await opened(10n)
  const channelId = session.channelId!
  const ahead = await session.voucher(50_000n)
  for (let i = 0; i < requests; i++) {
    const served = await completion(ahead)
    expect(served.status).toBe(200)
    await served.text()
  }
  const { amount, signature } = await settleVoucher(channelId)
  const spent = (await Ledger.channelState(gw.sql, channelId)).spent
  return { channelId, ahead, spent, amount, signature }
}

/**
 * A stranger floods a channel the payer opened with `credential`s (five at a time, well over
 * the channel's rate of 10 a second) while the payer sends its own next five vouchers in half
 * a second (half its rate); the flood's statuses, the payer's, and the accepted amount after.
 */
async function flooded(credential: (stranger: PayingSession) => Promise<string>) {
  const session = await opened(1_000n)
  const channelId = session.channelId!
  // A stranger knows the channelId (it is public on chain) and nothing else: it signs with its
  // own key, under a challenge anyone can get.
  const stranger = new PayingSession({
    account: privateKeyToAccount(generatePrivateKey()),
    challenge: await freshChallenge(),
    tokenDomain,
  })
  stranger.channelId = channelId
  let stop = false
  const statuses: number[] = []
  const flood = Array.from({ length: 5 }, async () => {
    while (!stop) {
      const res = await fetch(url, {
        method: 'HEAD',
        headers: { authorization: await credential(stranger) },
      })
      statuses.push(res.status)
    }
  })
  await Bun.sleep(300)
  const mine: number[] = []
  for (let i = 1; i <= 5; i++) {
    const res = await fetch(url, {
      method: 'HEAD',
      headers: { authorization: await session.voucher(1_000n + 1_000n * BigInt(i)) },
    })
    mine.push(res.status)
    await Bun.sleep(100)
  }
  stop = true
  await Promise.all(flood)
  return {
    statuses,
    mine,
    accepted: (await Ledger.channelState(gw.sql, channelId)).acceptedCumulative,
  }
}

describe('voucher rate limit (evm-session "Denial of Service")', () => {
  test('error: vouchers a stranger forges for a channel do not use up the rate of its payer', async () => {
    let n = 0
    const { statuses, mine, accepted } = await flooded((stranger) =>
      stranger.voucher(10_000n + BigInt(n++)),
    )
    // Every forged voucher was refused, and none was stored.
    expect(statuses.length).toBeGreaterThan(10)
    for (const status of statuses) expect([402, 429]).toContain(status)
    expect(mine).toEqual([200, 200, 200, 200, 200])
    expect(accepted).toBe(6_000n)
  }, 60_000)

  test('error: top-ups a stranger makes up for a channel (with no funds behind them) do not use up the voucher rate of its payer', async () => {
    // EIP-3009 top-ups of a stranger without tokens: each refused only once the chain is asked.
    const { statuses, mine, accepted } = await flooded((stranger) => stranger.topUp(200_000n))
    expect(statuses.length).toBeGreaterThan(10)
    expect(statuses).not.toContain(200)
    // Their own rate ran out; the payer's vouchers did not.
    expect(statuses).toContain(429)
    expect(mine).toEqual([200, 200, 200, 200, 200])
    expect(accepted).toBe(6_000n)
  }, 60_000)
})

describe('a voucher carrying a top-up, signed by someone else', () => {
  test('error: its voucher is checked before the top-up is sent: refused, the deposit untouched', async () => {
    const session = await opened(1_000n)
    const channelId = session.channelId!
    // A funded stranger (a development payer with tokens) tops up the channel and pays itself
    // with a voucher it signs: its signature is not the channel signer's.
    const stranger = privateKeyToAccount(chain.payers[3]!.privateKey)
    const additional = 5_000n
    const topUpSalt = keccak256(toHex(`stranger:${channelId}`))
    const cumulative = 2_000n
    const header = await Paid.voucherWithTopUp(stranger, {
      challenge: await freshChallenge(),
      chain,
      tokenDomain,
      channelId,
      cumulative,
      additional,
      salt: topUpSalt,
    })
    const before = await Ledger.channelState(gw.sql, channelId)
    const res = await fetch(url, { method: 'HEAD', headers: { authorization: header } })
    expect(res.status).toBe(402)
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(onChain!.deposit).toBe(before.deposit)
    expect((await Ledger.channelState(gw.sql, channelId)).acceptedCumulative).toBe(
      before.acceptedCumulative,
    )
  }, 60_000)
})

describe('a voucher carrying a top-up of a channel that pays someone else', () => {
  test('error: refused before any transaction: the gateway pays no gas to top up a channel it would not serve (another payee, any escrow user can open one)', async () => {
    // A payer opens a channel on the gateway escrow that pays itself, then asks the gateway to
    // top it up (the gateway paying the gas) with a voucher it signs.
    const attacker = privateKeyToAccount(chain.payers[4]!.privateKey)
    const { channelId } = await Escrow.open(chain.payerClient(4), {
      escrow: chain.escrowAddress,
      payee: attacker.address,
      token: chain.currencyAddress,
      deposit: 10n,
      salt: keccak256(toHex(`own-payee:${Date.now()}`)),
    })
    const gas = () => getBalance(chain.payeeClient, { address: chain.payee.address })
    const before = await gas()
    for (let i = 0; i < 2; i++) {
      const header = await Paid.voucherWithTopUp(attacker, {
        challenge: await freshChallenge(),
        chain,
        tokenDomain,
        channelId,
        cumulative: 0n,
        additional: 1n,
        salt: keccak256(toHex(`own-payee-top-up:${channelId}:${i}`)),
      })
      // A POST without a body: a voucher alone, answered with its problem.
      const res = await fetch(url, { method: 'POST', headers: { authorization: header } })
      expect(res.status).toBe(402)
      expect(((await res.json()) as { detail: string }).detail).toContain('another payee')
    }
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(onChain!.deposit).toBe(10n)
    expect(await gas()).toBe(before)
  }, 60_000)
})

describe('voucher rate limit, valid vouchers at once', () => {
  test('error: forty valid vouchers sent at once are held to the channel rate of 10 a second', async () => {
    const session = await opened(1_000n)
    const vouchers: string[] = []
    for (let i = 1; i <= 40; i++) vouchers.push(await session.voucher(1_000n + 1_000n * BigInt(i)))
    const statuses = await Promise.all(
      vouchers.map(async (authorization) => {
        const res = await fetch(url, { method: 'HEAD', headers: { authorization } })
        await res.arrayBuffer()
        return res.status
      }),
    )
    // Checked before any waits and counted after, all forty went through.
    expect(statuses.filter((s) => s === 429).length).toBeGreaterThanOrEqual(20)
    expect(statuses.filter((s) => s === 200).length).toBeGreaterThanOrEqual(1)
  }, 60_000)
})

describe('a voucher published on chain by a settlement', () => {
  test('error: a stranger cannot spend the payer channel with the voucher a settle transaction made public', async () => {
    const { channelId, spent, amount, signature } = await settledChannel(1)
    expect(spent).toBeGreaterThanOrEqual(10n)
    // A stranger (no channel, no funds) wraps it in a credential under a fresh challenge.
    const stolen = Credential.serialize(
      Credential.from({
        challenge: await freshChallenge(),
        payload: { action: 'voucher', channelId, cumulativeAmount: amount.toString(), signature },
      }),
    )
    const res = await completion(stolen)
    const text = await res.text()
    // It must not be served on the payer's channel, nor charge it.
    expect(res.status).toBe(402)
    expect(JSON.parse(text).type).toBe(
      'https://paymentauth.org/problems/session/insufficient-balance',
    )
    expect((await Ledger.channelState(gw.sql, channelId)).spent).toBe(spent)
  }, 60_000)
})

describe('a close with a voucher a settle transaction made public', () => {
  test('error: a stranger cannot shut the payer channel with it', async () => {
    const { channelId, ahead, amount, signature } = await settledChannel(2)
    const before = (await Channels.get(gw.sql, channelId))!
    expect(before.spent).toBeGreaterThan(before.settled)
    // The settle's calldata, read by anyone, and sent back as a close.
    const close = await publicClose(channelId, amount, signature)
    const refused = await fetch(url, { method: 'POST', headers: { authorization: close } })
    await refused.text()
    expect(refused.status).toBe(402)
    // The channel is still the payer's: not closing, and it serves the payer's next request.
    const after = (await Channels.get(gw.sql, channelId))!
    expect(after.closeRequestedAt).toBeNull()
    const next = await completion(ahead)
    await next.text()
    expect(next.status).toBe(200)
  }, 60_000)
})

describe('a public voucher as a close while the payer has a request under way', () => {
  test('error: a stranger close that covers spent but not the request under way is refused, and leaves the channel open', async () => {
    const session = await opened(20_000n)
    const channelId = session.channelId! as Hex
    await (await underWay(channelId, 20_000n)).settle(20_000n)
    const ahead = await fetch(url, {
      method: 'HEAD',
      headers: { authorization: await session.voucher(40_000n) },
    })
    expect(ahead.status).toBe(200)
    const { amount, signature } = await settleVoucher(channelId)
    expect(amount).toBe(20_000n)
    // The payer's request under way; the stranger sends the settle's voucher back as a close.
    const request = await underWay(channelId, 5_000n)
    const close = await publicClose(channelId, amount, signature)
    const closing = fetch(url, { method: 'POST', headers: { authorization: close } })
    await Bun.sleep(300)
    await request.settle(5_000n)
    const refused = await closing
    await refused.text()
    expect(refused.status).toBe(402)
    const after = (await Channels.get(gw.sql, channelId))!
    expect(after).toMatchObject({ closeRequestedAt: null, cooperativeClose: false, spent: 25_000n })
    const next = await fetch(url, {
      method: 'HEAD',
      headers: { authorization: await session.voucher(60_000n) },
    })
    expect(next.status).toBe(200)
  }, 60_000)
})

describe('a public voucher as a close when all that was spent is settled', () => {
  test('error: a stranger cannot close the channel with the settle voucher; the payer closes it with one a base unit above', async () => {
    const session = await opened(20_000n)
    const channelId = session.channelId! as Hex
    // Spent exactly what the voucher signed, then settled: the settle's voucher covers spent.
    await (await underWay(channelId, 20_000n)).settle(20_000n)
    const { amount, signature } = await settleVoucher(channelId)
    expect(amount).toBe(20_000n)
    expect((await Channels.get(gw.sql, channelId))!).toMatchObject({
      spent: 20_000n,
      settled: 20_000n,
    })
    const refused = await fetch(url, {
      method: 'POST',
      headers: { authorization: await publicClose(channelId, amount, signature) },
    })
    expect(refused.status).toBe(402)
    expect(((await refused.json()) as { requiredCumulative?: string }).requiredCumulative).toBe(
      '20001',
    )
    expect((await Channels.get(gw.sql, channelId))!).toMatchObject({
      closeRequestedAt: null,
      cooperativeClose: false,
      finalized: false,
    })
    // The payer's own close, a base unit above: taken, and the channel ends.
    const closed = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.close(20_001n) },
    })
    await closed.text()
    expect(closed.status).toBe(200)
    expect((await Channels.get(gw.sql, channelId))!.finalized).toBe(true)
  }, 60_000)
})

describe('the paying client closing a channel settled to all it signed', () => {
  test('behavior: close() signs a base unit above the settled voucher when the server asks, and the channel ends', async () => {
    const { fetch, openai } = Payer.client(chain, gw.url, 1)
    await openai.chat.completions.create({
      model: 'fake',
      messages: [{ role: 'user', content: 'one two three' }],
    })
    const { channelId, signed } = (await fetch.channel(gw.url))!
    const before = (await Channels.get(gw.sql, channelId as Hex))!
    expect(before.acceptedCumulative).toBe(BigInt(signed))
    // Everything signed is spent (a request charged the rest) and settled on chain.
    await (await underWay(channelId as Hex, BigInt(signed) - before.spent)).settle(
      BigInt(signed) - before.spent,
    )
    await settleVoucher(channelId as Hex)
    expect((await Channels.get(gw.sql, channelId as Hex))!.settled).toBe(BigInt(signed))
    expect(await fetch.close(gw.url)).toMatch(/^0x/)
    expect((await Channels.get(gw.sql, channelId as Hex))!.finalized).toBe(true)
  }, 60_000)
})

describe('an open rebuilt from public transactions', () => {
  test('error: a stranger cannot spend the payer channel with an open made of its open and settle calldata', async () => {
    const { channelId, spent: spentByPayer, amount, signature } = await settledChannel(1)
    // Both transactions are public: the gateway's openWithAuthorization and its settle.
    const [row] = await gw.sql`
      select encode(tx_hash, 'hex') as hash from chain_transactions
      where channel_id = ${Buffer.from(channelId.slice(2), 'hex')} and kind = 'open'`
    const openArgs = decodeFunctionData({
      abi: Escrow.abi,
      data: (await getTransaction(chain.payeeClient, { hash: `0x${row!.hash}` as Hex })).input,
    }).args as readonly unknown[]
    const [, , deposit, salt, , from, validAfter, validBefore, nonce, eip3009] = openArgs as [
      Hex,
      Hex,
      bigint,
      Hex,
      Hex,
      Hex,
      bigint,
      bigint,
      Hex,
      Hex,
    ]
    const stolen = Credential.serialize(
      Credential.from({
        challenge: await freshChallenge(),
        payload: {
          action: 'open',
          type: 'authorization',
          channelId,
          salt,
          authorization: {
            from,
            to: chain.escrowAddress,
            value: deposit.toString(),
            validAfter: validAfter.toString(),
            validBefore: validBefore.toString(),
            nonce,
          },
          signature: eip3009,
          cumulativeAmount: amount.toString(),
          voucherSignature: signature,
        },
      }),
    )
    const res = await completion(stolen)
    await res.text()
    expect(res.status).toBe(402)
    expect((await Ledger.channelState(gw.sql, channelId)).spent).toBe(spentByPayer)
  }, 60_000)
})

describe('a top-up transaction anyone can read', () => {
  // A top-up credential carries no voucher: by hash it names a transaction anyone can read on
  // chain, so it proves nothing about who sends it. It adds to the deposit, and pays for no
  // request (the draft's requests are paid by vouchers).
  test('error: a stranger showing the payer top-up transaction gets no request served from the payer channel', async () => {
    const session = await opened(10n)
    const channelId = session.channelId!
    // The payer authorized well ahead of what was spent (as createFetch does by its margin).
    const ahead = await fetch(url, {
      method: 'HEAD',
      headers: { authorization: await session.voucher(50_000n) },
    })
    expect(ahead.status).toBe(200)
    const sent = await Escrow.topUp(chain.payerClient(0), {
      escrow: chain.escrowAddress,
      channelId,
      token: chain.currencyAddress,
      amount: 1_000n,
    })
    const stranger = privateKeyToAccount(generatePrivateKey())
    const topUpByHash = async () =>
      Credential.serialize(
        Credential.from({
          challenge: await freshChallenge(),
          payload: {
            action: 'topUp',
            type: 'hash',
            channelId,
            hash: sent.hash,
            additionalDeposit: '1000',
          },
          source: Session.source({ chainId: chain.chainId, address: stranger.address }),
        }),
      )
    const before = await Ledger.channelState(gw.sql, channelId)
    const res = await completion(await topUpByHash())
    // Asked for a voucher instead, with a fresh challenge; the top-up itself was recorded.
    expect(res.status).toBe(402)
    expect(res.headers.get('www-authenticate')).toContain('Payment id=')
    const problem = (await res.json()) as { type: string; requiredCumulative: string }
    expect(problem.type).toBe('https://paymentauth.org/problems/session/insufficient-balance')
    expect(BigInt(problem.requiredCumulative)).toBeGreaterThan(before.spent)
    const after = await Ledger.channelState(gw.sql, channelId)
    expect(after.spent).toBe(before.spent)
    // The same credential without a request still records the top-up.
    const managed = await fetch(url, {
      method: 'HEAD',
      headers: { authorization: await topUpByHash() },
    })
    expect(managed.status).toBe(200)
    expect((await Ledger.channelState(gw.sql, channelId)).deposit).toBe(101_000n)
  }, 30_000)
})

describe('a voucher in a settle transaction not yet mined', () => {
  test.skipIf(gw.db.max === 1)(
    'error: a stranger cannot spend the payer channel with it while the settle waits in the mempool',
    async () => {
      const session = await opened(10n)
      const channelId = session.channelId!
      const ahead = await session.voucher(50_000n)
      const served = await completion(ahead)
      expect(served.status).toBe(200)
      await served.text()
      const rpc = (method: string, params: unknown[] = []) =>
        chain.payeeClient.request({ method, params } as never) as Promise<unknown>
      await rpc('evm_setAutomine', [false])
      try {
        const settling = gw.admin(`/channels/${channelId}/settle`, {})
        // The settle transaction, sent and not mined: its calldata is public.
        let input: Hex | undefined
        for (let i = 0; i < 200 && !input; i++) {
          const block = (await rpc('eth_getBlockByNumber', ['pending', true])) as {
            transactions: { input: Hex; to: Hex }[]
          }
          input = block.transactions.find(
            (t) => t.to?.toLowerCase() === chain.escrowAddress.toLowerCase(),
          )?.input
          if (!input) await Bun.sleep(25)
        }
        const { functionName, args } = decodeFunctionData({ abi: Escrow.abi, data: input! })
        expect(functionName).toBe('settle')
        const [, amount, signature] = args as [Hex, bigint, Hex]
        const before = await Ledger.channelState(gw.sql, channelId)
        expect(before.settled).toBe(0n)
        const stolen = Credential.serialize(
          Credential.from({
            challenge: await freshChallenge(),
            payload: {
              action: 'voucher',
              channelId,
              cumulativeAmount: amount.toString(),
              signature,
            },
          }),
        )
        const res = await completion(stolen)
        expect(res.status).toBe(402)
        expect(((await res.json()) as { type: string }).type).toBe(
          'https://paymentauth.org/problems/session/insufficient-balance',
        )
        expect((await Ledger.channelState(gw.sql, channelId)).spent).toBe(before.spent)
        await rpc('evm_setAutomine', [true])
        await rpc('evm_mine')
        await (await settling).text()
      } finally {
        await rpc('evm_setAutomine', [true])
      }
      // The payer's own voucher, above what was published, still pays.
      const again = await completion(ahead)
      expect(again.status).toBe(200)
      await again.text()
    },
    60_000,
  )
})
