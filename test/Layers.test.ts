/**
 * The layers of DESIGN.md: data flows from http/ down to chain/, and nothing imports upward.
 * Reads every import of src/ (static and dynamic, types included) and fails on one that
 * reaches a layer above its file's.
 */
import { describe, expect, test } from 'bun:test'
import { readdirSync, readFileSync } from 'node:fs'
import { dirname, join, relative, resolve } from 'node:path'

const src = resolve(import.meta.dir, '../src')
const order = ['http', 'payment', 'metering', 'upstream', 'ledger', 'chain']

/** The layer of a path under src/ (undefined for top-level files and other folders). */
function layer(path: string): string | undefined {
  const first = relative(src, path).split('/')[0]
  return first !== undefined && order.includes(first) ? first : undefined
}

/** The relative specifiers a TypeScript file imports or re-exports. */
function specifiers(text: string): string[] {
  const found: string[] = []
  const pattern = /(?:\bfrom\s*|\bimport\s*\(\s*|\bimport\s+)['"](\.{1,2}\/[^'"]+)['"]/g
  for (const m of text.matchAll(pattern)) found.push(m[1]!)
  return found
}

function files(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? files(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : [],
  )
}

describe('layers', () => {
  test('behavior: the import reader finds static, type-only, dynamic and side-effect imports', () => {
    expect(
      specifiers(`import * as A from '../a.ts'
import type { B } from "./b.ts"
export { C } from '../../c.ts'
const d = await import('../d.ts')
import './e.ts'
import { z } from 'zod'`),
    ).toEqual(['../a.ts', './b.ts', '../../c.ts', '../d.ts', './e.ts'])
  })

  test('behavior: no file under src/ imports from a layer above its own', () => {
    const upward: string[] = []
    for (const file of files(src)) {
      const own = layer(file)
      if (own === undefined) continue
      for (const spec of specifiers(readFileSync(file, 'utf8'))) {
        const target = layer(resolve(dirname(file), spec))
        if (target !== undefined && order.indexOf(target) < order.indexOf(own))
          upward.push(`${relative(src, file)} imports ${spec} (${target} is above ${own})`)
      }
    }
    expect(upward).toEqual([])
  })
})
