/**
 * What a payment method module provides, for intent `session`. `evm` (evm/Server.ts) is
 * the first; a second (tempo session) is one more module registered in main.ts: metering,
 * the ledger and the routes only see this interface.
 */
import type { Price } from '../metering/Pricing.ts'
import type * as Challenge from './Challenge.ts'
import type * as Credential from './Credential.ts'

export type Hex = `0x${string}`

/** A channel's balances as a receipt reports them. */
export type State = { channelId: Hex; acceptedCumulative: bigint; spent: bigint; deposit: bigint }

/** A credential typed and checked against its challenge, ready to apply. */
export type Checked = {
  /** `open`, `topUp`, `voucher`, `close`. */
  action: string
  channelId: Hex
  /** The prices the challenge stated (to check they are still the model's). */
  price: Price
  /**
   * A voucher no higher than one this instance saw accepted on the channel (amounts only
   * grow, so it is a replay wherever it is checked): applying it stores nothing, and it is
   * not counted against the channel's voucher rate.
   */
  replay?: boolean
  /** The cumulative amount of the voucher the credential carries (none for a top-up). */
  voucher?: bigint
  /**
   * It adds to (or opens) the deposit: an open, a top-up, a voucher carrying a deposit. Such
   * submissions have a rate of their own, so that cheap ones a stranger makes up for a public
   * channel id (refused only after chain work) cannot use up the payer's voucher rate.
   */
  funds?: boolean
  /** Method-specific payload, opaque to the routes. */
  payload: unknown
}

/**
 * The result of applying a credential: the channel's state, and a tx hash if one was sent. No
 * state only for a voucher applied `beforeRequest` that the method knew to be a replay (the
 * request's admission reads the channel).
 */
export type Applied = { channel?: State; txHash?: Hex; closed?: boolean }

export interface Method {
  readonly method: string
  readonly intent: string
  /** The challenge `request` for a price (and the channel the request named). */
  request(price: Price, channelId?: Hex): Record<string, unknown>
  /** Throws when the payload's action is not one this method knows: checked before the
   * echoed challenge (the session draft's "Common Verification" order). */
  recognize?(payload: unknown): void
  /** Types a credential's payload and checks it against the challenge's request. */
  check(credential: Credential.Credential, challenge: Challenge.Challenge): Checked
  /**
   * Verifies and applies the action (the draft's order), persisting what it accepts.
   * `beforeRequest`: a completion request follows, whose admission checks the channel, so a
   * `replay` need only have its signature checked.
   */
  apply(checked: Checked, options?: { beforeRequest?: boolean }): Promise<Applied>
  /**
   * The receipt of a channel's state; `units`, at the end of a request, the units of the
   * challenge's `unitType` it consumed.
   */
  receipt(r: {
    challengeId: string
    channel: State
    txHash?: Hex
    units?: number
  }): Record<string, unknown>
}
