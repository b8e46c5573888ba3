/**
 * Property tests of every parser of outside input reachable over HTTP: whatever arrives,
 * the answer is a typed error envelope or a success, never a 500 or a crash.
 */
import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()
const { key } = await gw.account({ credits: 10n ** 12n })

async function expectTyped(res: Response) {
  expect(res.status).not.toBe(500)
  const text = await res.text()
  if (res.status >= 400) {
    const body = JSON.parse(text) as { error: { type: string; message: string; code: string } }
    expect(typeof body.error.type).toBe('string')
    expect(typeof body.error.message).toBe('string')
    expect(typeof body.error.code).toBe('string')
  }
}

const chatLike = fc.record(
  {
    model: fc.oneof(fc.constant('fake'), fc.string(), fc.integer()),
    messages: fc.oneof(
      fc.array(
        fc.record(
          {
            role: fc.oneof(fc.constantFrom('system', 'user', 'assistant', 'tool'), fc.string()),
            content: fc.oneof(
              fc.string(),
              fc.array(fc.record({ type: fc.constant('text'), text: fc.string() })),
              fc.jsonValue(),
            ),
            tool_calls: fc.oneof(
              fc.array(
                fc.record(
                  {
                    id: fc.string(),
                    function: fc.oneof(
                      fc.record(
                        { name: fc.string(), arguments: fc.oneof(fc.string(), fc.jsonValue()) },
                        { requiredKeys: [] },
                      ),
                      fc.jsonValue(),
                    ),
                  },
                  { requiredKeys: [] },
                ),
                { maxLength: 2 },
              ),
              fc.jsonValue(),
            ),
            tool_call_id: fc.string(),
          },
          { requiredKeys: [] },
        ),
        { maxLength: 4 },
      ),
      fc.jsonValue(),
    ),
    stream: fc.oneof(fc.boolean(), fc.jsonValue()),
    max_tokens: fc.oneof(fc.integer({ min: -5, max: 5000 }), fc.jsonValue()),
    temperature: fc.oneof(fc.double(), fc.jsonValue()),
    stop: fc.oneof(fc.string(), fc.array(fc.string()), fc.jsonValue()),
    stream_options: fc.jsonValue(),
    tools: fc.jsonValue(),
  },
  { requiredKeys: [] },
)

describe('POST /v1/chat/completions', () => {
  test('property: any JSON body gets a typed answer', async () => {
    await fc.assert(
      fc.asyncProperty(fc.oneof(chatLike, fc.jsonValue()), async (body) => {
        const res = await fetch(`${gw.url}/v1/chat/completions`, {
          method: 'POST',
          headers: { authorization: `Bearer ${key}` },
          body: JSON.stringify(body),
        })
        await expectTyped(res)
      }),
      { numRuns: 1000 },
    )
  }, 120_000)

  test('property: any bytes and any credentials get a typed answer', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.uint8Array({ maxLength: 300 }),
        // Header values the HTTP parser accepts (it rejects control bytes before the app runs).
        fc
          .string({ unit: 'binary-ascii', maxLength: 80 })
          .filter((s) => /^[\t\x20-\x7e]*$/.test(s)),
        fc.option(fc.string({ unit: 'grapheme-ascii', maxLength: 300 })),
        async (bytes, auth, idem) => {
          const headers: Record<string, string> = { authorization: auth, 'x-api-key': auth }
          if (idem !== null) headers['idempotency-key'] = idem
          let res: Response
          try {
            res = await fetch(`${gw.url}/v1/chat/completions`, {
              method: 'POST',
              headers,
              body: bytes,
            })
          } catch {
            return // a header the fetch client itself refuses to send
          }
          await expectTyped(res)
        },
      ),
      { numRuns: 1000 },
    )
  }, 120_000)
})

describe('other inputs', () => {
  test('property: path ids, cursors and limits get a typed answer', async () => {
    await fc.assert(
      fc.asyncProperty(fc.string({ maxLength: 60 }), fc.string({ maxLength: 60 }), async (a, b) => {
        const q = `cursor=${encodeURIComponent(a)}&limit=${encodeURIComponent(b)}`
        const headers = { authorization: `Bearer ${key}` }
        await expectTyped(await fetch(`${gw.url}/v1/usage?${q}`, { headers }))
        const filter = `model=${encodeURIComponent(a)}&key_id=${encodeURIComponent(b)}&from=${encodeURIComponent(a)}&to=${encodeURIComponent(b)}`
        await expectTyped(await fetch(`${gw.url}/v1/usage?${filter}`, { headers }))
        await expectTyped(await fetch(`${gw.url}/v1/usage/${encodeURIComponent(a)}`, { headers }))
        await expectTyped(
          await fetch(`${gw.url}/v1/usage?cursor=${encodeURIComponent(a)}`, { headers }),
        )
        await expectTyped(
          await fetch(`${gw.url}/v1/credits/transactions?cursor=${encodeURIComponent(a)}`, {
            headers,
          }),
        )
        await expectTyped(
          await fetch(`${gw.url}/v1/keys/${encodeURIComponent(a)}`, { method: 'DELETE', headers }),
        )
        await expectTyped(await gw.admin(`/accounts/${encodeURIComponent(a)}`))
        await expectTyped(
          await gw.admin(`/accounts/${encodeURIComponent(a)}/credits`, { amount: b }),
        )
        await expectTyped(await fetch(`${gw.url}/v1/models/${encodeURIComponent(a)}/health`))
      }),
      { numRuns: 300 },
    )
  }, 120_000)
})
