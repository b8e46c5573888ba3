/**
 * Paying a gateway by hand in tests (src/client/Session.ts, below createFetch): a fresh
 * challenge, and a channel opened by EIP-3009 authorization.
 */
import { expect } from 'bun:test'
import { type Hex, keccak256, type LocalAccount, toHex } from 'viem'
import type * as Client from '../../src/chain/Client.ts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import * as Voucher from '../../src/chain/Voucher.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import type * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'

/**
 * An open the payer broadcast itself (paying its gas) on the test chain, with `deposit`: the
 * channel, salt and transaction hash its `hash` credential names.
 */
export async function broadcastOpen(
  chain: { escrowAddress: Hex; currencyAddress: Hex; payee: { address: Hex } },
  payer: Client.WalletClient,
  deposit: bigint,
) {
  const salt = keccak256(toHex(`hash-open-${Date.now()}-${Math.random()}`))
  const opened = await Escrow.open(payer, {
    escrow: chain.escrowAddress,
    payee: chain.payee.address,
    token: chain.currencyAddress,
    deposit,
    salt,
  })
  return { channelId: opened.channelId, salt, hash: opened.hash }
}

/** The Payment challenge a completion request without credentials gets (a 402) at `url`. */
export async function challenge(url: string, body?: string) {
  const res = await fetch(url, {
    method: 'POST',
    body: body ?? JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
  })
  expect(res.status).toBe(402)
  return challengeOf(res.headers.get('www-authenticate'))!
}

/** A paying session of `account` whose channel at `url` was opened (HEAD, no request) with
 * `deposit` and an initial voucher for `initial`. */
export async function opened(
  url: string,
  o: { account: LocalAccount; tokenDomain: Token.TokenDomain; deposit: bigint; initial: bigint },
) {
  const session = new PayingSession({
    account: o.account,
    challenge: await challenge(url),
    tokenDomain: o.tokenDomain,
  })
  const res = await fetch(url, {
    method: 'HEAD',
    headers: {
      authorization: await session.openWithAuthorization({
        deposit: o.deposit,
        initial: o.initial,
      }),
    },
  })
  expect(res.status).toBe(200)
  return session
}

/**
 * A voucher credential's `deposit` that tops channel `channelId` up by `additional` from
 * `account` (an EIP-3009 authorization signed by it, for the gateway to submit).
 */
export async function topUpDeposit(
  account: LocalAccount,
  o: {
    channelId: Hex
    additional: bigint
    escrow: Hex
    tokenDomain: Token.TokenDomain
    salt: Hex
  },
) {
  const authorization = {
    from: account.address,
    to: o.escrow,
    value: o.additional,
    validAfter: 0n,
    validBefore: BigInt(Math.floor(Date.now() / 1000) + 3600),
    nonce: Escrow.topUpNonce({
      channelId: o.channelId,
      additionalDeposit: o.additional,
      from: account.address,
      topUpSalt: o.salt,
    }),
  }
  return {
    action: 'topUp',
    type: 'authorization',
    authorization,
    signature: await Token.signReceiveAuthorization(account, {
      domain: o.tokenDomain,
      ...authorization,
    }),
    salt: o.salt,
  }
}

/**
 * A voucher credential (its header) on `challenge` for `cumulative` on channel `channelId`,
 * signed by `account`, that carries a top-up of `additional` from `account` (see
 * `topUpDeposit`): the gateway submits the top-up, then takes the voucher.
 */
export async function voucherWithTopUp(
  account: LocalAccount,
  o: {
    challenge: Challenge.Challenge
    chain: { chainId: number; escrowAddress: Hex }
    tokenDomain: Token.TokenDomain
    channelId: Hex
    cumulative: bigint
    additional: bigint
    salt: Hex
  },
): Promise<string> {
  const { channelId, cumulative } = o
  const escrow = o.chain.escrowAddress
  return Credential.serialize(
    Credential.from({
      challenge: o.challenge,
      payload: {
        action: 'voucher',
        channelId,
        cumulativeAmount: cumulative,
        signature: await Voucher.sign(account, {
          chainId: o.chain.chainId,
          escrow,
          channelId,
          cumulativeAmount: cumulative,
        }),
        deposit: await topUpDeposit(account, {
          channelId,
          additional: o.additional,
          escrow,
          tokenDomain: o.tokenDomain,
          salt: o.salt,
        }),
      },
    }),
  )
}
