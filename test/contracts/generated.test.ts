import { describe, expect, test } from 'bun:test'
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { build } from '../../contracts/build.ts'

const committed = join(import.meta.dir, '../../src/chain/generated')

describe('build', () => {
  // One source of truth: the committed ABIs and bytecode must be what the sources compile to.
  test('behavior: committed generated files equal a fresh build', () => {
    const dir = mkdtempSync(join(tmpdir(), 'tollway-build-'))
    try {
      const files = build(dir).map((file) => file.slice(dir.length + 1))
      expect(files.sort()).toEqual(readdirSync(committed).sort())
      for (const file of files) {
        const fresh = readFileSync(join(dir, file), 'utf8')
        const onDisk = readFileSync(join(committed, file), 'utf8')
        if (fresh !== onDisk) throw new Error(`${file} is stale: run \`npm run build:contracts\``)
        expect(onDisk).toBe(fresh)
      }
    } finally {
      rmSync(dir, { recursive: true, force: true })
    }
  }, 120_000)
})
