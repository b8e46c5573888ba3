/**
 * Sending a contract call and waiting for it: simulate first (a revert there is decoded into the
 * contract's custom error and nothing is sent), then send (a revert when the node estimates its
 * gas is decoded the same way), then wait for the receipt. A mined `status: reverted` is a
 * definite failure, never "still pending".
 */
import {
  type Abi,
  type Address,
  BaseError,
  ContractFunctionRevertedError,
  type Hash,
  NonceTooLowError,
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
  /**
   * Simulate on the pending block (the one the transaction is mined in) rather than the latest:
   * for a call that depends on the time (a withdraw after the grace period), on a chain that
   * mines only on transactions (anvil), whose latest block keeps its last transaction's time.
   * A node that refuses the pending block tag (an RPC error, not a revert) is asked for the
   * latest block's instead.
   */
  pending?: boolean | undefined
}

/** Runs `fn` with no other sender of the same account running (see `exclusive`). */
export type Exclusive = <T>(fn: () => Promise<T>) => Promise<T>

const exclusives = new WeakMap<object, Exclusive>()

/**
 * Makes `client`'s sends take turns with every other sender of its account: `run` is a lock
 * shared by all the gateway's instances (main.ts passes a Postgres advisory lock). Held
 * from the nonce to the node's acceptance, not while the transaction is mined: without it
 * two instances pick the same pending nonce, and the node refuses one transaction or
 * replaces it with the other, whose sender then waits for a receipt that never comes.
 */
export function exclusive(client: Client, run: Exclusive): void {
  exclusives.set(client, run)
}

const alone: Exclusive = (fn) => fn()

/**
 * How many times a send is tried when its nonce was taken. Every instance of the gateway
 * sends from the payee's key with its own nonce manager, so two of them (or one whose
 * manager was reset mid-flight) can pick the same pending nonce; the node refuses the
 * second, which then asks the node again. A refused transaction was never accepted, so
 * trying again cannot send anything twice.
 */
const attempts = 8

/** Simulates, sends and waits for `call`; throws TransactionRevertedError on any revert. */
export async function send<result = unknown>(
  client: Client,
  call: Call,
  options: SendOptions = {},
): Promise<Sent<result>> {
  const account = client.account
  if (!account) throw new AccountRequiredError(call.functionName)
  const turn = exclusives.get(client) ?? alone
  for (let attempt = 1; ; attempt++) {
    const sent = await turn(async () => {
      let simulated: { request: unknown; result: unknown }
      const simulate = (pending: boolean) =>
        simulateContract(client, {
          ...call,
          account,
          ...(pending ? { blockTag: 'pending' } : {}),
        } as never) as Promise<{ request: unknown; result: unknown }>
      try {
        // Again on every attempt: another instance may have changed the state meanwhile.
        simulated = await simulate(options.pending === true).catch((error: unknown) => {
          // A node without a pending block (some providers refuse the tag on eth_call) answers
          // an RPC error, not a revert: the latest block then, as ChainClient.now reads it.
          if (
            options.pending &&
            !(toReverted(error, call.functionName, call.abi) instanceof TransactionRevertedError)
          )
            return simulate(false)
          throw error
        })
      } catch (error) {
        throw toReverted(error, call.functionName, call.abi)
      }
      try {
        // The call's whole ABI, not the simulation's request's (the function alone): the gas
        // estimate may revert where the simulation did not (the state moved in between, or the
        // node estimates on its pending block, where a transaction of this account waits), and
        // viem decodes that revert with the ABI it is given, which must hold the custom errors.
        const request = { ...(simulated.request as object), abi: call.abi }
        return { hash: await writeContract(client, request as never), simulated }
      } catch (error) {
        // The nonce may have been handed out without a transaction using it: ask the node again.
        account.nonceManager?.reset({ address: account.address, chainId: client.chain.id })
        if (attempt < attempts && nonceTaken(error)) return undefined
        throw toReverted(error, call.functionName, call.abi)
      }
    })
    if (!sent) {
      await new Promise((r) => setTimeout(r, Math.random() * 20 * attempt))
      continue
    }
    const { hash, simulated } = sent
    await options.onSubmitted?.(hash)
    const receipt = await wait(client, { hash, functionName: call.functionName })
    return { hash, receipt, result: simulated.result as result }
  }
}

/**
 * Whether the node refused a transaction because its nonce was already used (by another
 * sender with the same key). Not "already known": that is this very transaction, already
 * in the pool, and sending it again under a new nonce would send it twice.
 */
function nonceTaken(error: unknown): boolean {
  if (!(error instanceof BaseError)) return false
  const details = error.details?.toLowerCase() ?? ''
  if (details.includes('already known') || details.includes('already imported')) return false
  return (
    error.walk((e) => e instanceof NonceTooLowError) instanceof NonceTooLowError ||
    details.includes('replacement transaction underpriced')
  )
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

/**
 * A revert becomes TransactionRevertedError, its custom error decoded with `abi` when viem
 * could not (it decodes with the ABI its action was given, which may lack the error); anything
 * else (network, RPC) is returned as is.
 */
export function toReverted(error: unknown, functionName: string, abi?: Abi): unknown {
  if (!(error instanceof BaseError)) return error
  const found = error.walk((e) => e instanceof ContractFunctionRevertedError)
  if (!(found instanceof ContractFunctionRevertedError)) return error
  let revert = found
  if (!revert.data && revert.raw && abi) {
    const decoded = new ContractFunctionRevertedError({ abi, data: revert.raw, functionName })
    if (decoded.data) revert = decoded
  }
  return new TransactionRevertedError({
    functionName,
    errorName: revert.data?.errorName ?? revert.reason,
    details: revert.shortMessage,
    cause: error,
  })
}
