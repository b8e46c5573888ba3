/** The development chain's state file: kept, or set aside only when anvil cannot read it. */
import { expect, test } from 'bun:test'
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as DevChain from '../../src/chain/DevChain.ts'

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
