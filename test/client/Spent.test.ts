/**
 * What was spent on a channel, as the paying client must know it to authorize whole
 * (non-streaming) completions far enough ahead, against a real gateway, anvil and PostgreSQL.
 * Without `max_tokens` the gateway stops a whole completion where what the payer authorized
 * runs out, and no voucher can follow mid-way: a client that authorizes too little gets an
 * answer cut short (its finish_reason still `stop`).
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { Store } from '../../src/client/index.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Payer from '../helpers/Payer.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789' },
})

/** `n` words of one token each (o200k_base counts ` hello` as one). */
const text = (n: number, word = 'hello') => Array.from({ length: n }, () => word).join(' ')

describe('createFetch: what was spent', () => {
  // 160 tokens in (166 with the chat's framing), the same 160 out (the fake upstream echoes
  // them): 486 base units, within what each whole completion is authorized ahead of what was
  // spent. After two, 972 spent. A restarted client that takes spent for 0 authorizes no more
  // than what it signed before (spent + the margin of the second request): with 700, that
  // leaves 214, enough for the prompt (no 402 to ask for more) and 24 tokens of the answer;
  // with 600 (the audit's case), 114, under the prompt: a 402, then margin past what it asked
  // for, 48 tokens.
  for (const [payer, completionMargin] of [
    [0, 700n],
    [2, 600n],
  ] as const)
    test(`behavior: a restarted client (a new createFetch on the same store) authorizes a whole completion ahead of what the channel spent before: its answer is whole (completionMargin ${completionMargin})`, async () => {
      const store = Store.memory()
      const words = text(160)
      const messages = [{ role: 'user' as const, content: words }]
      const options = { store, completionMargin }
      const first = Payer.client(chain, gw.url, payer, options)
      for (let i = 0; i < 2; i++) {
        const res = await first.openai.chat.completions.create({ model: 'fake', messages })
        expect(res.choices[0]!.message.content).toBe(words)
        expect(res.usage!.completion_tokens).toBe(160)
      }
      const { channelId } = (await first.fetch.channel(gw.url))!
      await first.fetch.release()
      // Restarted: the channel is resumed from the store, with no receipt yet this run.
      const second = Payer.client(chain, gw.url, payer, options)
      const res = await second.openai.chat.completions.create({ model: 'fake', messages })
      expect((await second.fetch.channel(gw.url))!.channelId).toBe(channelId)
      expect(res.choices[0]!.finish_reason).toBe('stop')
      expect(res.usage!.completion_tokens).toBe(160)
      expect(res.choices[0]!.message.content).toBe(words)
    }, 60_000)

  test('behavior: a whole completion refused for want of authorized balance (402 insufficient-balance) is authorized completionMargin past what the server asked for, not margin', async () => {
    // The 402s the client receives: what each asked for.
    const asked: bigint[] = []
    const watching: typeof globalThis.fetch = Object.assign(
      async (input: string | URL | Request, init?: RequestInit) => {
        const res = await globalThis.fetch(input, init)
        if (res.status !== 402) return res
        const body = (await res
          .clone()
          .json()
          .catch(() => undefined)) as { requiredCumulative?: unknown } | undefined
        if (typeof body?.requiredCumulative === 'string')
          asked.push(BigInt(body.requiredCumulative))
        return res
      },
      { preconnect: globalThis.fetch.preconnect },
    )
    const vouchers: bigint[] = []
    const { openai } = Payer.client(chain, gw.url, 1, {
      completionMargin: 600n,
      fetch: watching,
      onVoucher: (v) => vouchers.push(v.cumulativeAmount),
    })
    await openai.chat.completions.create({
      model: 'fake',
      messages: [{ role: 'user', content: 'short' }],
    })
    expect(asked).toEqual([])
    // A prompt of some 800 tokens, over the 600 authorized ahead: refused, then paid for with
    // a voucher raised past what the server asked for (the prompt and a first block of 16
    // tokens). The answer (the fake upstream echoes the last user message) is 100 tokens, 200
    // base units: more than margin (64) past that leaves (48 tokens in all).
    const answer = text(100, 'one')
    const res = await openai.chat.completions.create({
      model: 'fake',
      messages: [
        { role: 'user', content: text(800) },
        { role: 'assistant', content: 'ok' },
        { role: 'user', content: answer },
      ],
    })
    expect(asked.length).toBe(1)
    expect(vouchers.at(-1)).toBe(asked[0]! + 600n)
    expect(res.usage!.completion_tokens).toBe(100)
    expect(res.choices[0]!.message.content).toBe(answer)
  }, 60_000)
})
