/**
 * Issue 4: 50 payment channels at once on two gateway instances over one database. Each
 * channel streams on one instance and pays its way with vouchers posted to the other
 * (a voucher accepted on B wakes the stream paused on A), while more vouchers, replays
 * and raises, race it on both. A sampler checks the ledger's invariants in one consistent
 * snapshot over and over while this runs; at the end every stream has its full text and
 * every channel is charged exactly the tokens it was sent.
 */
import { afterAll, expect, test } from 'bun:test'
import { privateKeyToAccount } from 'viem/accounts'
import * as Token from '../../src/chain/Token.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import { read, text } from '../helpers/Sse.ts'

const N = 50
const chain = await Anvil.start({ accounts: N + 1 })
afterAll(() => chain.stop())
const a = await Gateway.create({
  chain: Gateway.chainOf(chain),
  // Generous: 50 streams share one event loop (and, embedded, one connection).
  payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 30_000 },
})
const b = await a.another()
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const completions = (gw: Gateway.TestGateway) => `${gw.url}/v1/chat/completions`

let limited = 0
/** Posts a credential with HEAD; retries after a 429 (the per-channel voucher rate). */
async function head(url: string, authorization: string): Promise<Response> {
  while (true) {
    const res = await fetch(url, { method: 'HEAD', headers: { authorization } })
    if (res.status !== 429) return res
    limited++
    await Bun.sleep(Number(res.headers.get('retry-after') ?? 1) * 1000)
  }
}

type Row = {
  channel_id: Uint8Array
  deposit: bigint
  accepted_cumulative: bigint
  spent: bigint
  reserved: bigint
  settled: bigint
  vouchers_max: bigint
  usage_cost: bigint
  usage_rows: bigint
  held: bigint
}

/**
 * Every channel's amounts with what backs them, in one statement (one snapshot): the
 * vouchers behind accepted_cumulative, the usage rows behind spent, the reservations
 * behind reserved.
 */
const snapshot = () =>
  a.sql`
    select c.channel_id, c.deposit, c.accepted_cumulative, c.spent, c.reserved, c.settled,
      (select coalesce(max(cumulative_amount), 0) from vouchers v where v.channel_id = c.channel_id) as vouchers_max,
      (select coalesce(sum(cost), 0) from usage u where u.channel_id = c.channel_id) as usage_cost,
      (select count(*) from usage u where u.channel_id = c.channel_id) as usage_rows,
      (select coalesce(sum(held), 0) from reservations r where r.channel_id = c.channel_id) as held
    from channels c` as Promise<Row[]>

const before = new Map<string, Row>()
let checks = 0
/** The ledger invariants at one instant, and that no amount went down since the last check. */
async function check() {
  const rows = await snapshot()
  checks++
  for (const r of rows) {
    const id = Buffer.from(r.channel_id).toString('hex')
    const at = { id, ...r }
    expect(r.settled <= r.spent, `settled <= spent ${JSON.stringify(at, big)}`).toBe(true)
    expect(r.spent + r.reserved <= r.accepted_cumulative, `spent + reserved <= accepted`).toBe(true)
    expect(r.accepted_cumulative <= r.deposit, 'accepted <= deposit').toBe(true)
    expect(r.reserved >= 0n).toBe(true)
    expect(r.accepted_cumulative).toBe(r.vouchers_max)
    expect(r.spent).toBe(r.usage_cost)
    expect(r.reserved).toBe(r.held)
    const last = before.get(id)
    if (last)
      for (const k of ['deposit', 'accepted_cumulative', 'spent', 'settled'] as const)
        expect(r[k] >= last[k], `${k} only grows`).toBe(true)
    before.set(id, r)
  }
  return rows
}
const big = (_: string, v: unknown) => (typeof v === 'bigint' ? v.toString() : v)

test('behavior: 50 channels, streams on A and B paid by vouchers posted to the other, with racing vouchers → invariants hold throughout, charges equal tokens sent', async () => {
  const started = performance.now()
  const probe = await fetch(completions(a), {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', stream: true, messages: [] }),
  })
  const challenge = challengeOf(probe.headers.get('www-authenticate'))!
  expect(challenge).toBeDefined()

  let running = true
  const sampler = (async () => {
    while (running) {
      const t = performance.now()
      await check()
      // Leave the database mostly to the gateways (embedded, it has one connection).
      await Bun.sleep(Math.max(10, 2 * (performance.now() - t)))
    }
  })()

  let needs = 0
  let slowNeeds = 0
  const extras = { accepted: 0, replays: 0 }
  const run = async (i: number) => {
    const [here, there] = i % 2 === 0 ? [a, b] : [b, a]
    const words = Array.from({ length: 30 + (i % 5) * 10 }, (_, j) => `c${i}w${j}`)
    const content = words.join(' ')
    const messages = [{ role: 'user', content }]
    const prompt = Tokenizer.prompt(messages)
    const completion = words.reduce((n, w, j) => n + Tokenizer.count(j ? ` ${w}` : w), 0)
    const session = new PayingSession({
      account: privateKeyToAccount(chain.payers[i]!.privateKey),
      challenge,
      tokenDomain,
    })
    // Open on the instance that will not stream (the two instances race to send opens),
    // with enough for the prompt and the first block of 16 tokens.
    const open = await session.openWithAuthorization({
      deposit: 100_000n,
      initial: BigInt(prompt) + 32n,
    })
    const opened = await head(completions(there), open)
    expect(opened.status).toBe(200)

    const res = await fetch(completions(here), {
      method: 'POST',
      headers: { authorization: open },
      body: JSON.stringify({ model: 'fake', stream: true, messages }),
    })
    expect(res.status).toBe(200)
    let streaming = true
    // Vouchers racing the stream, on both instances: the highest amount signed so far again
    // (a replay, unless it overtakes the voucher the stream asked for) and raises by 1.
    const racing = (async () => {
      for (let k = 0; streaming && k < 4; k++) {
        await Bun.sleep(Math.random() * 20)
        const replay = k % 2 === 0
        const to = k < 2 ? here : there
        const r = await head(
          completions(to),
          await session.voucher(replay ? session.signed : session.signed + 1n),
        )
        expect(r.status).toBe(200)
        if (replay) extras.replays++
        else extras.accepted++
      }
    })()
    const events = await read(res, async (need) => {
      needs++
      const t = performance.now()
      const required = BigInt(need.requiredCumulative!)
      expect(required).toBeGreaterThan(BigInt(need.acceptedCumulative!))
      // Sign a little ahead, as a client does, so vouchers stay under 10 a second.
      const amount = required + 64n > session.signed ? required + 64n : session.signed + 1n
      const r = await head(completions(there), await session.voucher(amount))
      expect(r.status).toBe(200)
      if (performance.now() - t > 500) slowNeeds++
    })
    streaming = false
    await racing
    const errors = events.filter((e) => e.data.includes('"error"'))
    expect(errors).toEqual([])
    expect(text(events)).toBe(content)
    expect(events.at(-1)!.data).toBe('[DONE]')
    const receipt = JSON.parse(events.find((e) => e.event === 'payment-receipt')!.data) as {
      spent: string
    }
    expect(BigInt(receipt.spent)).toBe(BigInt(prompt + 2 * completion))
    // Some channels settle on-chain while the others still stream (the two instances'
    // settlement workers take turns on the settlement lock: 'busy' means try again).
    let settledOnChain = 0n
    if (i % 5 === 0)
      while (true) {
        const r = (await (
          await there.admin(`/channels/${session.channelId}/settle`, {})
        ).json()) as {
          result: { status: string }
          channel: { settled: string }
        }
        if (r.result.status === 'busy') {
          await Bun.sleep(20)
          continue
        }
        expect(r.result.status).toBe('confirmed')
        settledOnChain = BigInt(r.channel.settled)
        expect(settledOnChain).toBeGreaterThan(0n)
        break
      }
    return {
      settled: settledOnChain,
      channelId: session.channelId!,
      cost: BigInt(prompt + 2 * completion),
      signed: session.signed,
    }
  }
  const results = await Promise.all(Array.from({ length: N }, (_, i) => run(i))).finally(() => {
    running = false
  })
  const streamed = performance.now()
  await sampler

  const rows = new Map(
    (await check()).map((r) => [`0x${Buffer.from(r.channel_id).toString('hex')}`, r]),
  )
  expect(rows.size).toBe(N)
  for (const r of results) {
    const row = rows.get(r.channelId.toLowerCase())!
    expect(row.reserved).toBe(0n)
    expect(row.usage_rows).toBe(1n)
    expect(row.spent).toBe(r.cost)
    expect(row.usage_cost).toBe(r.cost)
    expect(row.accepted_cumulative <= r.signed).toBe(true)
    expect(row.settled).toBe(r.settled)
  }
  expect((await a.sql`select count(*)::int as n from reservations`)[0]!.n).toBe(0)
  // Both instances streamed and took vouchers, and streams paused for them.
  expect(needs).toBeGreaterThanOrEqual(N * 2)
  console.log(
    JSON.stringify({
      mode: process.env.DATABASE_URL ? 'postgres' : 'embedded',
      ms: Math.round(streamed - started),
      checks,
      needs,
      slowNeeds,
      limited,
      extras,
    }),
  )
}, 60_000)
