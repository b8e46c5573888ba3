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
import * as Scripted from '../helpers/Scripted.ts'

/** Mistral's reasoning models answer content as parts: thinking, then text. */
const thinking = { type: 'thinking', thinking: [{ type: 'text', text: 'Say hi.' }] }

/** An answer carrying escape sequences: a window title set, the screen cleared. */
const mischief = 'Hi\u001b]0;owned\u0007\u001b[2J\u009b31m.'

const url = Scripted.serve((body) =>
  body.model === 'mischief'
    ? body.stream
      ? Scripted.events([
          Scripted.chunk({ role: 'assistant', content: mischief.slice(0, 4) }),
          Scripted.chunk({ content: mischief.slice(4) }),
          Scripted.chunk({}, 'stop'),
        ])
      : Response.json(
          Scripted.completion({ content: mischief }, { prompt_tokens: 5, completion_tokens: 6 }),
        )
    : body.model === 'magistral'
      ? body.stream
        ? Scripted.events([
            Scripted.chunk({ role: 'assistant', content: [thinking] }),
            Scripted.chunk({ content: [{ type: 'text', text: 'Hi' }] }),
            Scripted.chunk({ content: '.' }),
            Scripted.chunk({}, 'stop'),
          ])
        : Response.json(
            Scripted.completion(
              { content: [thinking, { type: 'text', text: 'Hi.' }] },
              { prompt_tokens: 5, completion_tokens: 6 },
            ),
          )
      : body.stream
        ? Scripted.events([
            Scripted.chunk({ role: 'assistant', content: '' }),
            Scripted.chunk({ content: null, reasoning_content: 'Say hi.' }),
            Scripted.chunk({ content: 'Hi.' }),
            Scripted.chunk({}, 'stop'),
          ])
        : Response.json(
            Scripted.completion(
              { content: 'Hi.', reasoning_content: 'Say hi.' },
              { prompt_tokens: 5, completion_tokens: 6 },
            ),
          ),
)

const chain = await Anvil.start()
afterAll(() => chain.stop())
const gw = await Scripted.gateway(
  url,
  ['thinker', 'magistral', 'mischief'],
  {},
  {
    chain: Gateway.chainOf(chain),
    payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 5_000 },
  },
)
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

test('behavior: chat prints the text parts of an answer whose content is an array of parts, whole and streamed', async () => {
  for (const stream of [[], ['--stream']]) {
    const r = await cli([
      'chat',
      'hello',
      '--model',
      'magistral',
      ...stream,
      '--trust-escrow',
      '--receipt',
    ])
    expect(r.stdout).toBe('Hi.\n')
    expect(r.stderr).toContain('receipt: verified')
    expect(r.code).toBe(0)
  }
}, 60_000)

test('error: an answer with control characters is printed with them visible, not sent to the terminal, whole and streamed', async () => {
  for (const stream of [[], ['--stream']]) {
    const r = await cli(['chat', 'hello', '--model', 'mischief', ...stream, '--trust-escrow'])
    expect(r.code).toBe(0)
    expect(r.stdout).toBe('Hi\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{9b}31m.\n')
    for (const c of ['\u001b', '\u0007', '\u009b']) expect(r.stdout + r.stderr).not.toContain(c)
  }
}, 60_000)

test('error: chat --receipt refuses the receipt of another request, though its text and cost are the same', async () => {
  // A gateway (here a proxy in front of one) that hands out the receipt of an earlier request
  // with the same answer: signed, of the text received, of the same cost, but not of this
  // request, whose charge then has no receipt.
  let first: unknown
  const proxy = proxyOf((body) => {
    first ??= body.tollway_receipt
    return { ...body, tollway_receipt: first }
  })
  try {
    const run = () => chatVia(proxy.port!)
    const once = await run()
    expect(once.stderr).toContain('receipt: verified')
    expect(once.code).toBe(0)
    const again = await run()
    expect(again.stdout).toBe('Hi.\n')
    expect(again.stderr).toContain('the receipt does not hold: it is for request')
    expect(again.code).toBe(4)
  } finally {
    proxy.stop(true)
  }
}, 60_000)

test('error: chat --receipt exits 4 (the receipt does not hold), not 2, when the gateway gives no key of the receipt key_id, or the key of another id', async () => {
  // A receipt whose key_id names a key no instance published (404 receipt_key_unknown), or no
  // key id at all (400): the gateway's word on the bill does not hold; the command was right.
  let keyId = ''
  /** Whether the proxy answers the key as an instance of a release without ?key_id= does. */
  let older = false
  const proxy = proxyOf(
    (body) => ({ ...body, tollway_receipt: { ...body.tollway_receipt, key_id: keyId } }),
    (u) => (older && u.pathname === '/v1/receipts/key' ? '' : u.search),
  )
  try {
    for (const [id, status] of [
      ['0'.repeat(16), '404'],
      ['not-a-key-id', '400'],
    ] as const) {
      keyId = id
      const r = await chatVia(proxy.port!)
      expect(r.stdout).toBe('Hi.\n')
      expect(r.stderr).toContain(
        `the receipt does not hold: the gateway gives no key of its key_id "${id}"`,
      )
      expect(r.stderr).toContain(`gateway answered ${status}`)
      expect(r.code).toBe(4)
    }
    // An older instance gives its own key whatever key_id asks: said so, not a bad signature.
    older = true
    keyId = '0'.repeat(16)
    const r = await chatVia(proxy.port!)
    expect(r.stderr).toContain(
      `the receipt does not hold: its key_id is ${keyId}, and the gateway gave the key of`,
    )
    expect(r.code).toBe(4)
  } finally {
    proxy.stop(true)
  }
}, 60_000)

/**
 * A proxy in front of the gateway that passes everything on, but for a completion answered 200,
 * whose body `rewrite` changes; `search` gives the query string sent on (default: as asked).
 */
function proxyOf(
  rewrite: (body: { tollway_receipt?: Record<string, unknown> }) => unknown,
  search: (u: URL) => string = (u) => u.search,
) {
  return Bun.serve({
    port: 0,
    hostname: '127.0.0.1',
    async fetch(req) {
      const u = new URL(req.url)
      const headers = new Headers(req.headers)
      headers.delete('host')
      const res = await fetch(`${gw.url}${u.pathname}${search(u)}`, {
        method: req.method,
        headers,
        ...(req.method === 'GET' || req.method === 'HEAD' ? {} : { body: await req.arrayBuffer() }),
      })
      const out = new Headers(res.headers)
      out.delete('content-length')
      out.delete('content-encoding')
      if (!u.pathname.endsWith('/chat/completions') || res.status !== 200)
        return new Response(res.body, { status: res.status, headers: out })
      const body = (await res.json()) as { tollway_receipt?: Record<string, unknown> }
      return Response.json(rewrite(body), { status: 200, headers: out })
    },
  })
}

/** `tollway chat hello --receipt` through a proxy on `port`, paying from the first dev payer. */
const chatVia = (port: number) =>
  Cli.run([Cli.bin, 'chat', 'hello', '--model', 'thinker', '--trust-escrow', '--receipt'], {
    TOLLWAY_URL: `http://127.0.0.1:${port}`,
    TOLLWAY_DATA_DIR: dataDir,
    TOLLWAY_WALLET_KEY: chain.payers[0]!.privateKey,
    TOLLWAY_RPC_URL: chain.rpcUrl,
  })
