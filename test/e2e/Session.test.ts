/**
 * MPP session payments end to end: real anvil with our escrow, real PostgreSQL, the fake
 * upstream, and the client side of src/client.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { type Hex, keccak256, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { verifyReceipt } from '../../src/client/index.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Receipt from '../../src/payment/Receipt.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'
import { read, text } from '../helpers/Sse.ts'

const chain = await Anvil.start({ accounts: 12 })
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 5_000 },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const balance = (owner: Hex) =>
  Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner })

const words = Array.from({ length: 80 }, (_, i) => `w${i}`).join(' ')
const body = (stream: boolean, content = words) =>
  JSON.stringify({ model: 'fake', stream, messages: [{ role: 'user', content }] })

async function challenge() {
  const res = await fetch(url, { method: 'POST', body: body(true) })
  expect(res.status).toBe(402)
  return { res, challenge: challengeOf(res.headers.get('www-authenticate'))! }
}

describe('challenge', () => {
  test('behavior: no credentials → 402 payment_required offering both ways in', async () => {
    const { res } = await challenge()
    const e = ((await res.json()) as { error: { type: string; message: string } }).error
    expect(e.type).toBe('payment_required')
    expect(e.message).toContain('API key')
    expect(e.message).toContain('Payment')
    const www = res.headers.get('www-authenticate')!
    expect(www).toStartWith('Bearer realm="tollway", Payment ')
    // A 402 is stored by no cache (the payment draft's MUST), and may be retried at once with
    // a credential (its SHOULD: Retry-After).
    expect(res.headers.get('cache-control')).toBe('no-store')
    expect(res.headers.get('retry-after')).toBe('0')
    const c = challengeOf(www)!
    expect(c).toMatchObject({ realm: 'tollway', method: 'evm', intent: 'session' })
    expect(c.request).toMatchObject({
      amount: '2000000',
      inputAmount: '1000000',
      methodDetails: {
        chainId: chain.chainId,
        feePayer: true,
        credentialTypes: ['authorization', 'hash'],
        // Read from the token at start-up: a payer signs the EIP-3009 open without the chain.
        tokenDomain: { name: 'Test USD', version: '1' },
      },
    })
    expect(Date.parse(c.expires!)).toBeGreaterThan(Date.now() + 9 * 60_000)
  })

  test('behavior: payments.tokenDomain, when configured, is what the challenge states', async () => {
    const configured = await Gateway.create(
      {
        chain: Gateway.chainOf(chain),
        payments: {
          challengeSecret: 'test-challenge-secret-0123456789',
          tokenDomain: { name: 'Configured', version: '9' },
        },
      },
      { db: gw.db, upstream: gw.upstream },
    )
    const res = await fetch(`${configured.url}/v1/chat/completions`, {
      method: 'POST',
      body: body(false),
    })
    await res.body?.cancel()
    const c = challengeOf(res.headers.get('www-authenticate'))!
    expect((c.request as { methodDetails: unknown }).methodDetails).toMatchObject({
      tokenDomain: { name: 'Configured', version: '9' },
    })
  })

  test('behavior: a bad key gets 401 with both challenges; declining every Payment method with Accept-Payment still gets one (a 402 must carry one)', async () => {
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: 'Bearer nope' },
      body: body(false),
    })
    expect(res.status).toBe(401)
    expect(res.headers.get('www-authenticate')).toContain('Payment ')
    for (const authorization of ['Bearer nope', undefined]) {
      const declined = await fetch(url, {
        method: 'POST',
        headers: {
          ...(authorization ? { authorization } : {}),
          'accept-payment': 'evm/session;q=0',
        },
        body: body(false),
      })
      await declined.body?.cancel()
      expect(declined.status).toBe(authorization ? 401 : 402)
      expect(challengeOf(declined.headers.get('www-authenticate'))).toMatchObject({
        method: 'evm',
        intent: 'session',
      })
    }
  })
})

describe('a full session', () => {
  test('behavior: open (authorization) → a stream needing several vouchers → HEAD voucher → second request → close; the payee gets exactly spent', async () => {
    const payer = privateKeyToAccount(chain.payers[0]!.privateKey)
    const payerBefore = await balance(payer.address)
    const payeeBefore = await balance(chain.payee.address)
    const { challenge: c } = await challenge()
    const session = new PayingSession({ account: payer, challenge: c, tokenDomain })
    const deposit = 1_000_000n
    const prompt = Tokenizer.prompt([{ content: words }])
    // Enough for the prompt and the first block of 16 tokens, no more.
    const open = await session.openWithAuthorization({ deposit, initial: BigInt(prompt) + 32n })
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: open },
      body: body(true),
    })
    expect(res.status).toBe(200)
    // A response with a receipt is kept by no shared cache (the payment draft's MUST).
    expect(res.headers.get('cache-control')).toBe('private, no-cache')
    const first = Receipt.deserialize(res.headers.get('payment-receipt')!)
    expect(first).toMatchObject({
      method: 'evm',
      intent: 'session',
      status: 'success',
      reference: session.channelId,
    })

    let needs = 0
    const events = await read(res, async (need) => {
      needs++
      expect(BigInt(need.requiredCumulative!)).toBeGreaterThan(BigInt(need.acceptedCumulative!))
      expect(need.deposit).toBe(deposit.toString())
      expect(need.topUpRequired).toBe(false as never)
      // Sign a little ahead, as a client does, so vouchers stay under 10 a second.
      const r = await fetch(url, {
        method: 'HEAD',
        headers: { authorization: await session.voucher(BigInt(need.requiredCumulative!) + 64n) },
      })
      expect(r.status).toBe(200)
      expect(r.headers.get('payment-receipt')).not.toBeNull()
      expect(r.headers.get('cache-control')).toBe('private')
    })
    expect(needs).toBeGreaterThanOrEqual(3)
    expect(text(events)).toBe(words)
    const receiptEvent = events.find((e) => e.event === 'payment-receipt')!
    const receipt = JSON.parse(receiptEvent.data) as {
      spent: string
      acceptedCumulative: string
      channelId: string
      units: number
    }
    expect(events.at(-1)!.data).toBe('[DONE]')
    const usage = events
      .filter((e) => !e.event && e.data.includes('"usage"'))
      .map((e) => JSON.parse(e.data).usage as { cost: string; completion_tokens: number })[0]!
    expect(receipt.spent).toBe(usage.cost)
    // The units the request consumed: output tokens, the unit the challenge's amount prices.
    expect(receipt.units).toBe(usage.completion_tokens)
    expect(first).not.toHaveProperty('units')

    // Top the channel up to a second request (non-streaming), paid by a voucher sent with it.
    const again = await fetch(url, {
      method: 'POST',
      headers: {
        authorization: await session.voucher(BigInt(receipt.acceptedCumulative) + 1_000n),
        'tollway-receipt': 'true',
      },
      body: body(false, 'short one'),
    })
    expect(again.status).toBe(200)
    expect(again.headers.get('cache-control')).toBe('private')
    const second = Receipt.deserialize(again.headers.get('payment-receipt')!) as unknown as {
      spent: string
      units: number
    }
    const secondBody = (await again.json()) as {
      usage: { cost: string; completion_tokens: number }
      tollway_receipt: Record<string, unknown>
    }
    const secondUsage = secondBody.usage
    expect(BigInt(second.spent)).toBe(BigInt(receipt.spent) + BigInt(secondUsage.cost))
    // The signed completion receipt names the channel as the payer, and the same charge.
    const { public_key } = (await (await fetch(`${gw.url}/v1/receipts/key`)).json()) as {
      public_key: string
    }
    expect(secondBody.tollway_receipt).toMatchObject({ payer: 'channel', cost: secondUsage.cost })
    expect(verifyReceipt(secondBody.tollway_receipt, public_key)).toBe(true)
    expect(second.units).toBe(secondUsage.completion_tokens)

    // Ledger invariants.
    const channel = (await Channels.get(gw.sql, session.channelId!))!
    expect(channel.spent).toBe(BigInt(second.spent))
    expect(channel.reserved).toBe(0n)
    expect(channel.settled <= channel.spent && channel.spent <= channel.acceptedCumulative).toBe(
      true,
    )
    expect(channel.acceptedCumulative <= channel.deposit).toBe(true)

    // The channel's state, for the payer and the operator.
    const status = (await (
      await fetch(`${gw.url}/v1/channels/${session.channelId}`)
    ).json()) as Record<string, string>
    expect(status).toMatchObject({
      status: 'open',
      spent: channel.spent.toString(),
      deposit: deposit.toString(),
    })
    const listed = (await (await gw.admin('/channels')).json()) as { data: { channelId: string }[] }
    expect(listed.data.map((c) => c.channelId)).toContain(session.channelId!)
    const settled = (await (
      await gw.admin(`/channels/${session.channelId}/settle`, {})
    ).json()) as {
      result: { status: string; cumulativeAmount: string }
      channel: { settled: string }
    }
    expect(settled.result.status).toBe('confirmed')
    expect(BigInt(settled.channel.settled)).toBeLessThanOrEqual(channel.spent)
    expect(await balance(chain.payee.address)).toBe(payeeBefore + BigInt(settled.channel.settled))

    // Close with a final voucher for exactly what was spent.
    const close = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.close(channel.spent) },
    })
    if (close.status !== 200)
      console.log(
        await close.text(),
        gw.logs.filter((l) => l.includes('"level":50')),
      )
    expect(close.status).toBe(200)
    const closed = ((await close.json()) as { receipt: { txHash: string } }).receipt
    expect(closed.txHash).toMatch(/^0x[0-9a-f]{64}$/)
    expect(await balance(chain.payee.address)).toBe(payeeBefore + channel.spent)
    expect(await balance(payer.address)).toBe(payerBefore - channel.spent)
    const onChain = (await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: session.channelId!,
    }))!
    expect(onChain.finalized).toBe(true)
    expect((await Channels.get(gw.sql, session.channelId!))!.finalized).toBe(true)
    expect(
      (
        (await (await fetch(`${gw.url}/v1/channels/${session.channelId}`)).json()) as {
          status: string
        }
      ).status,
    ).toBe('closed')
    expect((await fetch(`${gw.url}/v1/channels/0x${'0'.repeat(64)}`)).status).toBe(404)
  }, 60_000)

  test('behavior: open with a client-broadcast transaction (type="hash")', async () => {
    const payerClient = chain.payerClient(1)
    const { challenge: c } = await challenge()
    const session = new PayingSession({
      account: payerClient.account as never,
      challenge: c,
      tokenDomain,
    })
    const opened = await Paid.broadcastOpen(chain, payerClient, 500_000n)
    const header = await session.openWithHash({ ...opened, initial: 100_000n })
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: header },
      body: body(false, 'hello there'),
    })
    expect(res.status).toBe(200)
    const r = Receipt.deserialize(res.headers.get('payment-receipt')!) as unknown as {
      acceptedCumulative: string
      spent: string
    }
    expect(r.acceptedCumulative).toBe('100000')
    expect(BigInt(r.spent)).toBeGreaterThan(0n)
  }, 30_000)
})

describe('top-up mid-stream', () => {
  test('behavior: past the deposit the event says to top up; a topUp then a voucher resume the stream', async () => {
    const payer = privateKeyToAccount(chain.payers[8]!.privateKey)
    const { challenge: c } = await challenge()
    const session = new PayingSession({ account: payer, challenge: c, tokenDomain })
    const prompt = BigInt(Tokenizer.prompt([{ content: words }]))
    const deposit = prompt + 64n
    const open = await session.openWithAuthorization({ deposit, initial: deposit })
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: open },
      body: body(true),
    })
    expect(res.status).toBe(200)
    let topUps = 0
    let total = deposit
    const events = await read(res, async (need) => {
      const required = BigInt(need.requiredCumulative!)
      if (need.topUpRequired as unknown as boolean) {
        expect(required).toBeGreaterThan(BigInt(need.deposit!))
        topUps++
        total += 1_000n
        const t = await fetch(url, {
          method: 'HEAD',
          headers: { authorization: await session.topUp(1_000n) },
        })
        expect(t.status).toBe(200)
      }
      const v = await fetch(url, {
        method: 'HEAD',
        headers: {
          authorization: await session.voucher(required + 64n > total ? total : required + 64n),
        },
      })
      expect(v.status).toBe(200)
    })
    expect(topUps).toBeGreaterThanOrEqual(1)
    expect(text(events)).toBe(words)
    const channel = (await Channels.get(gw.sql, session.channelId!))!
    expect(channel.deposit).toBe(total)
    expect(channel.reserved).toBe(0n)
  }, 30_000)
})

describe('channel limits', () => {
  test('behavior: a new stream on a channel ends the one before it', async () => {
    const payer = privateKeyToAccount(chain.payers[5]!.privateKey)
    const { challenge: c } = await challenge()
    const session = new PayingSession({ account: payer, challenge: c, tokenDomain })
    const prompt = Tokenizer.prompt([{ content: words }])
    const open = await session.openWithAuthorization({
      deposit: 1_000_000n,
      initial: BigInt(prompt) * 2n + 64n,
    })
    const slow = JSON.stringify({
      model: 'fake-slow',
      stream: true,
      messages: [{ role: 'user', content: words }],
    })
    const first = await fetch(url, { method: 'POST', headers: { authorization: open }, body: slow })
    expect(first.status).toBe(200)
    const reading = read(first, async () => {})
    await Bun.sleep(200)
    // The second stream takes the channel (it has its own voucher).
    const second = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(session.signed + 100_000n) },
      body: body(true, 'one two three'),
    })
    expect(second.status).toBe(200)
    const events = await reading
    const error = events.map((e) => e.data).find((d) => d.includes('stream_superseded'))
    expect(error).toBeDefined()
    expect(text(events).length).toBeLessThan(words.length)
    expect(text(await read(second, async () => {}))).toBe('one two three')
    expect((await Channels.get(gw.sql, session.channelId!))!.reserved).toBe(0n)
  }, 30_000)

  test('error: more than 10 voucher submissions a second on a channel → 429 with Retry-After; replays are not counted', async () => {
    const payer = privateKeyToAccount(chain.payers[6]!.privateKey)
    const { challenge: c } = await challenge()
    const session = new PayingSession({ account: payer, challenge: c, tokenDomain })
    expect(
      (
        await fetch(url, {
          method: 'HEAD',
          headers: {
            authorization: await session.openWithAuthorization({ deposit: 100_000n, initial: 1n }),
          },
        })
      ).status,
    ).toBe(200)
    // A high voucher that is refused (not the channel's signer) makes no later one a replay.
    const stranger = new PayingSession({
      account: privateKeyToAccount(keccak256(toHex('stranger'))),
      challenge: c,
      tokenDomain,
    })
    stranger.channelId = session.channelId
    expect(
      (
        await fetch(url, {
          method: 'HEAD',
          headers: { authorization: await stranger.voucher(99_999n) },
        })
      ).status,
    ).toBe(402)
    const statuses: number[] = []
    let refused: Response | undefined
    for (let i = 2; i < 16; i++) {
      const res = await fetch(url, {
        method: 'HEAD',
        headers: { authorization: await session.voucher(BigInt(i)) },
      })
      statuses.push(res.status)
      if (res.status === 429) refused ??= res
    }
    // The refused voucher took one of the 10 submissions of this second.
    expect(statuses.filter((s) => s === 200).length).toBeGreaterThanOrEqual(9)
    expect(statuses).toContain(429)
    // As every 429 of type rate_limit_exceeded: Retry-After and the x-ratelimit headers (10 a
    // second, none left, the next one within a tenth of a second).
    expect(refused!.headers.get('retry-after')).toBe('1')
    expect(Number(refused!.headers.get('retry-after-ms'))).toBeWithin(0, 101)
    expect(refused!.headers.get('x-ratelimit-limit-requests')).toBe('10')
    expect(refused!.headers.get('x-ratelimit-remaining-requests')).toBe('0')
    expect(refused!.headers.get('x-ratelimit-reset-requests')).toMatch(/^0(\.\d+)?s$/)
    // Accepted vouchers are kept; refused ones changed nothing.
    const accepted = (await Channels.get(gw.sql, session.channelId!))!.acceptedCumulative
    expect(accepted).toBe(BigInt(1 + statuses.lastIndexOf(200) + 1))
    // The accepted voucher again (what every request of a busy channel carries) is a replay:
    // it does not count, however many (VoucherLimiter's unit test pins the rest).
    const head = async (amount: bigint) =>
      (
        await fetch(url, {
          method: 'HEAD',
          headers: { authorization: await session.voucher(amount) },
        })
      ).status
    for (let i = 0; i < 12; i++) expect(await head(accepted)).toBe(200)
    expect(await head(accepted - 1n)).toBe(200)
  })
})

describe('privacy', () => {
  test('behavior: a paid stream leaves no prompt or completion text in the database or the logs', async () => {
    const marker = `MARKER${crypto.randomUUID().replaceAll('-', '')}`
    const payer = privateKeyToAccount(chain.payers[9]!.privateKey)
    const { challenge: c } = await challenge()
    const session = new PayingSession({ account: payer, challenge: c, tokenDomain })
    const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 50_000n })
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: open },
      body: body(true, `say ${marker} now`),
    })
    expect(text(await read(res, async () => {}))).toContain(marker)
    const tables = await gw.sql`
      select table_name from information_schema.tables
      where table_schema = current_schema() and table_type = 'BASE TABLE'`
    expect(tables.map((t) => t.table_name)).toContain('channels')
    for (const { table_name } of tables) {
      const [hit] = await gw.sql.unsafe(
        `select count(*)::int as n from "${table_name}" t where t::text like '%' || $1 || '%'`,
        [marker],
      )
      expect({ table: table_name, n: hit!.n }).toEqual({ table: table_name, n: 0 })
    }
    expect(gw.logs.join('\n')).not.toContain(marker)
  }, 30_000)
})

describe('idempotency', () => {
  test('behavior: a paid retry with the same Idempotency-Key is not charged twice', async () => {
    const payer = privateKeyToAccount(chain.payers[7]!.privateKey)
    const { challenge: c } = await challenge()
    const session = new PayingSession({ account: payer, challenge: c, tokenDomain })
    const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 50_000n })
    const headers = { authorization: open, 'idempotency-key': 'paid-1' }
    const first = await fetch(url, { method: 'POST', headers, body: body(false, 'pay me once') })
    expect(first.status).toBe(200)
    const spent = (await Channels.get(gw.sql, session.channelId!))!.spent
    expect(spent).toBeGreaterThan(0n)
    const again = await fetch(url, { method: 'POST', headers, body: body(false, 'pay me once') })
    expect(again.status).toBe(409)
    expect(((await again.json()) as { error: { code: string } }).error.code).toBe(
      'idempotency_key_reused',
    )
    expect((await Channels.get(gw.sql, session.channelId!))!.spent).toBe(spent)
  }, 30_000)
})

describe('rejections', () => {
  test('error: a voucher signed by someone else → 402 signer-mismatch with a fresh challenge, nothing stored', async () => {
    const payer = privateKeyToAccount(chain.payers[2]!.privateKey)
    const { challenge: c } = await challenge()
    const session = new PayingSession({ account: payer, challenge: c, tokenDomain })
    const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 1_000n })
    const opened = await fetch(url, { method: 'HEAD', headers: { authorization: open } })
    expect(opened.status).toBe(200)
    const thief = new PayingSession({
      account: privateKeyToAccount(keccak256(toHex('thief'))),
      challenge: c,
    })
    thief.channelId = session.channelId
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: await thief.voucher(50_000n) },
    })
    expect(res.status).toBe(402)
    expect(res.headers.get('content-type')).toContain('application/problem+json')
    const p = (await res.json()) as { type: string }
    expect(p.type).toBe('https://paymentauth.org/problems/session/signer-mismatch')
    // The fresh challenge names the channel the credential named.
    expect(challengeOf(res.headers.get('www-authenticate'))!.request).toMatchObject({
      methodDetails: { channelId: session.channelId },
    })
    expect((await Channels.get(gw.sql, session.channelId!))!.acceptedCumulative).toBe(1_000n)
  }, 30_000)

  test('error: a forged challenge → 402 with a fresh one', async () => {
    const payer = privateKeyToAccount(chain.payers[3]!.privateKey)
    const { challenge: c } = await challenge()
    const forged = { ...c, request: { ...c.request, amount: '1' } }
    const session = new PayingSession({ account: payer, challenge: forged, tokenDomain })
    const res = await fetch(url, {
      method: 'HEAD',
      headers: {
        authorization: await session.openWithAuthorization({ deposit: 1000n, initial: 1n }),
      },
    })
    expect(res.status).toBe(402)
    expect(challengeOf(res.headers.get('www-authenticate'))).toBeDefined()
  })

  test('error: a stream short of funds with no voucher ends cleanly after the timeout, charging only what was sent', async () => {
    const payer = privateKeyToAccount(chain.payers[4]!.privateKey)
    const { challenge: c } = await challenge()
    const session = new PayingSession({ account: payer, challenge: c, tokenDomain })
    const prompt = Tokenizer.prompt([{ content: words }])
    const open = await session.openWithAuthorization({
      deposit: 100_000n,
      initial: BigInt(prompt) + 32n,
    })
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: open },
      body: body(true),
    })
    let needs = 0
    const events = await read(res, async () => {
      needs++
    })
    expect(needs).toBe(1)
    expect(events.at(-1)!.data).toBe('[DONE]')
    const channel = (await Channels.get(gw.sql, session.channelId!))!
    expect(channel.spent).toBeLessThanOrEqual(BigInt(prompt) + 32n)
    expect(channel.reserved).toBe(0n)
    const sent = text(events)
    const delivered = sent
      .split(' ')
      .filter(Boolean)
      .map((w, i) => Tokenizer.count(i ? ` ${w}` : w))
      .reduce((a, b) => a + b, 0)
    expect(channel.spent).toBe(BigInt(prompt + 2 * delivered))
  }, 30_000)
})
