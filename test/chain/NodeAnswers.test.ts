/**
 * What a JSON-RPC node answers the escrow's and the token's reads with is outside input:
 * `eth_getLogs` for the channels the settlement worker reads back (`Escrow.closings`), the
 * receipt of the payer's own withdraw (`Escrow.events`), and `eth_call` of the token's
 * `eip712Domain()` (`Token.domain`, whose domain a payer signs EIP-3009 authorizations with). A
 * real JSON-RPC server of the test answers with what the property picks: logs of our events
 * with any values, logs of other events or other contracts, garbled logs, answers of the wrong
 * shape, JSON-RPC errors, bodies that are not JSON.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import {
  type AbiEvent,
  type Address,
  encodeAbiParameters,
  encodeEventTopics,
  getAddress,
  type Hex,
} from 'viem'
import * as Client from '../../src/chain/Client.ts'
import { TokenDomainError } from '../../src/chain/Errors.ts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import * as RpcNode from '../helpers/RpcNode.ts'

const chainId = 31337
const escrow: Address = '0x5FbDB2315678afecb367f032d93F642f64180aa3'
const token: Address = '0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512'

/** The answer to the next `eth_getLogs`, `eth_call` or `eth_getTransactionReceipt`. */
let answer: RpcNode.Answer = { result: [] }
const server = RpcNode.serve(chainId, (method) =>
  method === 'eth_blockNumber' ? { result: '0x10' } : answer,
)
afterAll(() => server.stop(true))
const rpcUrl = `http://127.0.0.1:${server.port}`
const client = Client.from({ rpcUrl, chainId })

const { anyHex, bytes, domainResult } = RpcNode
const weird = fc.oneof(
  fc.jsonValue({ maxDepth: 2 }),
  fc.constantFrom(null, '', '0x', '0xzz', 'toString', '__proto__', -1, 1e300),
)

const events = Escrow.abi.filter(
  (item): item is AbiEvent & (typeof Escrow.abi)[number] => item.type === 'event',
)
const closingNames = [
  'CloseRequested',
  'CloseRequestCancelled',
  'Withdrawn',
  'ChannelClosed',
  'Settled',
]
const closing = events.filter((e) => closingNames.includes(e.name))
const others = events.filter((e) => !closingNames.includes(e.name))

/** A value of an ABI type, any in its range. */
function arbitraryOf(type: string): fc.Arbitrary<unknown> {
  if (type === 'address') return bytes(20).map((a) => getAddress(a))
  if (type === 'bytes32') return bytes(32)
  if (type === 'bool') return fc.boolean()
  const m = /^uint(\d+)$/.exec(type)
  if (m) return fc.bigInt({ min: 0n, max: 2n ** BigInt(m[1]!) - 1n })
  throw new Error(`no arbitrary for ${type}`)
}

/** The RPC log of `event` with `args` (the node's form: quantities in hex). */
function rpcLog(
  event: AbiEvent,
  args: Record<string, unknown>,
  at: { address: Address; n: number },
) {
  const indexed = event.inputs.filter((i) => i.indexed)
  const unindexed = event.inputs.filter((i) => !i.indexed)
  const topics = encodeEventTopics({
    abi: [event],
    eventName: event.name,
    args: Object.fromEntries(indexed.map((i) => [i.name!, args[i.name!]])),
  } as never) as Hex[]
  const data = encodeAbiParameters(
    unindexed,
    unindexed.map((i) => args[i.name!]),
  )
  return {
    address: at.address.toLowerCase(),
    topics,
    data,
    blockNumber: `0x${(1 + Math.floor(at.n / 4)).toString(16)}`,
    blockHash: `0x${'11'.repeat(32)}`,
    transactionHash: `0x${'22'.repeat(32)}`,
    transactionIndex: '0x0',
    logIndex: `0x${at.n.toString(16)}`,
    removed: false,
  } as Record<string, unknown>
}

/** A log of `events`, args any. */
const logOf = (from: AbiEvent[]) =>
  fc.constantFrom(...from).chain((event) =>
    fc.tuple(...event.inputs.map((i) => arbitraryOf(i.type))).map((values) => ({
      event,
      args: Object.fromEntries(event.inputs.map((i, k) => [i.name!, values[k]])),
    })),
  )

/** How a log of ours is garbled: it is no longer one the escrow emits. */
const garbling = fc.oneof(
  fc.constant((l: Record<string, unknown>) => ({ ...l, topics: (l.topics as Hex[]).slice(0, -1) })),
  fc.constant((l: Record<string, unknown>) => ({
    ...l,
    topics: [...(l.topics as Hex[]), `0x${'33'.repeat(32)}`],
  })),
  anyHex(40).map((t) => (l: Record<string, unknown>) => {
    const topics = [...(l.topics as Hex[])]
    topics[1] = t.length === 66 ? `${t}00` : t
    return { ...l, topics }
  }),
  weird.map((t) => (l: Record<string, unknown>) => {
    const topics = [...(l.topics as unknown[])]
    topics[1] = t
    return { ...l, topics }
  }),
  fc.constant((l: Record<string, unknown>) => ({ ...l, data: (l.data as string).slice(0, -2) })),
  anyHex(20).map(
    (d) => (l: Record<string, unknown>) =>
      (l.data as string).length > 2
        ? { ...l, data: d }
        : { ...l, topics: [(l.topics as Hex[])[0]] },
  ),
  fc
    .constantFrom('topics', 'data')
    .chain((key) => weird.map((v) => (l: Record<string, unknown>) => ({ ...l, [key]: v }))),
  fc.constantFrom('topics', 'data').map((key) => (l: Record<string, unknown>) => {
    const { [key]: _, ...rest } = l
    return rest
  }),
)

type Entry =
  | { kind: 'ours'; event: AbiEvent; args: Record<string, unknown> }
  | { kind: 'other'; event: AbiEvent; args: Record<string, unknown> }
  | { kind: 'elsewhere'; event: AbiEvent; args: Record<string, unknown>; address: Address }
  | {
      kind: 'garbled'
      event: AbiEvent
      args: Record<string, unknown>
      garble: (l: Record<string, unknown>) => unknown
    }
  | { kind: 'junk'; value: unknown }

const entry: fc.Arbitrary<Entry> = fc.oneof(
  { weight: 4, arbitrary: logOf(closing).map((l) => ({ kind: 'ours' as const, ...l })) },
  { weight: 1, arbitrary: logOf(others).map((l) => ({ kind: 'other' as const, ...l })) },
  {
    weight: 1,
    arbitrary: fc
      .tuple(logOf(closing), bytes(20))
      .filter(([, a]) => a.toLowerCase() !== escrow.toLowerCase())
      .map(([l, a]) => ({ kind: 'elsewhere' as const, ...l, address: getAddress(a) })),
  },
  {
    weight: 2,
    arbitrary: fc
      .tuple(logOf(closing), garbling)
      .map(([l, garble]) => ({ kind: 'garbled' as const, ...l, garble })),
  },
  { weight: 1, arbitrary: weird.map((value) => ({ kind: 'junk' as const, value })) },
)

/** The node's answer to `eth_getLogs` for these entries, and the channels `closings` must give. */
function logsOf(entries: Entry[]): { logs: unknown[]; expected: Hex[] } {
  const logs = entries.map((e, n) => {
    if (e.kind === 'junk') return e.value
    const log = rpcLog(e.event, e.args, { address: e.kind === 'elsewhere' ? e.address : escrow, n })
    return e.kind === 'garbled' ? e.garble(log) : log
  })
  const expected = [
    ...new Set(entries.flatMap((e) => (e.kind === 'ours' ? [e.args.channelId as Hex] : []))),
  ]
  return { logs, expected }
}

/** `closings` over the node's answer: the channels, or the error it threw. */
const closings = () =>
  Escrow.closings(client, { escrow, fromBlock: 1n, toBlock: 16n }).then(
    (ids) => ({ ids }),
    (error: unknown) => ({ error }),
  )

describe('Escrow.closings over what the node answers', () => {
  test('property: logs of our closing events with any values, and of other events or contracts, give each channel of ours once, in chain order', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          entry.filter((e) => e.kind !== 'garbled' && e.kind !== 'junk'),
          { maxLength: 30 },
        ),
        fc.boolean(),
        async (entries, repeat) => {
          // A channel with several events (a close request, then its settle and close).
          const all = repeat && entries.length > 0 ? [...entries, ...entries] : entries
          const { logs, expected } = logsOf(all)
          answer = { result: logs }
          const r = await closings()
          expect(r).toEqual({ ids: expected })
        },
      ),
      { numRuns: 300, seed: 20261125 },
    )
  }, 60_000)

  test('property: garbled logs, junk in the answer, are left out or fail the read, never give a channel', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(entry, { maxLength: 30 }), async (entries) => {
        const { logs, expected } = logsOf(entries)
        answer = { result: logs }
        const r = await closings()
        if ('error' in r) {
          // A node fault: the settlement pass logs it and reads the range again next time.
          expect(r.error).toBeInstanceOf(Error)
          return
        }
        for (const id of r.ids) expect(id).toMatch(/^0x[0-9a-f]{64}$/)
        expect(r.ids).toEqual(expected)
      }),
      { numRuns: 500, seed: 20261125 },
    )
  }, 60_000)

  test('property: an answer of the wrong shape, a JSON-RPC error, a body that is not JSON fail the read with an Error', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          weird.filter((v) => !Array.isArray(v)).map((result) => ({ result })),
          fc
            .tuple(
              fc.integer({ min: -32768, max: 32767 }),
              fc.string({ maxLength: 40 }),
              fc.option(weird),
            )
            .map(([code, message, data]) => ({
              error: { code, message, ...(data === null ? {} : { data }) },
            })),
          fc
            .tuple(fc.string({ maxLength: 40 }), fc.constantFrom(200, 400, 500, 502, 429))
            .map(([raw, status]) => ({ raw, status })),
        ),
        async (a) => {
          answer = a as RpcNode.Answer
          const r = await closings()
          if ('ids' in r) {
            // Only an empty answer may pass for no logs.
            expect(r.ids).toEqual([])
            return
          }
          expect(r.error).toBeInstanceOf(Error)
        },
      ),
      { numRuns: 100, seed: 20261125 },
    )
  }, 60_000)

  test('a huge answer of our logs gives each channel once', async () => {
    const event = closing.find((e) => e.name === 'Settled')!
    const logs = Array.from({ length: 8_000 }, (_, n) =>
      rpcLog(
        event,
        {
          channelId: `0x${(n % 2_000).toString(16).padStart(64, '0')}`,
          payee: escrow,
          cumulativeAmount: BigInt(n),
          delta: 1n,
        },
        { address: escrow, n },
      ),
    )
    answer = { result: logs }
    const r = await closings()
    expect('ids' in r && r.ids.length).toBe(2_000)
  }, 30_000)
})

describe('Escrow.events over a receipt the node answers', () => {
  test("property: any logs in a receipt: the escrow's own events decoded, in order, nothing of other contracts, junk left out, never a throw", async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(entry, { maxLength: 20 }), async (entries) => {
        const { logs } = logsOf(entries)
        const decoded = Escrow.events({ logs } as never, escrow)
        for (const e of decoded) expect(e.address.toLowerCase()).toBe(escrow.toLowerCase())
        const wanted = entries.flatMap((e) =>
          e.kind === 'ours' || e.kind === 'other' ? [e.event.name] : [],
        )
        // Garbled logs that still decode (a topic too many) may come in between.
        let i = 0
        for (const e of decoded) if (e.eventName === wanted[i]) i++
        expect(i).toBe(wanted.length)
      }),
      { numRuns: 300, seed: 20261125 },
    )
  })
})

/** `Token.domain` over the node's answer: the domain, or the error it threw. */
const domain = () =>
  Token.domain(client, { token }).then(
    (d) => ({ d }),
    (error: unknown) => ({ error }),
  )

/** The error the gateway logs and the payer's client wraps: typed, one line naming the
 * problem and the token, neither a viem dump nor the RPC URL. */
function expectNamed(error: unknown) {
  expect(error).toBeInstanceOf(TokenDomainError)
  const message = (error as Error).message
  expect(message).toContain(token)
  expect(message).not.toContain('\n')
  expect(message).not.toContain('viem@')
  // The node's address, not its port's digits alone: a chain id the node makes up may hold them.
  expect(message).not.toContain(`127.0.0.1:${server.port}`)
  expect(message.length).toBeLessThan(400)
}

describe('Token.domain over what the node answers', () => {
  const name = fc.string({ maxLength: 40 })

  test('property: the domain of the token on this chain is read as it is', async () => {
    await fc.assert(
      fc.asyncProperty(name, name, async (n, v) => {
        answer = {
          result: domainResult({
            name: n,
            version: v,
            chainId: BigInt(chainId),
            verifyingContract: token,
          }),
        }
        expect(await domain()).toEqual({
          d: { name: n, version: v, chainId, verifyingContract: token },
        })
      }),
      { numRuns: 100, seed: 20261125 },
    )
  })

  test('property: a domain of another chain or another contract is refused, naming which', async () => {
    await fc.assert(
      fc.asyncProperty(
        name,
        fc.oneof(
          fc.bigInt({ min: 0n, max: 2n ** 256n - 1n }).filter((c) => c !== BigInt(chainId)),
          fc.constant(BigInt(chainId)),
        ),
        fc.oneof(
          bytes(20).map((a) => getAddress(a)),
          fc.constant(token),
        ),
        async (n, id, at) => {
          fc.pre(id !== BigInt(chainId) || at !== token)
          answer = {
            result: domainResult({ name: n, version: '1', chainId: id, verifyingContract: at }),
          }
          const r = await domain()
          expect('error' in r).toBe(true)
          expectNamed((r as { error: unknown }).error)
        },
      ),
      { numRuns: 100, seed: 20261125 },
    )
  })

  test('property: garbage, no contract, a JSON-RPC error, a body that is not JSON: a TokenDomainError naming the problem', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          anyHex(300).map((result) => ({ result })),
          fc
            .tuple(fc.constantFrom(...(['0x', '0x00', '0x0f'] as const)), anyHex(64))
            .map(([head, tail]) => ({ result: `${head}${tail.slice(2)}` })),
          weird.map((result) => ({ result })),
          fc
            .tuple(
              fc.constantFrom(3, -32000, -32602, 4),
              fc.string({ maxLength: 40 }),
              fc.option(anyHex(40)),
            )
            .map(([code, message, data]) => ({
              error: { code, message, ...(data === null ? {} : { data }) },
            })),
          fc
            .tuple(fc.string({ maxLength: 40 }), fc.constantFrom(200, 404, 400))
            .map(([raw, status]) => ({ raw, status })),
        ),
        async (a) => {
          answer = a as RpcNode.Answer
          const r = await domain()
          // Random bytes that happen to decode as a domain of this token on this chain are one.
          if ('d' in r) {
            expect(r.d.chainId).toBe(chainId)
            expect(r.d.verifyingContract).toBe(token)
            return
          }
          expectNamed(r.error)
        },
      ),
      { numRuns: 150, seed: 20261125 },
    )
  }, 60_000)
})
