/**
 * What a node answers a reverting call with is chain input the gateway reads: the revert's data
 * (a custom error of the escrow, `Error(string)`, `Panic(uint256)`, or bytes of nothing known)
 * or, with no data, only its message. Whatever it is, a call ends in a TransactionRevertedError
 * and the payer gets a problem of the draft, never anything untyped. A real JSON-RPC server of
 * the test answers every `eth_call` with the revert the property picks.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import { encodeAbiParameters, encodeErrorResult, type Hex } from 'viem'
import * as Client from '../../src/chain/Client.ts'
import * as ChainErrors from '../../src/chain/Errors.ts'
import * as Escrow from '../../src/chain/Escrow.ts'
import { abi } from '../../src/chain/generated/PaymentChannelEscrow.ts'
import * as ChainEscrow from '../../src/payment/evm/ChainEscrow.ts'
import { PaymentProblem } from '../../src/payment/Problem.ts'

const chainId = 31337
/** The error the node answers the next `eth_call` with. */
let revert: { code: number; message: string; data?: Hex } = { code: 3, message: 'reverted' }
const server = Bun.serve({
  port: 0,
  hostname: '127.0.0.1',
  async fetch(req) {
    const call = (await req.json()) as { id: number; method: string }
    if (call.method === 'eth_chainId')
      return Response.json({ jsonrpc: '2.0', id: call.id, result: `0x${chainId.toString(16)}` })
    return Response.json({ jsonrpc: '2.0', id: call.id, error: revert })
  },
})
afterAll(() => server.stop(true))

const client = Client.from({
  rpcUrl: `http://127.0.0.1:${server.port}`,
  chainId,
  // anvil's first development key (public): the payee that settles.
  privateKey: '0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80',
})
const escrow = '0x5FbDB2315678afecb367f032d93F642f64180aa3'
const channelId: Hex = `0x${'ab'.repeat(32)}`

const hex = (max: number) =>
  fc.uint8Array({ maxLength: max }).map((b) => `0x${Buffer.from(b).toString('hex')}` as Hex)
const customErrors = abi.filter(
  (item): item is Extract<(typeof abi)[number], { type: 'error' }> =>
    item.type === 'error' && item.inputs.length === 0,
)
/** Names an object has without owning them: a lookup by name must not find them. */
const inherited = ['toString', 'constructor', '__proto__', 'valueOf', 'hasOwnProperty']
const reason = fc.oneof(fc.string({ maxLength: 30 }), fc.constantFrom(...inherited))
const data: fc.Arbitrary<Hex | undefined> = fc.oneof(
  fc.constant(undefined),
  hex(40),
  fc
    .tuple(fc.constantFrom(...customErrors), hex(8))
    .map(
      ([e, tail]) =>
        `${encodeErrorResult({ abi: [e], errorName: e.name } as never)}${tail.slice(2)}` as Hex,
    ),
  reason.map((r) => `0x08c379a0${encodeAbiParameters([{ type: 'string' }], [r]).slice(2)}` as Hex),
  fc
    .bigInt({ min: 0n, max: 2n ** 256n - 1n })
    .map((n) => `0x4e487b71${encodeAbiParameters([{ type: 'uint256' }], [n]).slice(2)}` as Hex),
)
const message = fc.oneof(
  reason,
  reason.map((r) => `execution reverted: ${r}`),
  fc.constant('execution reverted'),
)

/** The revert as the payer and the operator see it: typed, with plain text. */
function expectTyped(error: unknown) {
  expect(error).toBeInstanceOf(ChainErrors.TransactionRevertedError)
  const e = error as ChainErrors.TransactionRevertedError
  expect(e.message).not.toContain('native code')
  const problem = ChainEscrow.problem(e, channelId)
  expect(problem).toBeInstanceOf(PaymentProblem)
  expect((problem as PaymentProblem).status).toBeGreaterThanOrEqual(400)
  expect((problem as PaymentProblem).status).toBeLessThan(500)
  const described = ChainErrors.describe(e)
  expect(typeof described.name).toBe('string')
  expect(typeof described.message).toBe('string')
}

describe('a revert the node answers', () => {
  test('error: a revert named only by a message that is a name every object has is a ChainErrors.TransactionRevertedError and a problem of the draft', async () => {
    for (const name of inherited) {
      revert = { code: 3, message: name }
      const error = await Escrow.settle(client, {
        escrow,
        channelId,
        cumulativeAmount: 1n,
        signature: `0x${'00'.repeat(65)}`,
      }).catch((e: unknown) => e)
      expectTyped(error)
      expect((error as ChainErrors.TransactionRevertedError).message).toContain(
        'Check the channel state and arguments',
      )
      expect((ChainEscrow.problem(error, channelId) as PaymentProblem).kind).toBe(
        'session/transaction-reverted',
      )
    }
  })

  test('property: any revert data or message gives a ChainErrors.TransactionRevertedError and a problem of the draft', async () => {
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(3, -32000), message, data, async (code, text, bytes) => {
        revert = { code, message: text, ...(bytes === undefined ? {} : { data: bytes }) }
        const settled = await Escrow.settle(client, {
          escrow,
          channelId,
          cumulativeAmount: 1n,
          signature: `0x${'00'.repeat(65)}`,
        }).catch((e: unknown) => e)
        // Code -32000 with a message other than "execution reverted" is the node refusing
        // the call, not a revert: viem's error as it is, which the route answers as a 503.
        if (!(settled instanceof ChainErrors.TransactionRevertedError)) {
          expect(code).toBe(-32000)
          return
        }
        expectTyped(settled)
      }),
      { numRuns: 300, seed: 20261125 },
    )
  }, 30_000)
})
