/**
 * Sending a contract call and waiting for it: simulate first (a revert there is decoded into the
 * contract's custom error and nothing is sent), then send, then wait for the receipt. A mined
 * `status: reverted` is a definite failure, never "still pending".
 */
import {
  type Abi,
  type Address,
  BaseError,
  ContractFunctionRevertedError,
  type Hash,
  type TransactionReceipt,
} from 'viem'
import { simulateContract, waitForTransactionReceipt, writeContract } from 'viem/actions'
import type { Client } from './Client.ts'
import { AccountRequiredError, TransactionRevertedError } from './Errors.ts'

export type Call = {
  address: Address
  abi: Abi
  functionName: string
  args: readonly unknown[]
}

export type Sent<result = unknown> = { hash: Hash; receipt: TransactionReceipt; result: result }

export type SendOptions = {
  /** Called with the hash once the node accepted the transaction, before waiting for it (to record it). */
  onSubmitted?: ((hash: Hash) => void | Promise<void>) | undefined
}

/** Simulates, sends and waits for `call`; throws TransactionRevertedError on any revert. */
export async function send<result = unknown>(
  client: Client,
  call: Call,
  options: SendOptions = {},
): Promise<Sent<result>> {
  const account = client.account
  if (!account) throw new AccountRequiredError(call.functionName)
  let simulated: { request: unknown; result: unknown }
  try {
    simulated = await simulateContract(client, { ...call, account } as never)
  } catch (error) {
    throw toReverted(error, call.functionName)
  }
  let hash: Hash
  try {
    hash = await writeContract(client, simulated.request as never)
  } catch (error) {
    // The nonce may have been handed out without a transaction using it: ask the node again.
    account.nonceManager?.reset({ address: account.address, chainId: client.chain.id })
    throw toReverted(error, call.functionName)
  }
  await options.onSubmitted?.(hash)
  const receipt = await wait(client, { hash, functionName: call.functionName })
  return { hash, receipt, result: simulated.result as result }
}

/** Waits for a sent transaction; a mined `status: reverted` throws TransactionRevertedError. */
export async function wait(
  client: Client,
  parameters: { hash: Hash; functionName: string },
): Promise<TransactionReceipt> {
  const receipt = await waitForTransactionReceipt(client, { hash: parameters.hash })
  if (receipt.status === 'reverted') throw new TransactionRevertedError({ ...parameters, receipt })
  return receipt
}

/** A revert becomes TransactionRevertedError; anything else (network, RPC) is rethrown as is. */
export function toReverted(error: unknown, functionName: string): unknown {
  if (!(error instanceof BaseError)) return error
  const revert = error.walk((e) => e instanceof ContractFunctionRevertedError)
  if (!(revert instanceof ContractFunctionRevertedError)) return error
  return new TransactionRevertedError({
    functionName,
    errorName: revert.data?.errorName ?? revert.reason,
    details: revert.shortMessage,
    cause: error,
  })
}
