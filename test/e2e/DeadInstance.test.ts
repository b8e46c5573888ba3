/**
 * An instance that dies with a request under way (killed, or its machine gone) holds that
 * request's reservation no longer than its heartbeat's threshold and a sweep: a plan
 * with one completion at a time is served again within seconds, not after the lease (10
 * minutes), and the dead request is charged what it had delivered, as the lease sweep charges.
 */
import { afterAll, expect, test } from 'bun:test'
import * as Db from '../../src/ledger/Db.ts'
import { forwarder } from '../helpers/Forwarder.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Postgres from '../helpers/Postgres.ts'
import * as Sse from '../helpers/Sse.ts'
import * as Upstream from '../helpers/Upstream.ts'

const server = Boolean(process.env.DATABASE_URL)

/**
 * Two instances on one database: `a` on its own connections, `b` through a link the test
 * cuts or stalls (its faults); `options` are both's (sweep, threshold).
 */
async function pair(
  upstream: Upstream.FakeUpstream,
  options: { sweepMs: number; deadAfterMs: number },
) {
  const db = await Postgres.fresh()
  const link = await forwarder(new URL(process.env.DATABASE_URL!))
  const sql = Db.connect({ url: link.url, schema: db.schema!, max: 4 })
  afterAll(() => sql.end({ timeout: 1 }))
  const a = await Gateway.create({}, { db, upstream }, options)
  const b = await Gateway.create({}, { db: { ...db, sql }, upstream }, options)
  return { db, link, sql, a, b }
}

for (const death of ['killed', 'vanished'] as const)
  test.skipIf(!server)(
    `behavior: an instance ${death === 'killed' ? 'killed (its sessions close)' : 'gone with its machine (its sessions linger)'} with a stream under way: the free plan (one at a time) is served again on another instance within seconds; the dead stream is charged what it delivered`,
    async () => {
      const { link, sql, a, b } = await pair(Upstream.start(), { sweepMs: 200, deadAfterMs: 600 })
      const { id, key } = await a.account({ plan: 'free' })
      const words = Array.from({ length: 300 }, (_, i) => `w${i}`).join(' ')
      const chat = (gw: Gateway.TestGateway, stream: boolean) =>
        gw.complete(key, {
          model: stream ? 'fake-slow' : 'fake',
          stream,
          // The stream: 300 words, one each 50 ms.
          messages: [{ role: 'user', content: stream ? words : 'one two three' }],
        })
      // A stream on b, 15 s long: it holds the plan's one slot.
      const res = await chat(b, true)
      expect(res.status).toBe(200)
      const reader = res.body!.getReader()
      let text = ''
      while (!Sse.text(Sse.events(text)).includes('w0'))
        text += new TextDecoder().decode((await reader.read()).value)
      // Alive, b keeps it however long its stream takes: it beats.
      await Bun.sleep(1_500)
      expect((await chat(a, false)).status).toBe(429)

      // b dies. Killed, its sessions close; its machine gone, they linger in PostgreSQL (until
      // TCP keepalive gives up, hours): either way it beats no more. (Its HTTP side lingers
      // here, but can write nothing more to the database.)
      if (death === 'killed') await sql.end({ timeout: 0 })
      else link.stall()
      const started = performance.now()
      let status = 429
      while (status === 429 && performance.now() - started < 10_000) {
        const r = await chat(a, false)
        status = r.status
        await r.body?.cancel()
        if (status === 429) await Bun.sleep(100)
      }
      expect(status).toBe(200)
      // Released once its heartbeat is deadAfterMs (0.6 s) old, at a sweep (every 0.2 s).
      expect(performance.now() - started).toBeLessThan(5_000)
      void reader.cancel().catch(() => {})

      const l = await Gateway.ledger(a.sql, id)
      expect(l.open_reservations).toBe(0n)
      const rows = await a.sql`
        select status, cost from usage where account_id = ${id} order by created_at`
      expect(rows.map((r) => r.status)).toEqual(['abandoned', 'ok'])
      // The dead stream is charged what it had delivered by its admission's record (nothing
      // recorded yet: it is the lease sweep's rule), never more than it held.
      expect(1_000_000n - l.balance).toBe(rows.reduce((n, r) => n + (r.cost as bigint), 0n))
      expect(a.logs.join('\n')).toContain('instances that are gone')
    },
    30_000,
  )

test.skipIf(!server)(
  'behavior: a stream whose instance died counts the tokens it was charged for against the plan: the monthly quota and the token wallet, as a finished one does',
  async () => {
    for (const plan of ['free', 'wallet'] as const) {
      const { sql, a, b } = await pair(Upstream.start(), { sweepMs: 200, deadAfterMs: 600 })
      const { id, key } = await a.account({ plan })
      // 300 words, one each 50 ms, without max_tokens: it extends a block (16 tokens) at a time,
      // and each extension records what it delivered.
      const words = Array.from({ length: 300 }, (_, i) => `w${i}`).join(' ')
      const res = await b.complete(key, {
        model: 'fake-slow',
        stream: true,
        messages: [{ role: 'user', content: words }],
      })
      expect(res.status).toBe(200)
      const reader = res.body!.getReader()
      let text = ''
      while (!Sse.text(Sse.events(text)).includes('w60'))
        text += new TextDecoder().decode((await reader.read()).value)
      await sql.end({ timeout: 0 })
      const l = await Gateway.released(a.sql, id, 10_000)
      void reader.cancel().catch(() => {})
      expect(l.open_reservations).toBe(0n)
      const [u] = await a.sql`
        select status, cost, prompt_tokens, completion_tokens from usage where account_id = ${id}`
      expect(u!.status).toBe('abandoned')
      expect(u!.cost).toBeGreaterThan(0n)
      // Its prompt (300 words and more) and the output its charge was for (60 words and more).
      expect(u!.prompt_tokens).toBeGreaterThanOrEqual(300)
      expect(u!.completion_tokens).toBeGreaterThanOrEqual(40)
      const tokens = BigInt(u!.prompt_tokens + u!.completion_tokens)
      expect(l.usage_tokens).toBe(tokens)
      const [acc] = await a.sql`select month_tokens, wallet_tokens from accounts where id = ${id}`
      if (plan === 'free') expect(acc!.month_tokens).toBe(tokens)
      else {
        // A full wallet (10,000) less those tokens, and the little it refilled meanwhile.
        expect(acc!.wallet_tokens).toBeLessThanOrEqual(10_000 - Number(tokens) + 1)
        expect(acc!.wallet_tokens).toBeGreaterThan(10_000 - Number(tokens) - 1)
      }
    }
  },
  60_000,
)

/**
 * A stream on `gw` of `words` words (one each 100 ms, with slowMs 100), all held at admission
 * (max_tokens): no extension records what it delivered. Read until its first word; `rest`
 * reads it to its end and gives its usage.
 */
async function held(
  gw: Gateway.TestGateway,
  key: string,
  words: number,
  headers?: Record<string, string>,
) {
  const res = await gw.complete(key, asked(words), headers)
  const reader = res.body!.getReader()
  let raw = ''
  while (!Sse.text(Sse.events(raw)).includes('hello'))
    raw += new TextDecoder().decode((await reader.read()).value)
  return {
    async rest() {
      for (let r = await reader.read(); !r.done; r = await reader.read())
        raw += new TextDecoder().decode(r.value)
      return (
        Sse.json(raw).findLast((e) => e.usage) as {
          usage: { cost: string; prompt_tokens: number; completion_tokens: number }
        }
      ).usage
    },
  }
}

/** The streamed completion `held` asks for: `words` words of prompt, 200 tokens at most. */
function asked(words: number) {
  return {
    model: 'fake-slow',
    stream: true,
    max_tokens: 200,
    stream_options: { include_usage: true },
    messages: [{ role: 'user', content: Array(words).fill('hello').join(' ') }],
  }
}

test.skipIf(!server)(
  'behavior: a live instance whose database link drops for a moment (its sessions closed) is not taken for dead: its stream is charged in full',
  async () => {
    // Past a moment's outage and the reconnection's backoff (postgres.js waits up to seconds).
    const { db, link, a, b } = await pair(Upstream.start({ slowMs: 100 }), {
      sweepMs: 200,
      deadAfterMs: 5_000,
    })
    const { id, key } = await a.account()
    const stream = await held(b, key, 150)
    await link.cut() // every session of b closes; b lives on
    await Bun.sleep(1_000)
    await link.mend()
    const usage = await stream.rest()
    // The stream outlived the threshold since the cut: a's sweeps saw b beat again. (b's
    // charge is written on its own connections.)
    await Gateway.ledger(b.sql, id)
    const l = await Gateway.ledger(db.sql, id)
    const rows = await db.sql`select status, cost from usage where account_id = ${id}`
    expect(rows.map((r) => `${r.status}:${r.cost}`)).toEqual([`ok:${usage.cost}`])
    expect(1_000_000n - l.balance).toBe(BigInt(usage.cost))
    expect(a.logs.join('\n')).not.toContain('instances that are gone')
  },
  40_000,
)

test.skipIf(!server)(
  'behavior: a live instance cut off from the database past the threshold is taken for dead, and its stream, released as abandoned, is charged in full once it ends, taking back its Idempotency-Key',
  async () => {
    const { db, link, a, b } = await pair(Upstream.start({ slowMs: 100 }), {
      sweepMs: 200,
      deadAfterMs: 1_500,
    })
    const { id, key } = await a.account()
    const keyed = { 'idempotency-key': 'cut-off' }
    const stream = await held(b, key, 100, keyed)
    await link.cut()
    // Past the threshold: a releases b's reservation, charging what it recorded (nothing).
    let rows = await db.sql`select status, cost from usage where account_id = ${id}`
    for (let i = 0; i < 50 && rows.length === 0; i++) {
      await Bun.sleep(100)
      rows = await db.sql`select status, cost from usage where account_id = ${id}`
    }
    expect(rows.map((r) => `${r.status}:${r.cost}`)).toEqual(['abandoned:0'])
    await link.mend()
    const usage = await stream.rest()
    // b's own charge finds the reservation gone and charges the rest (once b reaches the
    // database again: its charge may be waiting out a retry).
    await Gateway.ledger(b.sql, id)
    for (let i = 0; i < 150 && rows[0]?.status === 'abandoned'; i++) {
      await Bun.sleep(100)
      rows = await db.sql`select status, cost from usage where account_id = ${id}`
    }
    const l = await Gateway.ledger(db.sql, id)
    expect(rows.map((r) => `${r.status}:${r.cost}`)).toEqual([`ok:${usage.cost}`])
    expect(1_000_000n - l.balance).toBe(BigInt(usage.cost))
    // Its tokens count in the plan's month (the sweep counted none), as its usage row says.
    const tokens = BigInt(usage.prompt_tokens + usage.completion_tokens)
    expect([l.usage_tokens, l.month_tokens]).toEqual([tokens, tokens])
    // The sweep, charging nothing, freed its Idempotency-Key; the late charge took it back, so a
    // retry with it is not run or charged again.
    const [k] =
      await db.sql`select request_id, state from idempotency_keys where account_id = ${id}`
    const [u] = await db.sql`select id from usage where account_id = ${id}`
    expect(k).toEqual({ request_id: u!.id, state: 'completed' })
    const retry = await a.complete(key, asked(100), keyed)
    expect(retry.status).toBe(409)
    expect(((await retry.json()) as { error: { code: string } }).error.code).toBe(
      'idempotency_key_reused',
    )
  },
  40_000,
)

test.skipIf(!server)(
  'behavior: an instance killed with more than a hundred streams under way has them all released by the first sweep that finds it dead, not a hundred a sweep',
  async () => {
    const { db, sql, a, b } = await pair(Upstream.start({ slowMs: 500 }), {
      sweepMs: 200,
      deadAfterMs: 600,
    })
    const { id, key } = await a.account()
    const words = Array.from({ length: 60 }, (_, i) => `w${i}`).join(' ')
    // 110 streams on b, 30 s each (a word each 0.5 s), started a few at a time: the upstream's
    // headers come within its 1 s timeout. (This process's fetch holds 256 requests at once:
    // 110 to b, 110 from b to the upstream.)
    const streams: Response[] = []
    while (streams.length < 110)
      streams.push(
        ...(await Promise.all(
          Array.from({ length: 10 }, () =>
            b.complete(key, {
              model: 'fake-slow',
              stream: true,
              messages: [{ role: 'user', content: words }],
            }),
          ),
        )),
      )
    expect(streams.map((r) => r.status)).toEqual(Array(110).fill(200))
    const [held] =
      await db.sql`select count(*)::int as n from reservations where account_id = ${id}`
    expect(held!.n).toBe(110)
    // b is killed: its sessions close, it beats no more.
    await sql.end({ timeout: 0 })
    const gone = () =>
      a.logs
        .map((l) => JSON.parse(l) as { msg?: string; released?: number })
        .filter((l) => l.msg?.startsWith('released reservations of dead requests and of instances'))
    for (let i = 0; i < 100 && gone().length === 0; i++) await Bun.sleep(100)
    // The first sweep that found b dead released all its reservations.
    expect(gone()[0]?.released).toBe(110)
    for (const r of streams) void r.body?.cancel().catch(() => {})
    const [left] =
      await db.sql`select count(*)::int as n from reservations where account_id = ${id}`
    expect(left!.n).toBe(0)
  },
  60_000,
)
