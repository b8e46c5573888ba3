/**
 * Property tests of the CLI's outside input: its arguments, and the answers of the gateway it
 * calls. Whatever they are, a run ends with an exit code of the CLI's (0, or 2 usage, 3 payment,
 * 4 server) and a message of its own, never a JavaScript error's; a command or subcommand that
 * is not one of the CLI's is a usage error, whatever its name.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import fc from 'fast-check'
import { run } from '../../src/cli/main.ts'

/** The gateway's next answer, set by the property. */
let next: { status: number; type: string; body: string } = {
  status: 200,
  type: 'application/json',
  body: '{}',
}
const server = Bun.serve({
  port: 0,
  hostname: '127.0.0.1',
  async fetch(req) {
    await req.arrayBuffer()
    return new Response(next.status === 204 ? null : next.body, {
      status: next.status,
      headers: { 'content-type': next.type },
    })
  },
})
afterAll(() => server.stop(true))

const env = {
  TOLLWAY_URL: `http://127.0.0.1:${server.port}`,
  TOLLWAY_ADMIN_TOKEN: 'admin-token-0123456789',
  TOLLWAY_API_KEY: 'tw_key',
  TOLLWAY_TIMEOUT: '2',
  TOLLWAY_DATA_DIR: '/nonexistent/tollway-args-test',
}

async function cli(argv: string[], extra: Record<string, string> = {}) {
  let out = ''
  let err = ''
  const code = await run(
    argv,
    { ...env, ...extra },
    {
      out: (s) => {
        out += s
      },
      err: (s) => {
        err += s
      },
      tty: false,
    },
  )
  return { code, out, err }
}

/** Names every object has without owning them. */
const inherited = ['toString', 'constructor', '__proto__', 'valueOf', 'hasOwnProperty']
const admin = ['accounts', 'usage', 'credits', 'keys', 'channels']
const subs = ['create', 'get', 'list', 'set', 'grant', 'revoke', 'settle', 'status', 'close']
const id = '4f5c9b1e-2f3a-4c1d-9e8f-0a1b2c3d4e5f'
const word = fc.oneof(
  fc.constantFrom(...inherited, id, '10', '-5', '0x', ''),
  fc.string({ maxLength: 12 }),
)
const option = fc.oneof(
  fc
    .tuple(
      fc.constantFrom(
        '--name',
        '--plan',
        '--note',
        '--limit',
        '--cursor',
        '--model',
        '--from',
        '--to',
        '--timeout',
        '--max-deposit',
        '--max-total',
        '--channel',
        '--url',
      ),
      word,
    )
    .map(([o, v]) => [o, v]),
  fc.constantFrom(['--json'], ['--stream'], ['--help'], ['--bogus'], ['--'], ['-h']),
)
const argv = fc
  .tuple(
    fc.oneof(fc.constantFrom(...admin, ...inherited), word),
    fc.oneof(fc.constantFrom(...subs, ...inherited), word),
    fc.array(word, { maxLength: 2 }),
    fc.array(option, { maxLength: 3 }),
  )
  .map(([name, sub, rest, opts]) => [name, sub, ...rest, ...opts.flat()])
  // `serve` runs a gateway; `chat` and `channel` pay from a wallet (none here): not these.
  .filter((a) => !['serve', 'chat', 'channel'].includes(a[0]!))

const answer = fc.record({
  status: fc.constantFrom(200, 200, 201, 204, 400, 401, 402, 404, 409, 429, 500, 503),
  type: fc.constantFrom('application/json', 'text/plain'),
  body: fc.oneof(
    fc.jsonValue({ maxDepth: 2 }).map((v) => JSON.stringify(v)),
    fc.string({ maxLength: 30 }),
    fc.constantFrom(
      '{"error":{"message":"no","type":"invalid_request_error","code":"x"}}',
      '{"data":[],"has_more":false}',
      '{"data":[{}],"has_more":true,"next_cursor":1}',
      '{"id":"x","name":"n","plan":"free","balance":"1","reserved":"0","keys":{}}',
      '{"balance":{}}',
      'null',
    ),
  ),
})

/** Command lines that reach the gateway, with --json or not. */
const calls = fc
  .tuple(
    fc.constantFrom(
      ['accounts', 'create', '--name', 'n'],
      ['accounts', 'get', id],
      ['accounts', 'list'],
      ['accounts', 'set', id, '--plan', 'free'],
      ['usage', id],
      ['credits', 'grant', id, '10'],
      ['keys', 'create', id],
      ['keys', 'list', id],
      ['keys', 'revoke', id, id],
      ['keys', 'revoke', id],
      ['channels', 'list'],
      ['channels', 'settle', `0x${'ab'.repeat(32)}`],
    ),
    fc.boolean(),
  )
  .map(([call, json]) => (json ? [...call, '--json'] : [...call]))

/** What a run may end with: the CLI's codes, and no JavaScript error named to the user. */
function expectTyped(r: { code: number; err: string }) {
  expect([0, 2, 3, 4]).toContain(r.code)
  expect(r.err).not.toMatch(/\b(TypeError|ReferenceError|RangeError|SyntaxError)\b/)
}

describe('run', () => {
  test('error: a command or subcommand named as a member every object has is unknown (exit 2), not run', async () => {
    for (const name of inherited) {
      const r = await cli([name])
      expect(r.code).toBe(2)
      expect(r.err).toContain('Unknown command')
    }
    for (const name of admin.filter((a) => a !== 'usage'))
      for (const sub of inherited) {
        const r = await cli([name, sub])
        expect(r.code).toBe(2)
        expect(r.err).toContain('Unknown subcommand')
      }
  })

  test('property: any arguments end in an exit code of the CLI and its own message', async () => {
    next = {
      status: 404,
      type: 'application/json',
      body: '{"error":{"message":"No account.","type":"not_found_error","code":"account_not_found"}}',
    }
    await fc.assert(
      fc.asyncProperty(argv, async (args) => {
        expectTyped(await cli(args))
      }),
      { numRuns: 400, seed: 20261125 },
    )
  }, 60_000)

  test('property: any arguments, with any gateway answer, end in an exit code of the CLI and its own message', async () => {
    await fc.assert(
      fc.asyncProperty(fc.oneof(calls, argv), answer, async (args, a) => {
        next = a
        expectTyped(await cli(args))
      }),
      { numRuns: 400, seed: 20261125 },
    )
  }, 60_000)

  test('property: chat, with any answer of the gateway (whole or streamed), ends in an exit code of the CLI and its own message', async () => {
    // A gateway that answers without asking for payment: the paying fetch hands its answer on.
    const wallet = {
      TOLLWAY_WALLET_KEY: `0x${'11'.repeat(32)}`,
      TOLLWAY_DATA_DIR: mkdtempSync(join(tmpdir(), 'tollway-args-')),
    }
    const sse = fc
      .array(
        fc.oneof(
          fc.jsonValue({ maxDepth: 3 }).map((v) => `data: ${JSON.stringify(v)}\n\n`),
          fc.constantFrom(
            'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
            'data: {"choices":[{"delta":{"content":[{"type":"text","text":"x"}]}}],"usage":{"cost":"1"}}\n\n',
            'data: {"choices":null}\n\n',
            'data: {"choices":[null]}\n\n',
            'data: {"error":{"message":"funds ran out","code":"insufficient_funds"}}\n\n',
            'data: {"error":"x"}\n\n',
            'data: null\n\n',
            'data: not json\n\n',
            'data: [DONE]\n\n',
          ),
        ),
        { maxLength: 4 },
      )
      .map((events) => ({ status: 200, type: 'text/event-stream', body: events.join('') }))
    const whole = fc.oneof(
      fc.jsonValue({ maxDepth: 3 }).map((v) => JSON.stringify(v)),
      fc.constantFrom(
        '{"choices":[{"message":{"content":"hi"}}],"usage":{"cost":"1"}}',
        '{"choices":[]}',
        '{"choices":[null]}',
        '{"choices":[{"message":null}]}',
        '{"data":[{"id":"m"}]}',
        'not json',
      ),
    )
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          sse,
          whole.map((body) => ({ status: 200, type: 'application/json', body })),
        ),
        fc.subarray(['--stream', '--json', '--model', 'm']),
        async (a, options) => {
          next = a
          // --model without its value would take the prompt: only with it.
          const opts = options.includes('--model') ? options : options.filter((o) => o !== 'm')
          expectTyped(await cli(['chat', 'hi', ...opts], wallet))
        },
      ),
      { numRuns: 200, seed: 20261125 },
    )
  }, 60_000)

  test('error: a stream that ends with an error event whose code is null (as OpenAI envelopes allow) ends saying its message, not that the event is no chat completion', async () => {
    const wallet = {
      TOLLWAY_WALLET_KEY: `0x${'11'.repeat(32)}`,
      TOLLWAY_DATA_DIR: mkdtempSync(join(tmpdir(), 'tollway-args-')),
    }
    next = {
      status: 200,
      type: 'text/event-stream',
      body: 'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: {"error":{"message":"the upstream broke","type":"upstream_error","code":null}}\n\n',
    }
    const r = await cli(['chat', 'hi', '--stream', '--model', 'm'], wallet)
    expect(r.code).toBe(4)
    expect(r.err).toContain('the stream ended early: the upstream broke')
    expect(r.err).not.toContain("not a chat completion's")
    // It asked for no payment: no channel was opened, and the progress line says so.
    expect(r.err).toContain('opening a payment channel (on chain)… not needed')
  }, 30_000)
})
