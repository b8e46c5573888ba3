/**
 * A development chain for a test file: one anvil with the contracts deployed (start it in
 * beforeAll), and `reset()` to return to the freshly deployed state before each test
 * (evm_snapshot / evm_revert, a few milliseconds).
 */
import type { Hex } from 'viem'
import * as Client from '../../src/chain/Client.ts'
import * as DevChain from '../../src/chain/DevChain.ts'

export type TestChain = DevChain.DevChain & {
  /** A client acting as the payee (gateway). */
  payeeClient: Client.WalletClient
  /** A client acting as payer `index`. */
  payerClient(index?: number): Client.WalletClient
  /** A client with another dev account's key (e.g. a third party). */
  clientFor(privateKey: Hex): Client.WalletClient
  /** Reverts the chain to the state right after deployment. */
  reset(): Promise<void>
  /** Moves block time forward by `seconds` and mines a block. */
  increaseTime(seconds: number): Promise<void>
  /** Puts runtime bytecode `code` at `address` (a contract that answers as the test needs). */
  setCode(address: Hex, code: Hex): Promise<void>
}

export async function start(options: DevChain.Options = {}): Promise<TestChain> {
  const chain = await DevChain.start(options)
  const clients = new Map<Hex, Client.WalletClient>()
  const clientFor = (privateKey: Hex) => {
    let client = clients.get(privateKey)
    if (!client) {
      client = Client.from({
        rpcUrl: chain.rpcUrl,
        chainId: chain.chainId,
        privateKey,
        pollingInterval: 20,
      })
      clients.set(privateKey, client)
    }
    return client
  }
  const payeeClient = clientFor(chain.payee.privateKey)
  let snapshot = (await payeeClient.request({ method: 'evm_snapshot' } as never)) as Hex
  return {
    ...chain,
    payeeClient,
    clientFor,
    payerClient: (index = 0) => {
      const payer = chain.payers[index]
      if (!payer) throw new Error(`no payer ${index}`)
      return clientFor(payer.privateKey)
    },
    async reset() {
      await payeeClient.request({ method: 'evm_revert', params: [snapshot] } as never)
      // Reverting rewinds account nonces; the clients' nonce managers must forget theirs.
      for (const client of clients.values())
        client.account.nonceManager?.reset({
          address: client.account.address,
          chainId: chain.chainId,
        })
      // A snapshot is consumed by reverting to it: take a new one for the next test.
      snapshot = (await payeeClient.request({ method: 'evm_snapshot' } as never)) as Hex
    },
    async increaseTime(seconds: number) {
      await payeeClient.request({ method: 'evm_increaseTime', params: [seconds] } as never)
      await payeeClient.request({ method: 'evm_mine' } as never)
    },
    async setCode(address: Hex, code: Hex) {
      await payeeClient.request({ method: 'anvil_setCode', params: [address, code] } as never)
    },
  }
}

/**
 * Whether the node at `rpcUrl` stops answering within `ms` (its anvil ended): asked every
 * 200 ms. An anvil left running after its gateway was killed keeps answering.
 */
export async function stopsAnswering(rpcUrl: string, ms = 10_000): Promise<boolean> {
  const rpc = () =>
    fetch(rpcUrl, { method: 'POST', body: '{"jsonrpc":"2.0","id":1,"method":"eth_chainId"}' })
  const deadline = Date.now() + ms
  for (;;) {
    const gone = await rpc().then(
      () => false,
      () => true,
    )
    if (gone || Date.now() >= deadline) return gone
    await Bun.sleep(200)
  }
}
