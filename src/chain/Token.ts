/**
 * The payment token: ERC-20 reads and approvals, TestUSD's deployer-only mint, and EIP-3009
 * `ReceiveWithAuthorization` signing (what a payer signs for `openWithAuthorization`).
 */
import { type Address, erc20Abi, type Hex, isAddressEqual, type LocalAccount } from 'viem'
import { readContract } from 'viem/actions'
import type { Client } from './Client.ts'
import { describe, TokenDomainError } from './Errors.ts'
import { abi as testUsdAbi } from './generated/TestUSD.ts'
import * as Transaction from './Transaction.ts'

/** The token balance of `owner`, in base units. */
export function balanceOf(
  client: Client,
  parameters: { token: Address; owner: Address },
): Promise<bigint> {
  return readContract(client, {
    address: parameters.token,
    abi: erc20Abi,
    functionName: 'balanceOf',
    args: [parameters.owner],
  })
}

/** How much `spender` may pull from `owner`. */
export function allowance(
  client: Client,
  parameters: { token: Address; owner: Address; spender: Address },
): Promise<bigint> {
  return readContract(client, {
    address: parameters.token,
    abi: erc20Abi,
    functionName: 'allowance',
    args: [parameters.owner, parameters.spender],
  })
}

/** Approves `spender` to pull `amount` from the client's account. */
export function approve(
  client: Client,
  parameters: { token: Address; spender: Address; amount: bigint },
): Promise<Transaction.Sent> {
  return Transaction.send(client, {
    address: parameters.token,
    abi: erc20Abi,
    functionName: 'approve',
    args: [parameters.spender, parameters.amount],
  })
}

/** Mints TestUSD (development token only; the client must be its deployer). */
export function mint(
  client: Client,
  parameters: { token: Address; to: Address; amount: bigint },
): Promise<Transaction.Sent> {
  return Transaction.send(client, {
    address: parameters.token,
    abi: testUsdAbi,
    functionName: 'mint',
    args: [parameters.to, parameters.amount],
  })
}

/**
 * The token's EIP-712 domain as it reports it (ERC-5267 `eip712Domain()`), which must be the
 * token's on the client's chain: signed with another chain id or verifying contract, an EIP-3009
 * authorization is one the token rejects. The node's answer is outside input: one that cannot
 * be read, or a domain of another chain or contract, throws a TokenDomainError naming it.
 */
export async function domain(client: Client, parameters: { token: Address }): Promise<TokenDomain> {
  const { token } = parameters
  const [, name, version, chainId, verifyingContract] = await readContract(client, {
    address: token,
    abi: testUsdAbi,
    functionName: 'eip712Domain',
  }).catch((error: unknown) => {
    const said = describe(error).message.split('\n')[0]!.slice(0, 200)
    throw new TokenDomainError(token, `could not be read (eip712Domain(), ERC-5267): ${said}`, {
      cause: error,
    })
  })
  if (chainId !== BigInt(client.chain.id))
    throw new TokenDomainError(
      token,
      `is for chain ${String(chainId).slice(0, 80)}, not this chain (${client.chain.id})`,
    )
  if (!isAddressEqual(verifyingContract, token))
    throw new TokenDomainError(token, `names another contract (${verifyingContract})`)
  return { name, version, chainId: client.chain.id, verifyingContract }
}

export type TokenDomain = {
  name: string
  version: string
  chainId: number
  verifyingContract: Address
}

export type ReceiveAuthorization = {
  from: Address
  to: Address
  value: bigint
  validAfter: bigint
  validBefore: bigint
  nonce: Hex
}

/** Signs an EIP-3009 `ReceiveWithAuthorization` (65 bytes r||s||v). */
export function signReceiveAuthorization(
  account: LocalAccount,
  parameters: { domain: TokenDomain } & ReceiveAuthorization,
): Promise<Hex> {
  const { domain, ...message } = parameters
  return account.signTypedData({
    domain,
    types: {
      ReceiveWithAuthorization: [
        { name: 'from', type: 'address' },
        { name: 'to', type: 'address' },
        { name: 'value', type: 'uint256' },
        { name: 'validAfter', type: 'uint256' },
        { name: 'validBefore', type: 'uint256' },
        { name: 'nonce', type: 'bytes32' },
      ],
    },
    primaryType: 'ReceiveWithAuthorization',
    message,
  })
}
