/**
 * The paying side of an evm session, as the tests drive it (the client issue grows this
 * into the SDK): read a Payment challenge, open a channel (gasless EIP-3009 authorization,
 * or a client-broadcast open), sign cumulative vouchers, top up, close. Each method returns
 * the `Authorization` header value to send to the same URI.
 */
import { type Address, type Hex, keccak256, type LocalAccount, toHex } from 'viem'
import * as Escrow from '../chain/Escrow.ts'
import type * as Token from '../chain/Token.ts'
import { signReceiveAuthorization } from '../chain/Token.ts'
import * as Voucher from '../chain/Voucher.ts'
import * as Challenge from '../payment/Challenge.ts'
import * as Credential from '../payment/Credential.ts'
import * as Session from '../payment/evm/Session.ts'

/** The first evm/session challenge of a `WWW-Authenticate` value, or undefined. */
export function challengeOf(wwwAuthenticate: string | null): Challenge.Challenge | undefined {
  if (!wwwAuthenticate) return undefined
  return Challenge.deserialize(wwwAuthenticate).find(
    (c) => c.method === Session.method && c.intent === Session.intent,
  )
}

export type Options = {
  account: LocalAccount
  challenge: Challenge.Challenge
  /** The token's EIP-712 domain, for EIP-3009 authorizations (default: the challenge's
   * `methodDetails.tokenDomain`). */
  tokenDomain?: Token.TokenDomain | undefined
}

export class PayingSession {
  readonly account: LocalAccount
  challenge: Challenge.Challenge
  request: Session.Request
  channelId: Hex | undefined
  /** The highest cumulative amount signed so far. */
  signed = 0n
  private readonly tokenDomain: Token.TokenDomain | undefined

  constructor(o: Options) {
    this.account = o.account
    this.challenge = o.challenge
    this.request = Session.requestOf(o.challenge)
    this.tokenDomain = o.tokenDomain
  }

  /** Adopts a fresh challenge (after a 402, or when the old one expires). */
  renew(challenge: Challenge.Challenge): void {
    this.challenge = challenge
    this.request = Session.requestOf(challenge)
  }

  /**
   * Whether deposits (open, topUp) go as EIP-3009 authorizations the server sends and pays
   * the gas of, else as transactions of the payer's (`hash`): the server must pay the gas
   * (`feePayer`) and take `authorization` credentials.
   */
  get serverSends(): boolean {
    const d = this.request.methodDetails
    return d.feePayer === true && d.credentialTypes?.includes('authorization') === true
  }

  /** Whether EIP-3009 authorizations (gasless open, topUp) can be signed. */
  get hasTokenDomain(): boolean {
    return this.domain !== undefined
  }

  /** The token's EIP-712 domain: the one given, else the one the challenge states. */
  private get domain(): Token.TokenDomain | undefined {
    if (this.tokenDomain) return this.tokenDomain
    const stated = this.request.methodDetails.tokenDomain
    return (
      stated && {
        ...stated,
        chainId: this.request.methodDetails.chainId,
        verifyingContract: this.request.currency,
      }
    )
  }

  private get scope() {
    return {
      chainId: this.request.methodDetails.chainId,
      escrow: this.request.methodDetails.escrowContract,
    }
  }

  private get source() {
    return Session.source({ chainId: this.scope.chainId, address: this.account.address })
  }

  private header(payload: Record<string, unknown>, withSource = false): string {
    return Credential.serialize(
      Credential.from({
        challenge: this.challenge,
        payload,
        ...(withSource ? { source: this.source } : {}),
      }),
    )
  }

  private async signVoucher(channelId: Hex, cumulativeAmount: bigint): Promise<Hex> {
    const signature = await Voucher.sign(this.account, {
      ...this.scope,
      channelId,
      cumulativeAmount,
    })
    if (cumulativeAmount > this.signed) this.signed = cumulativeAmount
    return signature
  }

  /** An EIP-3009 authorization moving `value` from the payer to the escrow, valid after
   * `validAfter` (unix seconds; 0: at once). */
  private async authorize(value: bigint, nonce: Hex, validAfter = 0n) {
    const domain = this.domain
    if (!domain) throw new Error('A token domain is needed to sign an EIP-3009 authorization.')
    // The evm draft's encoding: byte arrays, addresses among them, in lowercase hex.
    const authorization = {
      from: this.account.address.toLowerCase() as Address,
      to: this.scope.escrow.toLowerCase() as Address,
      value,
      validAfter,
      validBefore: BigInt(Math.floor(Date.now() / 1000) + 3600),
      nonce,
    }
    const signature = await signReceiveAuthorization(this.account, {
      domain,
      ...authorization,
    })
    return { authorization, signature }
  }

  /** `open` with `type="authorization"`: the server submits it and pays the gas. */
  async openWithAuthorization(o: {
    deposit: bigint
    initial: bigint
    salt?: Hex
    authorizedSigner?: Address
  }) {
    const salt =
      o.salt ?? keccak256(toHex(`${this.account.address}:${Date.now()}:${Math.random()}`))
    const payee = this.request.recipient
    const token = this.request.currency
    const channelId = Escrow.computeChannelId({
      payer: this.account.address,
      payee,
      token,
      salt,
      authorizedSigner: o.authorizedSigner,
      ...this.scope,
    })
    const nonce = Escrow.openNonce({
      from: this.account.address,
      payee,
      token,
      salt,
      authorizedSigner: o.authorizedSigner,
    })
    const { authorization, signature } = await this.authorize(o.deposit, nonce)
    this.channelId = channelId
    return this.header(
      {
        action: 'open',
        type: 'authorization',
        channelId,
        salt,
        cumulativeAmount: o.initial,
        ...(o.authorizedSigner ? { authorizedSigner: o.authorizedSigner.toLowerCase() } : {}),
        authorization,
        signature,
        voucherSignature: await this.signVoucher(channelId, o.initial),
      },
      true,
    )
  }

  /**
   * `credential` (an open) made again on the current challenge: its payload and signatures as
   * they were, nothing signed anew (an open signed anew, with a fresh salt, would be a second
   * channel and deposit).
   */
  again(credential: string): string {
    const { payload, source } = Credential.deserialize(credential)
    return Credential.serialize(Credential.from({ challenge: this.challenge, payload, source }))
  }

  /** `open` with `type="hash"`: the client broadcast `open` itself (tx `hash`). */
  async openWithHash(o: { channelId: Hex; salt: Hex; hash: Hex; initial: bigint }) {
    this.channelId = o.channelId
    return this.header(
      {
        action: 'open',
        type: 'hash',
        channelId: o.channelId,
        salt: o.salt,
        hash: o.hash,
        cumulativeAmount: o.initial,
        signature: await this.signVoucher(o.channelId, o.initial),
      },
      true,
    )
  }

  /** A voucher raising the cumulative amount to `cumulativeAmount`. */
  async voucher(cumulativeAmount: bigint) {
    const channelId = this.required()
    return this.header({
      action: 'voucher',
      channelId,
      cumulativeAmount,
      signature: await this.signVoucher(channelId, cumulativeAmount),
    })
  }

  /**
   * `topUp` with `type="authorization"`. For a channel with a forced close pending, pass its
   * `closeRequestedAt` (the escrow's, unix seconds; a 410 refusing a voucher on the channel
   * states it): the authorization is then valid from the close request on, which the escrow
   * requires of a top-up by authorization that cancels the close (one made before the request
   * does not, and the gateway refuses it before sending anything).
   */
  async topUp(additionalDeposit: bigint, options: { closeRequestedAt?: bigint } = {}) {
    const channelId = this.required()
    const topUpSalt = keccak256(toHex(`${channelId}:${Date.now()}:${Math.random()}`))
    const nonce = Escrow.topUpNonce({
      channelId,
      additionalDeposit,
      from: this.account.address,
      topUpSalt,
    })
    const { authorization, signature } = await this.authorize(
      additionalDeposit,
      nonce,
      options.closeRequestedAt ?? 0n,
    )
    return this.header({
      action: 'topUp',
      type: 'authorization',
      channelId,
      salt: topUpSalt,
      authorization,
      signature,
      additionalDeposit,
    })
  }

  /** `topUp` with `type="hash"`: the client broadcast `topUp` itself (tx `hash`). */
  async topUpWithHash(o: { hash: Hex; additionalDeposit: bigint }) {
    // The draft: a `type="hash"` credential names its payer (`source`), as `openWithHash`'s.
    return this.header(
      {
        action: 'topUp',
        type: 'hash',
        channelId: this.required(),
        hash: o.hash,
        additionalDeposit: o.additionalDeposit,
      },
      true,
    )
  }

  /** `close` with a final voucher for `cumulativeAmount`. */
  async close(cumulativeAmount: bigint) {
    const channelId = this.required()
    return this.header({
      action: 'close',
      channelId,
      cumulativeAmount,
      signature: await this.signVoucher(channelId, cumulativeAmount),
    })
  }

  private required(): Hex {
    if (!this.channelId) throw new Error('Open a channel first.')
    return this.channelId
  }
}
