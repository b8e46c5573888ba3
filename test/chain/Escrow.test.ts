import { afterAll, beforeAll, beforeEach, describe, expect, test } from 'bun:test'
import { secp256k1 } from '@noble/curves/secp256k1.js'
import { type Hex, keccak256, toHex, zeroAddress } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import { getBalance, readContract, writeContract } from 'viem/actions'
import * as Client from '../../src/chain/Client.ts'
import { AccountRequiredError, TransactionRevertedError } from '../../src/chain/Errors.ts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import * as Transaction from '../../src/chain/Transaction.ts'
import * as Voucher from '../../src/chain/Voucher.ts'
import * as ChainEscrow from '../../src/payment/evm/ChainEscrow.ts'
import type { PaymentProblem } from '../../src/payment/Problem.ts'
import * as Anvil from '../helpers/Anvil.ts'

let chain: Anvil.TestChain
beforeAll(async () => {
  chain = await Anvil.start()
})
afterAll(() => chain?.stop())
beforeEach(() => chain.reset())

const salt = keccak256(toHex('salt 1'))
const deposit = 1_000_000n

function payer(index = 0) {
  const p = chain.payers[index]!
  return { ...p, account: privateKeyToAccount(p.privateKey), client: chain.payerClient(index) }
}

async function openChannel(parameters: { authorizedSigner?: Hex } = {}) {
  const { client } = payer()
  return Escrow.open(client, {
    escrow: chain.escrowAddress,
    payee: chain.payee.address,
    token: chain.currencyAddress,
    deposit,
    salt,
    ...parameters,
  })
}

async function voucher(channelId: Hex, cumulativeAmount: bigint, index = 0) {
  return Voucher.sign(payer(index).account, {
    chainId: chain.chainId,
    escrow: chain.escrowAddress,
    channelId,
    cumulativeAmount,
  })
}

async function reverted(promise: Promise<unknown>): Promise<TransactionRevertedError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  )
  expect(error).toBeInstanceOf(TransactionRevertedError)
  return error as TransactionRevertedError
}

const balance = (owner: Hex) =>
  Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner })

describe('computeChannelId', () => {
  test('behavior: equals the contract computation and the id open returns', async () => {
    const parameters = {
      payer: payer().address,
      payee: chain.payee.address,
      token: chain.currencyAddress,
      salt,
      authorizedSigner: zeroAddress,
    }
    const onChain = await readContract(chain.payeeClient, {
      address: chain.escrowAddress,
      abi: Escrow.abi,
      functionName: 'computeChannelId',
      args: [parameters.payer, parameters.payee, parameters.token, salt, zeroAddress],
    })
    const local = Escrow.computeChannelId({
      ...parameters,
      escrow: chain.escrowAddress,
      chainId: chain.chainId,
    })
    expect(local).toBe(onChain)
    expect((await openChannel()).channelId).toBe(local)
  })
})

describe('openNonce / topUpNonce', () => {
  test('behavior: equal the contract derivations', async () => {
    const from = payer().address
    const open = await readContract(chain.payeeClient, {
      address: chain.escrowAddress,
      abi: Escrow.abi,
      functionName: 'computeOpenNonce',
      args: [from, chain.payee.address, chain.currencyAddress, salt, zeroAddress],
    })
    expect(
      Escrow.openNonce({ from, payee: chain.payee.address, token: chain.currencyAddress, salt }),
    ).toBe(open)
    const topUp = await readContract(chain.payeeClient, {
      address: chain.escrowAddress,
      abi: Escrow.abi,
      functionName: 'computeTopUpNonce',
      args: [salt, 5n, from, salt],
    })
    expect(
      Escrow.topUpNonce({ channelId: salt, additionalDeposit: 5n, from, topUpSalt: salt }),
    ).toBe(topUp)
  })
})

describe('open', () => {
  test('behavior: approves, opens and moves the deposit into the escrow', async () => {
    const before = await balance(payer().address)
    const { channelId, receipt } = await openChannel()
    expect(receipt.status).toBe('success')
    expect(
      await Escrow.getChannel(chain.payeeClient, { escrow: chain.escrowAddress, channelId }),
    ).toEqual({
      payer: payer().address,
      payee: chain.payee.address,
      token: chain.currencyAddress,
      authorizedSigner: zeroAddress,
      deposit,
      settled: 0n,
      closeRequestedAt: 0n,
      finalized: false,
    })
    expect(await balance(payer().address)).toBe(before - deposit)
    expect(await balance(chain.escrowAddress)).toBe(deposit)
  })

  test('error: an existing channel reverts with ChannelAlreadyExists', async () => {
    await openChannel()
    const error = await reverted(openChannel())
    expect(error.errorName).toBe('ChannelAlreadyExists')
  })

  test('error: a client without an account cannot send', async () => {
    const readOnly = Client.from({ rpcUrl: chain.rpcUrl, chainId: chain.chainId })
    const error = await Escrow.requestClose(readOnly, {
      escrow: chain.escrowAddress,
      channelId: salt,
    }).catch((e: unknown) => e)
    expect(error).toBeInstanceOf(AccountRequiredError)
  })
})

describe('getChannel', () => {
  test('behavior: undefined for an unknown channel', async () => {
    expect(
      await Escrow.getChannel(chain.payeeClient, { escrow: chain.escrowAddress, channelId: salt }),
    ).toBeUndefined()
  })
})

describe('openWithAuthorization', () => {
  async function authorization(parameters: { payee?: Hex } = {}) {
    const { account, address } = payer()
    const nonce = Escrow.openNonce({
      from: address,
      payee: parameters.payee ?? chain.payee.address,
      token: chain.currencyAddress,
      salt,
    })
    const domain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
    const signature = await Token.signReceiveAuthorization(account, {
      domain,
      from: address,
      to: chain.escrowAddress,
      value: deposit,
      validAfter: 0n,
      validBefore: 2n ** 48n,
      nonce,
    })
    return { from: address, validAfter: 0n, validBefore: 2n ** 48n, nonce, signature }
  }

  test('behavior: the payee submits the payer-signed authorization; the payer pays no gas', async () => {
    const auth = await authorization()
    const gasBefore = await getBalance(chain.payeeClient, { address: payer().address })
    const { channelId } = await Escrow.openWithAuthorization(chain.payeeClient, {
      escrow: chain.escrowAddress,
      payee: chain.payee.address,
      token: chain.currencyAddress,
      deposit,
      salt,
      ...auth,
    })
    const channel = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(channel?.payer).toBe(payer().address)
    expect(channel?.deposit).toBe(deposit)
    expect(await balance(chain.escrowAddress)).toBe(deposit)
    expect(await getBalance(chain.payeeClient, { address: payer().address })).toBe(gasBefore)
  })

  test('error: a nonce for other channel parameters reverts with NonceMismatch', async () => {
    const auth = await authorization({ payee: payer(1).address })
    const error = await reverted(
      Escrow.openWithAuthorization(chain.payeeClient, {
        escrow: chain.escrowAddress,
        payee: chain.payee.address,
        token: chain.currencyAddress,
        deposit,
        salt,
        ...auth,
      }),
    )
    expect(error.errorName).toBe('NonceMismatch')
  })
})

describe('topUp', () => {
  test('behavior: adds to the deposit', async () => {
    const { channelId } = await openChannel()
    await Escrow.topUp(payer().client, {
      escrow: chain.escrowAddress,
      channelId,
      token: chain.currencyAddress,
      amount: 5n,
    })
    const channel = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(channel?.deposit).toBe(deposit + 5n)
  })

  test('error: someone else than the payer reverts with NotPayer', async () => {
    const { channelId } = await openChannel()
    const error = await reverted(
      Escrow.topUp(payer(1).client, {
        escrow: chain.escrowAddress,
        channelId,
        token: chain.currencyAddress,
        amount: 5n,
      }),
    )
    expect(error.errorName).toBe('NotPayer')
  })
})

describe('topUpWithAuthorization', () => {
  test('behavior: a relayed top-up signed by the payer', async () => {
    const { channelId } = await openChannel()
    const { account, address } = payer()
    const topUpSalt = keccak256(toHex('top-up 1'))
    const nonce = Escrow.topUpNonce({ channelId, additionalDeposit: 7n, from: address, topUpSalt })
    const signature = await Token.signReceiveAuthorization(account, {
      domain: await Token.domain(chain.payeeClient, { token: chain.currencyAddress }),
      from: address,
      to: chain.escrowAddress,
      value: 7n,
      validAfter: 0n,
      validBefore: 2n ** 48n,
      nonce,
    })
    await Escrow.topUpWithAuthorization(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
      additionalDeposit: 7n,
      from: address,
      topUpSalt,
      validAfter: 0n,
      validBefore: 2n ** 48n,
      nonce,
      signature,
    })
    const channel = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(channel?.deposit).toBe(deposit + 7n)
  })
})

describe('settle', () => {
  test('behavior: pays the payee the delta and keeps the channel open', async () => {
    const { channelId } = await openChannel()
    const escrow = chain.escrowAddress
    await Escrow.settle(chain.payeeClient, {
      escrow,
      channelId,
      cumulativeAmount: 300n,
      signature: await voucher(channelId, 300n),
    })
    await Escrow.settle(chain.payeeClient, {
      escrow,
      channelId,
      cumulativeAmount: 500n,
      signature: await voucher(channelId, 500n),
    })
    const channel = await Escrow.getChannel(chain.payeeClient, { escrow, channelId })
    expect(channel?.settled).toBe(500n)
    expect(channel?.finalized).toBe(false)
    expect(await balance(escrow)).toBe(deposit - 500n)
  })

  test('behavior: concurrent settlements from one payee account all land', async () => {
    const escrow = chain.escrowAddress
    const channels = await Promise.all(
      [0, 1, 2].map((index) =>
        Escrow.open(payer(index).client, {
          escrow,
          payee: chain.payee.address,
          token: chain.currencyAddress,
          deposit,
          salt,
        }),
      ),
    )
    await Promise.all(
      channels.map(async ({ channelId }, index) =>
        Escrow.settle(chain.payeeClient, {
          escrow,
          channelId,
          cumulativeAmount: 10n,
          signature: await voucher(channelId, 10n, index),
        }),
      ),
    )
    expect(await balance(escrow)).toBe(3n * (deposit - 10n))
  })

  test('error: a stale voucher reverts with AmountNotIncreasing', async () => {
    const { channelId } = await openChannel()
    const signature = await voucher(channelId, 300n)
    const escrow = chain.escrowAddress
    await Escrow.settle(chain.payeeClient, { escrow, channelId, cumulativeAmount: 300n, signature })
    const error = await reverted(
      Escrow.settle(chain.payeeClient, { escrow, channelId, cumulativeAmount: 300n, signature }),
    )
    expect(error.errorName).toBe('AmountNotIncreasing')
  })

  test('error: a high-s voucher reverts with InvalidSignature', async () => {
    const { channelId } = await openChannel()
    const signature = await voucher(channelId, 300n)
    const n = secp256k1.Point.Fn.ORDER
    const s = BigInt(`0x${signature.slice(66, 130)}`)
    const v = Number.parseInt(signature.slice(130), 16)
    const high =
      `${signature.slice(0, 66)}${(n - s).toString(16).padStart(64, '0')}${(55 - v).toString(16)}` as Hex
    const error = await reverted(
      Escrow.settle(chain.payeeClient, {
        escrow: chain.escrowAddress,
        channelId,
        cumulativeAmount: 300n,
        signature: high,
      }),
    )
    expect(error.errorName).toBe('InvalidSignature')
  })
})

describe('simulateSettle', () => {
  test('behavior: resolves for a voucher the escrow would accept, sends nothing', async () => {
    const { channelId } = await openChannel()
    const parameters = { escrow: chain.escrowAddress, channelId, payee: chain.payee.address }
    await Escrow.simulateSettle(chain.payeeClient, {
      ...parameters,
      cumulativeAmount: 10n,
      signature: await voucher(channelId, 10n),
    })
    expect((await Escrow.getChannel(chain.payeeClient, parameters))?.settled).toBe(0n)
  })

  test('error: a voucher signed by someone else is InvalidSignature', async () => {
    const { channelId } = await openChannel()
    const error = await reverted(
      Escrow.simulateSettle(chain.payeeClient, {
        escrow: chain.escrowAddress,
        channelId,
        payee: chain.payee.address,
        cumulativeAmount: 10n,
        signature: await voucher(channelId, 10n, 1),
      }),
    )
    expect(error.errorName).toBe('InvalidSignature')
  })
})

describe('ChainEscrow verifyVoucher', () => {
  test('behavior: a voucher by the key of a payer whose account has code (an EIP-7702 delegation) is taken, as the escrow settles it; another key is still refused', async () => {
    const { channelId } = await openChannel()
    const signature = await voucher(channelId, 300n)
    const other = await voucher(channelId, 300n, 1)
    // An EIP-7702 designator delegating to the token, which has no ERC-1271.
    await chain.setCode(payer().address, `0xef0100${chain.currencyAddress.slice(2)}`)
    const gateway = ChainEscrow.create({
      client: chain.payeeClient,
      escrow: chain.escrowAddress,
      currency: chain.currencyAddress,
      chainId: chain.chainId,
      close: () => Promise.reject(new Error('not used')),
    })
    try {
      const v = { channelId, cumulativeAmount: 300n, signer: payer().address }
      await gateway.verifyVoucher({ ...v, signature })
      const refused = await Promise.resolve(
        gateway.verifyVoucher({ ...v, signature: other }),
      ).catch((e: unknown) => e)
      expect((refused as PaymentProblem).kind).toBe('session/signer-mismatch')
    } finally {
      gateway.stop()
    }
    // What the gateway took, the escrow pays.
    await Escrow.settle(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
      cumulativeAmount: 300n,
      signature,
    })
    const channel = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(channel?.settled).toBe(300n)
  }, 30_000)
})

describe('close', () => {
  test('behavior: settles the final voucher and refunds the payer', async () => {
    const { channelId } = await openChannel()
    const before = await balance(payer().address)
    await Escrow.close(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
      cumulativeAmount: 400n,
      signature: await voucher(channelId, 400n),
    })
    const channel = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
    })
    expect(channel?.finalized).toBe(true)
    expect(await balance(payer().address)).toBe(before + deposit - 400n)
    expect(await balance(chain.escrowAddress)).toBe(0n)
  })

  test('behavior: forfeit path with an empty signature', async () => {
    const { channelId } = await openChannel()
    await Escrow.close(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId,
      cumulativeAmount: 0n,
      signature: '0x',
    })
    expect(await balance(chain.escrowAddress)).toBe(0n)
  })
})

describe('requestClose / withdraw', () => {
  test('behavior: withdraw works once the grace period has passed, not before', async () => {
    const { channelId } = await openChannel()
    const { client, address } = payer()
    const escrow = chain.escrowAddress
    const seen: Escrow.CloseRequest[] = []
    const unwatch = Escrow.watchCloseRequested(chain.payeeClient, {
      escrow,
      onCloseRequested: (request) => seen.push(request),
    })
    try {
      await Escrow.requestClose(client, { escrow, channelId })
      const early = await reverted(Escrow.withdraw(client, { escrow, channelId }))
      expect(early.errorName).toBe('CloseNotReady')
      await chain.increaseTime(Number(Escrow.closeGracePeriod))
      const before = await balance(address)
      await Escrow.withdraw(client, { escrow, channelId })
      expect(await balance(address)).toBe(before + deposit)
      for (let i = 0; i < 50 && seen.length === 0; i++) await Bun.sleep(20)
      expect(seen.map((r) => [r.channelId, r.payer])).toEqual([[channelId, address]])
    } finally {
      unwatch()
    }
  })

  test('behavior: withdraw works through a node that refuses the pending block tag', async () => {
    // Some providers answer eth_call and eth_getBlockByNumber on "pending" with an error (no
    // pending block): a real JSON-RPC server of the test in front of anvil refuses them so.
    const proxy = Bun.serve({
      port: 0,
      hostname: '127.0.0.1',
      async fetch(req) {
        const text = await req.text()
        const call = JSON.parse(text) as { id: number; method: string; params?: unknown[] }
        if (
          (call.method === 'eth_call' || call.method === 'eth_getBlockByNumber') &&
          JSON.stringify(call.params ?? []).includes('"pending"')
        )
          return Response.json({
            jsonrpc: '2.0',
            id: call.id,
            error: { code: -32602, message: 'unsupported block tag: pending' },
          })
        return fetch(chain.rpcUrl, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: text,
        })
      },
    })
    try {
      const { channelId } = await openChannel()
      const { address, privateKey } = payer()
      const escrow = chain.escrowAddress
      await Escrow.requestClose(payer().client, { escrow, channelId })
      await chain.increaseTime(Number(Escrow.closeGracePeriod))
      const client = Client.from({
        rpcUrl: `http://127.0.0.1:${proxy.port}`,
        chainId: chain.chainId,
        privateKey,
        pollingInterval: 20,
      })
      const before = await balance(address)
      await Escrow.withdraw(client, { escrow, channelId })
      expect(await balance(address)).toBe(before + deposit)
    } finally {
      proxy.stop(true)
    }
  }, 30_000)
})

describe('Transaction.wait', () => {
  test('error: a mined reverted transaction is a TransactionRevertedError, not pending', async () => {
    // Explicit gas skips estimation, so the revert happens on-chain and shows in the receipt.
    const hash = await writeContract(chain.payeeClient, {
      address: chain.escrowAddress,
      abi: Escrow.abi,
      functionName: 'withdraw',
      args: [salt],
      gas: 100_000n,
    })
    const error = await reverted(
      Transaction.wait(chain.payeeClient, { hash, functionName: 'withdraw' }),
    )
    expect(error.receipt?.status).toBe('reverted')
    expect(error.hash).toBe(hash)
  })
})

describe('Transaction.send', () => {
  test('error: a revert at gas estimation, after the simulation passed, is decoded into the escrow custom error', async () => {
    const { channelId } = await openChannel()
    const escrow = chain.escrowAddress
    const rpc = (method: string, params: unknown[] = []) =>
      chain.payeeClient.request({ method, params } as never)
    // The payee's close waits in the pool: anvil simulates (eth_call) on the latest block,
    // where the channel is open, and estimates gas on the pending one, where it is closed. So
    // the simulation passes and the estimation reverts with the escrow's ChannelFinalized.
    await rpc('evm_setAutomine', [false])
    let closing: Promise<unknown> | undefined
    let error: unknown
    try {
      const submitted = Promise.withResolvers<void>()
      closing = Escrow.close(
        chain.payeeClient,
        { escrow, channelId, cumulativeAmount: 100n, signature: await voucher(channelId, 100n) },
        { onSubmitted: () => submitted.resolve() },
      )
      await submitted.promise
      const before = await rpc('eth_getBlockTransactionCountByNumber', ['pending'])
      error = await Escrow.settle(chain.payeeClient, {
        escrow,
        channelId,
        cumulativeAmount: 300n,
        signature: await voucher(channelId, 300n),
      }).catch((e: unknown) => e)
      // Refused before sending: nothing more waits in the pool.
      expect(await rpc('eth_getBlockTransactionCountByNumber', ['pending'])).toBe(before)
    } finally {
      await rpc('evm_setAutomine', [true])
      await rpc('evm_mine')
    }
    await closing
    expect(error).toBeInstanceOf(TransactionRevertedError)
    expect((error as TransactionRevertedError).errorName).toBe('ChannelFinalized')
    expect((error as TransactionRevertedError).hash).toBeUndefined()
    // What the gateway answers a payer with: the draft's problem type for that revert.
    const problem = ChainEscrow.problem(error, channelId) as PaymentProblem
    expect(problem.kind).toBe('session/channel-finalized')
    expect((await Escrow.getChannel(chain.payeeClient, { escrow, channelId }))?.settled).toBe(100n)
  }, 30_000)

  test('error: a revert the token causes (DepositNotReceived, ReentrancyGuardReentrantCall) names the token as the cause, not the arguments', () => {
    for (const [errorName, said, problemSays] of [
      [
        'DepositNotReceived',
        'The token delivered less to the escrow than the deposit',
        'cannot fund channels',
      ],
      [
        'ReentrancyGuardReentrantCall',
        'The token called back into the escrow',
        'cannot fund or pay out channels',
      ],
    ] as const) {
      const error = new TransactionRevertedError({ functionName: 'open', errorName })
      expect(error.message).toContain(said)
      expect(error.message).not.toContain('Check the channel state and arguments')
      const problem = ChainEscrow.problem(error, `0x${'ab'.repeat(32)}`) as PaymentProblem
      expect(problem.kind).toBe('session/transaction-reverted')
      expect(problem.message).toContain(problemSays)
    }
  })
})
