/**
 * Reasoning tokens an upstream reports beside its completion tokens, not among them: xAI
 * ("reasoning token consumption will be counted separately from completion_tokens, but will be
 * counted in the total_tokens") and Gemini's thoughts as OpenAI-compatible proxies map them
 * (`total_tokens` = prompt + completion + reasoning). They are generated output (xAI streams
 * them as `reasoning_content`), charged as such; OpenAI's own usage, whose completion tokens
 * include the reasoning (`total_tokens` = prompt + completion), is charged as it says.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Scripted from '../helpers/Scripted.ts'

const REASONING = Array.from({ length: 20 }, (_, i) => ` step${i}`)
/** Per model: the upstream's usage, and the completion tokens it is charged. */
const cases: Record<string, { usage: object; charged: number }> = {
  // xAI: 5 of reply, 100 of reasoning apart.
  xai: {
    usage: {
      prompt_tokens: 10,
      completion_tokens: 5,
      total_tokens: 115,
      completion_tokens_details: { reasoning_tokens: 100 },
    },
    charged: 105,
  },
  // A Gemini proxy: thoughts alone, no reply tokens.
  gemini: {
    usage: {
      prompt_tokens: 21,
      completion_tokens: 0,
      total_tokens: 81,
      completion_tokens_details: { reasoning_tokens: 60 },
    },
    charged: 60,
  },
  // Without total_tokens: more reasoning than completion tokens can only be apart.
  untotalled: {
    usage: {
      prompt_tokens: 10,
      completion_tokens: 5,
      completion_tokens_details: { reasoning_tokens: 100 },
    },
    charged: 105,
  },
  // OpenAI's convention (reasoning among the completion tokens) with a total that also holds
  // cache tokens left out of prompt_tokens (as Bedrock's and proxies of Anthropic's models
  // count them): 1000 cached, 40 of the 50 completion tokens reasoning. Not reasoning apart.
  cached: {
    usage: {
      prompt_tokens: 10,
      completion_tokens: 50,
      total_tokens: 1060,
      prompt_tokens_details: { cached_tokens: 1000 },
      completion_tokens_details: { reasoning_tokens: 40 },
    },
    charged: 50,
  },
  // OpenAI: the reasoning is among the completion tokens.
  openai: {
    usage: {
      prompt_tokens: 10,
      completion_tokens: 105,
      total_tokens: 115,
      completion_tokens_details: { reasoning_tokens: 100 },
    },
    charged: 105,
  },
}

const url = Scripted.serve((body) => {
  const model = body.model as string
  const { usage } = cases[model]!
  if (body.stream)
    return Scripted.events([
      Scripted.chunk({ role: 'assistant', content: '' }, null, model),
      ...REASONING.map((r) => Scripted.chunk({ reasoning_content: r }, null, model)),
      Scripted.chunk({ content: 'The answer is 4.' }, null, model),
      Scripted.chunk({}, 'stop', model),
      { ...Scripted.chunk({}, null, model), choices: [], usage },
    ])
  return Response.json(
    Scripted.completion(
      { content: 'The answer is 4.', reasoning_content: REASONING.join('') },
      usage,
      model,
    ),
  )
})
const gw = await Scripted.gateway(url, Object.keys(cases))
const messages = [{ role: 'user' as const, content: 'what is 2 + 2?' }]

for (const [model, { usage, charged }] of Object.entries(cases)) {
  const prompt = (usage as { prompt_tokens: number }).prompt_tokens
  const cost = prompt + 2 * charged

  test(`behavior: a stream whose usage is ${model}-shaped is charged ${charged} completion tokens`, async () => {
    const { id, key } = await gw.account()
    const res = await gw.complete(key, {
      model,
      stream: true,
      stream_options: { include_usage: true },
      messages,
    })
    expect(res.status).toBe(200)
    const lines = (await res.text()).split('\n\n').filter((l) => l.startsWith('data: {'))
    const last = JSON.parse(lines.at(-1)!.slice(6)) as { usage: Record<string, unknown> }
    expect(last.usage).toMatchObject({
      prompt_tokens: prompt,
      completion_tokens: charged,
      total_tokens: prompt + charged,
      cost: String(cost),
    })
    await Batch.settled(gw.sql)
    const l = await Gateway.ledger(gw.sql, id)
    expect(l.balance).toBe(1_000_000n - BigInt(cost))
  })

  test(`behavior: a whole completion whose usage is ${model}-shaped is charged ${charged} completion tokens`, async () => {
    const { id, key } = await gw.account()
    const res = await gw.complete(key, { model, messages })
    expect(res.status).toBe(200)
    const body = (await res.json()) as { usage: Record<string, unknown> }
    expect(body.usage).toMatchObject({
      prompt_tokens: prompt,
      completion_tokens: charged,
      cost: String(cost),
    })
    await Batch.settled(gw.sql)
    const l = await Gateway.ledger(gw.sql, id)
    expect(l.balance).toBe(1_000_000n - BigInt(cost))
  })
}
