/**
 * Property test of the token's EIP-712 domain the paying client reads from its RPC URL (a
 * server that pays the gas and does not state the domain): the node's answer to
 * `eip712Domain()` is outside input. The token's domain on the challenge's chain is signed
 * with; anything else (a domain of another chain or contract, garbage, no contract, a JSON-RPC
 * error, a body that is not JSON) ends the paying fetch in a ClientError naming the token, with
 * nothing signed. Both the server (speaking MPP as the drafts state it) and the node are real
 * HTTP servers of the test.
 */
import { afterAll, expect, test } from 'bun:test'
import fc from 'fast-check'
import { getAddress } from 'viem'
import { ClientError, TokenDomainUnavailableError } from '../../src/client/index.ts'
import * as RpcNode from '../helpers/RpcNode.ts'
import * as ScriptedPayments from '../helpers/ScriptedPayments.ts'

const chainId = 31337
const { currency } = ScriptedPayments
// No tokenDomain: the client reads it from its RPC URL, the node of this test.
const challenge = () => ScriptedPayments.feePaid({ chainId })

/** Every credential payload the server got. */
let got: Record<string, unknown>[] = []
const server = ScriptedPayments.serve(challenge, (payload) => {
  got.push(payload)
  return Response.json({})
})

/** What the node answers `eth_call` with. */
let answer: RpcNode.Answer = { result: '0x' }
const node = RpcNode.serve(chainId, (method) =>
  method === 'eth_call' ? answer : { error: { code: -32601, message: 'not here' } },
)
afterAll(() => {
  server.stop(true)
  node.stop(true)
})
const url = `http://127.0.0.1:${server.port}/v1/chat/completions`

const { anyHex, bytes, domainResult } = RpcNode

/** What the node answers, and whether it is the token's domain on the challenge's chain. */
const answers: fc.Arbitrary<{ answer: RpcNode.Answer; ok: boolean }> = fc.oneof(
  fc.string({ maxLength: 20 }).map((name) => ({
    answer: {
      result: domainResult({ name, chainId: BigInt(chainId), verifyingContract: currency }),
    },
    ok: true,
  })),
  fc
    .tuple(
      fc.oneof(fc.bigInt({ min: 0n, max: 2n ** 256n - 1n }), fc.constant(BigInt(chainId))),
      fc.oneof(
        bytes(20).map((a) => getAddress(a)),
        fc.constant(currency),
      ),
    )
    .filter(([id, at]) => id !== BigInt(chainId) || at !== currency)
    .map(([id, at]) => ({
      answer: { result: domainResult({ name: 'TestUSD', chainId: id, verifyingContract: at }) },
      ok: false,
    })),
  anyHex(200).map((result) => ({ answer: { result }, ok: false })),
  fc
    .oneof(fc.jsonValue({ maxDepth: 1 }), fc.constantFrom(null, '', '0xzz'))
    .map((result) => ({ answer: { result }, ok: false })),
  fc
    .tuple(fc.constantFrom(3, -32000, -32602), fc.string({ maxLength: 30 }))
    .map(([code, message]) => ({ answer: { error: { code, message } }, ok: false })),
  fc
    .tuple(fc.string({ maxLength: 30 }), fc.constantFrom(200, 404, 400))
    .map(([raw, status]) => ({ answer: { raw, status }, ok: false })),
)

test("property: the token domain the node answers is signed with only when it is the token's on the challenge's chain; anything else is a ClientError naming the token, nothing signed", async () => {
  await fc.assert(
    fc.asyncProperty(answers, async ({ answer: a, ok }) => {
      answer = a
      got = []
      const f = ScriptedPayments.payer({
        rpcUrl: `http://127.0.0.1:${node.port}`,
        limits: { maxDeposit: 1_000_000n, maxTotal: 3_000_000n },
      })
      try {
        const r = await ScriptedPayments.chat(f, url).then(
          async (res) => ({ res: await res.text() }),
          (error: unknown) => ({ error }),
        )
        if (ok) {
          // Signed with: the open's authorization reached the server.
          expect(got.length).toBeGreaterThan(0)
          return
        }
        expect('error' in r).toBe(true)
        const error = (r as { error: unknown }).error
        expect(error).toBeInstanceOf(TokenDomainUnavailableError)
        expect(error).toBeInstanceOf(ClientError)
        expect((error as Error).message.toLowerCase()).toContain(currency.toLowerCase())
        expect((error as Error).message).not.toContain(String(node.port))
        expect(got).toEqual([])
      } finally {
        await f.release()
      }
    }),
    { numRuns: 120, seed: 20261125 },
  )
}, 60_000)
