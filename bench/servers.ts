/**
 * The servers the gateway benchmark measures against, each run as its own process:
 *   bun bench/servers.ts upstream <port> [tokensPerSecond]
 *       an OpenAI-compatible upstream. Without a rate it answers at once (a stream is
 *       max_tokens one-word chunks, then usage, in one write). With a rate it streams like an
 *       inference server: one write per token event, paced at that rate per stream, then the
 *       usage chunk and [DONE].
 *   bun bench/servers.ts proxy <port> <target>
 *       a bare Hono pass-through proxy (the ceiling)
 *   bun bench/servers.ts floor <port> <target> <databaseUrl> roundtrip|ledger|batched
 *       the proxy plus the least a ledger in PostgreSQL costs: `roundtrip`, a `select 1`
 *       before each call upstream (any per-request database check pays this); `ledger`, the
 *       least DESIGN.md allows, unbatched: one conditional UPDATE … RETURNING on the account
 *       row holds credit before the call, one statement after it charges (the account row, a
 *       transaction row, a usage row), commits asynchronous as the gateway's ledger. No keys,
 *       plans, idempotency or token counting: a floor, not a gateway. `batched`, the same
 *       ledger with the gateway's group commit: the holds and charges of the requests under way
 *       in one statement (the account row once, a transaction row and a usage row a charge).
 */
import { Hono } from 'hono'
import { Batcher } from '../src/ledger/Batch.ts'
import { tokenChunk, usageChunk } from './Harness.ts'

const [kind, port, target] = process.argv.slice(2)

/** How often the paced upstream writes the events that are due (one ticker for all streams). */
const tickMs = 20

/** A paced stream in flight: it has written `sent` of its `n` token events. */
type Paced = {
  controller: ReadableStreamDefaultController<Uint8Array>
  n: number
  sent: number
  started: number
  tail: Uint8Array
}

if (kind === 'upstream') {
  const rate = Number(process.argv[4] ?? 0)
  const body = JSON.stringify({
    id: 'chatcmpl-bench',
    object: 'chat.completion',
    created: 1,
    model: 'bench',
    choices: [{ index: 0, message: { role: 'assistant', content: 'pong' }, finish_reason: 'stop' }],
    usage: { prompt_tokens: 9, completion_tokens: 1, total_tokens: 10 },
  })

  const event = new TextEncoder().encode(`data: ${tokenChunk}\n\n`)
  const active = new Set<Paced>()

  /** Writes the events of `s` that are due: token k is due k/rate seconds after the request. */
  const pump = (s: Paced, now: number) => {
    const due = Math.min(s.n, Math.floor(((now - s.started) * rate) / 1000) + 1)
    try {
      for (; s.sent < due; s.sent++) s.controller.enqueue(event)
      if (s.sent === s.n) {
        s.controller.enqueue(s.tail)
        s.controller.close()
        active.delete(s)
      }
    } catch {
      active.delete(s) // the client went away and the stream is already closed
    }
  }
  if (rate > 0)
    setInterval(() => {
      const now = performance.now()
      for (const s of active) pump(s, now)
    }, tickMs)

  Bun.serve({
    port: Number(port),
    hostname: '127.0.0.1',
    async fetch(req) {
      const request = (await req.json()) as { stream?: boolean; max_tokens?: number }
      if (!request.stream)
        return new Response(body, { headers: { 'content-type': 'application/json' } })
      const n = request.max_tokens ?? 100
      if (rate > 0) {
        let s: Paced
        const stream = new ReadableStream<Uint8Array>({
          start(controller) {
            s = {
              controller,
              n,
              sent: 0,
              started: performance.now(),
              tail: new TextEncoder().encode(`data: ${usageChunk(n)}\n\ndata: [DONE]\n\n`),
            }
            active.add(s)
            pump(s, s.started) // the first token at once, not at the next tick
          },
          cancel() {
            active.delete(s)
          },
        })
        return new Response(stream, { headers: { 'content-type': 'text/event-stream' } })
      }
      const text = `${`data: ${tokenChunk}\n\n`.repeat(n)}data: ${usageChunk(n)}\n\ndata: [DONE]\n\n`
      return new Response(text, { headers: { 'content-type': 'text/event-stream' } })
    },
  })
} else if (kind === 'proxy') {
  const app = new Hono()
  app.post('/v1/chat/completions', async (c) => {
    const res = await fetch(`${target}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: await c.req.arrayBuffer(),
    })
    return new Response(res.body, {
      status: res.status,
      headers: { 'content-type': 'application/json' },
    })
  })
  Bun.serve({ port: Number(port), hostname: '127.0.0.1', fetch: app.fetch })
} else if (kind === 'floor') {
  const [databaseUrl, mode] = process.argv.slice(5)
  const postgres = (await import('postgres')).default
  const sql = postgres(databaseUrl!, {
    max: 10,
    onnotice: () => {},
    connection: { search_path: 'floor', synchronous_commit: 'off' },
  })
  await sql`create schema if not exists floor`
  await sql`create table if not exists accounts (id int primary key,
    balance numeric not null check (balance >= 0),
    reserved numeric not null default 0 check (reserved >= 0 and reserved <= balance))`
  await sql`create table if not exists transactions (id bigserial primary key,
    account_id int not null, amount numeric not null, at timestamptz not null default now())`
  await sql`create table if not exists usage (id bigserial primary key, account_id int not null,
    tokens int not null, cost numeric not null, at timestamptz not null default now())`
  await sql`insert into accounts values (1, 1000000000000000) on conflict do nothing`
  /** `batched`: holds and charges of requests under way go in one statement (the gateway's
   * group commit, src/ledger/Batch.ts): the account row once, a transaction row and a usage
   * row a charge. */
  type Item = { hold: true } | { hold: false; cost: number }
  const batcher = new Batcher<Item, boolean>({
    many: async (items) => {
      let hold = 0
      let release = 0
      const costs: number[] = []
      for (const i of items)
        if (i.hold) hold += 100
        else {
          release += 100
          costs.push(i.cost)
        }
      const spent = costs.reduce((a, b) => a + b, 0)
      const [row] = await sql`with a as (update accounts
          set balance = balance - ${spent}, reserved = reserved - ${release} + ${hold}
          where id = 1 and balance - ${spent} - (reserved - ${release}) >= ${hold} returning id),
        t as (insert into transactions (account_id, amount)
          select a.id, -x from a, unnest(${costs}::numeric[]) x),
        u as (insert into usage (account_id, tokens, cost)
          select a.id, 10, x from a, unnest(${costs}::numeric[]) x)
        select count(*)::int as ok from a`
      const held = row?.ok === 1
      return items.map(() => held)
    },
  })
  const app = new Hono()
  app.post('/v1/chat/completions', async (c) => {
    const body = await c.req.arrayBuffer()
    if (mode === 'roundtrip') await sql`select 1`
    else if (mode === 'batched') {
      if (!(await batcher.run({ hold: true })))
        return c.json({ error: { type: 'insufficient_credits' } }, 402)
    } else {
      const [held] = await sql`update accounts set reserved = reserved + 100
        where id = 1 and balance - reserved >= 100 returning reserved`
      if (!held) return c.json({ error: { type: 'insufficient_credits' } }, 402)
    }
    const res = await fetch(`${target}/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body,
    })
    const answer = await res.arrayBuffer()
    if (mode === 'batched')
      void batcher.run({ hold: false, cost: 11 }).catch((e) => console.error(e))
    else if (mode !== 'roundtrip')
      // Charged after the answer, as the gateway's charge: nobody waits for it.
      void sql`with a as (update accounts set balance = balance - 11, reserved = reserved - 100
          where id = 1 returning id),
        t as (insert into transactions (account_id, amount) select id, -11 from a)
        insert into usage (account_id, tokens, cost) select id, 10, 11 from a`.catch((e) =>
        console.error(e),
      )
    return new Response(answer, {
      status: res.status,
      headers: { 'content-type': 'application/json' },
    })
  })
  Bun.serve({ port: Number(port), hostname: '127.0.0.1', fetch: app.fetch })
} else {
  console.error(
    'usage: bun bench/servers.ts upstream <port> [tokensPerSecond] | proxy <port> <target> | floor <port> <target> <databaseUrl> roundtrip|ledger|batched',
  )
  process.exit(2)
}
console.log('ready')
