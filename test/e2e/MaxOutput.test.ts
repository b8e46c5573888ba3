/**
 * A model's `maxOutputTokens`: the most one answer may have, below what its context leaves.
 * An upstream refuses a `max_tokens` above its model's own limit, and a request without one
 * holds credits for that limit, not for the whole context.
 */
import { describe, expect, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'
import * as Upstream from '../helpers/Upstream.ts'

// Slow words (three a request): requests sent at once are all under way together.
const fake = Upstream.start({ slowMs: 50 })
const price = { input: '1000000', output: '2000000' }
const gw = await Gateway.create({
  upstreams: [{ name: 'up', baseUrl: fake.url }],
  models: [
    {
      id: 'bounded',
      upstream: 'up',
      upstreamModel: 'fake-slow',
      pricing: price,
      contextLength: 100_000,
      maxOutputTokens: 100,
    },
    {
      id: 'open',
      upstream: 'up',
      upstreamModel: 'fake-slow',
      pricing: price,
      contextLength: 100_000,
    },
  ],
})

const messages = [{ role: 'user', content: 'say something short' }]
const post = (key: string, body: Record<string, unknown>) =>
  fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${key}` },
    body: JSON.stringify({ messages, ...body }),
  })

describe('maxOutputTokens', () => {
  test('behavior: /v1/models shows it (null where unset)', async () => {
    const { data } = (await (await fetch(`${gw.url}/v1/models`)).json()) as {
      data: { id: string; max_output_tokens: number | null }[]
    }
    expect(data.find((m) => m.id === 'bounded')!.max_output_tokens).toBe(100)
    expect(data.find((m) => m.id === 'open')!.max_output_tokens).toBeNull()
  })

  test('behavior: a max_tokens above it reaches the upstream as it, whole or streamed', async () => {
    const { key } = await gw.account()
    for (const stream of [false, true]) {
      const from = fake.received.length
      const res = await post(key, { model: 'bounded', max_tokens: 5_000, stream })
      expect(res.status).toBe(200)
      await res.text()
      expect(fake.received[from]!.body.max_tokens).toBe(100)
    }
  })

  test('behavior: without max_tokens, an account that covers the limit but not the context sends no max_tokens above it, and three at once are all served', async () => {
    // Credits for the prompt and 100 output tokens three times over, far short of the context.
    const { key } = await gw.account({ credits: 3 * (100 + 2 * 100) })
    const from = fake.received.length
    const answers = await Promise.all([0, 1, 2].map(() => post(key, { model: 'bounded' })))
    for (const res of answers) expect(res.status).toBe(200)
    const sent = fake.received.slice(from).map((r) => r.body.max_tokens)
    expect(sent).toHaveLength(3)
    for (const m of sent) expect(m === undefined || (m as number) <= 100).toBe(true)
    // Unbounded, the first of them held all that was left for the context's output.
    const open = await gw.account({ credits: 3 * (100 + 2 * 100) })
    const refused = await Promise.all([0, 1, 2].map(() => post(open.key, { model: 'open' })))
    expect(refused.map((r) => r.status)).toContain(402)
  })
})
