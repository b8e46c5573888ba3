/**
 * The server side of method `evm`, intent `session` (draft-evm-session-00): the challenge
 * request for a price, and the verification of each credential action in the draft's order
 * ("Verification Procedure"). Pure of I/O: the channel store and the escrow are interfaces
 * that ledger/ and chain/ implement, wired by main.ts.
 */

import { Lru } from '../../Lru.ts'
import type * as Channels from '../../ledger/Channels.ts'
import type { Price } from '../../metering/Pricing.ts'
import * as Challenge from '../Challenge.ts'
import type * as Credential from '../Credential.ts'
import type * as Method from '../Method.ts'
import * as Problem from '../Problem.ts'
import * as Session from './Session.ts'

type Hex = Session.Hex
type Address = Session.Address

/** Server-side accounting of a channel: the ledger's record, as much as the method reads. */
export type Channel = Pick<
  Channels.Channel,
  | 'channelId'
  | 'signer'
  | 'deposit'
  | 'acceptedCumulative'
  | 'voucherSignature'
  | 'spent'
  | 'reserved'
  | 'settled'
  | 'closeRequestedAt'
  | 'cooperativeClose'
  | 'finalized'
>

/** What the escrow says about a channel. */
export type OnChain = {
  channelId: Hex
  chainId: number
  escrow: Hex
  payer: Hex
  payee: Hex
  token: Hex
  signer: Hex
  deposit: bigint
  settled: bigint
  finalized: boolean
  closeRequested: boolean
  /** The escrow's `closeRequestedAt` (unix seconds of the forced close's request); 0 when none. */
  closeRequestedAt: bigint
}

export type VoucherStatus =
  | 'accepted'
  | 'replay'
  | 'delta_too_small'
  | 'exceeds_deposit'
  | 'not_found'
  | 'finalized'
  | 'close_requested'

export type Store = {
  get(channelId: Hex): Promise<Channel | undefined>
  /** `toppedUpAt` (`clock()`'s): the state was read after it, and after a top-up the chain
   * confirmed. */
  observe(state: OnChain, options?: { toppedUpAt?: string }): Promise<Channel>
  /** The store's clock (the database's), as it compares times it wrote. */
  clock(): Promise<string>
  acceptVoucher(v: {
    channelId: Hex
    cumulativeAmount: bigint
    signature: Hex
    minDelta: bigint
  }): Promise<{ status: VoucherStatus } & Omit<State, 'channelId'>>
  /** Records a transaction the gateway sent (and paid the gas of) for the payer, mined. */
  sent(t: { channelId: Hex; kind: 'open' | 'topUp'; deposit: bigint; hash: Hex }): Promise<void>
  /** The highest voucher the gateway settled on chain or put in a settle transaction (public
   * from then on: its calldata); 0 when none. */
  settledPublicly(channelId: Hex): Promise<bigint>
}

/** A transaction the gateway sent: its hash, and the channel's deposit right after it (its event). */
export type Sent = { hash: Hex; deposit: bigint }

/** The escrow as this method uses it (chain/ implements it). Failures are Problems. */
export type Escrow = {
  read(channelId: Hex): Promise<OnChain | undefined>
  /** Whether the currency's EIP-3009 authorization of `from` with `nonce` was used (or
   * cancelled). */
  authorizationUsed(channelId: Hex, a: { from: Address; nonce: Hex }): Promise<boolean>
  /** Checks that `hash` is a successful transaction of `fn` on our escrow for `channelId`. */
  /**
   * Checks that `hash` is a mined, successful `fn` of the channel on our escrow; what it put
   * in (the deposit of an open, the additionalDeposit of a top-up, from its event).
   */
  verifyTransaction(v: {
    hash: Hex
    fn: 'open' | 'topUp'
    channelId: Hex
  }): Promise<{ amount: bigint }>
  /**
   * Submits the payer's EIP-3009 open (the gateway pays the gas), once mined. Refused before
   * anything is sent when its parameters create another channel than `channelId`, the one the
   * credential names: the deposit would be locked in a channel the gateway does not serve.
   */
  openWithAuthorization(v: {
    channelId: Hex
    salt: Hex
    authorizedSigner: Address | undefined
    authorization: Session.Eip3009
    signature: Hex
  }): Promise<Sent>
  /** Submits the payer's EIP-3009 top-up (the gateway pays the gas), once mined. */
  topUpWithAuthorization(v: {
    channelId: Hex
    topUpSalt: Hex
    authorization: Session.Eip3009
    signature: Hex
  }): Promise<Sent>
  /**
   * Closes the channel cooperatively with the client's final voucher, or a better accepted
   * one (chain/Settlement.close decides), finalizing it in the store; the tx hash.
   */
  close(v: { channelId: Hex; cumulativeAmount: bigint; signature: Hex }): Promise<Hex>
  /** Throws `invalid-signature` or `signer-mismatch` unless `signer` signed the voucher. */
  verifyVoucher(v: {
    channelId: Hex
    cumulativeAmount: bigint
    signature: Hex
    signer: Hex
  }): void | Promise<void>
}

export type Options = {
  chainId: number
  escrow: Address
  currency: Address
  recipient: Address
  minVoucherDelta: bigint
  suggestedDeposit: bigint
  /** The least deposit or top-up the gateway pays the gas of (default 0: any). */
  minGasPaidDeposit?: bigint | undefined
  /** The currency's EIP-712 domain name and version, stated in the challenge so that a payer
   * can sign EIP-3009 authorizations without an RPC URL (`methodDetails.tokenDomain`). */
  tokenDomain?: Session.TokenDomain | undefined
  /**
   * Whether the gateway submits opens and top-ups for payers (EIP-3009, `feePayer: true`);
   * false for a currency without EIP-3009, whose payers broadcast their own (`hash`). Default
   * true.
   */
  feePayer?: boolean | undefined
  store: Store
  chain: Escrow
}

/** Who signs a channel's vouchers: its authorizedSigner when set (non-zero), else the payer. */
function signerOf(authorizedSigner: Address | undefined, payer: Address): Address {
  return authorizedSigner && !/^0x0{40}$/i.test(authorizedSigner) ? authorizedSigner : payer
}

export type State = Method.State
export type Applied = Method.Applied

/**
 * The unit of the challenge `amount`: base units per 1,000,000 output tokens. Prices are
 * integers per million tokens, so this states them exactly; the input price travels beside
 * it as `inputAmount` in the same unit (`inputUnitType`).
 */
export const unitType = 'llm-output-token-per-1M'
export const inputUnitType = 'llm-input-token-per-1M'

export function create(o: Options) {
  // Who signs a channel's vouchers never changes: kept in memory after the first lookup.
  const signers = new Lru<string, Hex>(100_000)
  const remember = (c: { channelId: Hex; signer: Hex } | undefined): Hex | undefined => {
    if (!c) return undefined
    signers.set(c.channelId, c.signer)
    return c.signer
  }

  // The highest voucher this instance saw accepted per channel: a lower bound of the channel's
  // (amounts only grow), so a voucher at or below it is a replay wherever it is checked.
  const accepted = new Lru<string, bigint>(100_000)
  const sawAccepted = (channelId: Hex, amount: bigint) => {
    if ((accepted.get(channelId) ?? -1n) >= amount) return
    accepted.set(channelId, amount)
  }
  const isReplay = (channelId: Hex, amount: bigint) => (accepted.get(channelId) ?? -1n) >= amount

  const request = (price: Price, channelId?: Hex): Record<string, unknown> => ({
    ...Session.request({
      amount: price.output,
      unitType,
      suggestedDeposit: o.suggestedDeposit,
      currency: o.currency,
      recipient: o.recipient,
      methodDetails: {
        chainId: o.chainId,
        escrowContract: o.escrow,
        minVoucherDelta: o.minVoucherDelta,
        // The draft: no `feePayer: true` for a token whose authorization path we cannot use.
        feePayer: o.feePayer !== false,
        credentialTypes: o.feePayer === false ? ['hash'] : ['authorization', 'hash'],
        ...(channelId ? { channelId } : {}),
        ...(o.tokenDomain ? { tokenDomain: o.tokenDomain } : {}),
      },
    }),
    inputAmount: price.input.toString(),
    inputUnitType,
  })

  /** Whether the escrow's channel is one this gateway may serve: its payee and token, open. */
  const checkOurs = (state: OnChain | undefined, channelId: Hex): OnChain => {
    if (!state) throw Problem.channelNotFound('The escrow has no such channel.', { channelId })
    const same = (a: string, b: string) => a.toLowerCase() === b.toLowerCase()
    if (!same(state.payee, o.recipient))
      throw Problem.verificationFailed('The channel pays another payee.', { channelId })
    if (!same(state.token, o.currency))
      throw Problem.verificationFailed('The channel holds another token.', { channelId })
    if (state.finalized) throw Problem.channelFinalized('The channel is closed.', { channelId })
    return state
  }

  /**
   * An open of a channel that exists already is the same credential sent again (a retry after
   * a lost answer, or to two instances), whose authorization opened it: the escrow derives an
   * open's nonce from the channel's parameters, so that authorization was used. One never
   * used is another open of it, which the escrow would revert: refused whole, as the draft
   * says ("For already-existing channels, deposit.action MUST be topUp"; "If the deposit
   * fails, the server MUST reject the entire credential"); it was served with no deposit made.
   */
  const openedBy = async (channelId: Hex, a: { from: Address; nonce: Hex }) => {
    if (!(await o.chain.authorizationUsed(channelId, a)))
      throw Problem.verificationFailed(
        'The channel exists already and this open authorization was never used: a deposit to it is a top-up (deposit.action "topUp"), or send the voucher alone.',
        { channelId },
      )
  }

  /** The draft's open checks on the escrow's state. */
  const checkOpened = (state: OnChain | undefined, channelId: Hex, _amount: bigint): OnChain => {
    checkOurs(state, channelId)
    if (state!.closeRequested)
      throw Problem.channelFinalized('The channel has a pending close request.', { channelId })
    // The draft checks `deposit - settled >= amount` for a per-unit price; our unit is a
    // million tokens (to state prices exactly), so any free deposit passes and admission
    // checks each request's own cost.
    if (state!.deposit <= state!.settled)
      throw Problem.insufficientBalance('The channel has no deposit left.', { channelId })
    return state!
  }

  /**
   * Checks a voucher's signature, then records it (a replay changes nothing). Whether it may
   * pay for a request is the admission's to say (a voucher the gateway made public pays for
   * none: `Channels.admit`).
   */
  const acceptVoucher = async (
    channel: { signer: Hex },
    v: { channelId: Hex; cumulativeAmount: bigint; signature: Hex },
    minDelta = o.minVoucherDelta,
  ): Promise<State> => {
    // Signature and signer first: before the replay short-circuit (draft, Idempotency).
    await o.chain.verifyVoucher({ ...v, signer: channel.signer })
    const r = await o.store.acceptVoucher({ ...v, minDelta })
    const ext = {
      channelId: v.channelId,
      acceptedCumulative: r.acceptedCumulative,
      deposit: r.deposit,
    }
    switch (r.status) {
      case 'accepted':
      case 'replay': {
        sawAccepted(v.channelId, r.acceptedCumulative)
        const { status: _, ...state } = r
        return { channelId: v.channelId, ...state }
      }
      case 'delta_too_small':
        throw Problem.deltaTooSmall(
          `A voucher must raise the cumulative amount by at least ${o.minVoucherDelta}.`,
          { ...ext, minVoucherDelta: o.minVoucherDelta },
        )
      case 'exceeds_deposit':
        throw Problem.amountExceedsDeposit(
          'The voucher exceeds the channel deposit; top up first.',
          ext,
        )
      case 'not_found':
        throw Problem.channelNotFound('No channel with this id; open one first.', ext)
      case 'finalized':
        throw Problem.channelFinalized('The channel is closed.', ext)
      case 'close_requested':
        throw Problem.channelFinalized(
          'The channel has a pending close request; it takes no more vouchers.',
          ext,
        )
    }
  }

  /** The channel; a closed one only when `closed` (a close sent again). */
  const known = async (channelId: Hex, closed = false): Promise<Channel> => {
    const channel = await o.store.get(channelId)
    if (!channel)
      throw Problem.channelNotFound('No channel with this id; open one first.', { channelId })
    if (channel.finalized && !closed)
      throw Problem.channelFinalized('The channel is closed.', { channelId })
    return channel
  }

  /**
   * A top-up of a channel its payer asked to close cooperatively: refused before any
   * transaction (the gateway would pay the gas to lock more of the payer's tokens in a channel
   * that serves nothing more). A forced close's channel takes one: a top-up cancels it (by
   * authorization, only one `cancelsClose` lets through).
   */
  const notClosing = (channel: Channel) => {
    if (channel.closeRequestedAt && channel.cooperativeClose)
      throw Problem.channelFinalized(
        'The channel is closing (its payer asked to close it): a top-up cannot reopen it. Open another channel.',
        { channelId: channel.channelId },
      )
  }

  /**
   * A top-up by authorization of a channel with a forced close pending on chain: the escrow
   * cancels the close only for the payer's authorization made for after the request (`from` the
   * payer, `validAfter >= closeRequestedAt`), so any other is refused before any transaction
   * (the gateway would pay the gas to lock more tokens in a channel that stays closing). Read
   * from the chain, which the ledger follows only at its next pass.
   */
  const cancelsClose = async (channelId: Hex, a: Session.Eip3009) => {
    const state = await o.chain.read(channelId)
    if (!state || state.closeRequestedAt === 0n) return
    const closeRequestedAt = state.closeRequestedAt
    if (a.from.toLowerCase() !== state.payer.toLowerCase())
      throw Problem.verificationFailed(
        `The channel has a pending close request (closeRequestedAt ${closeRequestedAt}); only a top-up from its payer cancels it. Nothing was submitted.`,
        { channelId, closeRequestedAt },
      )
    if (a.validAfter < closeRequestedAt)
      throw Problem.verificationFailed(
        `The authorization predates the channel's close request (closeRequestedAt ${closeRequestedAt}), so the escrow would not cancel the close with it: sign one with validAfter at or after closeRequestedAt. Nothing was submitted.`,
        { channelId, closeRequestedAt, validAfter: a.validAfter },
      )
  }

  /**
   * A voucher (one carrying a top-up) refused on a channel with a close pending, with the
   * escrow's `closeRequestedAt` when known (0: none on chain, the ledger's mark): a top-up that
   * cancels a forced close must be authorized from then on.
   */
  const closePending = (channelId: Hex, closeRequestedAt: bigint | undefined) =>
    closeRequestedAt
      ? Problem.channelFinalized(
          `The channel has a pending close request (closeRequestedAt ${closeRequestedAt}); it takes no voucher, one carrying a top-up neither. Send the top-up as a topUp credential whose authorization has validAfter at or after closeRequestedAt (it cancels a forced close), then the voucher.`,
          { channelId, closeRequestedAt },
        )
      : Problem.channelFinalized(
          'The channel has a pending close request; it takes no voucher, one carrying a top-up neither. Send the top-up as a topUp credential (it cancels a forced close), then the voucher.',
          { channelId },
        )

  /** Refuses a deposit or top-up the gateway would pay the gas of, below the least it takes. */
  const gasPaid = (value: bigint, what: 'deposit' | 'top-up', channelId: Hex) => {
    const least = o.minGasPaidDeposit ?? 0n
    if (value < least)
      throw Problem.paymentInsufficient(
        `A ${what} the gateway sends (and pays the gas of) must be at least ${least}; this one is ${value}. Send more, or broadcast the transaction yourself (type "hash").`,
        { channelId, minimum: least },
      )
  }

  /** Verifies and applies a credential's action. `price` is the challenge's `amount`. */
  async function apply(
    parsed: Session.Parsed,
    amount: bigint,
    replayBeforeRequest: boolean,
  ): Promise<Applied> {
    const p = parsed.payload
    switch (p.action) {
      case 'open': {
        let txHash: Hex | undefined
        // A transaction the gateway sent (and paid the gas of), to record once the channel is.
        let sent: Sent | undefined
        if (p.type === 'hash') {
          await o.chain.verifyTransaction({ hash: p.hash, fn: 'open', channelId: p.channelId })
          txHash = p.hash
        } else if (p.type === 'authorization') {
          if (p.authorization.to.toLowerCase() !== o.escrow.toLowerCase())
            throw Problem.verificationFailed('authorization.to must be the escrow contract.')
          const existing = await o.chain.read(p.channelId)
          if (existing) await openedBy(p.channelId, p.authorization)
          // The initial voucher is checked before the gateway pays gas to lock the payer's
          // deposit in a channel it would then refuse to serve.
          if (!existing) {
            gasPaid(p.authorization.value, 'deposit', p.channelId)
            await o.chain.verifyVoucher({
              channelId: p.channelId,
              cumulativeAmount: p.cumulativeAmount,
              signature: p.voucherSignature,
              signer: signerOf(p.authorizedSigner, p.authorization.from),
            })
            sent = await o.chain.openWithAuthorization({
              channelId: p.channelId,
              salt: p.salt,
              authorizedSigner: p.authorizedSigner,
              authorization: p.authorization,
              signature: p.signature,
            })
            txHash = sent.hash
          }
        } else
          throw Problem.methodUnsupported('Permit2 is not offered; use "authorization" or "hash".')
        const state = checkOpened(await o.chain.read(p.channelId), p.channelId, amount)
        const signature = p.type === 'hash' ? p.signature : p.voucherSignature
        // The draft's order ("Open Verification"): the initial voucher's signature (step 5)
        // before any server-side accounting state (step 6), so a refused open stores nothing.
        await o.chain.verifyVoucher({
          channelId: p.channelId,
          cumulativeAmount: p.cumulativeAmount,
          signature,
          signer: state.signer,
        })
        const channel = await o.store.observe(state)
        if (sent) await o.store.sent({ channelId: p.channelId, kind: 'open', ...sent })

        // minVoucherDelta spaces voucher updates; a channel's first voucher is no update, and
        // its deposit is in the escrow already (draft, "Open Verification": its signature only).
        // An open sent again may be made of public parts (the open and settle calldata).
        await acceptVoucher(
          channel,
          { channelId: p.channelId, cumulativeAmount: p.cumulativeAmount, signature },
          channel.acceptedCumulative === 0n ? 0n : o.minVoucherDelta,
        )
        return { channel: (await o.store.get(p.channelId))!, ...(txHash ? { txHash } : {}) }
      }
      case 'topUp': {
        notClosing(await known(p.channelId))
        let txHash: Hex
        let sent: Sent | undefined
        if (p.type === 'hash') {
          const { amount: added } = await o.chain.verifyTransaction({
            hash: p.hash,
            fn: 'topUp',
            channelId: p.channelId,
          })
          // The draft: the deposit grew by exactly additionalDeposit (the event says by how
          // much this transaction grew it, whatever else happened to the channel meanwhile).
          if (added !== p.additionalDeposit)
            throw Problem.verificationFailed(
              `The transaction added ${added} to the deposit, not additionalDeposit ${p.additionalDeposit}.`,
              { channelId: p.channelId, txHash: p.hash },
            )
          txHash = p.hash
        } else if (p.type === 'authorization') {
          gasPaid(p.authorization.value, 'top-up', p.channelId)
          await cancelsClose(p.channelId, p.authorization)
          sent = await o.chain.topUpWithAuthorization({
            channelId: p.channelId,
            topUpSalt: p.salt,
            authorization: p.authorization,
            signature: p.signature,
          })
          txHash = sent.hash
        } else
          throw Problem.methodUnsupported('Permit2 is not offered; use "authorization" or "hash".')
        // Read after the top-up: a forced close it cancelled on chain is cancelled here too.
        const toppedUpAt = await o.store.clock()
        const state = await o.chain.read(p.channelId)
        if (!state)
          throw Problem.channelNotFound('The escrow has no such channel.', {
            channelId: p.channelId,
          })
        const channel = await o.store.observe(state, { toppedUpAt })
        if (sent) await o.store.sent({ channelId: p.channelId, kind: 'topUp', ...sent })
        return { channel, txHash }
      }
      case 'voucher': {
        if (p.deposit) {
          const d = p.deposit
          if (d.type !== 'authorization')
            throw Problem.methodUnsupported('Permit2 is not offered; use "authorization".')
          let sent: Sent | undefined
          const known = await o.store.get(p.channelId)
          if (d.action === 'topUp') {
            if (known) notClosing(known)
            // A channel this gateway has not seen is checked first as an open would be (its
            // payee, its token, not closed): anyone can open a channel on the escrow paying
            // themselves, and the gateway would pay the gas of its top-up, then refuse it.
            const seen = known ? undefined : checkOurs(await o.chain.read(p.channelId), p.channelId)
            // No voucher on a channel with a close pending, one carrying a top-up neither: the
            // draft checks that first, before the deposit (Voucher Verification, steps 1 and
            // 2). A payer cancels its forced close with a topUp credential, then pays.
            if (known ? known.closeRequestedAt : seen!.closeRequested)
              throw closePending(
                p.channelId,
                // The chain's time for a known channel, if it answers: the refusal stands anyway.
                (seen ?? (await o.chain.read(p.channelId).catch(() => undefined)))
                  ?.closeRequestedAt,
              )
            const signer = known?.signer ?? seen!.signer
            // The voucher first: a made-up one costs a signature check, not the chain work of a
            // top-up (an authorization copied from an earlier top-up is refused only on chain).
            await o.chain.verifyVoucher({ ...p, signer })
            // A known channel's forced close as the chain shows it, before the ledger's next
            // pass does: its top-up would lock more of the deposit and be refused after it.
            if (known) {
              const now = await o.chain.read(p.channelId)
              if (now?.closeRequested) throw closePending(p.channelId, now.closeRequestedAt)
            }
          }
          if (d.action === 'open' && known) await openedBy(p.channelId, d.authorization)
          if (d.action === 'open' && !known) {
            if (await o.chain.read(p.channelId)) await openedBy(p.channelId, d.authorization)
            else {
              gasPaid(d.authorization.value, 'deposit', p.channelId)
              await o.chain.verifyVoucher({
                ...p,
                signer: signerOf(d.authorizedSigner, d.authorization.from),
              })
              sent = await o.chain.openWithAuthorization({
                channelId: p.channelId,
                salt: d.salt!,
                authorizedSigner: d.authorizedSigner,
                authorization: d.authorization,
                signature: d.signature,
              })
            }
          } else if (d.action === 'topUp') {
            gasPaid(d.authorization.value, 'top-up', p.channelId)
            sent = await o.chain.topUpWithAuthorization({
              channelId: p.channelId,
              topUpSalt: d.salt!,
              authorization: d.authorization,
              signature: d.signature,
            })
          }
          const toppedUpAt = sent && d.action === 'topUp' ? await o.store.clock() : undefined
          const state = checkOpened(await o.chain.read(p.channelId), p.channelId, amount)
          // Nothing sent (the channel was there already): nothing is stored for a voucher
          // that is not the channel signer's.
          if (!sent) await o.chain.verifyVoucher({ ...p, signer: state.signer })
          const observed = await o.store.observe(
            state,
            d.action === 'topUp' && sent ? { toppedUpAt } : {},
          )
          remember(observed)
          if (sent) await o.store.sent({ channelId: p.channelId, kind: d.action, ...sent })
          const first = d.action === 'open' && observed.acceptedCumulative === 0n
          return {
            channel: await acceptVoucher(state, p, first ? 0n : o.minVoucherDelta),
            ...(sent ? { txHash: sent.hash } : {}),
          }
        }
        // The hot path: the signer (immutable per channel) from memory, then one round trip
        // that checks the channel's state and records the voucher.
        const signer = signers.get(p.channelId) ?? remember(await o.store.get(p.channelId))
        if (!signer)
          throw Problem.channelNotFound('No channel with this id; open one first.', {
            channelId: p.channelId,
          })
        // A known replay ahead of a request: the signature is checked (the draft's order), and
        // the request's admission reads the channel's state, so nothing need be stored.
        if (replayBeforeRequest) {
          await o.chain.verifyVoucher({ ...p, signer })
          return {}
        }
        return { channel: await acceptVoucher({ signer }, p, o.minVoucherDelta) }
      }
      case 'close': {
        // A closed channel too: a client whose close was answered on an instance that then
        // died, or whose answer was lost, sends it again and gets that close's receipt (the
        // close itself answers 410 when the channel closed some other way).
        const channel = await known(p.channelId, true)
        await o.chain.verifyVoucher({ ...p, signer: channel.signer })
        // Below what was spent it cannot close (draft, "Cooperative Close"), and is refused
        // before the channel is marked closing: a voucher the gateway settled is public (its
        // settle transaction's calldata), and anyone sending it back as a close would
        // otherwise end the payer's stream and leave its channel closing for good.
        if (!channel.finalized && p.cumulativeAmount < channel.spent)
          throw Problem.paymentInsufficient(
            `The final voucher must cover what was spent (${channel.spent}).`,
            { channelId: p.channelId, requiredCumulative: channel.spent },
          )
        // Nor at or below a voucher the gateway settled (the core draft: a proof is usable
        // once): with all that was spent settled, that public voucher covers spent too, and
        // anyone could finalize the payer's channel with it. The payer's own close carries one
        // above it (by a base unit, when nothing more was spent). A channel settled to its
        // whole deposit has nothing left to take back or spend: any close may end it.
        if (!channel.finalized) {
          const published = await o.store.settledPublicly(p.channelId)
          if (published > 0n && published < channel.deposit && p.cumulativeAmount <= published)
            throw Problem.paymentInsufficient(
              `A final voucher must be above the last one settled on chain (${published}), which anyone can read.`,
              { channelId: p.channelId, requiredCumulative: published + 1n },
            )
        }
        // A final voucher above the accepted amount is recorded first (durable, like any).
        // minVoucherDelta bounds the work of a stream of vouchers; it is no reason to refuse
        // the last one, and with it the close (draft, "Cooperative Close"). Not on a channel
        // already closing (a forced close pending, another close under way): it takes no more
        // vouchers, and the close never submits one above spent, so it goes on without.
        if (
          channel.closeRequestedAt === null &&
          p.cumulativeAmount > channel.acceptedCumulative &&
          p.cumulativeAmount <= channel.deposit
        )
          await acceptVoucher(channel, p, 0n)
        const txHash = await o.chain.close({
          channelId: p.channelId,
          cumulativeAmount: p.cumulativeAmount,
          signature: p.signature,
        })
        return { channel: (await o.store.get(p.channelId))!, txHash, closed: true }
      }
    }
  }

  /**
   * The payload typed and tied to its challenge's request: a function of the two alone, so
   * kept for a credential object the route has seen before (it keeps parsed credentials, frozen,
   * by their text). Failures are not kept.
   */
  const typedOf = new WeakMap<
    Credential.Credential,
    { challenge: Challenge.Challenge; parsed: Session.Parsed; price: Price }
  >()
  function typed(credential: Credential.Credential, challenge: Challenge.Challenge) {
    const known = typedOf.get(credential)
    if (known?.challenge === challenge) return known
    const parsed = Session.fromCredential(credential)
    const req = Session.requestOf(challenge)
    Session.check(parsed, req)
    const input = challenge.request.inputAmount
    const entry = {
      challenge,
      parsed: Challenge.deepFreeze(parsed),
      price: {
        output: req.amount,
        input: typeof input === 'string' && /^\d+$/.test(input) ? BigInt(input) : -1n,
      },
    }
    if (Object.isFrozen(credential)) typedOf.set(credential, entry)
    return entry
  }

  return {
    method: Session.method,
    intent: Session.intent,
    request,
    recognize: Session.recognize,
    check(credential: Credential.Credential, challenge: Challenge.Challenge): Method.Checked {
      const { parsed, price } = typed(credential, challenge)
      const p = parsed.payload
      const voucher = Session.voucherOf(p)
      return {
        action: p.action,
        channelId: p.channelId,
        price,
        ...(p.action === 'voucher' && !p.deposit && isReplay(p.channelId, p.cumulativeAmount)
          ? { replay: true }
          : {}),
        ...(voucher ? { voucher: voucher.cumulativeAmount } : {}),
        ...(p.action === 'open' || p.action === 'topUp' || (p.action === 'voucher' && p.deposit)
          ? { funds: true }
          : {}),
        payload: { parsed, amount: price.output },
      }
    },
    apply(checked: Method.Checked, options?: { beforeRequest?: boolean }): Promise<Applied> {
      const { parsed, amount } = checked.payload as { parsed: Session.Parsed; amount: bigint }
      return apply(parsed, amount, options?.beforeRequest === true && checked.replay === true)
    },
    receipt: (r: { challengeId: string; channel: State; txHash?: Hex; units?: number }) =>
      Session.receipt({
        challengeId: r.challengeId,
        channelId: r.channel.channelId,
        acceptedCumulative: r.channel.acceptedCumulative,
        spent: r.channel.spent,
        chainId: o.chainId,
        ...(r.txHash ? { txHash: r.txHash } : {}),
        ...(r.units !== undefined ? { units: r.units } : {}),
      }),
  } satisfies Method.Method
}
