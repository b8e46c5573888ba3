/**
 * The migration runner: migrations once each, and the SQL functions of ledger/functions
 * applied again when their file's version rises, so a function's change edits its file.
 */
import { describe, expect, test } from 'bun:test'
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import * as Db from '../../src/ledger/Db.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Postgres from '../helpers/Postgres.ts'
import * as Upstream from '../helpers/Upstream.ts'

const db = await Postgres.fresh()
const file = 'tollway_ledger_batch.sql'
const text = readFileSync(join(import.meta.dir, '../../src/ledger/functions', file), 'utf8')
const sha256 = createHash('sha256').update(text).digest('hex')
const recorded = async () =>
  (await db.sql`select version, sha256 from schema_functions where name = ${file}`)[0]
const definitions = async () =>
  (
    await db.sql`
      select count(*)::int as n from pg_proc
      where proname = 'tollway_ledger_batch' and pronamespace = current_schema()::regnamespace`
  )[0]?.n

describe('Db.migrate', () => {
  test('behavior: a function file is applied after the migrations and recorded with its version and hash; again, nothing runs', async () => {
    expect((await recorded())?.sha256).toBe(sha256)
    expect(await Db.migrate(db.sql)).toEqual([])
  })

  test('behavior: a higher version than applied is applied again; a lower one is left alone (a rolling deploy never goes back)', async () => {
    const version = (await recorded())!.version as number
    // A database an instance of the next release migrated already: left as it is.
    await db.sql`update schema_functions set version = ${version + 1} where name = ${file}`
    expect(await Db.migrate(db.sql)).toEqual([])
    // A database migrated before the file changed: an older version, another body in place.
    await db.sql.unsafe('alter function tollway_ledger_batch(jsonb) rename to tollway_ledger_old')
    expect(await definitions()).toBe(0)
    await db.sql`update schema_functions set version = ${version - 1}, sha256 = 'older'
      where name = ${file}`
    expect(await Db.migrate(db.sql)).toEqual([`functions/${file}`])
    expect(await definitions()).toBe(1)
    expect(await recorded()).toEqual({ version, sha256 })
  })

  test('error: the same version with another text stops the start, naming the file', async () => {
    await db.sql`update schema_functions set sha256 = 'an edit' where name = ${file}`
    await expect(Db.migrate(db.sql)).rejects.toThrow(/tollway_ledger_batch.sql.*raise it/)
    await db.sql`update schema_functions set sha256 = ${sha256} where name = ${file}`
  })
})

describe('Db.newer', () => {
  test('behavior: migrations a newer release applied are named, and a gateway starting on that database warns', async () => {
    const other = await Postgres.fresh()
    expect(await Db.newer(other.sql)).toEqual([])
    await other.sql`insert into schema_migrations (name) values ('9999_from_the_future.sql')`
    expect(await Db.newer(other.sql)).toEqual(['9999_from_the_future.sql'])
    const gw = await Gateway.create({}, { db: other, upstream: Upstream.start() })
    const warned = gw.logs.find((l) => l.includes('newer release'))
    expect(warned).toContain('9999_from_the_future.sql')
  })
})
