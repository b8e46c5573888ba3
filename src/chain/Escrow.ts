/**
 * The PaymentChannelEscrow contract (draft-evm-session-00, "Channel Escrow Contract"): pure
 * channelId / nonce derivations, channel reads, and client-first writes that wait for their
 * receipt and throw TransactionRevertedError on any revert.
 */
import {
  type Address,
  encodeAbiParameters,
  type Hex,
  keccak256,
  parseEventLogs,
  zeroAddress,
} from 'viem'
import { getLogs, readContract, simulateContract, watchContractEvent } from 'viem/actions'
import type { Client } from './Client.ts'
import { abi } from './generated/PaymentChannelEscrow.ts'
import * as Token from './Token.ts'
import * as Transaction from './Transaction.ts'

export { abi }

/** Seconds between `requestClose` and the earliest `withdraw`. */
export const closeGracePeriod = 15n * 60n

/**
 * The shortest close grace period the draft allows an escrow ("Forced Close"): the time the
 * server has to settle before a payer who asked to close can withdraw.
 */
export const minCloseGracePeriod = 10n * 60n

/** The escrow's own `CLOSE_GRACE_PERIOD`, seconds. */
export async function gracePeriod(
  client: Client,
  parameters: { escrow: Address },
): Promise<bigint> {
  return BigInt(
    await readContract(client, {
      address: parameters.escrow,
      abi,
      functionName: 'CLOSE_GRACE_PERIOD',
    }),
  )
}

/** A channel as the escrow stores it. Amounts in token base units. */
export type Channel = {
  payer: Address
  payee: Address
  token: Address
  /** Zero address: the payer signs vouchers. */
  authorizedSigner: Address
  deposit: bigint
  settled: bigint
  /** Unix seconds; 0n when no close is pending. */
  closeRequestedAt: bigint
  finalized: boolean
}

/** The address whose signature vouchers need: authorizedSigner, or the payer when it is zero. */
export function signerOf(channel: Pick<Channel, 'payer' | 'authorizedSigner'>): Address {
  return channel.authorizedSigner === zeroAddress ? channel.payer : channel.authorizedSigner
}

/** channelId = keccak256(abi.encode(payer, payee, token, salt, authorizedSigner, escrow, chainId)). */
export function computeChannelId(parameters: {
  payer: Address
  payee: Address
  token: Address
  salt: Hex
  authorizedSigner?: Address | undefined
  escrow: Address
  chainId: number
}): Hex {
  return keccak256(
    encodeAbiParameters(
      [
        { type: 'address' },
        { type: 'address' },
        { type: 'address' },
        { type: 'bytes32' },
        { type: 'address' },
        { type: 'address' },
        { type: 'uint256' },
      ],
      [
        parameters.payer,
        parameters.payee,
        parameters.token,
        parameters.salt,
        parameters.authorizedSigner ?? zeroAddress,
        parameters.escrow,
        BigInt(parameters.chainId),
      ],
    ),
  )
}

/** The EIP-3009 nonce `openWithAuthorization` requires: keccak256(abi.encode(from, payee, token, salt, authorizedSigner)). */
export function openNonce(parameters: {
  from: Address
  payee: Address
  token: Address
  salt: Hex
  authorizedSigner?: Address | undefined
}): Hex {
  return keccak256(
    encodeAbiParameters(
      [
        { type: 'address' },
        { type: 'address' },
        { type: 'address' },
        { type: 'bytes32' },
        { type: 'address' },
      ],
      [
        parameters.from,
        parameters.payee,
        parameters.token,
        parameters.salt,
        parameters.authorizedSigner ?? zeroAddress,
      ],
    ),
  )
}

/** The EIP-3009 nonce `topUpWithAuthorization` requires: keccak256(abi.encode(channelId, additionalDeposit, from, topUpSalt)). */
export function topUpNonce(parameters: {
  channelId: Hex
  additionalDeposit: bigint
  from: Address
  topUpSalt: Hex
}): Hex {
  return keccak256(
    encodeAbiParameters(
      [{ type: 'bytes32' }, { type: 'uint128' }, { type: 'address' }, { type: 'bytes32' }],
      [parameters.channelId, parameters.additionalDeposit, parameters.from, parameters.topUpSalt],
    ),
  )
}

/** Reads a channel; `undefined` when the escrow has no channel with that id. */
export async function getChannel(
  client: Client,
  parameters: { escrow: Address; channelId: Hex },
): Promise<Channel | undefined> {
  const channel = await readContract(client, {
    address: parameters.escrow,
    abi,
    functionName: 'getChannel',
    args: [parameters.channelId],
  })
  if (channel.payer === zeroAddress) return undefined
  return { ...channel, closeRequestedAt: BigInt(channel.closeRequestedAt) }
}

/** The escrow's own voucher digest (used to pin the TypeScript digest to the contract's). */
export function voucherDigest(
  client: Client,
  parameters: { escrow: Address; channelId: Hex; cumulativeAmount: bigint },
): Promise<Hex> {
  return readContract(client, {
    address: parameters.escrow,
    abi,
    functionName: 'voucherDigest',
    args: [parameters.channelId, parameters.cumulativeAmount],
  })
}

export type Opened = Transaction.Sent<Hex> & { channelId: Hex }

/**
 * Approves the escrow (when the allowance is short) and opens a channel from the client's
 * account, which becomes the payer. For clients and tests; the gateway never calls it.
 */
export async function open(
  client: Client,
  parameters: {
    escrow: Address
    payee: Address
    token: Address
    deposit: bigint
    salt: Hex
    authorizedSigner?: Address | undefined
  },
): Promise<Opened> {
  await ensureAllowance(client, parameters.token, parameters.escrow, parameters.deposit)
  const sent = await Transaction.send<Hex>(client, {
    address: parameters.escrow,
    abi,
    functionName: 'open',
    args: [
      parameters.payee,
      parameters.token,
      parameters.deposit,
      parameters.salt,
      parameters.authorizedSigner ?? zeroAddress,
    ],
  })
  return { ...sent, channelId: sent.result }
}

/** Opens a channel funded by `from`'s EIP-3009 authorization; the client pays the gas. */
export async function openWithAuthorization(
  client: Client,
  parameters: {
    escrow: Address
    payee: Address
    token: Address
    deposit: bigint
    salt: Hex
    authorizedSigner?: Address | undefined
    from: Address
    validAfter: bigint
    validBefore: bigint
    nonce: Hex
    signature: Hex
  },
): Promise<Opened> {
  const sent = await Transaction.send<Hex>(client, {
    address: parameters.escrow,
    abi,
    functionName: 'openWithAuthorization',
    args: [
      parameters.payee,
      parameters.token,
      parameters.deposit,
      parameters.salt,
      parameters.authorizedSigner ?? zeroAddress,
      parameters.from,
      parameters.validAfter,
      parameters.validBefore,
      parameters.nonce,
      parameters.signature,
    ],
  })
  return { ...sent, channelId: sent.result }
}

/** Approves (when needed) and adds `amount` to a channel from the client's account (the payer). */
export async function topUp(
  client: Client,
  parameters: { escrow: Address; channelId: Hex; token: Address; amount: bigint },
): Promise<Transaction.Sent> {
  await ensureAllowance(client, parameters.token, parameters.escrow, parameters.amount)
  return Transaction.send(client, {
    address: parameters.escrow,
    abi,
    functionName: 'topUp',
    args: [parameters.channelId, parameters.amount],
  })
}

/** Adds funds to a channel from `from`'s EIP-3009 authorization; the client pays the gas. */
export function topUpWithAuthorization(
  client: Client,
  parameters: {
    escrow: Address
    channelId: Hex
    additionalDeposit: bigint
    from: Address
    topUpSalt: Hex
    validAfter: bigint
    validBefore: bigint
    nonce: Hex
    signature: Hex
  },
): Promise<Transaction.Sent> {
  return Transaction.send(
    client,
    {
      address: parameters.escrow,
      abi,
      functionName: 'topUpWithAuthorization',
      args: [
        parameters.channelId,
        parameters.additionalDeposit,
        parameters.from,
        parameters.topUpSalt,
        parameters.validAfter,
        parameters.validBefore,
        parameters.nonce,
        parameters.signature,
      ],
    },
    // Its EIP-3009 validity window is checked against the time of the block it is mined in
    // (see Client.now): a top-up that cancels a forced close is valid only after the request's
    // block (validAfter at its closeRequestedAt), which stays the latest on a chain that mines
    // only on transactions (anvil).
    { pending: true },
  )
}

/** Payee: collects up to `cumulativeAmount` with the payer's voucher, keeping the channel open. */
export function settle(
  client: Client,
  parameters: { escrow: Address; channelId: Hex; cumulativeAmount: bigint; signature: Hex },
  options?: Transaction.SendOptions,
): Promise<Transaction.Sent> {
  return Transaction.send(
    client,
    {
      address: parameters.escrow,
      abi,
      functionName: 'settle',
      args: [parameters.channelId, parameters.cumulativeAmount, parameters.signature],
    },
    options,
  )
}

/**
 * Checks a voucher with the escrow's own rules without sending anything (an `eth_call` of
 * `settle` from the payee). The path for signers the fast verifier cannot handle, such as
 * ERC-1271 contract wallets. Resolves when `settle` would succeed; otherwise throws
 * TransactionRevertedError (e.g. `InvalidSignature`, `AmountExceedsDeposit`).
 */
export async function simulateSettle(
  client: Client,
  parameters: {
    escrow: Address
    channelId: Hex
    cumulativeAmount: bigint
    signature: Hex
    payee: Address
  },
): Promise<void> {
  try {
    await simulateContract(client, {
      account: parameters.payee,
      address: parameters.escrow,
      abi,
      functionName: 'settle',
      args: [parameters.channelId, parameters.cumulativeAmount, parameters.signature],
    })
  } catch (error) {
    throw Transaction.toReverted(error, 'settle', abi)
  }
}

/**
 * Payee: settles the final voucher and refunds the rest to the payer. With `cumulativeAmount`
 * at or below `settled`, the signature may be `0x` and the payee forfeits the difference.
 */
export function close(
  client: Client,
  parameters: { escrow: Address; channelId: Hex; cumulativeAmount: bigint; signature: Hex },
  options?: Transaction.SendOptions,
): Promise<Transaction.Sent> {
  return Transaction.send(
    client,
    {
      address: parameters.escrow,
      abi,
      functionName: 'close',
      args: [parameters.channelId, parameters.cumulativeAmount, parameters.signature],
    },
    options,
  )
}

/** Payer: starts the 15-minute grace period of a forced close. */
export function requestClose(
  client: Client,
  parameters: { escrow: Address; channelId: Hex },
): Promise<Transaction.Sent> {
  return Transaction.send(client, {
    address: parameters.escrow,
    abi,
    functionName: 'requestClose',
    args: [parameters.channelId],
  })
}

/** Payer: takes back `deposit - settled` once the grace period has passed. */
export function withdraw(
  client: Client,
  parameters: { escrow: Address; channelId: Hex },
): Promise<Transaction.Sent> {
  return Transaction.send(
    client,
    { address: parameters.escrow, abi, functionName: 'withdraw', args: [parameters.channelId] },
    // Its time check is the block's it is mined in (see Client.now).
    { pending: true },
  )
}

export type CloseRequest = {
  channelId: Hex
  payer: Address
  closeRequestedAt: bigint
  blockNumber: bigint
}

/** Calls `onCloseRequested` for every `CloseRequested` event; returns a function that stops watching. */
export function watchCloseRequested(
  client: Client,
  parameters: {
    escrow: Address
    onCloseRequested: (request: CloseRequest) => void
    onError?: ((error: Error) => void) | undefined
  },
): () => void {
  return watchContractEvent(client, {
    address: parameters.escrow,
    abi,
    eventName: 'CloseRequested',
    onError: parameters.onError,
    onLogs: (logs) => {
      for (const log of logs) {
        parameters.onCloseRequested({
          channelId: log.args.channelId!,
          payer: log.args.payer!,
          closeRequestedAt: BigInt(log.args.closeRequestedAt!),
          blockNumber: log.blockNumber ?? 0n,
        })
      }
    },
  })
}

/** Calls `onWithdrawn` with the channel of every `Withdrawn` event (a payer took back what
 * was not settled, after the grace period); returns a function that stops watching. */
export function watchWithdrawn(
  client: Client,
  parameters: {
    escrow: Address
    onWithdrawn: (channelId: Hex) => void
    onError?: ((error: Error) => void) | undefined
  },
): () => void {
  return watchContractEvent(client, {
    address: parameters.escrow,
    abi,
    eventName: 'Withdrawn',
    onError: parameters.onError,
    onLogs: (logs) => {
      for (const log of logs) parameters.onWithdrawn(log.args.channelId!)
    },
  })
}

/** Events by which a payer moves a channel out of the open state (or back: a top-up cancels a
 * close request), or by which it is settled or closed (a settle the gateway lost track of is
 * still learnt). */
const closingEvents = abi.filter(
  (item) =>
    item.type === 'event' &&
    (item.name === 'CloseRequested' ||
      item.name === 'CloseRequestCancelled' ||
      item.name === 'Withdrawn' ||
      item.name === 'ChannelClosed' ||
      item.name === 'Settled'),
)

/** The shape of each closing event's logs: its selector and a topic per indexed input, and a
 * word of data per other input (all of them static). */
const closingShapes = new Map(
  closingEvents.map((e) => {
    const indexed = e.inputs.filter((i) => 'indexed' in i && i.indexed).length
    return [e.name, { topics: 1 + indexed, data: 2 + 64 * (e.inputs.length - indexed) }]
  }),
)

/**
 * The channels with a `CloseRequested`, `CloseRequestCancelled`, `Withdrawn`, `ChannelClosed`
 * or `Settled` event in the
 * blocks from `fromBlock` to `toBlock` (inclusive), in chain order, each once. The node's
 * answer is outside input: a log that is not one the escrow emits (another contract's, one
 * with topics or data that do not decode as the event's, or more of them than it has) gives no
 * channel; an answer that is not a list of logs throws.
 */
export async function closings(
  client: Client,
  parameters: { escrow: Address; fromBlock: bigint; toBlock: bigint },
): Promise<Hex[]> {
  const logs = await getLogs(client, {
    address: parameters.escrow,
    events: closingEvents,
    fromBlock: parameters.fromBlock,
    toBlock: parameters.toBlock,
    strict: true,
  })
  const escrow = parameters.escrow.toLowerCase()
  const ids = logs
    .filter(
      (log) =>
        typeof log.address === 'string' &&
        log.address.toLowerCase() === escrow &&
        log.topics.length === closingShapes.get(log.eventName)?.topics &&
        typeof log.data === 'string' &&
        log.data.length === closingShapes.get(log.eventName)?.data,
    )
    .map((log) => (log.args as { channelId: Hex }).channelId.toLowerCase() as Hex)
  return [...new Set(ids)]
}

/**
 * The escrow's events in a receipt, decoded. A receipt is the node's word: only logs of
 * `escrow` count (another contract's log may carry the same signature), and a log that is not
 * well formed (topics not a list of hex strings, data not a string) is left out, as is one that
 * does not decode as one of the escrow's events.
 */
export function events(receipt: Transaction.Sent['receipt'], escrow: Address) {
  const at = escrow.toLowerCase()
  const logs = (Array.isArray(receipt.logs) ? receipt.logs : []).filter((log: unknown) => {
    const l = log as { address?: unknown; topics?: unknown; data?: unknown } | null
    return (
      typeof l === 'object' &&
      l !== null &&
      typeof l.address === 'string' &&
      l.address.toLowerCase() === at &&
      Array.isArray(l.topics) &&
      l.topics.every((t) => typeof t === 'string') &&
      typeof l.data === 'string'
    )
  })
  return parseEventLogs({ abi, logs })
}

async function ensureAllowance(client: Client, token: Address, spender: Address, amount: bigint) {
  const owner = client.account?.address
  if (!owner) return // Transaction.send reports the missing account
  if ((await Token.allowance(client, { token, owner, spender })) >= amount) return
  await Token.approve(client, { token, spender, amount })
}
