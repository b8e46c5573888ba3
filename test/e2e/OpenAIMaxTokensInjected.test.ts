/**
 * OpenAI's reasoning models (o1, o3, o4-mini, gpt-5) refuse `max_tokens` ("Use
 * 'max_completion_tokens' instead"). A client that names no limit must not have the gateway
 * add a `max_tokens` of its own to such an upstream, or the request that works against OpenAI
 * directly fails through the gateway: an upstream configured with `maxTokensParam:
 * "max_completion_tokens"` gets the gateway's limit there. The upstream here answers as OpenAI
 * does for those models.
 */
import { afterAll, expect, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'

const sent: Record<string, unknown>[] = []
const server = Bun.serve({
  port: 0,
  hostname: '127.0.0.1',
  async fetch(req) {
    const body = (await req.json()) as Record<string, unknown>
    sent.push(body)
    if ('max_tokens' in body)
      return Response.json(
        {
          error: {
            message:
              "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
            type: 'invalid_request_error',
            param: 'max_tokens',
            code: 'unsupported_parameter',
          },
        },
        { status: 400 },
      )
    return Response.json({
      id: 'c',
      object: 'chat.completion',
      created: 1,
      model: 'o4-mini',
      choices: [{ index: 0, message: { role: 'assistant', content: 'ok' }, finish_reason: 'stop' }],
      usage: { prompt_tokens: 8, completion_tokens: 1, total_tokens: 9 },
    })
  },
})
afterAll(() => server.stop(true))

const gw = await Gateway.create({
  upstreams: [
    {
      name: 'openai',
      baseUrl: `http://127.0.0.1:${server.port}/v1`,
      timeoutMs: 2_000,
      maxTokensParam: 'max_completion_tokens',
    },
  ],
  models: [
    {
      id: 'o4-mini',
      upstream: 'openai',
      upstreamModel: 'o4-mini',
      pricing: { input: '1000000', output: '2000000' },
      contextLength: 200_000,
    },
  ],
})

test('behavior: a request naming no limit to a reasoning model is answered whatever the credits', async () => {
  const messages = [{ role: 'user' as const, content: 'hello' }]
  // Plenty of credits: the gateway sends no limit, and the upstream answers.
  const rich = await gw.account({ credits: 1_000_000n })
  const a = await gw.openai(rich.key).chat.completions.create({ model: 'o4-mini', messages })
  expect(a.choices[0]!.message.content).toBe('ok')
  // Credits for fewer tokens than the context leaves: the gateway caps the output with a
  // max_tokens of its own, which the upstream refuses.
  const modest = await gw.account({ credits: 100_000n })
  const b = await gw
    .openai(modest.key)
    .chat.completions.create({ model: 'o4-mini', messages })
    .catch((e: Error) => e)
  expect(b instanceof Error ? b.message : 'ok').toBe('ok')
  // The gateway's limit went as max_completion_tokens.
  expect(sent.at(-1)!.max_completion_tokens).toBeGreaterThan(0)
})
