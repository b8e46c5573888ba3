/**
 * viem clients for the chain layer. One client type serves reads and writes: actions from
 * `viem/actions` take it first (`Escrow.settle(client, {...})`); writes need an account.
 */
import {
  type Account,
  type Chain,
  createClient,
  createNonceManager,
  defineChain,
  type Hex,
  http,
  type Transport,
  type Client as ViemClient,
} from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import { getBlock } from 'viem/actions'
import { jsonRpc } from 'viem/nonce'

/** Where the chain is; plain values, the gateway's Config maps env vars onto them. */
export type Options = {
  rpcUrl: string
  chainId: number
  /** Key of the account that sends transactions; omit for a read-only client. */
  privateKey?: Hex | undefined
  /** How often to poll for receipts and events, in ms (default 1000; anvil needs far less). */
  pollingInterval?: number | undefined
}

/** A client that can read; it can write when it carries an account. */
export type Client = ViemClient<Transport, Chain, Account | undefined>
/** A client that carries an account and can send transactions. */
export type WalletClient = ViemClient<Transport, Chain, Account>

/** Creates a client for the chain at `rpcUrl`, with an account when `privateKey` is given. */
export function from(options: Options & { privateKey: Hex }): WalletClient
export function from(options: Options): Client
export function from(options: Options): Client {
  return createClient({
    chain: chain(options),
    transport: http(options.rpcUrl, { retryCount: 2 }),
    // A nonce manager per client hands out nonces locally, so concurrent sends from one account
    // (the gateway settling many channels) do not collide on the same pending nonce. Not viem's
    // shared one: it would carry nonces over between chains (e.g. two dev chains in one process).
    account: options.privateKey
      ? privateKeyToAccount(options.privateKey, {
          nonceManager: createNonceManager({ source: jsonRpc() }),
        })
      : undefined,
    pollingInterval: options.pollingInterval ?? 1_000,
  })
}

/** A viem chain definition for an arbitrary chain id and RPC URL. */
export function chain(options: { chainId: number; rpcUrl: string }): Chain {
  return defineChain({
    id: options.chainId,
    name: `chain ${options.chainId}`,
    nativeCurrency: { name: 'Ether', symbol: 'ETH', decimals: 18 },
    rpcUrls: { default: { http: [options.rpcUrl] } },
  })
}

/**
 * The chain's time now: the timestamp of the block a transaction sent now would be mined in
 * (`pending`), not below the latest block's. A chain that mines only on transactions (anvil,
 * the development chain) keeps its latest block's time from its last transaction however long
 * it sits idle: read from that alone, a forced close on an idle chain never came of age. A node
 * without a pending block answers for the latest one.
 */
export async function now(
  client: ViemClient<Transport, Chain | undefined, Account | undefined>,
): Promise<bigint> {
  // Both asked at once: one round trip's wait, not two.
  const [latest, pending] = await Promise.all([
    getBlock(client).then((b) => b.timestamp),
    getBlock(client, { blockTag: 'pending' }).then(
      (b) => b.timestamp,
      () => 0n,
    ),
  ])
  return pending > latest ? pending : latest
}
