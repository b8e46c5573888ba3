/**
 * DESIGN.md: no prompt or completion text is ever written to the database or the logs, by the
 * indirect ways too. Upstreams echo the request in their failures (a 400 quoting the
 * offending content, a moderation refusal quoting the text, a 500 with a trace holding the
 * request, an error event mid-stream); the client may read what the upstream said, but
 * nothing of it is logged or stored. The gateway's own 400s given the marker as a value are
 * held to the same.
 */
import { describe, expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

/** The request's first message, as the upstream echoes it. */
const promptOf = (body: Record<string, unknown>) =>
  String((body.messages as { content?: unknown }[] | undefined)?.[0]?.content ?? '')

/** How each model's upstream fails, quoting the prompt. */
const behaviours: Record<string, (prompt: string, stream: boolean, model: string) => Response> = {
  rejects400: (p) =>
    Response.json(
      { error: { message: `Invalid value for 'content': '${p}'`, type: 'invalid_request_error' } },
      { status: 400 },
    ),
  rejects422: (p) =>
    Response.json({ error: { message: `messages.0.content: '${p}' is flagged` } }, { status: 422 }),
  rejects404: (p) => Response.json({ error: { message: `no model for '${p}'` } }, { status: 404 }),
  fails500: (p) =>
    Response.json({ error: { message: `internal error handling '${p}'` } }, { status: 500 }),
  traces503: (p) =>
    new Response(`Traceback (most recent call last): request=${p}`, { status: 503 }),
  // Text, then an error event quoting the prompt (a moderation cut mid-answer).
  cutMidStream: (p, stream, model) =>
    stream
      ? Scripted.events([
          Scripted.chunk({ role: 'assistant', content: 'partial' }, null, model),
          { error: { message: `content policy: '${p}'`, type: 'moderation' } },
        ])
      : Response.json({ error: { message: `content policy: '${p}'` } }, { status: 400 }),
  // An error event before any text (a context-length refusal listing the messages).
  failsFirst: (p, stream) =>
    stream
      ? Scripted.events([{ error: { message: `context length exceeded: [${p}]` } }])
      : new Response(`not json: ${p}`),
  malformed: (p, stream, model) =>
    stream
      ? Scripted.events([
          Scripted.chunk({ role: 'assistant', content: 'partial' }, null, model),
          `not json: ${p}`,
        ])
      : Response.json({ choices: p }),
}
const models = Object.keys(behaviours)
const url = Scripted.serve((body) => {
  const model = body.model as string
  const answer = behaviours[model]
  if (answer) return answer(promptOf(body), body.stream === true, model)
  const p = promptOf(body)
  return body.stream
    ? Scripted.events([Scripted.chunk({ role: 'assistant', content: p }, 'stop', model)])
    : Response.json(Scripted.completion({ content: p }, undefined, model))
})
// One upstream per model (their circuits apart), and `failover`, whose first route fails with
// a 500 quoting the prompt and whose second answers.
const gw = await Gateway.create({
  upstreams: [...models, 'answers'].map((name) => ({
    name,
    baseUrl: url,
    timeoutMs: 2_000,
    completionTimeoutMs: 2_000,
  })),
  models: [
    ...models.map((id) => ({
      id,
      upstream: id,
      upstreamModel: id,
      pricing: { input: '1000000', output: '2000000' },
      contextLength: 4096,
    })),
    {
      id: 'failover',
      routes: [
        { upstream: 'fails500', upstreamModel: 'fails500' },
        { upstream: 'answers', upstreamModel: 'answers' },
      ],
      pricing: { input: '1000000', output: '2000000' },
      contextLength: 4096,
    },
  ],
})

/** Letters only: an upstream's words reach the client with runs of 24 or more characters that
 * hold a digit taken out (Errors.redacted), so a marker with one would never be echoed. */
const newMarker = () =>
  `MARKER${Array.from({ length: 18 }, () => String.fromCharCode(97 + Math.floor(Math.random() * 26))).join('')}`

/** Every table's rows holding `marker`, by table (none expected). */
async function rowsWith(marker: string) {
  await Batch.settled(gw.sql)
  const tables = await gw.sql`
    select table_name from information_schema.tables
    where table_schema = current_schema() and table_type = 'BASE TABLE'`
  expect(tables.length).toBeGreaterThan(5)
  const hits: Record<string, number> = {}
  for (const { table_name } of tables) {
    const [hit] = await gw.sql.unsafe(
      `select count(*)::int as n from "${table_name}" t where t::text like '%' || $1 || '%'`,
      [marker],
    )
    if (hit!.n > 0) hits[table_name] = hit!.n
  }
  return hits
}

describe('privacy of failures', () => {
  test('behavior: upstream errors quoting the prompt reach the client, never the database or the logs', async () => {
    const marker = newMarker()
    const { key } = await gw.account()
    const messages = [{ role: 'user', content: `say ${marker} please` }]
    const seen: string[] = []
    for (const model of [...models, 'failover'])
      for (const stream of [false, true]) {
        const res = await gw.complete(key, { model, messages, stream })
        seen.push(`${model} ${stream} ${res.status} ${await res.text()}`)
      }
    // The paths ran: the client read the upstream's words (a 400, an error event mid-stream),
    // and a failed route was logged.
    const told = (model: string, stream: boolean) =>
      seen.find((s) => s.startsWith(`${model} ${stream} `))!
    expect(told('rejects400', false)).toStartWith('rejects400 false 400 ')
    expect(told('rejects400', false)).toContain(marker)
    expect(told('rejects422', true)).toContain(marker)
    expect(told('cutMidStream', true)).toStartWith('cutMidStream true 200 ')
    expect(told('cutMidStream', true)).toContain(`content policy: '${promptOf({ messages })}'`)
    expect(told('failover', false)).toStartWith('failover false 200 ')
    expect(gw.logs.some((l) => l.includes('route failed'))).toBe(true)
    expect(await rowsWith(marker)).toEqual({})
    expect(gw.logs.filter((l) => l.includes(marker))).toEqual([])
  }, 60_000)

  test('behavior: the gateway refusing a request that holds the marker logs and stores none of it', async () => {
    const marker = newMarker()
    const { key } = await gw.account()
    const messages = [{ role: 'user', content: `say ${marker} please` }]
    const bodies = [
      { model: 'failover', messages: [{ role: marker, content: marker }] },
      { model: marker, messages },
      {
        model: 'failover',
        messages: [{ role: 'user', content: [{ type: 'text' }] }],
        user: marker,
      },
      { model: 'failover', messages, max_tokens: marker },
      { model: 'failover', messages, temperature: marker },
      { model: 'failover', messages, stream: marker },
    ]
    for (const body of bodies) {
      const res = await gw.complete(key, body)
      expect(res.status).toBeGreaterThanOrEqual(400)
      expect(res.status).toBeLessThan(500)
    }
    // Not JSON, cut after the marker.
    const raw = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: `{"model":"failover","messages":[{"role":"user","content":"${marker}"}],${marker}`,
    })
    expect(raw.status).toBe(400)
    expect(await rowsWith(marker)).toEqual({})
    expect(gw.logs.filter((l) => l.includes(marker))).toEqual([])
  }, 30_000)
})
