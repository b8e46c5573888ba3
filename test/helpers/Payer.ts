/**
 * A paying client for tests: `createFetch` for one of the development chain's payers, paying
 * `gateway`, with generous limits, a small margin and a store in memory unless `options` say
 * otherwise; and the official `openai` SDK over it.
 */
import OpenAI from 'openai'
import { createFetch, type Options, Store } from '../../src/client/index.ts'
import type { TestChain } from './Anvil.ts'

export function client(
  chain: TestChain,
  gatewayUrl: string,
  payer: number,
  options: Partial<Options> = {},
) {
  const fetch = createFetch({
    account: chain.payers[payer]!.privateKey,
    rpcUrl: chain.rpcUrl,
    limits: { maxDeposit: 1_000_000n, maxTotal: 1_000_000n },
    allow: { escrows: [chain.escrowAddress], currencies: [chain.currencyAddress] },
    margin: 64n,
    store: Store.memory(),
    ...options,
  })
  return {
    fetch,
    openai: new OpenAI({ baseURL: `${gatewayUrl}/v1`, apiKey: 'unused', fetch, maxRetries: 0 }),
  }
}
