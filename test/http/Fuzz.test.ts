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

const { id: accountId } = await gw.account({ credits: 1n })

describe('account, key and operator bodies', () => {
  const text = fc.oneof(
    fc.string({ maxLength: 20 }),
    fc.string({ unit: 'binary', maxLength: 20 }),
    fc.constantFrom(' ', '\u0000', '\ud800', 'free', 'pro', '__proto__', 'toString'),
  )
  const field = fc.oneof(text, fc.jsonValue({ maxDepth: 1 }))
  const amount = fc.oneof(
    fc.bigInt({ min: -(10n ** 80n), max: 10n ** 80n }).map(String),
    fc.constantFrom('-0', '0', '1e3', '1.0', ' 1', '+1', `${10n ** 77n}`, `-${10n ** 77n}`),
  )
  const bodyOf = fc.oneof(
    fc.record(
      { name: field, plan: field, note: field, amount: fc.oneof(amount, field) },
      {
        requiredKeys: [],
      },
    ),
    fc.jsonValue({ maxDepth: 2 }),
  )
  const send = (method: string, path: string, auth: string, value: unknown) =>
    fetch(`${gw.url}${path}`, {
      method,
      headers: { authorization: auth, 'content-type': 'application/json' },
      body: JSON.stringify(value),
    })

  test('property: any JSON body to the key, account and grant endpoints gets a typed answer', async () => {
    const admin = `Bearer ${gw.config.adminToken}`
    await fc.assert(
      fc.asyncProperty(bodyOf, async (value) => {
        await expectTyped(await send('POST', '/v1/keys', `Bearer ${key}`, value))
        await expectTyped(await send('POST', '/admin/accounts', admin, value))
        await expectTyped(await send('PATCH', `/admin/accounts/${accountId}`, admin, value))
        await expectTyped(await send('POST', `/admin/accounts/${accountId}/credits`, admin, value))
        await expectTyped(await send('POST', `/admin/accounts/${accountId}/keys`, admin, value))
      }),
      { numRuns: 100, seed: 20261125 },
    )
  }, 60_000)

  test('property: any admin Authorization, channel id and channel cursor get a typed answer', async () => {
    const printable = fc
      .string({ unit: 'binary-ascii', maxLength: 80 })
      .filter((s) => /^[\t\x20-\x7e]*$/.test(s))
    await fc.assert(
      fc.asyncProperty(printable, fc.string({ maxLength: 70 }), async (auth, a) => {
        for (const path of ['/admin/accounts', '/admin/channels', '/metrics']) {
          let res: Response
          try {
            res = await fetch(`${gw.url}${path}`, { headers: { authorization: auth } })
          } catch {
            continue // a header the fetch client itself refuses to send
          }
          expect(res.status).toBe(401)
          await expectTyped(res)
        }
        await expectTyped(await fetch(`${gw.url}/v1/channels/${encodeURIComponent(a)}`))
        await expectTyped(
          await gw.admin(
            `/channels?cursor=${encodeURIComponent(a)}&limit=${encodeURIComponent(a)}`,
          ),
        )
        await expectTyped(await gw.admin(`/channels/${encodeURIComponent(a)}/settle`, {}))
      }),
      { numRuns: 100, seed: 20261125 },
    )
  }, 60_000)
})

describe('raw paths and queries', () => {
  // Percent-escapes as sent, malformed ones too (%, %E0%A4, %00, %ZZ): nothing decodes them first.
  const raw = fc
    .array(
      fc.oneof(
        fc.constantFrom('%', '%E0%A4', '%00', '%ZZ', '%2F', '%FF', '..', '/', '?', '#', '%25', '+'),
        fc.string({ unit: 'grapheme-ascii', maxLength: 6 }).map(encodeURIComponent),
      ),
      { maxLength: 6 },
    )
    .map((parts) => parts.join(''))

  test('property: raw path ids, model ids, receipt key ids and cursors get a typed answer', async () => {
    const headers = { authorization: `Bearer ${key}` }
    await fc.assert(
      fc.asyncProperty(raw, async (a) => {
        for (const path of [
          `/v1/models/${a}`,
          `/v1/models/${a}/health`,
          `/v1/usage/${a}`,
          `/v1/channels/${a}`,
          `/v1/receipts/key?key_id=${a}`,
          `/v1/usage?cursor=${a}&limit=${a}`,
          `/v1/usage?from=${a}&to=${a}&model=${a}&key_id=${a}`,
          `/v1/keys/${a}`,
        ]) {
          let res: Response
          try {
            res = await fetch(`${gw.url}${path}`, {
              headers,
              method: path.startsWith('/v1/keys/') ? 'DELETE' : 'GET',
            })
          } catch {
            continue // a URL the fetch client itself refuses to send
          }
          await expectTyped(res)
        }
      }),
      { numRuns: 120, seed: 20261125 },
    )
  }, 60_000)
})
