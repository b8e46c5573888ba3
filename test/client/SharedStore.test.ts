/**
 * maxTotal over a store that several clients share: clients of one wallet, each paying its own
 * server through one channel store file (other processes, or other `Store.file` on it in this
 * one). Their vouchers together stay within maxTotal, whatever each signs meanwhile. The
 * servers are scripted (real HTTP on this machine, no chain: opens are gasless
 * authorizations, never submitted), each answering every credential with a receipt saying
 * all it authorized was spent, so each request signs further ahead.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtemp } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Hex, LocalAccount } from 'viem'
import { generatePrivateKey, privateKeyToAccount } from 'viem/accounts'
import { createFetch, type Options, Store } from '../../src/client/index.ts'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Events from '../../src/payment/Events.ts'
import * as Receipt from '../../src/payment/Receipt.ts'
import * as ScriptedPayments from '../helpers/ScriptedPayments.ts'

const escrow = `0x${'e5'.repeat(20)}` as Hex

/** What the scripted servers ask: gasless opens on a chain nobody reads. */
const asked = {
  amount: 1n,
  currency: `0x${'c0'.repeat(20)}`,
  recipient: `0x${'9a'.repeat(20)}`,
  methodDetails: {
    chainId: 31337,
    escrowContract: escrow,
    feePayer: true,
    credentialTypes: ['authorization'],
    tokenDomain: { name: 'Scripted', version: '1' },
  },
}

/**
 * A scripted payment server: a 402 with its challenge for a request without a credential, a
 * 200 with a receipt (spent: the credential's amount) for any other; its channel's view
 * (`GET /v1/channels/{id}`), and closes. `signed`: the highest amount of each channel it was
 * sent.
 */
function server() {
  const signed = new Map<string, bigint>()
  const challenge = () => ScriptedPayments.challenge(asked)
  const s = Bun.serve({
    port: 0,
    hostname: '127.0.0.1',
    async fetch(req) {
      const path = new URL(req.url).pathname
      if (path.startsWith('/v1/channels/')) {
        const spent = signed.get(path.split('/').at(-1) as string)
        if (spent === undefined) return new Response(null, { status: 404 })
        return Response.json({ status: 'open', spent: String(spent), settled: '0' })
      }
      const authorization = req.headers.get('authorization')
      if (!authorization?.startsWith('Payment '))
        return new Response('{}', {
          status: 402,
          headers: { 'www-authenticate': Challenge.serialize(challenge()) },
        })
      const p = Credential.deserialize(authorization).payload as Record<string, string>
      const amount = BigInt(p.cumulativeAmount as string)
      const channelId = p.channelId as string
      if (amount > (signed.get(channelId) ?? 0n)) signed.set(channelId, amount)
      if (p.action === 'close')
        return Response.json({ receipt: { txHash: `0x${'77'.repeat(32)}` } })
      const receipt = Receipt.serialize({
        status: 'success',
        method: 'evm',
        timestamp: new Date().toISOString(),
        reference: channelId,
        spent: String(amount),
      })
      return Response.json({ ok: true }, { headers: { 'payment-receipt': receipt } })
    },
  })
  afterAll(() => s.stop(true))
  return {
    url: `http://127.0.0.1:${s.port}/v1/chat/completions`,
    /** All its channels were signed, summed. */
    total: () => [...signed.values()].reduce((a, b) => a + b, 0n),
  }
}

const limits = { maxDeposit: 1_000n, maxTotal: 1_000n }
/** Each request signs this much further (spent, as the receipt says, plus the margin). */
const margin = 100n

const paying = (key: Hex, store: Store.Store, o: Partial<Options> = {}) =>
  createFetch({
    account: key,
    limits,
    margin,
    completionMargin: margin,
    allow: { escrows: [escrow] },
    store,
    ...o,
  })

const post = { method: 'POST', body: '{"model":"m","messages":[]}' }

/** `n` requests to `url`, one after another; each signs `margin` further while maxTotal lets it. */
async function requests(f: typeof fetch, url: string, n: number) {
  for (let i = 0; i < n; i++) await (await f(url, post)).text()
}

const storePath = async () => join(await mkdtemp(join(tmpdir(), 'tollway-shared-')), 'c.json')

describe('createFetch on a store file shared by clients of one wallet', () => {
  test('behavior: two clients (two Store.file on one path), two servers, signing at once: together within maxTotal', async () => {
    const path = await storePath()
    const key = generatePrivateKey()
    const [one, two] = [server(), server()]
    const a = paying(key, Store.file(path))
    const b = paying(key, Store.file(path))
    // Each opens its channel first (each reads what the store holds), then both go on at once.
    await requests(a, one.url, 1)
    await requests(b, two.url, 1)
    await Promise.all([requests(a, one.url, 15), requests(b, two.url, 15)])
    expect(one.total() + two.total()).toBeLessThanOrEqual(limits.maxTotal)
    // Not refused early either: between them, the budget was used.
    expect(one.total() + two.total()).toBeGreaterThan(limits.maxTotal - 2n * margin)
    await Promise.all([a.release(), b.release()])
  }, 30_000)

  test('error: a close that succeeded returns its transaction even when giving back its reservation fails', async () => {
    const memory = Store.memory()
    let failing = false
    const store: Store.Store = {
      ...memory,
      reserve: (...args: Parameters<NonNullable<Store.Store['reserve']>>) => {
        if (failing) return Promise.reject(new Error('the store cannot be written'))
        return memory.reserve!(...args)
      },
    }
    const one = server()
    const f = paying(generatePrivateKey(), store)
    await requests(f, one.url, 2)
    failing = true
    expect(await f.close(one.url)).toBe(`0x${'77'.repeat(32)}`)
    // What it signed is counted as closed.
    expect(await memory.closedTotal(Object.keys((await memory.all!()).closedTotals)[0]!)).toBe(200n)
  }, 30_000)

  test('behavior: what another client closed counts as it closes: its closed total read afresh, not as first read', async () => {
    const path = await storePath()
    const key = generatePrivateKey()
    const [one, two] = [server(), server()]
    const a = paying(key, Store.file(path))
    await requests(a, one.url, 1)
    // Another client pays its server 500, closes the channel (500 in the store's closed
    // totals), and gives the store up.
    const b = paying(key, Store.file(path))
    await requests(b, two.url, 5)
    await b.close(two.url)
    await b.release()
    expect(two.total()).toBe(500n)
    await requests(a, one.url, 15)
    expect(one.total() + two.total()).toBeLessThanOrEqual(limits.maxTotal)
    await a.release()
  }, 30_000)

  test('behavior: two processes, two servers, signing at once: together within maxTotal', async () => {
    const path = await storePath()
    const key = generatePrivateKey()
    const [one, two] = [server(), server()]
    const a = paying(key, Store.file(path))
    await requests(a, one.url, 1)
    // The other process: opens its channel, says so, waits for the word, then pays on.
    const client = join(import.meta.dir, '../../src/client/index.ts')
    const other = Bun.spawn(
      [
        process.execPath,
        '-e',
        `import { createFetch, Store } from ${JSON.stringify(client)}
        const f = createFetch({ account: ${JSON.stringify(key)},
          limits: { maxDeposit: ${limits.maxDeposit}n, maxTotal: ${limits.maxTotal}n },
          margin: ${margin}n, completionMargin: ${margin}n, allow: { escrows: [${JSON.stringify(escrow)}] },
          store: Store.file(${JSON.stringify(path)}) })
        const ask = async () => (await f(${JSON.stringify(two.url)}, ${JSON.stringify(post)})).text()
        await ask()
        console.log('opened')
        for await (const _ of console) break
        for (let i = 0; i < 15; i++) await ask()
        await f.release()`,
      ],
      { stdin: 'pipe', stdout: 'pipe', stderr: 'inherit' },
    )
    const reader = other.stdout.getReader()
    let out = ''
    while (!out.includes('opened')) {
      const { value, done } = await reader.read()
      if (done) throw new Error(`the other process ended before opening: ${out}`)
      out += new TextDecoder().decode(value)
    }
    other.stdin.write('go\n')
    other.stdin.end()
    await Promise.all([requests(a, one.url, 15), other.exited])
    expect(other.exitCode).toBe(0)
    expect(one.total() + two.total()).toBeLessThanOrEqual(limits.maxTotal)
    expect(one.total() + two.total()).toBeGreaterThan(limits.maxTotal - 2n * margin)
    await a.release()
  }, 60_000)

  test('behavior: two clients on one Store.memory, two servers, signing at once: together within maxTotal', async () => {
    const store = Store.memory()
    const key = generatePrivateKey()
    const [one, two] = [server(), server()]
    const a = paying(key, store)
    const b = paying(key, store)
    await requests(a, one.url, 1)
    await requests(b, two.url, 1)
    await Promise.all([requests(a, one.url, 15), requests(b, two.url, 15)])
    expect(one.total() + two.total()).toBeLessThanOrEqual(limits.maxTotal)
    expect(one.total() + two.total()).toBeGreaterThan(limits.maxTotal - 2n * margin)
  }, 30_000)

  test('behavior: a signature that fails gives back what its channel reserved past what it signed: another client can sign it', async () => {
    const path = await storePath()
    const key = generatePrivateKey()
    const [one, two] = [server(), server()]
    const inner = privateKeyToAccount(key)
    let failing = false
    // A remote signer that fails (a wallet that refuses, a network down).
    const account = {
      ...inner,
      async signTypedData(td: Parameters<typeof inner.signTypedData>[0]) {
        if (failing) throw new Error('the signer is unreachable')
        return inner.signTypedData(td)
      },
    } as LocalAccount
    const a = paying(key, Store.file(path), { account })
    // Opened with 100 signed, and reserved further ahead.
    await requests(a, one.url, 1)
    failing = true
    const e = await a(one.url, post).catch((e: unknown) => e)
    expect(e).toBeInstanceOf(Error)
    expect(one.total()).toBe(100n)
    const b = paying(key, Store.file(path))
    await requests(b, two.url, 12)
    // All but the 100 the first signed.
    expect(two.total()).toBe(limits.maxTotal - 100n)
    await Promise.all([a.release(), b.release()])
  }, 30_000)

  for (const [name, stores] of [
    [
      'Store.file',
      async () => {
        const path = await storePath()
        return [Store.file(path), Store.file(path)]
      },
    ],
    ['Store.memory', async () => Array(2).fill(Store.memory())],
  ] as [string, () => Promise<Store.Store[]>][])
    test(`behavior: release() gives back what was reserved and not signed: another client of this process can sign it (${name})`, async () => {
      const key = generatePrivateKey()
      const [one, two] = [server(), server()]
      const [first, second] = await stores()
      const a = paying(key, first as Store.Store)
      await requests(a, one.url, 1)
      await a.release()
      const b = paying(key, second as Store.Store)
      await requests(b, two.url, 12)
      expect(two.total()).toBe(limits.maxTotal - 100n)
      await b.release()
    }, 30_000)

  test('behavior: a store of another wallet in the same file does not take from this wallet', async () => {
    const path = await storePath()
    const [one, two] = [server(), server()]
    const a = paying(generatePrivateKey(), Store.file(path))
    const b = paying(generatePrivateKey(), Store.file(path))
    await Promise.all([requests(a, one.url, 12), requests(b, two.url, 12)])
    expect(one.total()).toBe(limits.maxTotal)
    expect(two.total()).toBe(limits.maxTotal)
    await Promise.all([a.release(), b.release()])
  }, 30_000)
})

describe('createFetch alone on its store, paying two servers', () => {
  for (const [name, make] of [
    ['Store.file', async () => Store.file(await storePath())],
    ['Store.memory', async () => Store.memory()],
  ] as [string, () => Promise<Store.Store>][])
    test(`behavior: what it reserved ahead on one server and does not sign does not refuse it on another below maxTotal (${name})`, async () => {
      const key = generatePrivateKey()
      const [one, two] = [server(), server()]
      const f = paying(key, await make())
      // 100 signed on the first server (and more reserved ahead there), then the second.
      await requests(f, one.url, 1)
      await requests(f, two.url, 12)
      expect(one.total()).toBe(100n)
      // Nothing else signs from this wallet: all but the 100 the first signed.
      expect(two.total()).toBe(limits.maxTotal - 100n)
      await f.release()
    }, 30_000)
})

describe('createFetch: a voucher leaves the client only once its amount is stored', () => {
  test('behavior: a mid-stream voucher sent again (its challenge expired on its way) while another request on the channel signed further and is storing it: sent at its own amount, not at the unstored one', async () => {
    // Challenges that live one second: the held voucher's expires while it is held.
    const challenge = () => ScriptedPayments.challenge(asked, 1_000)
    /** What the store held stored (the highest signed written) as each voucher arrived. */
    let stored = 0n
    const seen: { amount: bigint; stored: bigint }[] = []
    const held = Promise.withResolvers<void>()
    const answerHeld = Promise.withResolvers<void>()
    const voucherTaken = Promise.withResolvers<void>()
    let heads = 0
    const s = Bun.serve({
      port: 0,
      hostname: '127.0.0.1',
      async fetch(req) {
        const path = new URL(req.url).pathname
        if (path.startsWith('/v1/channels/'))
          return Response.json({ status: 'open', spent: '0', settled: '0', deposit: '10000' })
        const authorization = req.headers.get('authorization')
        const refuse = () =>
          new Response('{}', {
            status: 402,
            headers: { 'www-authenticate': Challenge.serialize(challenge()) },
          })
        if (!authorization?.startsWith('Payment ')) return refuse()
        const credential = Credential.deserialize(authorization)
        const p = credential.payload as Record<string, string>
        const amount = BigInt(p.cumulativeAmount as string)
        seen.push({ amount, stored })
        if (req.method === 'HEAD') {
          if (heads++ > 0) {
            voucherTaken.resolve()
            return new Response(null, { status: 200 })
          }
          // The first mid-stream voucher: answered once the test says so, its challenge expired.
          held.resolve()
          await answerHeld.promise
          const expires = Date.parse(credential.challenge.expires as string)
          while (Date.now() <= expires + 50) await Bun.sleep(50)
          return refuse()
        }
        const body = (await req.json()) as { stream?: boolean }
        if (!body.stream) return Response.json({ ok: true })
        const need = Events.needVoucher({
          channelId: p.channelId as Hex,
          requiredCumulative: amount + 50n,
          acceptedCumulative: amount,
          deposit: 10_000n,
        })
        const sse = new ReadableStream<Uint8Array>({
          async start(c) {
            const text = (e: string) => c.enqueue(new TextEncoder().encode(e))
            text(`event: ${need.event}\ndata: ${JSON.stringify(need.data)}\n\n`)
            await voucherTaken.promise
            text('data: {"choices":[]}\n\ndata: [DONE]\n\n')
            c.close()
          },
        })
        return new Response(sse, { headers: { 'content-type': 'text/event-stream' } })
      },
    })
    afterAll(() => s.stop(true))
    const url = `http://127.0.0.1:${s.port}/v1/chat/completions`
    // A store whose write of 2,000 signed waits for the test (a slow disk, a lock held).
    const inner = Store.memory()
    const blocked = Promise.withResolvers<void>()
    const gate = Promise.withResolvers<void>()
    const store: Store.Store = {
      ...inner,
      async set(key, state) {
        if (BigInt(state.signed) >= 2_000n) {
          blocked.resolve()
          await gate.promise
        }
        await inner.set(key, state)
        if (BigInt(state.signed) > stored) stored = BigInt(state.signed)
      },
    }
    const f = paying(generatePrivateKey(), store, {
      limits: { maxDeposit: 10_000n, maxTotal: 10_000n },
      completionMargin: 2_000n,
    })
    const res = await f(url, { method: 'POST', body: '{"model":"m","messages":[],"stream":true}' })
    const reading = res.text()
    await held.promise
    // Another request on the channel signs 2,000 ahead; its store write waits.
    const other = f(url, post)
    await blocked.promise
    answerHeld.resolve()
    await reading
    gate.resolve()
    await (await other).text()
    expect(seen.filter((v) => v.amount > v.stored)).toEqual([])
    await f.release()
  }, 30_000)
})
