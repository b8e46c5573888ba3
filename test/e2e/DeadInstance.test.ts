/**
 * An instance that dies with a request under way (killed: its sessions gone from the database)
 * holds that request's reservation no longer than a sweep or two of another instance: a plan
 * with one completion at a time is served again within seconds, not after the lease (10
 * minutes), and the dead request is charged what it had delivered, as the lease sweep charges.
 */
import { expect, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'
import * as Sse from '../helpers/Sse.ts'

const server = Boolean(process.env.DATABASE_URL)

test.skipIf(!server)(
  'behavior: an instance killed with a stream under way: the free plan (one at a time) is served again on another instance within seconds; the dead stream is charged what it delivered',
  async () => {
    const a = await Gateway.create({}, undefined, { sweepMs: 200, deadAfterMs: 600 })
    const b = await a.another()
    const { id, key } = await a.account({ plan: 'free' })
    const words = Array.from({ length: 300 }, (_, i) => `w${i}`).join(' ')
    const chat = (gw: Gateway.TestGateway, stream: boolean) =>
      fetch(`${gw.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
        body: JSON.stringify({
          model: stream ? 'fake-slow' : 'fake',
          stream,
          // The stream: 300 words, one each 50 ms.
          messages: [{ role: 'user', content: stream ? words : 'one two three' }],
        }),
      })
    // A stream on b, 15 s long: it holds the plan's one slot.
    const res = await chat(b, true)
    expect(res.status).toBe(200)
    const reader = res.body!.getReader()
    let text = ''
    while (!Sse.text(Sse.events(text)).includes('w0'))
      text += new TextDecoder().decode((await reader.read()).value)
    // Alive, b keeps it however long its stream takes: a's sweeps see b's sessions.
    await Bun.sleep(1_500)
    expect((await chat(a, false)).status).toBe(429)

    // b dies: its sessions close, as a killed process's do (its HTTP side lingers here, but
    // can write nothing more).
    await b.sql.end({ timeout: 0 })
    const started = performance.now()
    let status = 429
    while (status === 429 && performance.now() - started < 10_000) {
      const r = await chat(a, false)
      status = r.status
      await r.body?.cancel()
      if (status === 429) await Bun.sleep(100)
    }
    expect(status).toBe(200)
    // Released after it was seen gone for deadAfterMs (0.6 s) across sweeps (every 0.2 s).
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
