/**
 * What a receipt's result_sha256 covers, against a scripted upstream: a character whose UTF-16
 * halves arrive in two chunks, and reasoning, tool calls and two choices, as a client rebuilds
 * them from the chunks it received.
 */
import { expect, test } from 'bun:test'
import { createHash } from 'node:crypto'
import { receiptDigest, verifyReceipt } from '../../src/client/index.ts'
import * as Scripted from '../helpers/Scripted.ts'

const scripts: Record<string, unknown[]> = {}
const url = Scripted.serve((body) => Scripted.events(scripts[body.model as string]!))
const gw = await Scripted.gateway(url, ['split', 'mixed', 'held'])
const { public_key } = (await (await fetch(`${gw.url}/v1/receipts/key`)).json()) as {
  public_key: string
}

const chunk = (delta: Record<string, unknown>, finish: string | null = null) =>
  Scripted.chunk(delta, finish, 'x')

type Delta = {
  content?: string | null
  reasoning_content?: string | null
  reasoning?: string | null
  tool_calls?: { function?: { name?: string | null; arguments?: string | null } }[] | null
}
/** The README's rule: of each chunk, its content, its reasoning, then each tool call's name and arguments. */
const textOf = (d: Delta) =>
  (d.content ?? '') +
  (d.reasoning_content ?? d.reasoning ?? '') +
  (d.tool_calls ?? []).map((t) => (t.function?.name ?? '') + (t.function?.arguments ?? '')).join('')

async function streamed(model: string) {
  const { key } = await gw.account()
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: {
      'content-type': 'application/json',
      authorization: `Bearer ${key}`,
      'tollway-receipt': 'true',
    },
    body: JSON.stringify({ model, stream: true, messages: [{ role: 'user', content: 'hi' }] }),
  })
  expect(res.status).toBe(200)
  const chunks = (await res.text())
    .split('\n\n')
    .filter((b) => b.startsWith('data: ') && b !== 'data: [DONE]')
    .map((b) => JSON.parse(b.slice(6)) as Record<string, unknown>)
  let text = ''
  for (const c of chunks)
    for (const choice of (c.choices ?? []) as { delta?: Delta }[])
      text += textOf(choice.delta ?? {})
  const receipt = chunks.find((c) => 'tollway_receipt' in c)!.tollway_receipt as {
    result_sha256: string
  }
  // What tollway/client computes from the same chunks.
  const deltas = chunks.flatMap((c) =>
    ((c.choices ?? []) as { delta?: Delta }[]).map((x) => x.delta),
  )
  expect(receiptDigest(deltas)).toBe(receipt.result_sha256)
  expect(verifyReceipt(receipt, public_key)).toBe(true)
  return { text, receipt }
}

const sha256 = (text: string) => createHash('sha256').update(text).digest('hex')

test('behavior: an emoji whose UTF-16 halves arrive in two chunks hashes as the text the client received', async () => {
  scripts.split = [
    chunk({ role: 'assistant', content: '' }),
    '{"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":[{"index":0,"delta":{"content":"ok \\ud83d"},"finish_reason":null}]}',
    '{"id":"c","object":"chat.completion.chunk","created":1,"model":"x","choices":[{"index":0,"delta":{"content":"\\ude00!"},"finish_reason":null}]}',
    chunk({}, 'stop'),
  ]
  const { text, receipt } = await streamed('split')
  expect(text).toBe('ok \u{1F600}!')
  expect(receipt.result_sha256).toBe(sha256(text))
})

test('behavior: reasoning, tool calls and two choices hash by the README rule', async () => {
  scripts.mixed = [
    chunk({ role: 'assistant', content: '' }),
    chunk({ content: null, reasoning_content: 'think ' }),
    chunk({ content: null, reasoning_content: 'more ' }),
    chunk({ content: 'Hello' }),
    {
      ...chunk({}),
      choices: [
        { index: 0, delta: { content: ' A' }, finish_reason: null },
        { index: 1, delta: { content: ' B', reasoning: 'r' }, finish_reason: null },
      ],
    },
    chunk({
      tool_calls: [
        { index: 0, id: 't', type: 'function', function: { name: 'get', arguments: '{"a"' } },
      ],
    }),
    chunk({ tool_calls: [{ index: 0, function: { arguments: ':1}' } }] }),
    chunk({}, 'tool_calls'),
    { ...chunk({}), choices: [], usage: { prompt_tokens: 5, completion_tokens: 9 } },
  ]
  const { text, receipt } = await streamed('mixed')
  expect(text).toBe('think more Hello A Brget{"a":1}')
  expect(receipt.result_sha256).toBe(sha256(text))
})

test('behavior: the text of a finishing chunk held for the usage hashes where the client receives it, after the chunks sent ahead of it', async () => {
  // Two choices; the first finishes with text while the second goes on. Without include_usage
  // the finishing chunk is held to carry the usage, and the second choice's chunks go out
  // ahead of it: the digest follows the order sent, not the order the upstream wrote.
  const two = (
    a: Record<string, unknown> | null,
    b: Record<string, unknown> | null,
    finish: [string | null, string | null],
  ) => ({
    ...chunk({}),
    choices: [
      ...(a ? [{ index: 0, delta: a, finish_reason: finish[0] }] : []),
      ...(b ? [{ index: 1, delta: b, finish_reason: finish[1] }] : []),
    ],
  })
  scripts.held = [
    two({ role: 'assistant', content: 'one' }, { role: 'assistant', content: 'two' }, [null, null]),
    two({ content: ' end' }, null, ['stop', null]),
    two(null, { content: ' more' }, [null, null]),
    two(null, { content: ' last' }, [null, 'stop']),
  ]
  const { text, receipt } = await streamed('held')
  expect(text).toBe('onetwo more end last')
  expect(receipt.result_sha256).toBe(sha256(text))
})
