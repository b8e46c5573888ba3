/**
 * The escrow as the evm session method uses it (payment/evm/Server.ts `Escrow`): reads of
 * channel state, checks of client-broadcast transactions, the gateway's own (gas-paid)
 * EIP-3009 opens and top-ups and closes, and voucher verification on the fast path. Chain
 * failures become the draft's problem types.
 */
import {
  type Address,
  BaseError,
  encodeFunctionData,
  type Hex,
  HttpRequestError,
  isAddressEqual,
  parseAbi,
  parseAbiItem,
  parseEventLogs,
  TimeoutError,
  TransactionNotFoundError,
} from 'viem'
import {
  call,
  getBlockNumber,
  getCode,
  getLogs,
  getTransaction,
  getTransactionReceipt,
  readContract,
  waitForTransactionReceipt,
} from 'viem/actions'
import type * as Client from '../../chain/Client.ts'
import {
  ChannelBusyError,
  ChannelStateError,
  CloseBelowSpentError,
  InvalidVoucherSignatureError,
  SettlementBusyError,
  TransactionRevertedError,
  TransactionTimeoutError,
} from '../../chain/Errors.ts'
import * as Escrow from '../../chain/Escrow.ts'
import type * as Settlement from '../../chain/Settlement.ts'
import * as Token from '../../chain/Token.ts'
import * as Voucher from '../../chain/Voucher.ts'
import {
  ChannelBusyError as BusyChannelError,
  ChainUnavailableError,
  GatewayError,
  noRetry,
} from '../../Errors.ts'
import { Lru } from '../../Lru.ts'
import * as Problem from '../Problem.ts'
import type * as Server from './Server.ts'

export type Options = {
  /** The payee's (gateway's) wallet client: it pays the gas of what it submits. */
  client: Client.WalletClient
  escrow: Address
  currency: Address
  chainId: number
  /** How long to wait for a client's transaction to be mined (each confirmation, this long). */
  receiptTimeoutMs?: number
  /**
   * Blocks an open or a top-up needs (its own and those on top of it) before the channel's
   * deposit counts (default 1): the evm draft, "Chain Reorganization", asks for enough depth
   * that a reorganization cannot take back a deposit vouchers were spent against.
   */
  confirmations?: number
  /** Cooperative close (the settlement worker's, which records and finalizes it). */
  close: Settlement.Worker['close']
}

/**
 * EIP-3009's state of an authorization (true once used or cancelled), and the `bytes
 * signature` form of `receiveWithAuthorization` the escrow calls (USDC v2.2's; tokens with
 * only the `(v, r, s)` form cannot fund a channel through it).
 */
const eip3009 = parseAbi([
  'function authorizationState(address authorizer, bytes32 nonce) view returns (bool)',
  'function receiveWithAuthorization(address from, address to, uint256 value, uint256 validAfter, uint256 validBefore, bytes32 nonce, bytes signature)',
])

/** EIP-3009's event for an authorization used up. */
const authorizationUsed = parseAbiItem(
  'event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce)',
)

/** How far back a used authorization's transaction is looked for (blocks). */
const logBlocks = 50_000n

/**
 * How long a client's transaction hash the chain's node does not know is looked for before it
 * is refused: a payer's transaction broadcast through another node takes a moment to reach
 * ours. Only a transaction the node has seen is waited for until mined (`receiptTimeoutMs`); a
 * made-up hash (anyone can send one, for any channel) costs the gateway this long, not that.
 */
const unseenMs = 5_000

/** How long a signer without code is taken to have none before the chain is asked again. */
const noCodeMs = 10 * 60_000

/** A transaction the gateway sent, with the channel's deposit as its event left it. */
function sentOf(
  sent: { hash: Hex; receipt: { logs: Parameters<typeof parseEventLogs>[0]['logs'] } },
  channelId: Hex,
): Server.Sent {
  const found = ofChannel(sent, channelId)
  if (found) return found
  throw new Error(`Transaction ${sent.hash} has no event of channel ${channelId}.`)
}

/** The open or top-up of `channelId` that transaction `sent` made, if it made one. */
function ofChannel(
  sent: { hash: Hex; receipt: { logs: Parameters<typeof parseEventLogs>[0]['logs'] } },
  channelId: Hex,
): Server.Sent | undefined {
  for (const l of parseEventLogs({ abi: Escrow.abi, logs: sent.receipt.logs }))
    if (
      (l.eventName === 'ChannelOpened' || l.eventName === 'ToppedUp') &&
      l.args.channelId.toLowerCase() === channelId.toLowerCase()
    )
      return { hash: sent.hash, deposit: l.args.deposit }
  return undefined
}

/** Whether a viem error is the chain's RPC not answering (refused, failed, timed out). */
function unreachable(e: unknown): boolean {
  return (
    e instanceof BaseError &&
    e.walk((c) => c instanceof HttpRequestError || c instanceof TimeoutError) !== null
  )
}

/**
 * Whether `token` implements the EIP-3009 the escrow at `escrow` uses for the gateway's
 * `openWithAuthorization` and `topUpWithAuthorization`; undefined when the chain does not
 * answer. Its `authorizationState` view must answer, and its `bytes signature` form of
 * `receiveWithAuthorization` must exist: called as the escrow with a signature of zeros, a
 * token that has it refuses the signature with a reason (revert data), and one that has only
 * the `(v, r, s)` form finds no such function (a revert without data) or, worse, takes it.
 * The evm draft: no `feePayer: true` for a token whose authorization path cannot be serviced.
 */
export async function hasEip3009(
  client: Client.WalletClient,
  token: Address,
  escrow: Address,
): Promise<boolean | undefined> {
  try {
    await readContract(client, {
      address: token,
      abi: eip3009,
      functionName: 'authorizationState',
      args: [token, `0x${'0'.repeat(64)}`],
    })
  } catch (e) {
    return e instanceof BaseError && !unreachable(e) ? false : undefined
  }
  try {
    await call(client, {
      account: escrow,
      to: token,
      data: encodeFunctionData({
        abi: eip3009,
        functionName: 'receiveWithAuthorization',
        args: [
          '0x0000000000000000000000000000000000000001',
          escrow,
          0n,
          0n,
          2n ** 255n,
          `0x${'11'.repeat(32)}`,
          `0x${'00'.repeat(65)}`,
        ],
      }),
    })
    return false
  } catch (e) {
    if (!(e instanceof BaseError) || unreachable(e)) return undefined
    const data = (
      e.walk((c) => typeof (c as { data?: unknown }).data === 'string') as { data: string } | null
    )?.data
    // A node that says nothing of the revert leaves it unknown: taken as there.
    return data !== '0x'
  }
}

/** ERC-1271's check, and the value a wallet returns for a signature it made. */
const erc1271 = parseAbi([
  'function isValidSignature(bytes32 hash, bytes signature) view returns (bytes4)',
])
const erc1271Magic = '0x1626ba7e'

/**
 * The revert names of the escrow mapped to the draft's problem types ("Error Responses"); own
 * keys only (a revert without data is named by the node's message, which may be `toString`).
 */
const reverts: Record<string, Problem.Kind> = {
  AmountExceedsDeposit: 'session/amount-exceeds-deposit',
  ChannelNotFound: 'session/channel-not-found',
  ChannelFinalized: 'session/channel-finalized',
  InvalidSignature: 'session/invalid-signature',
}

/**
 * A chain call's failure as what a client consumes: a revert as the draft's problem type, a
 * chain that did not answer (or a transaction not mined in time) as a 503 to retry. Anything
 * else is not the chain's doing and goes on as it is.
 */
export function problem(e: unknown, channelId: Hex): unknown {
  if (e instanceof TransactionRevertedError) {
    const kind =
      (e.errorName && Object.hasOwn(reverts, e.errorName) && reverts[e.errorName]) ||
      'session/transaction-reverted'
    return Problem.create(
      kind,
      e.message,
      { channelId, ...(e.hash ? { txHash: e.hash } : {}) },
      { cause: e },
    )
  }
  if (e instanceof CloseBelowSpentError)
    return Problem.paymentInsufficient(e.message, {
      channelId,
      requiredCumulative: e.spent.toString(),
    })
  if (e instanceof ChannelStateError)
    return e.reason === 'finalized'
      ? Problem.channelFinalized('The channel is closed.', { channelId })
      : Problem.channelNotFound('No channel with this id on our escrow.', { channelId })
  if (e instanceof ChannelBusyError)
    return new BusyChannelError(e.message, { cause: e, details: { channelId } })
  if (e instanceof TransactionTimeoutError || e instanceof SettlementBusyError)
    return new ChainUnavailableError(e.message, { cause: e, details: { channelId } })
  // viem's own errors that are not a revert: the RPC failed, refused or timed out.
  if (e instanceof BaseError)
    return new ChainUnavailableError(
      'The chain did not answer. Send the same credential again shortly (GET /v1/channels/{id} shows what the chain has).',
      { cause: e, details: { channelId } },
    )
  return e
}

/** A channel as the escrow holds it, in the shape the method and the ledger take. */
export function onChain(
  c: NonNullable<Awaited<ReturnType<typeof Escrow.getChannel>>>,
  at: { channelId: Hex; chainId: number; escrow: Address },
) {
  return {
    ...at,
    payer: c.payer,
    payee: c.payee,
    token: c.token,
    signer: Escrow.signerOf(c),
    deposit: c.deposit,
    settled: c.settled,
    finalized: c.finalized,
    closeRequested: c.closeRequestedAt !== 0n,
    closeRequestedAt: c.closeRequestedAt,
  }
}

export function create(o: Options): Server.Escrow & { stop(): void } {
  const scope = { chainId: o.chainId, escrow: o.escrow }
  const confirmations = o.confirmations ?? 1
  // Signatures are checked on a worker thread: another core does the curve math while this
  // thread parses, stores and answers.
  const verifier = Voucher.createThreadedVerifier(scope)
  const payee = o.client.account.address

  const guard = async <T>(channelId: Hex, f: () => Promise<T>): Promise<T> => {
    try {
      return await f()
    } catch (e) {
      throw problem(e, channelId)
    }
  }

  // The draft ("Forced Close"): no channel is accepted on an escrow whose grace period is
  // under 10 minutes. Checked once, before the first open (the start-up check may have found
  // the chain down); a failed read is tried again at the next open.
  let graceChecked: Promise<void> | undefined
  const checkGrace = (channelId: Hex) => {
    graceChecked ??= guard(channelId, async () => {
      const grace = await Escrow.gracePeriod(o.client, { escrow: o.escrow })
      if (grace < Escrow.minCloseGracePeriod) throw new EscrowGraceError(o.escrow, grace)
    }).catch((e) => {
      graceChecked = undefined
      throw e
    })
    return graceChecked
  }

  /**
   * Whether a signer holds code (a contract wallet, or an account delegating to one), as the
   * escrow's signature check asks it. Code, once there, is remembered; its absence only for a
   * while (a counterfactual wallet may be deployed later). A chain that does not answer leaves
   * the signer taken for an account, whose signatures need no chain to check.
   */
  const codeSeen = new Lru<Address, number>(4_096)
  const hasCode = async (address: Address): Promise<boolean> => {
    const seen = codeSeen.get(address)
    if (seen === Number.POSITIVE_INFINITY) return true
    if (seen !== undefined && Date.now() - seen < noCodeMs) return false
    try {
      const code = (await getCode(o.client, { address })) ?? '0x'
      codeSeen.set(address, code !== '0x' ? Number.POSITIVE_INFINITY : Date.now())
      return code !== '0x'
    } catch {
      return false
    }
  }
  /**
   * The mined transaction that used an EIP-3009 authorization of the currency, if it was used
   * (its `AuthorizationUsed` log, looked for in the last `logBlocks` blocks).
   */
  const usedBy = async (authorizer: Address, nonce: Hex) => {
    const used = await readContract(o.client, {
      address: o.currency,
      abi: eip3009,
      functionName: 'authorizationState',
      args: [authorizer, nonce],
    })
    if (!used) return undefined
    const latest = await getBlockNumber(o.client, { cacheTime: 0 })
    const [log] = await getLogs(o.client, {
      address: o.currency,
      event: authorizationUsed,
      args: { authorizer, nonce },
      fromBlock: latest > logBlocks ? latest - logBlocks : 0n,
    })
    if (!log?.transactionHash)
      throw Problem.verificationFailed(
        'This authorization was used or cancelled, and no transaction using it is recent enough to show here.',
      )
    const hash = log.transactionHash
    return { hash, receipt: await getTransactionReceipt(o.client, { hash }) }
  }

  /**
   * Sends a transaction that uses an EIP-3009 authorization. When it reverts because the
   * authorization was used already, by a transaction of this channel (only the escrow can use
   * it, receiveWithAuthorization), the answer is that transaction: the same credential sent
   * again (a retry after the chain stopped answering, a client sending it twice) or to two
   * instances at once. Used for another channel, the revert stands (409). Unused, and the
   * payer holds less than it authorized: the token pull failed for want of funds, the draft's
   * `insufficient-balance` (its most specific problem type for it), not a bare revert.
   */
  const orUsed = async (
    channelId: Hex,
    a: { from: Address; nonce: Hex; value: bigint },
    send: () => Promise<Parameters<typeof sentOf>[0]>,
  ): Promise<Server.Sent> => {
    let sent: Parameters<typeof sentOf>[0]
    try {
      sent = await send()
      // Mined: deep enough before the deposit counts (see `confirmations`).
      if (confirmations > 1)
        await waitForTransactionReceipt(o.client, {
          hash: sent.hash,
          confirmations,
          timeout: (o.receiptTimeoutMs ?? 30_000) * confirmations,
        })
    } catch (e) {
      if (!(e instanceof TransactionRevertedError)) throw e
      const done = await usedBy(a.from, a.nonce).catch(() => undefined)
      // Used for this channel: the same credential. For another one: a reused authorization,
      // refused as the revert says.
      const same = done && ofChannel(done, channelId)
      if (same) return same
      if (!done) {
        const held = await Token.balanceOf(o.client, { token: o.currency, owner: a.from }).catch(
          () => undefined,
        )
        if (held !== undefined && held < a.value)
          throw Problem.insufficientBalance(
            `The payer holds ${held} of the ${a.value} base units it authorized; fund the wallet or authorize less.`,
            { channelId },
            { cause: e },
          )
      }
      throw e
    }
    return sentOf(sent, channelId)
  }

  /** Vouchers a wallet signed (ERC-1271): the wallet is asked once for each. */
  const walletVouchers = new Lru<string, true>(100_000)
  /** ERC-1271: whether the wallet `signer` takes `signature` for the voucher's digest. */
  const walletSigned = async (v: {
    channelId: Hex
    cumulativeAmount: bigint
    signature: Hex
    signer: Address
  }) => {
    const key = `${v.channelId}:${v.cumulativeAmount}:${v.signature}:${v.signer}`.toLowerCase()
    if (walletVouchers.get(key)) return true
    const digest = Voucher.digest({ ...scope, ...v })
    try {
      const magic = await readContract(o.client, {
        address: v.signer,
        abi: erc1271,
        functionName: 'isValidSignature',
        args: [digest, v.signature],
      })
      if (magic.toLowerCase() !== erc1271Magic) return false
      walletVouchers.set(key, true)
      return true
    } catch (e) {
      // A wallet that reverts, answers nothing or answers garbage did not sign it; a chain that
      // did not answer is the guard's to report.
      if (e instanceof BaseError && !unreachable(e)) return false
      throw e
    }
  }

  /** Resolves once the node knows the transaction (pending or mined); see `unseenMs`. */
  const seen = async (hash: Hex, channelId: Hex) => {
    const until = Date.now() + unseenMs
    for (;;) {
      const known = await guard(channelId, () =>
        getTransaction(o.client, { hash }).then(
          () => true,
          (e: unknown) => {
            if (e instanceof TransactionNotFoundError) return false
            throw e
          },
        ),
      )
      if (known) return
      if (Date.now() >= until)
        throw Problem.verificationFailed(
          `The chain does not know the transaction ${hash} (looked for ${unseenMs / 1000} s): send the hash of a transaction that was broadcast.`,
          { txHash: hash },
        )
      await new Promise((resolve) => setTimeout(resolve, o.client.pollingInterval))
    }
  }

  return {
    async authorizationUsed(channelId, a) {
      return guard(channelId, () =>
        readContract(o.client, {
          address: o.currency,
          abi: eip3009,
          functionName: 'authorizationState',
          args: [a.from, a.nonce],
        }),
      )
    },

    async read(channelId) {
      const c = await guard(channelId, () =>
        Escrow.getChannel(o.client, { escrow: o.escrow, channelId }),
      )
      return c && onChain(c, { channelId, chainId: o.chainId, escrow: o.escrow })
    },

    async verifyTransaction({ hash, fn, channelId }) {
      if (fn === 'open') await checkGrace(channelId)
      // A chain that does not answer (a 503, by `guard`) is told apart here from a transaction
      // it does not have, which the wait below would only report after its timeout.
      await seen(hash, channelId)
      let receipt: Awaited<ReturnType<typeof waitForTransactionReceipt>>
      try {
        receipt = await waitForTransactionReceipt(o.client, {
          hash,
          confirmations,
          timeout: (o.receiptTimeoutMs ?? 30_000) * confirmations,
        })
      } catch (e) {
        throw Problem.verificationFailed(
          'The transaction was not found or not mined in time.',
          { txHash: hash },
          { cause: e },
        )
      }
      if (receipt.status !== 'success')
        throw Problem.transactionReverted(`The ${fn} transaction reverted.`, {
          txHash: hash,
          channelId,
        })
      const logs = parseEventLogs({ abi: Escrow.abi, logs: receipt.logs }).filter((l) =>
        isAddressEqual(l.address, o.escrow),
      )
      const event = fn === 'open' ? 'ChannelOpened' : 'ToppedUp'
      const hit = logs.find(
        (l) =>
          l.eventName === event &&
          (l.args as { channelId: Hex }).channelId.toLowerCase() === channelId.toLowerCase(),
      )
      if (hit?.eventName === 'ChannelOpened') return { amount: hit.args.deposit }
      if (hit?.eventName === 'ToppedUp') return { amount: hit.args.additionalDeposit }
      throw Problem.verificationFailed(
        `The transaction is not a ${fn} of this channel on our escrow.`,
        { txHash: hash, channelId },
      )
    },

    async openWithAuthorization({
      channelId: named,
      salt,
      authorizedSigner,
      authorization: a,
      signature,
    }) {
      const channelId = Escrow.computeChannelId({
        payer: a.from,
        payee,
        token: o.currency,
        salt,
        authorizedSigner,
        escrow: o.escrow,
        chainId: o.chainId,
      })
      if (channelId.toLowerCase() !== named.toLowerCase())
        throw Problem.verificationFailed(
          `channelId is not the channel this open creates (${channelId}); nothing was submitted.`,
          { channelId: named },
        )
      await checkGrace(channelId)
      return await guard(channelId, () =>
        orUsed(channelId, a, () =>
          Escrow.openWithAuthorization(o.client, {
            escrow: o.escrow,
            payee,
            token: o.currency,
            deposit: a.value,
            salt,
            authorizedSigner,
            from: a.from,
            validAfter: a.validAfter,
            validBefore: a.validBefore,
            nonce: a.nonce,
            signature,
          }),
        ),
      )
    },

    async topUpWithAuthorization({ channelId, topUpSalt, authorization: a, signature }) {
      return await guard(channelId, () =>
        orUsed(channelId, a, () =>
          Escrow.topUpWithAuthorization(o.client, {
            escrow: o.escrow,
            channelId,
            additionalDeposit: a.value,
            from: a.from,
            topUpSalt,
            validAfter: a.validAfter,
            validBefore: a.validBefore,
            nonce: a.nonce,
            signature,
          }),
        ),
      )
    },

    async close({ channelId, cumulativeAmount, signature }) {
      const closed = await guard(channelId, () =>
        o.close({ channelId, cumulativeAmount, signature }),
      )
      return closed.hash
    },

    async verifyVoucher(v) {
      const mismatch = () =>
        Problem.signerMismatch('The voucher is not signed by the channel signer.', {
          channelId: v.channelId,
        })
      // As the escrow checks it at settlement: a signature by the signer's own key first, with
      // or without code at its address (an account that delegated through EIP-7702 has both,
      // and the escrow pays its key's vouchers whatever its delegate answers), then, for an
      // account with code, ERC-1271 (the draft's step 5). Asking only the wallet of an account
      // with code refused a delegated payer's vouchers that the escrow pays.
      try {
        await verifier.verify(v)
        return
      } catch (e) {
        if (!(e instanceof InvalidVoucherSignatureError)) throw e
        if (!(await hasCode(v.signer)))
          throw e.reason === 'signer-mismatch'
            ? mismatch()
            : Problem.invalidSignature(`The voucher signature is invalid (${e.reason}).`, {
                channelId: v.channelId,
              })
      }
      // The escrow refuses a high-s 65-byte signature before asking the wallet, whatever its v.
      if (
        /^0x[0-9a-fA-F]{128}[0-9a-fA-F]{2}$/.test(v.signature) &&
        BigInt(`0x${v.signature.slice(66, 130)}`) > Voucher.HALF_N
      )
        throw Problem.invalidSignature('The voucher signature is invalid (high-s).', {
          channelId: v.channelId,
        })
      if (await guard(v.channelId, () => walletSigned(v))) return
      throw mismatch()
    },

    /** Ends the verifier thread. */
    stop() {
      if ('close' in verifier) verifier.close()
    },
  }
}

/**
 * The configured escrow lets a payer withdraw sooner than the draft allows: the gateway
 * accepts no channel on it (503 to a payer; found at start-up, the gateway does not start).
 * Its grace period is the contract's (a constant in ours): a retry meets the same escrow, so
 * the 503 says not to (`x-should-retry: false`), unlike a chain that did not answer.
 */
export class EscrowGraceError extends GatewayError {
  override name = 'EscrowGraceError'
  override readonly status = 503
  override readonly type = 'escrow_unsuitable'
  constructor(escrow: Address, grace: bigint) {
    super(
      `The escrow ${escrow} lets a payer withdraw ${grace} s after asking to close; the payment draft requires at least ${Escrow.minCloseGracePeriod} s (10 minutes), so this gateway accepts no channel on it.`,
      'escrow_grace_period_too_short',
      { headers: { ...noRetry } },
    )
  }
}
