/**
 * OpenAI's reasoning models (o1, o3, o4-mini, gpt-5) refuse `max_tokens` ("Use
 * 'max_completion_tokens' instead"). A client that names no limit must not have the gateway
 * add a `max_tokens` of its own to such an upstream, or the request that works against OpenAI
 * directly fails through the gateway: an upstream configured with `maxTokensParam:
 * "max_completion_tokens"` gets the gateway's limit there. The upstream here answers as OpenAI
 * does for those models.
 */
import { expect, test } from 'bun:test'
import * as Scripted from '../helpers/Scripted.ts'

const sent: Record<string, unknown>[] = []
const url = Scripted.serve((body) => {
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
  return Response.json(
    Scripted.completion({ content: 'ok' }, { prompt_tokens: 8, completion_tokens: 1 }),
  )
})
const gw = await Scripted.gateway(
  url,
  ['o4-mini'],
  { maxTokensParam: 'max_completion_tokens' },
  {
    models: [
      {
        id: 'o4-mini',
        upstream: 'scripted',
        upstreamModel: 'o4-mini',
        pricing: { input: '1000000', output: '2000000' },
        contextLength: 200_000,
      },
    ],
  },
)

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
