/**
 * `tollway chat --receipt` against a reasoning model: the receipt covers the reasoning too,
 * which the CLI does not print, and still holds.
 */
import { afterAll, expect, test } from 'bun:test'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as Anvil from '../helpers/Anvil.ts'
import * as Cli from '../helpers/Cli.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chunk = (delta: Record<string, unknown>, finish: string | null = null) => ({
  id: 'c',
  object: 'chat.completion.chunk',
  created: 1,
  model: 'thinker',
  choices: [{ index: 0, delta, finish_reason: finish }],
})
const upstream = Bun.serve({
  port: 0,
  hostname: '127.0.0.1',
  async fetch(req) {
    const body = (await req.json()) as { stream?: boolean }
    if (!body.stream)
      return Response.json({
        id: 'c',
        object: 'chat.completion',
        created: 1,
        model: 'thinker',
        choices: [
          {
            index: 0,
            message: { role: 'assistant', content: 'Hi.', reasoning_content: 'Say hi.' },
            finish_reason: 'stop',
          },
        ],
        usage: { prompt_tokens: 5, completion_tokens: 6 },
      })
    const events = [
      chunk({ role: 'assistant', content: '' }),
      chunk({ content: null, reasoning_content: 'Say hi.' }),
      chunk({ content: 'Hi.' }),
      chunk({}, 'stop'),
    ]
    return new Response(
      `${events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join('')}data: [DONE]\n\n`,
      { headers: { 'content-type': 'text/event-stream' } },
    )
  },
})
afterAll(() => upstream.stop(true))

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 5_000 },
  upstreams: [
    { name: 'thinking', baseUrl: `http://127.0.0.1:${upstream.port}/v1`, timeoutMs: 2_000 },
  ],
  models: [
    {
      id: 'thinker',
      upstream: 'thinking',
      upstreamModel: 'thinker',
      pricing: { input: '1000000', output: '2000000' },
      contextLength: 4096,
    },
  ],
})
const dataDir = mkdtempSync(join(tmpdir(), 'tollway-cli-receipt-'))

function cli(args: string[]) {
  return Cli.run([Cli.bin, ...args], {
    TOLLWAY_URL: gw.url,
    TOLLWAY_DATA_DIR: dataDir,
    TOLLWAY_WALLET_KEY: chain.payers[0]!.privateKey,
    TOLLWAY_RPC_URL: chain.rpcUrl,
  })
}

test('behavior: chat --receipt verifies the receipt of a reasoning model, whole and streamed', async () => {
  const whole = await cli(['chat', 'hello', '--model', 'thinker', '--trust-escrow', '--receipt'])
  expect(whole.stderr).toContain('receipt: verified')
  expect(whole.stdout).toBe('Hi.\n')
  expect(whole.code).toBe(0)
  const streamed = await cli([
    'chat',
    'hello',
    '--model',
    'thinker',
    '--stream',
    '--trust-escrow',
    '--receipt',
  ])
  expect(streamed.stderr).toContain('receipt: verified')
  expect(streamed.code).toBe(0)
}, 60_000)
