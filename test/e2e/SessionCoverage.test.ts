/**
 * Session payment behaviours not covered elsewhere, end to end: real anvil with our escrow, a
 * real gateway on PostgreSQL (or PGlite), the fake upstream, and the client side of src/client.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { type Hex, keccak256, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Settlements from '../../src/ledger/Settlements.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Session from '../../src/payment/evm/Session.ts'
import * as Receipt from '../../src/payment/Receipt.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'
import { read, text } from '../helpers/Sse.ts'

const chain = await Anvil.start({ accounts: 19 })
afterAll(() => chain.stop())
const secret = 'test-challenge-secret-0123456789'
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: secret, voucherTimeoutMs: 3_000 },
})
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })

const words = Array.from({ length: 200 }, (_, i) => `w${i}`).join(' ')
const body = (stream: boolean, content = words, model = 'fake') =>
  JSON.stringify({ model, stream, messages: [{ role: 'user', content }] })
/** Prices of the test models: 1 base unit per prompt token, 2 per completion token. */
const promptCost = (content: string) => BigInt(Tokenizer.prompt([{ content }]))
/** A metering block is 16 tokens (Gateway.create) at 2 base units each. */
const blockCost = 32n
/** The tokens of a completion text as the fake upstream sends it, word by word. */
const tokensOf = (s: string) =>
  s
    .split(' ')
    .filter(Boolean)
    .map((w, i) => Tokenizer.count(i ? ` ${w}` : w))
    .reduce((a, b) => a + b, 0)

const freshChallenge = (at = url) => Paid.challenge(at, body(false, 'hi'))

/** A paying session of payer `index` with a channel opened (HEAD) and `initial` accepted. */
const opened = (index: number, deposit: bigint, initial: bigint, at = url) =>
  Paid.opened(at, {
    account: privateKeyToAccount(chain.payers[index]!.privateKey),
    tokenDomain,
    deposit,
    initial,
  })

type ChannelView = {
  deposit: string
  acceptedCumulative: string
  spent: string
  reserved: string
  status: string
}

/** The channel as its payer sees it (GET /v1/channels/{id}). */
async function channelOf(channelId: Hex, at = gw.url): Promise<ChannelView> {
  const res = await fetch(`${at}/v1/channels/${channelId}`)
  expect(res.status).toBe(200)
  return (await res.json()) as ChannelView
}

/** The channel once nothing is reserved on it any more (a cut stream settles as it unwinds). */
async function idle(channelId: Hex): Promise<ChannelView> {
  await Batch.settled(gw.sql)
  let c = await channelOf(channelId)
  for (let i = 0; i < 200 && c.reserved !== '0'; i++) {
    await Bun.sleep(25)
    c = await channelOf(channelId)
  }
  expect(c.reserved).toBe('0')
  return c
}

describe('admission of a paid request', () => {
  test('error: a channel that cannot cover the prompt and one block → 402 insufficient-balance with requiredCumulative and a fresh challenge naming the channel', async () => {
    const prompt = promptCost(words)
    // One base unit short of the prompt and the first block.
    const session = await opened(0, 100_000n, prompt + blockCost - 1n)
    const channelId = session.channelId!
    const calls = gw.upstream.received.length
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(prompt + blockCost - 1n) },
      body: body(true),
    })
    const raw = await res.text()
    expect(res.status).toBe(402)
    expect(res.headers.get('content-type')).toContain('application/problem+json')
    expect(res.headers.get('cache-control')).toBe('no-store')
    const problem = JSON.parse(raw) as Record<string, unknown>
    expect(problem).toMatchObject({
      type: 'https://paymentauth.org/problems/session/insufficient-balance',
      status: 402,
      channelId,
      requiredCumulative: (prompt + blockCost).toString(),
      acceptedCumulative: (prompt + blockCost - 1n).toString(),
      deposit: '100000',
    })
    const c = challengeOf(res.headers.get('www-authenticate'))!
    expect(c).toBeDefined()
    expect(Challenge.verify(c, secret).valid).toBe(true)
    expect(Date.parse(c.expires!)).toBeGreaterThan(Date.now())
    expect(Session.requestOf(c).methodDetails.channelId).toBe(channelId)
    // Refused before the upstream, with nothing held or spent.
    expect(gw.upstream.received.length).toBe(calls)
    expect(await channelOf(channelId)).toMatchObject({ spent: '0', reserved: '0' })

    // A voucher for requiredCumulative, on the fresh challenge, is enough.
    session.renew(c)
    const again = await fetch(url, {
      method: 'POST',
      headers: {
        authorization: await session.voucher(BigInt(problem.requiredCumulative as string)),
      },
      body: body(true, 'now it fits'),
    })
    expect(again.status).toBe(200)
    expect(text(await read(again, async () => {}))).toBe('now it fits')
  }, 30_000)

  test('error: with payments on, an API key with no credits → 402 insufficient_credits offering a Bearer and a Payment challenge', async () => {
    const { key } = await gw.account({ credits: 0 })
    const calls = gw.upstream.received.length
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: body(false, 'hello there'),
    })
    expect(res.status).toBe(402)
    const e = ((await res.json()) as { error: { type: string; code: string } }).error
    expect(e.type).toBe('insufficient_credits')
    const www = res.headers.get('www-authenticate')!
    expect(www).toStartWith('Bearer realm="tollway"')
    const payment = Challenge.deserialize(www).filter(
      (c) => c.method === 'evm' && c.intent === 'session',
    )
    expect(payment).toHaveLength(1)
    expect(Challenge.verify(payment[0]!, secret).valid).toBe(true)
    // Paying with the challenge can go at once.
    expect(res.headers.get('retry-after')).toBe('0')
    expect(gw.upstream.received.length).toBe(calls)
  })
})

describe('what a paid stream costs', () => {
  test('behavior: a paid stream the client aborts mid-stream spends the prompt plus the tokens sent, no more', async () => {
    const prompt = promptCost(words)
    const session = await opened(1, 1_000_000n, 500_000n)
    const channelId = session.channelId!
    const controller = new AbortController()
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(500_000n) },
      body: body(true, words, 'fake-slow'),
      signal: controller.signal,
    })
    expect(res.status).toBe(200)
    const reader = res.body!.getReader()
    const decoder = new TextDecoder()
    let sse = ''
    // Ten words (20 tokens): between the block boundaries (16 and 48 tokens) a charge of whole
    // blocks would land on.
    while (!/"content":"[^"]*\bw9\b/.test(sse)) {
      const { value, done } = await reader.read()
      if (done) break
      sse += decoder.decode(value, { stream: true })
    }
    controller.abort()
    await reader.cancel().catch(() => {})
    const received = sse
      .split('\n\n')
      .map((block) => /^data: (\{.*)$/m.exec(block)?.[1])
      .filter((d): d is string => d !== undefined)
      .map(
        (d) =>
          (JSON.parse(d) as { choices?: { delta?: { content?: string } }[] }).choices?.[0]?.delta
            ?.content ?? '',
      )
      .join('')
    expect(received).toStartWith('w0 w1 w2 w3 w4 w5 w6 w7 w8 w9')
    const c = await idle(channelId)
    await Batch.settled(gw.sql)
    const [usage] = await gw.sql`
      select status, prompt_tokens, completion_tokens, cost::text as cost from usage
      where channel_id = ${Buffer.from(channelId.slice(2), 'hex')}`
    expect(usage!.status).toBe('cancelled')
    // The charge is exactly what the usage row counts as sent...
    expect(BigInt(c.spent)).toBe(prompt + 2n * BigInt(usage!.completion_tokens))
    expect(c.spent).toBe(usage!.cost)
    // ...which is what the client received, or the word or two in flight when it left.
    const got = tokensOf(received)
    const inFlight = tokensOf(
      words
        .split(' ')
        .slice(0, received.split(' ').length + 2)
        .join(' '),
    )
    expect(usage!.completion_tokens).toBeGreaterThanOrEqual(got)
    expect(usage!.completion_tokens).toBeLessThanOrEqual(inFlight)
    expect(BigInt(c.spent)).toBeLessThan(prompt + 2n * BigInt(tokensOf(words)))
    await Bun.sleep(50)
    expect(gw.upstream.received.at(-1)!.aborted).toBe(true)
  }, 30_000)

  test('error: a paid request whose upstream fails before the first token → 502, nothing spent', async () => {
    const session = await opened(2, 100_000n, 50_000n)
    const channelId = session.channelId!
    // Something spent already, so that "unchanged" is not just zero.
    const first = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(50_000n) },
      body: body(false, 'pay for this'),
    })
    expect(first.status).toBe(200)
    const before = await idle(channelId)
    expect(BigInt(before.spent)).toBeGreaterThan(0n)
    for (const stream of [false, true]) {
      const res = await fetch(url, {
        method: 'POST',
        headers: { authorization: await session.voucher(50_000n) },
        body: body(stream, 'this fails', 'fake-500'),
      })
      expect(res.status).toBe(502)
      // No receipt of success on a failure.
      expect(res.headers.get('payment-receipt')).toBeNull()
      const e = ((await res.json()) as { error: { type: string } }).error
      expect(e.type).toBe('upstream_error')
      const after = await idle(channelId)
      expect(after.spent).toBe(before.spent)
      expect(after.acceptedCumulative).toBe('50000')
    }
  }, 30_000)

  test('behavior: with payments on, an API-key stream is plain OpenAI SSE: data lines only, ending with [DONE]', async () => {
    const { key } = await gw.account()
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: body(true, 'one two three four'),
    })
    expect(res.status).toBe(200)
    expect(res.headers.get('content-type')).toContain('text/event-stream')
    expect(res.headers.get('payment-receipt')).toBeNull()
    const raw = await res.text()
    const lines = raw.split('\n').filter((l) => l !== '')
    expect(lines.length).toBeGreaterThan(2)
    expect(lines.filter((l) => !l.startsWith('data: '))).toEqual([])
    expect(raw).not.toContain('payment-need-voucher')
    expect(raw).not.toContain('payment-receipt')
    expect(lines.at(-1)).toBe('data: [DONE]')
    const events = await read(new Response(raw), async () => {})
    expect(events.every((e) => e.event === undefined)).toBe(true)
    expect(text(events)).toBe('one two three four')
  })
})

describe('the generated challenge secret', () => {
  test('behavior: without CHALLENGE_SECRET the secret is kept in the data dir; a restarted gateway accepts a credential on a challenge issued before', async () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'tollway-secret-'))
    const otherDir = mkdtempSync(join(tmpdir(), 'tollway-secret-'))
    afterAll(() => {
      rmSync(dataDir, { recursive: true, force: true })
      rmSync(otherDir, { recursive: true, force: true })
    })
    const overrides = (dir: string) => ({
      chain: Gateway.chainOf(chain),
      dataDir: dir,
      payments: { voucherTimeoutMs: 3_000 },
    })
    const shared = { db: gw.db, upstream: gw.upstream }
    const first = await Gateway.create(overrides(dataDir), shared)
    const issued = await freshChallenge(`${first.url}/v1/chat/completions`)
    const kept = readFileSync(join(dataDir, 'challenge-secret'), 'utf8').trim()
    expect(kept.length).toBeGreaterThanOrEqual(32)
    expect(Challenge.verify(issued, kept).valid).toBe(true)
    await first.stop()

    const session = new PayingSession({
      account: privateKeyToAccount(chain.payers[3]!.privateKey),
      challenge: issued,
      tokenDomain,
    })
    const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 50_000n })
    // A gateway with another data dir has another secret: the challenge is not its own.
    const stranger = await Gateway.create(overrides(otherDir), shared)
    const refused = await fetch(`${stranger.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: open },
    })
    expect(refused.status).toBe(402)
    expect(((await refused.json()) as { type: string }).type).toBe(
      'https://paymentauth.org/problems/session/challenge-not-found',
    )
    expect(readFileSync(join(otherDir, 'challenge-secret'), 'utf8').trim()).not.toBe(kept)

    // The same data dir after a restart: the credential goes through.
    const restarted = await Gateway.create(overrides(dataDir), shared)
    const res = await fetch(`${restarted.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: open },
      body: body(false, 'after the restart'),
    })
    expect(res.status).toBe(200)
    expect(
      ((await res.json()) as { choices: { message: { content: string } }[] }).choices[0]!.message
        .content,
    ).toBe('after the restart')
    const receipt = Receipt.deserialize(res.headers.get('payment-receipt')!) as unknown as {
      reference: string
      challengeId: string
    }
    expect(receipt.reference).toBe(session.channelId!)
    expect(receipt.challengeId).toBe(issued.id)
  }, 30_000)
})

describe('deposits', () => {
  test('behavior: topUp with type "hash": the payer tops up on the escrow itself → 200 with a receipt; the deposit grows by exactly the top-up', async () => {
    const payerClient = chain.payerClient(4)
    const session = await opened(4, 100_000n, 1_000n)
    const channelId = session.channelId!
    const before = await channelOf(channelId)
    expect(before.deposit).toBe('100000')
    const amount = 12_345n
    const sent = await Escrow.topUp(payerClient, {
      escrow: chain.escrowAddress,
      channelId,
      token: chain.currencyAddress,
      amount,
    })
    const topUpByHash = (additionalDeposit: bigint) =>
      Credential.serialize(
        Credential.from({
          challenge: session.challenge,
          payload: { action: 'topUp', type: 'hash', channelId, hash: sent.hash, additionalDeposit },
          source: Session.source({
            chainId: chain.chainId,
            address: payerClient.account.address,
          }),
        }),
      )
    // Claiming other than the transaction put in (less, here): refused, nothing recorded (the draft: the
    // deposit grew by exactly additionalDeposit).
    const claimed = await fetch(url, {
      method: 'POST',
      headers: { authorization: topUpByHash(amount - 1n) },
    })
    expect(claimed.status).toBe(402)
    expect(((await claimed.json()) as { type: string }).type).toBe(
      'https://paymentauth.org/problems/verification-failed',
    )
    expect((await channelOf(channelId)).deposit).toBe(before.deposit)
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: topUpByHash(amount) },
    })
    expect(res.status).toBe(200)
    const receipt = Receipt.deserialize(res.headers.get('payment-receipt')!) as unknown as {
      reference: string
      txHash: string
      acceptedCumulative: string
    }
    expect(receipt.reference).toBe(channelId)
    expect(receipt.txHash).toBe(sent.hash)
    expect(receipt.acceptedCumulative).toBe('1000')
    const after = await channelOf(channelId)
    expect(BigInt(after.deposit)).toBe(BigInt(before.deposit) + amount)
    expect(after.acceptedCumulative).toBe(before.acceptedCumulative)
    // The grown deposit takes a voucher it could not before.
    const voucher = await fetch(url, {
      method: 'HEAD',
      headers: { authorization: await session.voucher(100_000n + amount) },
    })
    expect(voucher.status).toBe(200)
  }, 30_000)

  test('behavior: a voucher carrying a topUp deposit (EIP-3009) is applied and accepted in one request that also serves a completion', async () => {
    const account = privateKeyToAccount(chain.payers[5]!.privateKey)
    const deposit = 10_000n
    const session = await opened(5, deposit, 1_000n)
    const channelId = session.channelId!
    const additional = 5_000n
    // Above the old deposit: acceptable only once the top-up is in.
    const cumulative = 14_000n
    const topUpSalt = keccak256(toHex(`merge:${channelId}:${Date.now()}`))
    const header = await Paid.voucherWithTopUp(account, {
      challenge: session.challenge,
      chain,
      tokenDomain,
      channelId,
      cumulative,
      additional,
      salt: topUpSalt,
    })
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: header },
      body: body(false, 'merged deposit'),
    })
    expect(res.status).toBe(200)
    const completion = (await res.json()) as {
      choices: { message: { content: string } }[]
      usage: { cost: string }
    }
    expect(completion.choices[0]!.message.content).toBe('merged deposit')
    const receipt = Receipt.deserialize(res.headers.get('payment-receipt')!) as unknown as {
      acceptedCumulative: string
      spent: string
    }
    expect(receipt.acceptedCumulative).toBe(cumulative.toString())
    expect(receipt.spent).toBe(completion.usage.cost)
    const c = await idle(channelId)
    expect(c).toMatchObject({
      deposit: (deposit + additional).toString(),
      acceptedCumulative: cumulative.toString(),
      spent: completion.usage.cost,
    })
    const onChain = (await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    }))!
    expect(onChain.deposit).toBe(deposit + additional)
    // Both transactions the gateway sent for the payer (and paid the gas of) are recorded,
    // with their hash, outcome and the deposit each left (from its event).
    const sent = await Settlements.transactions(gw.sql, channelId)
    expect(sent.map((t) => [t.kind, t.cumulativeAmount, t.status])).toEqual([
      ['open', deposit, 'confirmed'],
      ['topUp', deposit + additional, 'confirmed'],
    ])
    for (const t of sent) expect(t.hash).toMatch(/^0x[0-9a-f]{64}$/)
    expect(sent[0]!.hash).not.toBe(sent[1]!.hash)
    // Recorded once, whoever records it again (a retried credential, another instance).
    await Settlements.sentForPayer(gw.sql, {
      channelId,
      kind: 'topUp',
      deposit: deposit + additional,
      hash: sent[1]!.hash!,
    })
    expect((await Settlements.transactions(gw.sql, channelId)).length).toBe(2)
  }, 30_000)
})

/**
 * A slow stream on the session's channel holding all its max_tokens (so it never extends),
 * then, 300 ms in, another stream on the same channel at `at`: how long the first took to end
 * after that, its events, and the second's text.
 */
async function takenOver(session: PayingSession, at: string, model = 'fake-slow') {
  const first = await fetch(url, {
    method: 'POST',
    headers: { authorization: await session.voucher(500_000n) },
    body: JSON.stringify({
      model,
      stream: true,
      max_tokens: 200,
      messages: [{ role: 'user', content: words }],
    }),
  })
  expect(first.status).toBe(200)
  const reading = read(first, async () => {})
  await Bun.sleep(300)
  const res = await fetch(at, {
    method: 'POST',
    headers: { authorization: await session.voucher(500_000n) },
    body: body(true, 'one two three'),
  })
  expect(res.status).toBe(200)
  const taken = performance.now()
  const events = await reading
  const elapsed = performance.now() - taken
  return { elapsed, events, second: text(await read(res, async () => {})) }
}

describe('one stream per channel', () => {
  test('behavior: a new stream on a channel ends the one before it at once, even one that holds enough for all its tokens', async () => {
    const session = await opened(10, 1_000_000n, 500_000n)
    const { elapsed, events, second } = await takenOver(session, url)
    // Ended within a few of its 50 ms words, not after all 200 (ten seconds).
    expect(elapsed).toBeLessThan(1_500)
    expect(events.some((e) => e.data.includes('stream_superseded'))).toBe(true)
    expect(text(events).split(' ').length).toBeLessThan(40)
    expect(second).toBe('one two three')
    expect((await idle(session.channelId!)).reserved).toBe('0')
  }, 30_000)

  test('behavior: a stream whose upstream has gone quiet ends at once when another takes its channel', async () => {
    const session = await opened(13, 1_000_000n, 500_000n)
    // fake-stall sends one word, then nothing: the gateway would cut it after 1 s.
    const { elapsed, events, second } = await takenOver(session, url, 'fake-stall')
    expect(elapsed).toBeLessThan(700)
    expect(events.some((e) => e.data.includes('stream_superseded'))).toBe(true)
    expect(events.some((e) => e.data.includes('upstream'))).toBe(false)
    expect(second).toBe('one two three')
  }, 30_000)

  test('error: a stream whose upstream has not begun when another takes its channel is a 409 stream_superseded, nothing charged', async () => {
    const session = await opened(15, 1_000_000n, 500_000n)
    // fake-hang sends an empty first chunk and nothing after: the stream has not begun.
    const first = fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(500_000n) },
      body: body(true, words, 'fake-hang'),
    })
    await Bun.sleep(300)
    const second = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(500_000n) },
      body: body(true, 'one two three'),
    })
    expect(second.status).toBe(200)
    const res = await first
    expect(res.status).toBe(409)
    // OpenAI's SDKs retry a 409 unless told not to: sent again, it would end the newer stream.
    expect(res.headers.get('x-should-retry')).toBe('false')
    expect(await res.text()).toContain('stream_superseded')
    expect(text(await read(second, async () => {}))).toBe('one two three')
    await idle(session.channelId!)
    const rows = await gw.sql`select status, cost from usage
      where channel_id = decode(${session.channelId!.slice(2)}, 'hex') order by status`
    expect(rows.map((r) => [r.status, r.cost > 0n])).toEqual([
      ['ok', true],
      ['superseded', false],
    ])
  }, 30_000)

  test('behavior: a stream waiting for a voucher when another stream takes its channel ends as superseded, at once', async () => {
    const prompt = promptCost(words)
    // Enough for the prompt and one block: the first stream soon waits for a voucher.
    const session = await opened(12, 1_000_000n, prompt + blockCost)
    const first = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(prompt + blockCost) },
      body: body(true, words, 'fake-slow'),
    })
    expect(first.status).toBe(200)
    let needs = 0
    let taken = 0
    let secondText = ''
    const events = await read(first, async () => {
      needs++
      // Instead of a voucher, another stream on the channel (paying for itself).
      const second = await fetch(url, {
        method: 'POST',
        headers: { authorization: await session.voucher(500_000n) },
        body: body(true, 'one two three'),
      })
      expect(second.status).toBe(200)
      taken = performance.now()
      secondText = text(await read(second, async () => {}))
    })
    expect(needs).toBe(1)
    expect(secondText).toBe('one two three')
    // Well inside the 3 s the gateway waits for a voucher before it gives up.
    expect(performance.now() - taken).toBeLessThan(1_500)
    expect(events.some((e) => e.data.includes('stream_superseded'))).toBe(true)
    await idle(session.channelId!)
    const rows = await gw.sql`select status from usage
      where channel_id = decode(${session.channelId!.slice(2)}, 'hex') order by status`
    expect(rows.map((r) => r.status)).toEqual(['ok', 'superseded'])
  }, 30_000)

  // Another instance hears of it through PostgreSQL (LISTEN), which the embedded one lacks.
  test.skipIf(!process.env.DATABASE_URL)(
    'behavior: a new stream on another instance ends the one before it at once',
    async () => {
      const other = await Gateway.create(
        { chain: Gateway.chainOf(chain), payments: { challengeSecret: secret } },
        { db: gw.db, upstream: gw.upstream },
      )
      try {
        const session = await opened(11, 1_000_000n, 500_000n)
        const { elapsed, events, second } = await takenOver(
          session,
          `${other.url}/v1/chat/completions`,
        )
        expect(elapsed).toBeLessThan(1_500)
        expect(events.some((e) => e.data.includes('stream_superseded'))).toBe(true)
        expect(second).toBe('one two three')
      } finally {
        await other.stop()
      }
    },
    30_000,
  )
})

describe('contract wallets (ERC-1271)', () => {
  test('behavior: a channel whose signer is a contract wallet is paid with vouchers the wallet accepts; one whose wallet refuses is not opened', async () => {
    // Wallets that answer isValidSignature (any call) with ERC-1271's magic value, or not.
    const accepts = '0x0000000000000000000000000000000000001271' as const
    const refuses = '0x0000000000000000000000000000000000001272' as const
    const silent = '0x0000000000000000000000000000000000001273' as const
    await chain.setCode(accepts, '0x631626ba7e60e01b60005260206000f3')
    await chain.setCode(refuses, '0x63ffffffff60e01b60005260206000f3')
    const wallet = new PayingSession({
      account: privateKeyToAccount(chain.payers[8]!.privateKey),
      challenge: await freshChallenge(),
      tokenDomain,
    })
    const open = await wallet.openWithAuthorization({
      deposit: 50_000n,
      initial: 1_000n,
      authorizedSigner: accepts,
    })
    expect((await fetch(url, { method: 'HEAD', headers: { authorization: open } })).status).toBe(
      200,
    )
    const voucher = await fetch(url, {
      method: 'HEAD',
      headers: { authorization: await wallet.voucher(2_000n) },
    })
    expect(voucher.status).toBe(200)
    expect((await channelOf(wallet.channelId!)).acceptedCumulative).toBe('2000')

    // A wallet that says no, and a contract that answers nothing (no wallet at all): the
    // signature is refused (not a chain failure), before the gateway pays gas to open.
    await chain.setCode(silent, '0x00')
    for (const signer of [refuses, silent]) {
      const refused = new PayingSession({
        account: privateKeyToAccount(chain.payers[9]!.privateKey),
        challenge: await freshChallenge(),
        tokenDomain,
      })
      const res = await fetch(url, {
        method: 'POST',
        headers: {
          authorization: await refused.openWithAuthorization({
            deposit: 50_000n,
            initial: 1_000n,
            authorizedSigner: signer,
          }),
        },
      })
      expect(res.status).toBe(402)
      expect(((await res.json()) as { type: string }).type).toBe(
        'https://paymentauth.org/problems/session/signer-mismatch',
      )
      expect(
        await Escrow.getChannel(chain.payeeClient, {
          escrow: chain.escrowAddress,
          channelId: refused.channelId!,
        }),
      ).toBeUndefined()
    }
  }, 30_000)
})

describe('a top-up sent twice', () => {
  test('behavior: the same top-up credential again is answered as the first was (its transaction), and the deposit grows once', async () => {
    const session = await opened(14, 10_000n, 1_000n)
    const channelId = session.channelId!
    const header = await session.topUp(5_000n)
    const receipts = []
    for (let i = 0; i < 2; i++) {
      const res = await fetch(url, { method: 'HEAD', headers: { authorization: header } })
      expect(res.status).toBe(200)
      receipts.push(
        Receipt.deserialize(res.headers.get('payment-receipt')!) as unknown as { txHash: Hex },
      )
    }
    expect(receipts[1]!.txHash).toBe(receipts[0]!.txHash)
    expect((await channelOf(channelId)).deposit).toBe('15000')
    const sent = await Settlements.transactions(gw.sql, channelId)
    expect(sent.filter((t) => t.kind === 'topUp').map((t) => t.hash)).toEqual([receipts[0]!.txHash])
  }, 30_000)
})

describe('a top-up after a settlement', () => {
  test('behavior: a channel settled on chain once takes a top-up: 200 and the deposit grows (it was a 500 with the payer tokens in the escrow)', async () => {
    const session = await opened(16, 10_000n, 10n)
    const channelId = session.channelId!
    // Spend past the first voucher, so that it can be settled.
    const res = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(5_000n) },
      body: body(false),
    })
    expect(res.status).toBe(200)
    await res.text()
    await idle(channelId)
    const settled = await gw.admin(`/channels/${channelId}/settle`, {}, 'POST')
    expect(((await settled.json()) as { result: { status: string } }).result.status).toBe(
      'confirmed',
    )
    const [before] = await gw.sql`select settled from channels
      where channel_id = decode(${channelId.slice(2)}, 'hex')`
    expect(before!.settled).toBe(10n)

    const topUp = await fetch(url, {
      method: 'HEAD',
      headers: { authorization: await session.topUp(5_000n) },
    })
    expect(topUp.status).toBe(200)
    expect((await channelOf(channelId)).deposit).toBe('15000')
    const [after] = await gw.sql`select settled, deposit from channels
      where channel_id = decode(${channelId.slice(2)}, 'hex')`
    expect(after).toEqual({ settled: 10n, deposit: 15_000n })
  }, 30_000)
})

describe('a credential sent to two instances at once', () => {
  // Two instances need their own connections: a server database.
  test.skipIf(!process.env.DATABASE_URL)(
    'behavior: the same open, then the same top-up, sent to two instances at once: 200 from both, one channel, one deposit',
    async () => {
      const other = await Gateway.create(
        { chain: Gateway.chainOf(chain), payments: { challengeSecret: secret } },
        { db: gw.db, upstream: gw.upstream },
      )
      try {
        const there = `${other.url}/v1/chat/completions`
        const session = new PayingSession({
          account: privateKeyToAccount(chain.payers[17]!.privateKey),
          challenge: await freshChallenge(url),
          tokenDomain,
        })
        const both = async (authorization: string) =>
          (
            await Promise.all(
              [url, there].map((at) => fetch(at, { method: 'HEAD', headers: { authorization } })),
            )
          ).map((r) => r.status)
        expect(
          await both(await session.openWithAuthorization({ deposit: 10_000n, initial: 100n })),
        ).toEqual([200, 200])
        expect(await both(await session.topUp(5_000n))).toEqual([200, 200])
        expect((await channelOf(session.channelId!)).deposit).toBe('15000')
      } finally {
        await other.stop()
      }
    },
    60_000,
  )
})

describe('the chain', () => {
  test("behavior: the escrow's CLOSE_GRACE_PERIOD is the one the code assumes, and above the draft's 10-minute floor", async () => {
    const grace = await Escrow.gracePeriod(chain.payeeClient, { escrow: chain.escrowAddress })
    expect(grace).toBe(Escrow.closeGracePeriod)
    expect(grace >= Escrow.minCloseGracePeriod).toBe(true)
  })

  test('error: a gateway pointed at an escrow whose grace period is under 10 minutes does not start', async () => {
    // A contract that answers every call with 60 (PUSH1 60, MSTORE at 0, RETURN 32 bytes).
    const short = '0x00000000000000000000000000000000000e5c40' as const
    await chain.setCode(short, '0x603c60005260206000f3')
    const started = Gateway.create(
      {
        chain: { ...Gateway.chainOf(chain), escrowAddress: short },
        payments: {
          challengeSecret: secret,
          tokenDomain: { name: tokenDomain.name, version: tokenDomain.version },
        },
      },
      { db: gw.db, upstream: gw.upstream },
    )
    await expect(started).rejects.toThrow(
      /ESCROW_ADDRESS: .* withdraw 60 s after asking to close; .* at least 600 s/,
    )
  })

  test('error: an escrow found at the first open to have a grace period under 10 minutes → 503 escrow_unsuitable with x-should-retry false, nothing stored', async () => {
    // No code at start-up (the check cannot read it, and is left to the first open); then a
    // contract that answers CLOSE_GRACE_PERIOD() (selector 0x956c8327) with 60 and any other
    // call with zeros (getChannel: no such channel): PUSH1 0 CALLDATALOAD PUSH1 0xe0 SHR
    // PUSH4 0x956c8327 EQ PUSH1 0x15 JUMPI, PUSH2 0x200 PUSH1 0 RETURN, JUMPDEST PUSH1 60
    // PUSH1 0 MSTORE PUSH1 32 PUSH1 0 RETURN.
    const short = '0x00000000000000000000000000000000000e5c41' as const
    const code = '0x60003560e01c63956c8327146015576102006000f35b603c60005260206000f3' as const
    const later = await Gateway.create(
      {
        chain: { ...Gateway.chainOf(chain), escrowAddress: short },
        payments: {
          challengeSecret: secret,
          tokenDomain: { name: tokenDomain.name, version: tokenDomain.version },
        },
      },
      { db: gw.db, upstream: gw.upstream },
    )
    try {
      await chain.setCode(short, code)
      const at = `${later.url}/v1/chat/completions`
      const session = new PayingSession({
        account: privateKeyToAccount(chain.payers[8]!.privateKey),
        challenge: await freshChallenge(at),
        tokenDomain,
      })
      const open = await session.openWithAuthorization({ deposit: 50_000n, initial: 1_000n })
      const res = await fetch(at, { method: 'POST', headers: { authorization: open } })
      expect(res.status).toBe(503)
      // The escrow's grace period is its contract's: a retry meets the same refusal.
      expect(res.headers.get('x-should-retry')).toBe('false')
      expect(((await res.json()) as { error: { type: string } }).error.type).toBe(
        'escrow_unsuitable',
      )
      const stored = await fetch(`${later.url}/v1/channels/${session.channelId}`)
      await stored.body?.cancel()
      expect(stored.status).toBe(404)
    } finally {
      await later.stop()
    }
  }, 60_000)

  test('error: with the chain RPC down, an open → 503 chain_unavailable with Retry-After, nothing stored; vouchers of known channels need no chain', async () => {
    const known = await opened(6, 100_000n, 1_000n)
    const down = await Gateway.create(
      {
        chain: { ...Gateway.chainOf(chain), rpcUrl: 'http://127.0.0.1:9' },
        payments: {
          challengeSecret: secret,
          tokenDomain: { name: tokenDomain.name, version: tokenDomain.version },
        },
      },
      { db: gw.db, upstream: gw.upstream },
    )
    try {
      const at = `${down.url}/v1/chat/completions`
      const session = new PayingSession({
        account: privateKeyToAccount(chain.payers[7]!.privateKey),
        challenge: await freshChallenge(at),
        tokenDomain,
      })
      const open = await session.openWithAuthorization({ deposit: 50_000n, initial: 1_000n })
      const res = await fetch(at, { method: 'POST', headers: { authorization: open } })
      expect(res.status).toBe(503)
      expect(res.headers.get('retry-after')).toBe('5')
      const e = ((await res.json()) as { error: { type: string } }).error
      expect(e.type).toBe('chain_unavailable')
      const stored = await fetch(`${down.url}/v1/channels/${session.channelId}`)
      await stored.body?.cancel()
      expect(stored.status).toBe(404)
      // A channel the gateway knows takes vouchers with the chain down.
      const voucher = await fetch(at, {
        method: 'HEAD',
        headers: { authorization: await known.voucher(2_000n) },
      })
      expect(voucher.status).toBe(200)
      // A top-up the payer sent itself cannot be checked either: 503, not a refusal.
      const topUp = await fetch(at, {
        method: 'POST',
        headers: {
          authorization: Credential.serialize(
            Credential.from({
              challenge: known.challenge,
              payload: {
                action: 'topUp',
                type: 'hash',
                channelId: known.channelId!,
                hash: keccak256(toHex('a top-up the gateway cannot see')),
                additionalDeposit: 1_000n,
              },
              source: Session.source({
                chainId: chain.chainId,
                address: privateKeyToAccount(chain.payers[6]!.privateKey).address,
              }),
            }),
          ),
        },
      })
      expect(topUp.status).toBe(503)
      expect(((await topUp.json()) as { error: { type: string } }).error.type).toBe(
        'chain_unavailable',
      )
    } finally {
      await down.stop()
    }
  }, 30_000)
})
