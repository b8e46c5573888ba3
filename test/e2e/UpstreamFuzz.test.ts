/**
 * Property test of what an upstream controls, through the whole gateway: any answer (a stream of
 * chunks with any fields changed, a whole completion with any fields changed, any status, any
 * bytes) reaches the client as a success or a typed error, never a 500 or a broken stream, and
 * the account's ledger keeps its invariants with nothing left held.
 */
import { expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

/** The upstream's next answer, set by the property. */
let next: () => Response = () => new Response('')
const url = Scripted.serve(() => next())
const gw = await Scripted.gateway(url, ['m'])
const { id, key } = await gw.account({ credits: 10n ** 12n })

const post = (stream: boolean) =>
  fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', stream, messages: [{ role: 'user', content: 'hi' }] }),
  })

const weird = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.constantFrom(
    null,
    -1,
    1.5,
    2 ** 53,
    1e308,
    '1',
    '',
    '\u0000',
    '\ud800',
    [],
    {},
    Number.MAX_SAFE_INTEGER,
  ),
  fc.string({ maxLength: 10 }),
  fc.integer(),
)
const usage = fc.oneof(
  fc.record(
    {
      prompt_tokens: fc.oneof(fc.nat({ max: 10_000 }), weird),
      completion_tokens: fc.oneof(fc.nat({ max: 10_000 }), weird),
      total_tokens: fc.oneof(fc.nat(), weird),
      completion_tokens_details: fc.oneof(
        fc.record({ reasoning_tokens: fc.oneof(fc.nat(), weird) }),
        weird,
      ),
    },
    { requiredKeys: [] },
  ),
  weird,
)
const delta = fc.oneof(
  fc.record(
    {
      role: fc.oneof(fc.constant('assistant'), weird),
      content: fc.oneof(fc.string({ maxLength: 20 }), weird),
      reasoning_content: fc.oneof(fc.string({ maxLength: 20 }), weird),
      refusal: fc.oneof(fc.string({ maxLength: 20 }), weird),
      tool_calls: fc.oneof(
        fc.array(
          fc.record(
            {
              index: fc.oneof(fc.nat({ max: 3 }), weird),
              id: fc.oneof(fc.string({ maxLength: 8 }), weird),
              type: fc.oneof(fc.constant('function'), weird),
              function: fc.oneof(
                fc.record(
                  {
                    name: fc.oneof(fc.string({ maxLength: 8 }), weird),
                    arguments: fc.oneof(fc.string({ maxLength: 20 }), weird),
                  },
                  { requiredKeys: [] },
                ),
                weird,
              ),
            },
            { requiredKeys: [] },
          ),
          { maxLength: 2 },
        ),
        weird,
      ),
    },
    { requiredKeys: [] },
  ),
  weird,
)
const finish = fc.oneof(fc.constantFrom(null, 'stop', 'length', 'tool_calls'), weird)
const choice = (inner: 'delta' | 'message') =>
  fc.record(
    {
      index: fc.oneof(fc.nat({ max: 2 }), weird),
      [inner]: delta,
      finish_reason: finish,
      logprobs: weird,
    },
    { requiredKeys: [inner] },
  )
const top = (inner: 'delta' | 'message') =>
  fc.record(
    {
      id: fc.oneof(fc.constant('c'), weird),
      object: fc.oneof(
        fc.constant(inner === 'delta' ? 'chat.completion.chunk' : 'chat.completion'),
        weird,
      ),
      created: fc.oneof(fc.constant(1), weird),
      model: fc.oneof(fc.constant('m'), weird),
      choices: fc.oneof(fc.array(choice(inner), { maxLength: 2 }), weird),
      usage,
      error: fc.oneof(fc.record({ message: fc.string({ maxLength: 20 }) }), weird),
    },
    { requiredKeys: ['choices'], noNullPrototype: true },
  )

type Answer = { status: number; type: string; body: string | Uint8Array }
const answer: fc.Arbitrary<Answer> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc
      .array(
        fc.oneof(
          { weight: 6, arbitrary: top('delta').map((c) => `data: ${JSON.stringify(c)}\n\n`) },
          fc.constant('data: [DONE]\n\n'),
          fc.string({ maxLength: 20 }).map((s) => `data: ${s}\n\n`),
          fc.constantFrom(': keep-alive\n\n', 'event: error\n', 'data: {"x":\n\n', '\n\n'),
        ),
        { maxLength: 8 },
      )
      .map((parts) => ({ status: 200, type: 'text/event-stream', body: parts.join('') })),
  },
  {
    weight: 3,
    arbitrary: fc.oneof(top('message'), weird).map((c) => ({
      status: 200,
      type: 'application/json',
      body: JSON.stringify(c) ?? '',
    })),
  },
  fc
    // Not 429: the gateway then waits out the upstream's Retry-After (OpenAICompatible.test.ts).
    .record({
      status: fc.constantFrom(200, 201, 204, 301, 400, 401, 404, 408, 409, 413, 422, 500, 503),
      type: fc.constantFrom('application/json', 'text/event-stream', 'text/plain', ''),
      body: fc.oneof(
        fc.uint8Array({ maxLength: 100 }),
        fc.jsonValue({ maxDepth: 2 }).map((v) => JSON.stringify(v)),
        fc.string({ maxLength: 40 }).map((s) => JSON.stringify({ error: { message: s } })),
      ),
    })
    .map((a) => ({ ...a, body: a.status === 204 || a.status === 301 ? '' : a.body })),
)

/** What the client got is typed: a JSON completion, a well-formed SSE stream, or an error envelope. */
async function expectTyped(res: Response, stream: boolean) {
  const text = await res.text()
  expect(res.status).not.toBe(500)
  if (res.status >= 400) {
    const body = JSON.parse(text) as { error: { type: string; message: string; code: string } }
    expect(typeof body.error.type).toBe('string')
    expect(typeof body.error.message).toBe('string')
    expect(typeof body.error.code).toBe('string')
    return
  }
  expect(res.status).toBe(200)
  if (!stream) {
    const body = JSON.parse(text) as { object: string; choices: unknown[] }
    expect(body.object).toBe('chat.completion')
    expect(Array.isArray(body.choices)).toBe(true)
    return
  }
  // Every event's data is JSON (a chunk or an error object) or the final [DONE].
  const events = text.split('\n\n').filter((e) => e.trim() !== '')
  for (const event of events) {
    const data = event
      .split('\n')
      .filter((l) => l.startsWith('data: '))
      .map((l) => l.slice(6))
      .join('\n')
    if (data === '' || data === '[DONE]') continue
    const parsed = JSON.parse(data) as { object?: string; error?: { message: string } }
    expect(parsed.object === 'chat.completion.chunk' || parsed.error !== undefined).toBe(true)
  }
}

test('property: any upstream answer reaches the client typed, and leaves the ledger whole', async () => {
  await fc.assert(
    fc.asyncProperty(answer, fc.boolean(), async (a, stream) => {
      next = () =>
        new Response(a.body, {
          status: a.status,
          headers: a.type ? { 'content-type': a.type } : {},
        })
      const res = await post(stream)
      await expectTyped(res, stream)
      // A good answer after each: three failures in a row would open the upstream's circuit,
      // and the next runs would get the gateway's 503 without reaching the upstream.
      next = () => Response.json(Scripted.completion({ content: 'ok' }, undefined, 'm'))
      const good = await post(false)
      expect(good.status).toBe(200)
      await good.text()
    }),
    { numRuns: 250, seed: 20261125 },
  )
  const l = await Gateway.released(gw.db.sql as never, id)
  expect(l.open_reservations).toBe(0n)
}, 60_000)
