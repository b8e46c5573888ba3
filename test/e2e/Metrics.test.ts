import { describe, expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()

const chat = (key: string, body: Record<string, unknown> = {}) =>
  fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      model: 'fake',
      messages: [{ role: 'user', content: 'one two three' }],
      ...body,
    }),
  })

async function scrape(): Promise<Map<string, number>> {
  const res = await fetch(`${gw.url}/metrics`, {
    headers: { authorization: `Bearer ${gw.config.adminToken}` },
  })
  expect(res.status).toBe(200)
  expect(res.headers.get('content-type')).toContain('text/plain')
  const samples = new Map<string, number>()
  for (const line of (await res.text()).split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const at = line.lastIndexOf(' ')
    samples.set(line.slice(0, at), Number(line.slice(at + 1)))
  }
  return samples
}

describe('GET /metrics', () => {
  test('error: without the admin token → 401', async () => {
    expect((await fetch(`${gw.url}/metrics`)).status).toBe(401)
    const wrong = await fetch(`${gw.url}/metrics`, { headers: { authorization: 'Bearer nope' } })
    expect(wrong.status).toBe(401)
  })

  test('behavior: completions, tokens, money and times by model, payer and outcome; answers by route pattern', async () => {
    const before = await scrape()
    const grew = (after: Map<string, number>, name: string) =>
      (after.get(name) ?? 0) - (before.get(name) ?? 0)
    const { key } = await gw.account()
    const usages: { prompt_tokens: number; completion_tokens: number; cost: string }[] = []
    for (const stream of [false, true]) {
      const res = await chat(key, stream ? { stream, stream_options: { include_usage: true } } : {})
      expect(res.status).toBe(200)
      if (stream) {
        const text = await res.text()
        const last = text
          .split('\n')
          .filter((l) => l.startsWith('data: {'))
          .map((l) => JSON.parse(l.slice(6)))
          .find((c) => c.usage)
        usages.push(last.usage)
      } else usages.push(((await res.json()) as { usage: (typeof usages)[0] }).usage)
    }
    // An upstream that fails before its first token: an outcome of its own, nothing charged.
    const failed = await chat(key, { model: 'fake-500' })
    expect(failed.status).toBe(502)
    await failed.text()
    const broke = await gw.account({ credits: 0n })
    expect((await chat(broke.key)).status).toBe(402)
    expect(
      (
        await fetch(`${gw.url}/v1/usage/${crypto.randomUUID()}`, {
          headers: { authorization: `Bearer ${key}` },
        })
      ).status,
    ).toBe(404)
    expect((await fetch(`${gw.url}/no/such/path`)).status).toBe(404)
    // A model and its health: one pattern serves both, counted apart (twice the health, as a
    // monitor polls it; an unknown model's too).
    expect((await fetch(`${gw.url}/v1/models/fake`)).status).toBe(200)
    for (const _ of [1, 2])
      expect((await fetch(`${gw.url}/v1/models/fake/health`)).status).toBe(200)
    expect((await fetch(`${gw.url}/v1/models/none/health`)).status).toBe(404)
    expect(
      (
        await fetch(`${gw.url}/admin/channels`, {
          headers: { authorization: `Bearer ${gw.config.adminToken}` },
        })
      ).status,
    ).toBe(200)
    await Batch.settled(gw.sql)

    const after = await scrape()
    const ok = 'tollway_completions_total{model="fake",payer="key",status="ok"}'
    expect(grew(after, ok)).toBe(2)
    const sum = (f: (u: (typeof usages)[0]) => number) => usages.reduce((s, u) => s + f(u), 0)
    expect(grew(after, 'tollway_tokens_total{model="fake",payer="key",kind="prompt"}')).toBe(
      sum((u) => u.prompt_tokens),
    )
    expect(grew(after, 'tollway_tokens_total{model="fake",payer="key",kind="completion"}')).toBe(
      sum((u) => u.completion_tokens),
    )
    // A failure before the first token cost nothing: no tokens charged for.
    expect(grew(after, 'tollway_tokens_total{model="fake-500",payer="key",kind="prompt"}')).toBe(0)
    expect(
      grew(
        after,
        'tollway_completions_total{model="fake-500",payer="key",status="upstream_error"}',
      ),
    ).toBe(1)
    expect(grew(after, 'tollway_charged_base_units_total{model="fake",payer="key"}')).toBe(
      sum((u) => Number(u.cost)),
    )
    for (const stream of ['false', 'true'])
      expect(
        grew(after, `tollway_completion_duration_seconds_count{model="fake",stream="${stream}"}`),
      ).toBe(1)
    // Time to first token: streams only (a whole completion's first token is its answer).
    expect(
      grew(after, 'tollway_time_to_first_token_seconds_count{model="fake",stream="true"}'),
    ).toBe(1)
    expect(
      after.has('tollway_time_to_first_token_seconds_count{model="fake",stream="false"}'),
    ).toBe(false)
    const answers = (route: string, status: number, method = 'POST') =>
      grew(
        after,
        `tollway_http_requests_total{method="${method}",route="${route}",status="${status}"}`,
      )
    expect(answers('/v1/chat/completions', 200)).toBe(2)
    expect(answers('/v1/chat/completions', 502)).toBe(1)
    expect(answers('/v1/chat/completions', 402)).toBe(1)
    expect(answers('/v1/usage/:id', 404, 'GET')).toBe(1)
    expect(answers('unmatched', 404, 'GET')).toBe(1)
    expect(answers('/v1/models/:id', 200, 'GET')).toBe(1)
    expect(answers('/v1/models/:id/health', 200, 'GET')).toBe(2)
    expect(answers('/v1/models/:id/health', 404, 'GET')).toBe(1)
    // A route behind middleware registered after it (the admin token check) is still itself.
    expect(
      grew(after, 'tollway_http_requests_total{method="GET",route="/admin/channels",status="200"}'),
    ).toBe(1)
    expect(after.get('tollway_upstream_up{model="fake"}')).toBe(1)
    expect(grew(after, 'tollway_ledger_statements_total{batcher="ledger"}')).toBeGreaterThan(0)
    expect(grew(after, 'tollway_ledger_items_total{batcher="ledger"}')).toBeGreaterThanOrEqual(
      grew(after, 'tollway_ledger_statements_total{batcher="ledger"}'),
    )
    expect(grew(after, 'tollway_ledger_statement_seconds_total{batcher="ledger"}')).toBeGreaterThan(
      0,
    )
    // The process, as Bun reports it; what Bun does not implement is left out.
    expect(after.get('process_cpu_seconds_total')).toBeGreaterThan(0)
    expect(after.get('process_resident_memory_bytes')).toBeGreaterThan(0)
    expect([...after.keys()].some((k) => k.startsWith('nodejs_eventloop_lag'))).toBe(false)
    // No key, account or request id in any label.
    expect([...after.keys()].join('\n')).not.toContain(key)
  })

  test('behavior: a long message sent again (an agent resending its conversation) is not tokenized again: its count is remembered, and the charge is the same', async () => {
    const { key } = await gw.account()
    // Unique to this test: a text this process has not counted before.
    const history = `${crypto.randomUUID()} ${'the same earlier turn of a long conversation '.repeat(40)}`
    const turn = async (last: string, by = key) => {
      const res = await chat(by, {
        messages: [
          { role: 'user', content: history },
          { role: 'user', content: last },
        ],
      })
      expect(res.status).toBe(200)
      return ((await res.json()) as { usage: { prompt_tokens: number } }).usage.prompt_tokens
    }
    const before = await scrape()
    const first = await turn('one')
    const middle = await scrape()
    const second = await turn('two')
    const after = await scrape()
    const grew = (from: Map<string, number>, to: Map<string, number>, how: string) =>
      (to.get(`tollway_counted_characters_total{how="${how}"}`) ?? 0) -
      (from.get(`tollway_counted_characters_total{how="${how}"}`) ?? 0)
    // The fake upstream, in this process, counts its usage with the same tokenizer for no
    // payer (twice a turn: prompt_tokens, total_tokens): it tokenizes the history every turn,
    // the gateway only the first time for a payer.
    const fakes = 2 * history.length
    expect(grew(before, middle, 'tokenized')).toBeGreaterThanOrEqual(fakes + history.length)
    expect(grew(middle, after, 'remembered')).toBeGreaterThanOrEqual(history.length)
    expect(grew(middle, after, 'tokenized')).toBeLessThan(fakes + history.length)
    // "one" and "two" are a token each: the prompt counts the same.
    expect(second).toBe(first)
    // Remembered for its payer only: another account's key sending the same text has it
    // tokenized (a stranger cannot time whether someone sent a text it guesses).
    const other = await gw.account()
    const third = await turn('three', other.key)
    const last = await scrape()
    expect(grew(after, last, 'tokenized')).toBeGreaterThanOrEqual(fakes + history.length)
    expect(grew(after, last, 'remembered')).toBe(0)
    expect(third).toBe(first)
  })

  test('error: a stranger cannot make the gateway count a long body or remember its counts: an unknown key is looked up first', async () => {
    const stranger = `tw_${'z'.repeat(43)}`
    const tokenized = (from: Map<string, number>, to: Map<string, number>, how = 'tokenized') =>
      (to.get(`tollway_counted_characters_total{how="${how}"}`) ?? 0) -
      (from.get(`tollway_counted_characters_total{how="${how}"}`) ?? 0)
    const before = await scrape()
    const long = await chat(stranger, {
      messages: [{ role: 'user', content: `${crypto.randomUUID()} ${'ab '.repeat(300)}` }],
    })
    expect(long.status).toBe(401)
    const middle = await scrape()
    expect(tokenized(before, middle)).toBe(0)
    // A body under the bound is counted (the key is checked with the plan, in one round
    // trip), but a stranger's counts are not remembered: the same message twice is tokenized
    // twice, and nothing of paying clients' is pushed out of the memo.
    const message = `${crypto.randomUUID()} ${'cd '.repeat(80)}`
    for (let i = 0; i < 2; i++)
      expect(
        (await chat(stranger, { messages: [{ role: 'user', content: message }] })).status,
      ).toBe(401)
    const after = await scrape()
    expect(tokenized(middle, after)).toBeGreaterThanOrEqual(2 * message.length)
    expect(tokenized(middle, after, 'remembered')).toBe(0)
  })

  test('behavior: a revoked key is forgotten: its next long body waits for the key lookup and is not counted', async () => {
    const { key } = await gw.account()
    const messages = [{ role: 'user', content: `${crypto.randomUUID()} ${'ef '.repeat(300)}` }]
    expect((await chat(key, { messages })).status).toBe(200)
    const auth = { authorization: `Bearer ${key}` }
    const listed = (await (await fetch(`${gw.url}/v1/keys`, { headers: auth })).json()) as {
      data: { id: string }[]
    }
    for (const k of listed.data)
      expect(
        (await fetch(`${gw.url}/v1/keys/${k.id}`, { method: 'DELETE', headers: auth })).status,
      ).toBe(200)
    // Known as good until admission finds it revoked: a 401, and forgotten.
    expect((await chat(key, { messages })).status).toBe(401)
    const before = await scrape()
    // A text it did not send before (a remembered count would not show as tokenized).
    const other = [{ role: 'user', content: `${crypto.randomUUID()} ${'gh '.repeat(300)}` }]
    expect((await chat(key, { messages: other })).status).toBe(401)
    const after = await scrape()
    expect(
      (after.get('tollway_counted_characters_total{how="tokenized"}') ?? 0) -
        (before.get('tollway_counted_characters_total{how="tokenized"}') ?? 0),
    ).toBe(0)
  })

  test('behavior: an upstream whose circuit opened reads 0', async () => {
    const { key } = await gw.account()
    const before = await scrape()
    for (let i = 0; i < 3; i++) await (await chat(key, { model: 'fake-500' })).text()
    const after = await scrape()
    expect(after.get('tollway_upstream_up{model="fake-500"}')).toBe(0)
    // Per upstream too: its status, its calls by outcome, and the latency routing orders by.
    expect(after.get('tollway_upstream_status{upstream="fake-500"}')).toBe(0)
    expect(after.get('tollway_upstream_status{upstream="fake"}')).toBe(1)
    const grew = (k: string) => (after.get(k) ?? 0) - (before.get(k) ?? 0)
    // Three failures open the circuit; no call goes to it after that.
    expect(after.get('tollway_upstream_calls_total{upstream="fake-500",outcome="failed"}')).toBe(3)
    expect(
      grew('tollway_upstream_calls_total{upstream="fake-500",outcome="failed"}'),
    ).toBeGreaterThan(0)
    expect(after.get('tollway_upstream_calls_total{upstream="fake",outcome="ok"}')).toBeGreaterThan(
      0,
    )
    const latency = (upstream: string, kind: string) =>
      after.get(
        `tollway_upstream_latency_seconds{upstream="${upstream}",upstream_model="${upstream}",kind="${kind}"}`,
      )
    expect(latency('fake', 'answer')).toBeGreaterThan(0)
    expect(latency('fake', 'first_token')).toBeGreaterThan(0)
    expect(latency('fake-500', 'answer')).toBeUndefined()
  })
})
