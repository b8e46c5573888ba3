/**
 * A fake JSON-RPC node for tests of what a node answers (outside input): a real HTTP server on
 * a random loopback port whose answers the test picks, and what such answers are built of.
 */
import fc from 'fast-check'
import { type Address, encodeFunctionResult, type Hex } from 'viem'
import { abi as testUsdAbi } from '../../src/chain/generated/TestUSD.ts'

/** What the node answers a call with: a JSON-RPC `result`, an `error`, or a raw body. */
export type Answer =
  | { result: unknown }
  | { error: { code: number; message: string; data?: unknown } }
  | { raw: string; status?: number }

/** A node on a random loopback port (the caller stops it) answering `eth_chainId` with
 * `chainId` and any other call with `answer(method)`. */
export function serve(chainId: number, answer: (method: string) => Answer) {
  return Bun.serve({
    port: 0,
    hostname: '127.0.0.1',
    async fetch(req) {
      const call = (await req.json()) as { id: number; method: string }
      const a =
        call.method === 'eth_chainId'
          ? { result: `0x${chainId.toString(16)}` }
          : answer(call.method)
      return 'raw' in a
        ? new Response(a.raw, { status: a.status ?? 200 })
        : Response.json({ jsonrpc: '2.0', id: call.id, ...a })
    },
  })
}

/** Any `n` bytes, as hex. */
export const bytes = (n: number) =>
  fc
    .uint8Array({ minLength: n, maxLength: n })
    .map((b) => `0x${Buffer.from(b).toString('hex')}` as Hex)
/** Any bytes up to `max`, as hex. */
export const anyHex = (max: number) =>
  fc.uint8Array({ maxLength: max }).map((b) => `0x${Buffer.from(b).toString('hex')}` as Hex)

/** An `eip712Domain()` result as the token would return it (ERC-5267). */
export const domainResult = (d: {
  name: string
  version?: string
  chainId: bigint
  verifyingContract: Address
}) =>
  encodeFunctionResult({
    abi: testUsdAbi,
    functionName: 'eip712Domain',
    result: [
      '0x0f',
      d.name,
      d.version ?? '1',
      d.chainId,
      d.verifyingContract,
      `0x${'00'.repeat(32)}`,
      [],
    ],
  })
