/** The development chain's state file: kept, or set aside only when anvil cannot read it. */
import { expect, test } from 'bun:test'
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { sendTransaction, waitForTransactionReceipt } from 'viem/actions'
import * as Client from '../../src/chain/Client.ts'
import * as DevChain from '../../src/chain/DevChain.ts'
import * as Token from '../../src/chain/Token.ts'

test('behavior: a state file anvil cannot read is set aside; one it could read stays when anvil fails otherwise', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'devchain-'))
  const state = join(dir, 'anvil-state.json')
  const good = await DevChain.start({ stateFile: state })
  await Bun.sleep(1_500)
  await good.stop()
  const kept = readFileSync(state, 'utf8')
  expect(kept.length).toBeGreaterThan(100)
  // anvil missing: the start fails and the good state stays where it is.
  await expect(
    DevChain.start({ stateFile: state, anvilPath: '/nonexistent/anvil' }),
  ).rejects.toThrow()
  expect(readdirSync(dir)).toEqual(['anvil-state.json'])
  expect(readFileSync(state, 'utf8')).toBe(kept)
  // Cut short: set aside, and a fresh chain starts.
  writeFileSync(state, '{"block":')
  const fresh = await DevChain.start({ stateFile: state })
  try {
    expect(fresh.setAside).toBeString()
    expect(readFileSync(fresh.setAside!, 'utf8')).toBe('{"block":')
  } finally {
    await fresh.stop()
  }
}, 60_000)

test('behavior: a state file of a start cut short while it funded the payers (the gateway killed then) is completed: every payer funded, the contracts where they were', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'devchain-'))
  const state = join(dir, 'anvil-state.json')
  // What a kill between the first mints and the last leaves: the contracts, two payers funded.
  const cut = await DevChain.start({ stateFile: state, accounts: 3 })
  await cut.stop()
  const resumed = await DevChain.start({ stateFile: state })
  try {
    expect(resumed.escrowAddress).toBe(cut.escrowAddress)
    expect(resumed.currencyAddress).toBe(cut.currencyAddress)
    const client = Client.from({ rpcUrl: resumed.rpcUrl, chainId: resumed.chainId })
    expect(resumed.payers).toHaveLength(9)
    for (const payer of resumed.payers)
      expect(
        await Token.balanceOf(client, { token: resumed.currencyAddress, owner: payer.address }),
      ).toBe(1_000_000_000_000n)
  } finally {
    await resumed.stop()
  }
  // Started again, nothing is minted twice.
  const again = await DevChain.start({ stateFile: state })
  try {
    const client = Client.from({ rpcUrl: again.rpcUrl, chainId: again.chainId })
    expect(
      await Token.balanceOf(client, {
        token: again.currencyAddress,
        owner: again.payers[0]!.address,
      }),
    ).toBe(1_000_000_000_000n)
  } finally {
    await again.stop()
  }
}, 60_000)

test('behavior: a start cut short while it funded the payers, then a gateway that sent transactions from the payee (settlements, closes), is completed on the next start: no payer left unfunded, none funded twice', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'devchain-'))
  const state = join(dir, 'anvil-state.json')
  // A kill between the first mints and the last (two payers funded), then the gateway served
  // (as a release before the completion did): its payee settled and closed channels.
  const cut = await DevChain.start({ stateFile: state, accounts: 3 })
  const payee = Client.from({
    rpcUrl: cut.rpcUrl,
    chainId: cut.chainId,
    privateKey: cut.payee.privateKey,
  })
  let last: `0x${string}` | undefined
  for (let i = 0; i < 3; i++)
    last = await sendTransaction(payee, { to: cut.payee.address, value: 0n } as never)
  await waitForTransactionReceipt(payee, { hash: last! })
  await cut.stop()
  const resumed = await DevChain.start({ stateFile: state })
  try {
    const client = Client.from({ rpcUrl: resumed.rpcUrl, chainId: resumed.chainId })
    const balances = await Promise.all(
      resumed.payers.map((payer) =>
        Token.balanceOf(client, { token: resumed.currencyAddress, owner: payer.address }),
      ),
    )
    expect(balances).toEqual(Array(9).fill(1_000_000_000_000n))
  } finally {
    await resumed.stop()
  }
}, 60_000)
