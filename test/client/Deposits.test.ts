/**
 * Deposits by the credential types a challenge offers (the evm draft: a client MUST NOT
 * submit a type the challenge leaves out): against a server that takes only `hash` (the payer
 * broadcasts `open` and `topUp` itself), the paying fetch opens and tops up by transaction;
 * against one that takes none it makes (`permit2` only), it refuses before anything is sent;
 * and a transaction mined after the challenge expired goes out on a fresh one (the core draft:
 * no credential for an expired challenge), one deposit, no second channel. The server is a
 * scripted one (MPP as the drafts state it, not tollway); the chain is real.
 */
import { afterAll, expect, test } from 'bun:test'
import type { Hex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import { ChallengeRefusedError, createFetch, Store } from '../../src/client/index.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as ScriptedPayments from '../helpers/ScriptedPayments.ts'

const chain = await Anvil.start({ accounts: 5 }) // the payee and four payers
afterAll(() => chain.stop())

/** On this machine (credentials may go over plain HTTP); the scripted fetch answers it. */
const url = 'http://127.0.0.1:9/v1/chat/completions'
type Sent = { action: string; type: string | undefined; expired: boolean }

/**
 * A scripted server: challenges offering `types` (with `feePayer`), living `expiresMs`; a
 * voucher below `need` (settable) asks for `need`; every other credential on a live challenge
 * is taken.
 */
function server(o: { feePayer: boolean; types: string[]; expiresMs?: number }) {
  const state = {
    sent: [] as Sent[],
    need: 0n,
    /** Open credentials still to refuse as unverifiable (a node behind the payer's). */
    refuseOpens: 0,
    fetch: undefined as unknown as typeof fetch,
  }
  const challenge = () =>
    ScriptedPayments.challenge(
      {
        amount: 1_000_000n,
        currency: chain.currencyAddress,
        recipient: chain.payee.address,
        methodDetails: {
          chainId: chain.chainId,
          escrowContract: chain.escrowAddress,
          feePayer: o.feePayer,
          credentialTypes: o.types,
        },
      },
      o.expiresMs,
    )
  const problem = (kind: string, extra: Record<string, unknown> = {}) =>
    new Response(
      JSON.stringify({
        type: `https://paymentauth.org/problems/${kind}`,
        title: kind,
        status: 402,
        ...extra,
      }),
      {
        status: 402,
        headers: {
          'content-type': 'application/problem+json',
          'www-authenticate': Challenge.serialize(challenge()),
        },
      },
    )
  const f = async (input: string | URL | Request, init: RequestInit = {}) => {
    if (String(input).includes('/v1/channels/')) return new Response(null, { status: 404 })
    const authorization = new Headers(init.headers).get('authorization')
    if (!authorization) return problem('payment-required')
    const { challenge: echoed, payload, source } = Credential.deserialize(authorization)
    const p = payload as { action: string; type?: string; cumulativeAmount?: bigint | string }
    const expired = Date.parse(echoed.expires!) <= Date.now()
    state.sent.push({ action: p.action, type: p.type, expired })
    if (expired) return problem('session/challenge-not-found')
    // The draft: a hash credential (open or top-up) names its payer.
    if (p.type === 'hash' && !source) return problem('malformed-credential')
    if (p.action === 'open' && state.refuseOpens > 0) {
      state.refuseOpens--
      return problem('verification-failed')
    }
    if (p.action === 'voucher' && BigInt(p.cumulativeAmount!) < state.need)
      return problem('session/insufficient-balance', { requiredCumulative: state.need.toString() })
    if (init.method === 'HEAD') return new Response(null)
    return Response.json({ ok: true })
  }
  state.fetch = Object.assign(f, { preconnect: () => {} }) as unknown as typeof fetch
  return state
}

const paying = (payer: number, fetch: typeof globalThis.fetch, rpcUrl = chain.rpcUrl) =>
  createFetch({
    account: chain.payers[payer]!.privateKey,
    rpcUrl,
    limits: { maxDeposit: 1_000_000n, maxTotal: 5_000_000n },
    deposit: 200_000n,
    allow: { escrows: [chain.escrowAddress] },
    store: Store.memory(),
    fetch,
    pollingInterval: 50,
  })
const post = { method: 'POST', body: '{"model":"m","messages":[]}' }
const onChain = async (channelId: Hex) =>
  (await Escrow.getChannel(chain.payeeClient, { escrow: chain.escrowAddress, channelId }))?.deposit

test('behavior: a server that takes only hash credentials is opened and topped up by transactions of the payer, never an authorization', async () => {
  const s = server({ feePayer: false, types: ['hash'] })
  const f = paying(0, s.fetch)
  expect((await f(url, post)).status).toBe(200)
  const { channelId } = (await f.channel(url))!
  expect(await onChain(channelId)).toBe(200_000n)
  // A request that needs more than the deposit: a top-up first, by transaction.
  s.need = 500_000n
  expect((await f(url, post)).status).toBe(200)
  const kinds = s.sent.map((x) => `${x.action}/${x.type ?? ''}`)
  expect(kinds).toContain('open/hash')
  expect(kinds).toContain('topUp/hash')
  expect(kinds.filter((k) => k.endsWith('/authorization'))).toEqual([])
  expect(await onChain(channelId)).toBeGreaterThanOrEqual(500_000n)
  expect(BigInt((await f.channel(url))!.deposit)).toBe((await onChain(channelId))!)
}, 30_000)

test('error: a server that takes only credential types this client does not make (permit2) is refused before anything is sent or deposited', async () => {
  const s = server({ feePayer: true, types: ['permit2'] })
  const f = paying(1, s.fetch)
  const e = await f(url, post).catch((x: unknown) => x)
  expect(e).toBeInstanceOf(ChallengeRefusedError)
  expect((e as Error).message).toContain('permit2')
  expect(s.sent).toEqual([])
  expect(await f.channel(url)).toBeUndefined()
})

test('behavior: an open of the payer the server cannot verify yet is sent again, not a second channel: served, one deposit', async () => {
  const s = server({ feePayer: false, types: ['hash'] })
  s.refuseOpens = 1
  const f = paying(3, s.fetch)
  const payer = chain.payers[3]!.address
  const token = { token: chain.currencyAddress, owner: payer }
  const before = await Token.balanceOf(chain.payeeClient, token)
  expect((await f(url, post)).status).toBe(200)
  expect(s.sent.filter((x) => x.action === 'open')).toHaveLength(2)
  expect(before - (await Token.balanceOf(chain.payeeClient, token))).toBe(200_000n)
  expect((await f.setApart(url)).refused).toBeUndefined()
}, 30_000)

test('behavior: an open mined after its challenge expired goes out on a fresh challenge: served, one deposit', async () => {
  // Receipts 2 s late, challenges that live 1.5 s.
  const slow = Bun.serve({
    port: 0,
    hostname: '127.0.0.1',
    async fetch(req) {
      const body = await req.text()
      if (body.includes('eth_getTransactionReceipt')) await Bun.sleep(2_000)
      return fetch(chain.rpcUrl, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body,
      })
    },
  })
  try {
    const s = server({ feePayer: false, types: ['hash'], expiresMs: 1_500 })
    const f = paying(2, s.fetch, `http://127.0.0.1:${slow.port}`)
    expect((await f(url, post)).status).toBe(200)
    expect(s.sent.filter((x) => x.expired)).toEqual([])
    expect(s.sent.filter((x) => x.action === 'open')).toHaveLength(1)
    const { channelId } = (await f.channel(url))!
    expect(await onChain(channelId)).toBe(200_000n)
    expect((await f.setApart(url)).refused).toBeUndefined()
  } finally {
    slow.stop(true)
  }
}, 30_000)

test('error: a challenge already expired is refused before anything is signed or sent (the core draft: no credential for an expired challenge)', async () => {
  const s = server({ feePayer: false, types: ['hash'], expiresMs: -60_000 })
  const f = paying(3, s.fetch)
  const e = await f(url, post).catch((e: Error) => e)
  expect(e).toBeInstanceOf(ChallengeRefusedError)
  expect((e as Error).message).toContain('expired')
  expect(s.sent).toEqual([])
})

/** Payer 3's session on a gateway that pays the gas (authorizations), with the token's domain. */
async function gasless() {
  const s = server({ feePayer: true, types: ['authorization', 'hash'] })
  const res = await s.fetch(url, post)
  return new PayingSession({
    account: privateKeyToAccount(chain.payers[3]!.privateKey),
    challenge: challengeOf(res.headers.get('www-authenticate'))!,
    tokenDomain: await Token.domain(chain.payeeClient, { token: chain.currencyAddress }),
  })
}

test('behavior: the addresses of an EIP-3009 authorization go in lowercase hex (the evm draft encoding)', async () => {
  const session = await gasless()
  const { payload } = Credential.deserialize(
    await session.openWithAuthorization({ deposit: 1_000n, initial: 0n }),
  )
  const { from, to } = (payload as { authorization: { from: string; to: string } }).authorization
  expect(from).toBe(chain.payers[3]!.address.toLowerCase())
  expect(to).toBe(chain.escrowAddress.toLowerCase())
})
