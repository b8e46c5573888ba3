/**
 * `npm run demo`: a gateway with its embedded defaults (PGlite, a development chain, the echo
 * model) in a temporary data dir on a free port, then an agent paying it from a development
 * wallet through `createFetch` under the official `openai` SDK: it opens a channel (gasless,
 * no RPC URL), streams an answer that needs several vouchers mid-stream, makes a second call on
 * the same channel, closes, and prints what it paid, what the payee received on-chain, and the
 * receipts. Then it stops everything. Nothing is configured and nothing is left behind.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import OpenAI from 'openai'
import { createFetch, Store } from 'tollway/client'
import type { Hex } from 'viem'
import * as Config from '../src/Config.ts'
import * as Client from '../src/chain/Client.ts'
import * as Token from '../src/chain/Token.ts'
import { start } from '../src/main.ts'
import type * as Receipt from '../src/payment/Receipt.ts'

const log = (line = '') => console.log(line)

const dataDir = await mkdtemp(join(tmpdir(), 'tollway-demo-'))
const started = Date.now()
// The embedded defaults, apart from free ports (its own and its chain's) and a data dir of its
// own (so a running `npm start` is left alone), and quiet logs.
const starting = start(Config.from({ dataDir, port: 0, devChainPort: 0, logLevel: 'error' }))
// Interrupted (Ctrl-C): stop the gateway and its chain and leave nothing behind either.
for (const signal of ['SIGINT', 'SIGTERM'] as const)
  process.once(signal, async () => {
    await (await starting.catch(() => undefined))?.stop().catch(() => {})
    await rm(dataDir, { recursive: true, force: true })
    process.exit(130)
  })
const gateway = await starting
try {
  const chain = gateway.chain!
  const payer = gateway.devChain!.payers[0]!
  const reader = Client.from({ rpcUrl: chain.rpcUrl, chainId: chain.chainId })
  const balance = (owner: Hex) =>
    Token.balanceOf(reader, { token: chain.currencyAddress as Hex, owner })
  const payee = gateway.devChain!.payee.address
  const payeeBefore = await balance(payee)
  const payerBefore = await balance(payer.address)
  log(`gateway   ${gateway.url} (embedded PGlite, echo model, dev chain ${chain.chainId})`)
  log(`escrow    ${chain.escrowAddress}`)
  log(`payer     ${payer.address} (a development key; no RPC URL, no gas)`)
  log(`payee     ${payee}`)
  log()

  const receipts: Receipt.Receipt[] = []
  let vouchers = 0
  const fetch = createFetch({
    account: payer.privateKey,
    limits: { maxDeposit: 1_000_000n, maxTotal: 2_000_000n },
    allow: { escrows: [chain.escrowAddress as Hex] },
    // Small, so that the stream needs several vouchers on its way.
    margin: 100n,
    store: Store.memory(),
    onVoucher: (v) => {
      vouchers++
      log(`  [voucher ${vouchers}: cumulative ${v.cumulativeAmount}]`)
    },
    onReceipt: (r) => receipts.push(r),
  })
  const openai = new OpenAI({ baseURL: `${gateway.url}/v1`, apiKey: 'unused', fetch })

  const words = Array.from({ length: 300 }, (_, i) => `token${i + 1}`).join(' ')
  log('1. a stream (the echo model repeats the prompt: 300 words)')
  const stream = await openai.chat.completions.create({
    model: 'tollway-echo',
    stream: true,
    messages: [{ role: 'user', content: words }],
  })
  let text = ''
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? ''
  const opened = (await fetch.channel(gateway.url))!
  log(`  answer: ${text.split(' ').slice(0, 6).join(' ')} … ${text.split(' ').at(-1)}`)
  log(`  channel ${opened.channelId}, deposit ${opened.deposit}`)
  log(`  vouchers sent mid-stream: ${vouchers}`)
  log()

  log('2. a second call on the same channel')
  const second = await openai.chat.completions.create({
    model: 'tollway-echo',
    messages: [{ role: 'user', content: 'and once more' }],
    max_tokens: 3,
  })
  log(`  answer: ${second.choices[0]?.message.content}`)
  const same = (await fetch.channel(gateway.url))?.channelId === opened.channelId
  log(`  same channel: ${same ? 'yes' : 'no'}`)
  log()

  log('3. close')
  const txHash = await fetch.close()
  log(`  settlement tx ${txHash}`)
  log()

  const paid = payerBefore - (await balance(payer.address))
  const received = (await balance(payee)) - payeeBefore
  const spent = receipts.at(-1)?.spent
  log(`paid by the agent (on-chain): ${paid} base units`)
  log(`received by the payee (on-chain): ${received} base units`)
  log(`spent per the last receipt: ${spent} base units`)
  log(`receipts (${receipts.length}):`)
  for (const r of receipts) log(`  ${JSON.stringify(r)}`)
  log()
  if (!same || paid !== received || vouchers < 3 || String(paid) !== spent)
    throw new Error('The demo did not go as it should; see above.')
  log(`done in ${((Date.now() - started) / 1000).toFixed(1)} s`)
} finally {
  await gateway.stop()
  await rm(dataDir, { recursive: true, force: true })
}
process.exit(0)
