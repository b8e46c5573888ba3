import { describe, expect, test } from 'bun:test'
import { mkdtemp, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ClientError } from '../../src/client/Errors.ts'
import * as Store from '../../src/client/Store.ts'

const state = (n: number): Store.ChannelState => ({
  channelId: `0x${n.toString(16).padStart(64, '0')}`,
  chainId: 31337,
  escrow: `0x${'11'.repeat(20)}`,
  currency: `0x${'22'.repeat(20)}`,
  recipient: `0x${'33'.repeat(20)}`,
  deposit: '1000',
  signed: String(n),
  url: 'http://localhost/v1/chat/completions',
})

const dir = () => mkdtemp(join(tmpdir(), 'tollway-store-'))

describe('file', () => {
  test('behavior: a missing file is an empty store; set, get (from a second store), delete', async () => {
    const path = join(await dir(), 'nested', 'channels.json')
    const a = Store.file(path)
    expect(await a.get('k')).toBeUndefined()
    await a.set('k', state(1))
    expect(await Store.file(path).get('k')).toEqual(state(1))
    await a.delete('k')
    expect(await Store.file(path).get('k')).toBeUndefined()
  })

  test('behavior: concurrent sets all land', async () => {
    const path = join(await dir(), 'channels.json')
    const s = Store.file(path)
    await Promise.all(Array.from({ length: 20 }, (_, i) => s.set(`k${i}`, state(i))))
    for (let i = 0; i < 20; i++) expect(await Store.file(path).get(`k${i}`)).toEqual(state(i))
  })

  test('error: a file that is not JSON → ClientError saying what to do', async () => {
    const path = join(await dir(), 'channels.json')
    await writeFile(path, '{nope')
    const e = await Store.file(path)
      .get('k')
      .catch((e) => e)
    expect(e).toBeInstanceOf(ClientError)
    expect(e.message).toContain('move it away')
  })
})

describe('memory', () => {
  test('behavior: set, get, delete', async () => {
    const s = Store.memory()
    await s.set('k', state(2))
    expect(await s.get('k')).toEqual(state(2))
    await s.delete('k')
    expect(await s.get('k')).toBeUndefined()
  })
})
