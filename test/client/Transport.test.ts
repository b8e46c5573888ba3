/**
 * The core draft: "Clients MUST NOT send Payment credentials over unencrypted HTTP." A server
 * on another machine over plain HTTP has its challenge refused before anything is signed or
 * deposited, unless the caller allows it (a test network); HTTPS and this machine are paid.
 */
import { afterAll, expect, test } from 'bun:test'
import { ChallengeRefusedError } from '../../src/client/index.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Payer from '../helpers/Payer.ts'

const chain = await Anvil.start({ accounts: 3 }) // the payee and two payers
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789' },
})

/** The gateway as if on another machine, over plain HTTP: what the fetch underneath sees. */
const remote = `http://gateway.test:${new URL(gw.url).port}`
function reaching(credentials: string[]): typeof fetch {
  const f = async (input: string | URL | Request, init?: RequestInit) => {
    const url = String(input instanceof Request ? input.url : input)
    const authorization = new Headers(init?.headers).get('authorization')
    if (authorization?.startsWith('Payment ')) credentials.push(url)
    return globalThis.fetch(url.replace(remote, gw.url), init)
  }
  return Object.assign(f, { preconnect: globalThis.fetch.preconnect }) as typeof fetch
}

const body = JSON.stringify({
  model: 'fake',
  max_tokens: 5,
  messages: [{ role: 'user', content: 'over the wire' }],
})
const post = { method: 'POST', headers: { 'content-type': 'application/json' }, body }

test('error: a server on another machine over plain HTTP is not paid: refused before anything is signed or deposited', async () => {
  const credentials: string[] = []
  const { fetch } = Payer.client(chain, gw.url, 0, { fetch: reaching(credentials) })
  const e = await fetch(`${remote}/v1/chat/completions`, post).catch((x: unknown) => x)
  expect(e).toBeInstanceOf(ChallengeRefusedError)
  expect((e as Error).message).toContain('plain HTTP')
  expect(credentials).toEqual([])
  expect(await fetch.channel(remote)).toBeUndefined()
})

test('behavior: with allowInsecureHttp it pays such a server; this machine is paid over HTTP by default', async () => {
  const credentials: string[] = []
  const { fetch } = Payer.client(chain, gw.url, 1, {
    fetch: reaching(credentials),
    allowInsecureHttp: true,
  })
  const res = await fetch(`${remote}/v1/chat/completions`, post)
  expect(res.status).toBe(200)
  await res.text()
  expect(credentials.length).toBeGreaterThan(0)
  expect((await fetch.channel(remote))?.channelId).toBeString()
  // The first payer, refused above, pays the same gateway as this machine's (127.0.0.1,
  // localhost) over plain HTTP without being allowed to.
  for (const local of [gw.url, gw.url.replace('127.0.0.1', 'localhost')]) {
    const mine: string[] = []
    const { fetch: plain } = Payer.client(chain, gw.url, 0, { fetch: reaching(mine) })
    const served = await plain(`${local}/v1/chat/completions`, post)
    expect(served.status).toBe(200)
    await served.text()
    expect(mine.length).toBeGreaterThan(0)
  }
}, 30_000)
