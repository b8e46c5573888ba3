import { describe, expect, test } from 'bun:test'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as EchoModel from '../../src/upstream/EchoModel.ts'

const echo = EchoModel.create({ tokenDelayMs: 0, tokens: Tokenizer })
const signal = new AbortController().signal
const body = (content: string, extra: Record<string, unknown> = {}) => ({
  model: EchoModel.id,
  messages: [
    { role: 'system', content: 'be brief' },
    { role: 'user', content },
    { role: 'assistant', content: 'ignored' },
  ],
  ...extra,
})

async function collect(b: ReturnType<typeof body>) {
  let text = ''
  let usage: { prompt_tokens: number; completion_tokens: number } | undefined
  for await (const batch of await echo.stream(b, signal))
    for (const { chunk: c } of batch) {
      text += c.choices[0]?.delta.content ?? ''
      if (c.usage) usage = c.usage
    }
  return { text, usage: usage! }
}

describe('EchoModel', () => {
  test('behavior: streams the last user message back word by word with exact usage', async () => {
    const { text, usage } = await collect(body('hello  echo\nworld'))
    expect(text).toBe('hello echo world')
    expect(usage.completion_tokens).toBe(
      Tokenizer.count('hello') + Tokenizer.count(' echo') + Tokenizer.count(' world'),
    )
    expect(usage.prompt_tokens).toBe(
      Tokenizer.prompt([
        { content: 'be brief' },
        { content: 'hello  echo\nworld' },
        { content: 'ignored' },
      ]),
    )
  })

  test('behavior: cycles until max_tokens when asked for more, and stops at fewer', async () => {
    const long = await collect(body('a b', { max_tokens: 7 }))
    expect(long.text).toBe('a b a b a b a')
    expect(long.usage.completion_tokens).toBe(7)
    const short = await collect(body('one two three four', { max_tokens: 2 }))
    expect(short.text).toBe('one two')
  })

  test("behavior: the gateway's limit only cuts: it never makes the model cycle, and caps what the client asked", async () => {
    // A payer whose credits cover 5 tokens, no max_tokens: the message once, not 5 tokens of it.
    const capped = await echo.complete(body('hello world'), signal, { maxTokens: 5 })
    expect(capped.choices[0]!.message.content).toBe('hello world')
    expect(capped.choices[0]!.finish_reason).toBe('stop')
    // Asked for 9, allowed 3: cut at 3.
    const cut = await echo.complete(body('a b', { max_tokens: 9 }), signal, { maxTokens: 3 })
    expect(cut.choices[0]!.message.content).toBe('a b a')
    expect(cut.choices[0]!.finish_reason).toBe('length')
    expect(cut.usage!.completion_tokens).toBe(3)
    // Asked for 4, allowed 100: cycles to 4.
    const asked = await echo.complete(body('a b', { max_tokens: 4 }), signal, { maxTokens: 100 })
    expect(asked.choices[0]!.message.content).toBe('a b a b')
  })

  test('behavior: honours stop sequences', async () => {
    const { text } = await collect(body('alpha beta gamma delta', { stop: ['gamma'] }))
    expect(text).toBe('alpha beta')
    // A stop spanning words, and one found only after cycling.
    expect((await collect(body('alpha beta gamma', { stop: ['a gam'] }))).text).toBe('alpha beta')
    const cycled = await collect(body('one two', { stop: ['two one two'], max_tokens: 20 }))
    expect(cycled.text).toBe('one two one')
  })

  test('behavior: a stop sequence that never comes costs no more than none (it is looked for in what the last word could complete)', async () => {
    // Searched in the whole text after every word, 100,000 tokens took seconds on the event
    // loop; the test's time limit fails that.
    const plain = await collect(body('alpha beta gamma delta', { max_tokens: 100_000 }))
    const stopped = await collect(
      body('alpha beta gamma delta', { max_tokens: 100_000, stop: ['zzz', 'never here'] }),
    )
    expect(stopped.usage.completion_tokens).toBe(plain.usage.completion_tokens)
    expect(stopped.text).toBe(plain.text)
  })

  test('behavior: the whole completion matches the stream', async () => {
    const c = await echo.complete(body('one two', { max_tokens: 5 }), signal)
    expect(c.choices[0]!.message.content).toBe('one two one two one')
    expect(c.choices[0]!.finish_reason).toBe('length')
    expect(c.usage!.completion_tokens).toBe(5)
  })

  test('error: an aborted stream stops', async () => {
    const ctl = new AbortController()
    const it = (await echo.stream(body('a b c d'), ctl.signal))[Symbol.asyncIterator]()
    await it.next()
    ctl.abort()
    await expect(it.next()).rejects.toThrow()
  })
})
