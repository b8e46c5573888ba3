/**
 * A client paying by a payment channel that goes away while its stream waits for a voucher
 * (after `payment-need-voucher`) is charged, on its channel, the prompt and the tokens it was
 * sent, no more, and its request is recorded as cancelled, not as a voucher that never came:
 * whether it sent no voucher, or one that the stream was taking when it went (made long with
 * a trigger that sleeps in the statement the gateway waits for). A real anvil chain pays.
 */
import { afterAll, expect, test } from 'bun:test'
import type { Hex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Token from '../../src/chain/Token.ts'
import { PayingSession } from '../../src/client/Session.ts'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'
import * as Scripted from '../helpers/Scripted.ts'
import * as Sse from '../helpers/Sse.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })

const messages = [{ role: 'user' as const, content: 'count to a hundred' }]
const prompt = BigInt(Tokenizer.prompt(messages))
// Every answer in one write: 100 words (200 tokens) and the finish.
const url = Scripted.serve((body) => {
  const model = body.model as string
  return Scripted.events([
    ...Array.from({ length: 100 }, (_, i) => Scripted.chunk({ content: ` w${i}` }, null, model)),
    Scripted.chunk({}, 'stop', model),
  ])
})
/** The output price is 2 base units a token; a metering block is 16 tokens. */
const blockCost = 32n
const gw = await Scripted.gateway(
  url,
  ['burst'],
  {},
  {
    chain: Gateway.chainOf(chain),
    payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 10_000 },
    metering: { blockTokens: 16 },
  },
)
const completions = `${gw.url}/v1/chat/completions`
const body = JSON.stringify({ model: 'burst', stream: true, messages })
const bytes = (id: Hex) => Buffer.from(id.slice(2), 'hex')

/** A channel of payer `payer` opened with a voucher for the prompt and the first block. */
async function opened(payer: number) {
  const session = new PayingSession({
    account: privateKeyToAccount(chain.payers[payer]!.privateKey),
    challenge: await Paid.challenge(completions, body),
    tokenDomain,
  })
  const open = await session.openWithAuthorization({
    deposit: 1_000_000n,
    initial: prompt + blockCost,
  })
  return { session, open }
}

/** The completion text of the complete events of raw SSE text. */
const contentOf = (raw: string) => Sse.text(Sse.events(raw))

/** Reads until the stream asks for a voucher; the text read, and what it asked for. */
async function untilNeed(reader: { read(): Promise<{ value?: Uint8Array | undefined }> }) {
  let text = ''
  while (true) {
    text += new TextDecoder().decode((await reader.read()).value)
    const need = /^event: payment-need-voucher\ndata: (.*)$/m.exec(text)?.[1]
    if (need) return { text, need: JSON.parse(need) as { requiredCumulative: string } }
  }
}

/** A stream on a new channel of payer `payer`, read until it asks for a voucher. */
async function untilNeedOn(payer: number) {
  const { session, open } = await opened(payer)
  const gone = new AbortController()
  const res = await fetch(completions, {
    method: 'POST',
    headers: { authorization: open },
    body,
    signal: gone.signal,
  })
  expect(res.status).toBe(200)
  const reader = res.body!.getReader()
  return { session, gone, reader, ...(await untilNeed(reader)) }
}

/** The client goes; it is charged, as cancelled, the prompt and the 16 tokens it was sent. */
async function goneAndCharged(s: Awaited<ReturnType<typeof untilNeedOn>>) {
  s.gone.abort()
  await s.reader.cancel().catch(() => {})
  const received = Tokenizer.count(contentOf(s.text))
  expect(received).toBe(16)
  const { channel, rows } = await chargedOn(s.session.channelId!)
  const cost = prompt + 2n * BigInt(received)
  expect(channel.spent).toBe(cost)
  expect(rows.map((r) => [r.status, r.completion_tokens, r.cost])).toEqual([
    ['cancelled', received, cost],
  ])
}

/** The channel and its usage rows, once its reservation is released. */
async function chargedOn(channelId: Hex) {
  const open = () =>
    gw.sql<{ n: number }[]>`
      select count(*)::int as n from reservations where channel_id = ${bytes(channelId)}`
  for (let i = 0; i < 200 && (await open())[0]!.n > 0; i++) await Bun.sleep(25)
  await Batch.settled(gw.sql)
  const rows = await gw.sql<{ status: string; completion_tokens: number; cost: bigint }[]>`
    select status, completion_tokens, cost from usage where channel_id = ${bytes(channelId)}`
  return { channel: (await Channels.get(gw.sql, channelId))!, rows }
}

test('behavior: a channel client gone while its stream waits for a voucher is charged the prompt and the tokens it was sent, as cancelled', async () => {
  await goneAndCharged(await untilNeedOn(0))
}, 30_000)

// The embedded database runs in the gateway's process: its sleep stops the client from going
// during it.
test.skipIf(!process.env.DATABASE_URL)(
  'behavior: a channel client gone while its stream takes the voucher it asked for is charged the prompt and the tokens it was sent, not the chunk the voucher paid for',
  async () => {
    // Only an extension that holds more sleeps: the stream's, once the voucher is in.
    await gw.sql.unsafe(`
      create function slow_hold() returns trigger language plpgsql as $$
      begin perform pg_sleep(0.7); return new; end $$;
      create trigger slow_hold before update on reservations for each row
      when (new.held > old.held) execute function slow_hold();`)
    try {
      const streaming = await untilNeedOn(1)
      const { session, need } = streaming
      const paid = await fetch(completions, {
        method: 'HEAD',
        headers: { authorization: await session.voucher(BigInt(need.requiredCumulative)) },
      })
      expect(paid.status).toBe(200)
      // The stream is woken and extends its hold with the voucher (it takes 0.7 s).
      await Bun.sleep(200)
      await goneAndCharged(streaming)
    } finally {
      await gw.sql.unsafe('drop trigger slow_hold on reservations; drop function slow_hold()')
    }
  },
  30_000,
)
