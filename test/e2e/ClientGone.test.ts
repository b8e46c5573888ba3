/**
 * A client that goes away is charged the prompt and the tokens it was sent, no more, whenever
 * it goes: while its stream waits for an extension of its reservation (a block, or a hold
 * ahead of a text whose bound passes its count), for a renewal of its lease, or before the
 * stream began (during admission). Waits are made long with a trigger that sleeps in the
 * statement the gateway is waiting for, so the client's going falls inside them.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'
import * as Sse from '../helpers/Sse.ts'

const messages = [{ role: 'user' as const, content: 'count to a hundred' }]
const WORDS = Array.from({ length: 100 }, (_, i) => ` w${i}`)

let calls = 0
// Every answer in one write: 100 words (200 tokens) and the finish.
const url = Scripted.serve((body) => {
  calls++
  const model = body.model as string
  return Scripted.events([
    ...WORDS.map((w) => Scripted.chunk({ content: w }, null, model)),
    Scripted.chunk({}, 'stop', model),
  ])
})

// Two words, then a text whose bound (30) is six times its count (5): the stream holds
// ahead of it (an extension), then the rest of the words and the finish, in one write.
const WIDE = '你好你好你好你好你好'
const wide = Scripted.serve((body) => {
  const model = body.model as string
  return Scripted.events([
    ...[' w0', ' w1', WIDE, ...WORDS.slice(2, 20)].map((w) =>
      Scripted.chunk({ content: w }, null, model),
    ),
    Scripted.chunk({}, 'stop', model),
  ])
})

/** The words of the paused upstream before its pause, and after it. */
const BEFORE = WORDS.slice(0, 4)
const AFTER = WORDS.slice(4, 14)
const PAUSE_MS = 550
// Four words, a pause longer than a lease renewal's period (a third of a 1 s lease), ten
// words in one write, and the finish after a while (the gateway has cancelled it by then).
const paused = Scripted.serve((body) => {
  const model = body.model as string
  /** `data:` events of `events` (a string as it is), in one write. */
  const write = (events: unknown[]) =>
    new TextEncoder().encode(
      events.map((e) => `data: ${typeof e === 'string' ? e : JSON.stringify(e)}\n\n`).join(''),
    )
  const words = (list: string[]) => list.map((w) => Scripted.chunk({ content: w }, null, model))
  return new Response(
    new ReadableStream({
      async start(c) {
        try {
          c.enqueue(write(words(BEFORE)))
          await Bun.sleep(PAUSE_MS)
          c.enqueue(write(words(AFTER)))
          await Bun.sleep(1_500)
          c.enqueue(write([Scripted.chunk({}, 'stop', model), '[DONE]']))
          c.close()
        } catch {
          // Cancelled: the client went away.
        }
      },
    }),
    { headers: { 'content-type': 'text/event-stream' } },
  )
})

const post = (
  gw: Gateway.TestGateway,
  key: string,
  signal: AbortSignal,
  model = 'burst',
  stream = true,
) =>
  fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model, messages, stream }),
    signal,
  })

/** Reads until the complete content events hold `word`; the text read. */
async function readUntil(
  reader: { read(): Promise<{ value?: Uint8Array | undefined }> },
  word: string,
) {
  let text = ''
  while (!contentOf(text).includes(word))
    text += new TextDecoder().decode((await reader.read()).value)
  return text
}

/** The usage rows of the account, once its reservation is released. */
async function usageOf(gw: Gateway.TestGateway, id: string) {
  for (let i = 0; i < 200 && (await Gateway.ledger(gw.sql, id)).open_reservations > 0n; i++)
    await Bun.sleep(25)
  await Batch.settled(gw.sql)
  return gw.sql<{ status: string; completion_tokens: number; cost: bigint }[]>`
    select status, completion_tokens, cost from usage where account_id = ${id}`
}

/** The completion text of the complete events of raw SSE text. */
const contentOf = (raw: string) => Sse.text(Sse.events(raw))

/** Makes every `event` (insert or update) of a row of `table` sleep `seconds` first. */
const slow = (gw: Gateway.TestGateway, table: string, event: string, seconds: number) =>
  gw.sql.unsafe(`
    create function slow_${event}() returns trigger language plpgsql as $$
    begin perform pg_sleep(${seconds}); return new; end $$;
    create trigger slow_${event} before ${event} on ${table} for each row execute function slow_${event}();`)

/** What a request of `completion` tokens costs with the prompt (1 and 2 base units a token). */
const costOf = (completion: number) => BigInt(Tokenizer.prompt(messages) + 2 * completion)

test('behavior: a client gone while its stream waits for an extension pays the prompt and the tokens it was sent, not the rest of the batch', async () => {
  const gw = await Scripted.gateway(url, ['burst'], {}, { metering: { blockTokens: 16 } })
  await slow(gw, 'reservations', 'update', 0.7)
  const { id, key } = await gw.account()
  const gone = new AbortController()
  const res = await post(gw, key, gone.signal)
  const reader = res.body!.getReader()
  let text = ''
  while (!text.includes(' w3')) text += new TextDecoder().decode((await reader.read()).value)
  gone.abort()
  await reader.cancel().catch(() => {})
  const received = Tokenizer.count(contentOf(text))
  const [usage, ...more] = await usageOf(gw, id)
  expect(more).toEqual([])
  expect(usage!.status).toBe('cancelled')
  expect(usage!.completion_tokens).toBe(received)
}, 30_000)

// The embedded database runs in the gateway's process: its sleep stops the client from going
// during it.
test.skipIf(!process.env.DATABASE_URL)(
  'behavior: a client gone during admission is not answered from the upstream and pays nothing, streamed or whole',
  async () => {
    const gw = await Scripted.gateway(url, ['burst'], {}, { metering: { blockTokens: 16 } })
    await slow(gw, 'reservations', 'insert', 0.5)
    for (const stream of [true, false]) {
      const { id, key } = await gw.account({ credits: 1_000_000 })
      const before = calls
      const gone = new AbortController()
      const answer = post(gw, key, gone.signal, 'burst', stream).catch((e: unknown) => e)
      await Bun.sleep(150)
      gone.abort()
      await answer
      const rows = await usageOf(gw, id)
      expect(calls - before).toBe(0)
      // No upstream read the prompt: nothing to pay for.
      expect(rows.map((r) => [r.status, r.completion_tokens, r.cost])).toEqual([
        ['cancelled', 0, 0n],
      ])
      expect((await Gateway.ledger(gw.sql, id)).balance).toBe(1_000_000n)
    }
  },
  30_000,
)

// The embedded database runs in the gateway's process: its sleep stops the client from going
// during it.
test.skipIf(!process.env.DATABASE_URL)(
  'behavior: a client gone while its stream renews its lease pays the prompt and the tokens it was sent, not the batch that came in meanwhile',
  async () => {
    // A lease of 1 s: renewed every 333 ms, so a renewal is due when the words after the
    // pause arrive (the one due before them, slowed down, has not returned).
    const gw = await Scripted.gateway(
      paused,
      ['paused'],
      {},
      { metering: { blockTokens: 64, leaseSeconds: 1 } },
    )
    await slow(gw, 'reservations', 'update', 0.7)
    const { id, key } = await gw.account()
    const gone = new AbortController()
    const reader = (await post(gw, key, gone.signal, 'paused')).body!.getReader()
    const text = await readUntil(reader, BEFORE.at(-1)!)
    // The words after the pause are in, their renewal under way (it takes 0.7 s or more).
    await Bun.sleep(PAUSE_MS + 200)
    gone.abort()
    await reader.cancel().catch(() => {})
    const received = Tokenizer.count(contentOf(text))
    expect(contentOf(text)).toBe(BEFORE.join(''))
    const rows = await usageOf(gw, id)
    expect(rows.map((r) => [r.status, r.completion_tokens, r.cost])).toEqual([
      ['cancelled', received, costOf(received)],
    ])
  },
  30_000,
)

test.skipIf(!process.env.DATABASE_URL)(
  'behavior: a client gone while its stream holds ahead of a text whose bound passes its count pays the prompt and the tokens it was sent, not that text',
  async () => {
    const gw = await Scripted.gateway(wide, ['wide'], {}, { metering: { blockTokens: 16 } })
    await slow(gw, 'reservations', 'update', 0.7)
    const { id, key } = await gw.account()
    const gone = new AbortController()
    const reader = (await post(gw, key, gone.signal, 'wide')).body!.getReader()
    // The two words are sent before the hold ahead of the wide text (slowed down) is asked.
    const text = await readUntil(reader, ' w1')
    gone.abort()
    await reader.cancel().catch(() => {})
    expect(contentOf(text)).toBe(' w0 w1')
    const received = Tokenizer.count(contentOf(text))
    const rows = await usageOf(gw, id)
    expect(rows.map((r) => [r.status, r.completion_tokens, r.cost])).toEqual([
      ['cancelled', received, costOf(received)],
    ])
  },
  30_000,
)
