import { describe, expect, test } from 'bun:test'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { getBalance, getCode } from 'viem/actions'
import * as Client from '../../src/chain/Client.ts'
import * as DevChain from '../../src/chain/DevChain.ts'
import { DevChainError } from '../../src/chain/Errors.ts'
import * as Token from '../../src/chain/Token.ts'
import * as Anvil from '../helpers/Anvil.ts'

describe('start', () => {
  test('behavior: anvil with both contracts deployed and funded payers; stop() ends it', async () => {
    const chain = await DevChain.start({ accounts: 4, mint: 123_000_000n })
    const client = Client.from({ rpcUrl: chain.rpcUrl, chainId: chain.chainId })
    try {
      expect(chain.rpcUrl).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
      expect(chain.chainId).toBe(31337)
      expect(chain.payers).toHaveLength(3)
      expect(await getCode(client, { address: chain.escrowAddress })).toMatch(/^0x[0-9a-f]{100,}$/)
      expect(await getCode(client, { address: chain.currencyAddress })).toMatch(
        /^0x[0-9a-f]{100,}$/,
      )
      for (const payer of chain.payers) {
        expect(
          await Token.balanceOf(client, { token: chain.currencyAddress, owner: payer.address }),
        ).toBe(123_000_000n)
        expect(await getBalance(client, { address: payer.address })).toBeGreaterThan(0n)
      }
      // The payee can mint: it deployed TestUSD.
      const payee = Client.from({
        ...chain,
        privateKey: chain.payee.privateKey,
        pollingInterval: 20,
      })
      await Token.mint(payee, { token: chain.currencyAddress, to: chain.payee.address, amount: 1n })
      expect(
        await Token.balanceOf(client, { token: chain.currencyAddress, owner: chain.payee.address }),
      ).toBe(1n)
    } finally {
      await chain.stop()
    }
    expect(
      await fetch(chain.rpcUrl, { method: 'POST' }).then(
        () => 'answered',
        () => 'refused',
      ),
    ).toBe('refused')
  })

  test('behavior: on the port asked for; one another process holds is given up for a free one', async () => {
    // A port free a moment ago (a listener opened and closed), then the same port held.
    const probe = Bun.serve({ port: 0, hostname: '127.0.0.1', fetch: () => new Response() })
    const port = probe.port!
    probe.stop(true)
    const chain = await DevChain.start({ accounts: 2, port })
    try {
      expect(chain.rpcUrl).toBe(`http://127.0.0.1:${port}`)
      expect(chain.portTaken).toBeUndefined()
      const holder = Bun.serve({ port: 0, hostname: '127.0.0.1', fetch: () => new Response() })
      try {
        const other = await DevChain.start({ accounts: 2, port: holder.port! })
        try {
          expect(other.portTaken).toBe(holder.port!)
          expect(other.rpcUrl).not.toBe(`http://127.0.0.1:${holder.port}`)
          const client = Client.from({ rpcUrl: other.rpcUrl, chainId: other.chainId })
          expect(await getCode(client, { address: other.escrowAddress })).toMatch(/^0x[0-9a-f]+$/)
        } finally {
          await other.stop()
        }
      } finally {
        holder.stop(true)
      }
    } finally {
      await chain.stop()
    }
  })

  test('behavior: a process killed outright that its parent has not reaped yet (a zombie) does not keep its anvil: the port is free for its restart', async () => {
    if (process.platform !== 'linux') return
    const module = join(import.meta.dir, '../../src/chain/DevChain.ts')
    const script = `const D = await import(${JSON.stringify(module)}); const c = await D.start(); console.log(c.rpcUrl); await Bun.sleep(60_000)`
    // A parent that never reaps: the shell becomes sleep; its child, the bun that started
    // anvil, stays a zombie once killed, until the parent ends.
    const parent = Bun.spawn(
      ['sh', '-c', `"${process.execPath}" -e '${script}' & echo $!; exec sleep 60`],
      { stdout: 'pipe', stderr: 'inherit' },
    )
    try {
      const reader = parent.stdout.getReader()
      let out = ''
      while (!/http:\/\/\S+\n/.test(out)) {
        const { value, done } = await reader.read()
        if (done) throw new Error(`no RPC URL:\n${out}`)
        out += new TextDecoder().decode(value)
      }
      const pid = Number(/^(\d+)$/m.exec(out)![1])
      const rpcUrl = /(http:\/\/\S+)/.exec(out)![1]!
      expect(await Anvil.stopsAnswering(rpcUrl, 0)).toBe(false)
      process.kill(pid, 'SIGKILL')
      const gone = await Anvil.stopsAnswering(rpcUrl)
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
      // Still a zombie: its parent has not reaped it.
      expect(stat.slice(stat.lastIndexOf(')') + 2)[0]).toBe('Z')
      expect(gone).toBe(true)
    } finally {
      parent.kill()
      await parent.exited
    }
  }, 60_000)

  test('error: a missing anvil binary is a DevChainError', async () => {
    await expect(DevChain.start({ anvilPath: '/nonexistent/anvil' })).rejects.toBeInstanceOf(
      DevChainError,
    )
  })
})

describe('summary', () => {
  test('behavior: lists RPC URL, chain id, addresses, payee and two payer keys', () => {
    const [payee, ...payers] = DevChain.devAccounts(4)
    const lines = DevChain.summary({
      rpcUrl: 'http://127.0.0.1:8545',
      chainId: 31337,
      escrowAddress: '0x5FbDB2315678afecb367f032d93F642f64180aa3',
      currencyAddress: '0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512',
      payee: payee!,
      payers,
    }).join('\n')
    expect(lines).toContain('http://127.0.0.1:8545')
    expect(lines).toContain('31337')
    expect(lines).toContain('0x5FbDB2315678afecb367f032d93F642f64180aa3')
    expect(lines).toContain('0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512')
    expect(lines).toContain(payee!.address)
    expect(lines).toContain(payers[0]!.privateKey)
    expect(lines).toContain(payers[1]!.privateKey)
    expect(lines).not.toContain(payers[2]!.privateKey)
  })
})

describe('devAccounts', () => {
  test("behavior: anvil's well-known first account", () => {
    expect(DevChain.devAccounts(1)[0]).toEqual({
      address: '0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266',
      privateKey: '0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80',
    })
  })
})
