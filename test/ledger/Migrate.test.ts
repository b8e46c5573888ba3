/**
 * The migration runner: migrations once each, and the SQL functions of ledger/functions
 * applied again whenever their text changed, so a function's change edits its file.
 */
import { describe, expect, test } from 'bun:test'
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import * as Db from '../../src/ledger/Db.ts'
import * as Postgres from '../helpers/Postgres.ts'

const db = await Postgres.fresh()
const file = 'tollway_ledger_many.sql'
const text = readFileSync(join(import.meta.dir, '../../src/ledger/functions', file), 'utf8')
const sha256 = createHash('sha256').update(text).digest('hex')

describe('Db.migrate', () => {
  test('behavior: a function file is applied after the migrations and recorded with its hash; again, nothing runs', async () => {
    const [row] = await db.sql`select sha256 from schema_functions where name = ${file}`
    expect(row?.sha256).toBe(sha256)
    expect(await Db.migrate(db.sql)).toEqual([])
  })

  test('behavior: a function whose recorded text differs is applied again (its file is the definition)', async () => {
    // As a database migrated before the file changed: another function body in place.
    await db.sql.unsafe(
      `alter function tollway_ledger_many(jsonb) rename to tollway_ledger_many_old`,
    )
    await db.sql`update schema_functions set sha256 = 'an older text' where name = ${file}`
    expect(await Db.migrate(db.sql)).toEqual([`functions/${file}`])
    const [fn] = await db.sql`
      select count(*)::int as n from pg_proc
      where proname = 'tollway_ledger_many' and pronamespace = current_schema()::regnamespace`
    expect(fn?.n).toBe(1)
    const [row] = await db.sql`select sha256 from schema_functions where name = ${file}`
    expect(row?.sha256).toBe(sha256)
  })
})
