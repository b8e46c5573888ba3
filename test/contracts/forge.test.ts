import { describe, expect, test } from 'bun:test'
import { join } from 'node:path'

const root = join(import.meta.dir, '../..')

describe('forge test', () => {
  // Unit, fuzz and invariant tests of contracts/ (see contracts/test). forge compiles with the
  // npm solc through contracts/solc.cjs, so nothing here needs a hand-installed tool.
  test('behavior: every Solidity test passes', () => {
    const forge = Bun.spawnSync([join(root, 'node_modules/.bin/forge'), 'test'], {
      cwd: join(root, 'contracts'),
      env: { ...process.env, FOUNDRY_DISABLE_NIGHTLY_WARNING: '1', NO_COLOR: '1' },
    })
    const output = `${forge.stdout.toString()}\n${forge.stderr.toString()}`
    if (forge.exitCode !== 0) console.error(output)
    expect(forge.exitCode).toBe(0)
    expect(output).toMatch(/invariant_escrowBalanceEqualsOpenChannelDebt\(\) \(runs: \d+/)
  }, 300_000)
})
