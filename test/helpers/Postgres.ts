/**
 * A fresh database for one test file: a new schema on the server at DATABASE_URL, or, when
 * it is unset, an in-memory embedded PGlite. Migrated and with the default plans.
 */
import { afterAll } from 'bun:test'
import * as Config from '../../src/Config.ts'
import * as Accounts from '../../src/ledger/Accounts.ts'
import * as Db from '../../src/ledger/Db.ts'
import * as Embedded from '../../src/ledger/Embedded.ts'

export type TestDb = { sql: Db.Sql; url: string; schema?: string; max: number }

/** Creates the database and registers its teardown with `afterAll`. */
export async function fresh(
  plans: Record<string, Config.Plan> = Config.from({}).plans,
): Promise<TestDb> {
  const url = process.env.DATABASE_URL
  let db: TestDb
  let stop: () => Promise<void>
  if (url) {
    const schema = `t_${crypto.randomUUID().replaceAll('-', '')}`
    const admin = Db.connect({ url, max: 1 })
    await admin.unsafe(`create schema ${schema}`)
    const sql = Db.connect({ url, schema, max: 10 })
    db = { sql, url, schema, max: 10 }
    stop = async () => {
      await sql.end()
      await admin.unsafe(`drop schema ${schema} cascade`)
      await admin.end()
    }
  } else {
    const embedded = await Embedded.start()
    const sql = Db.connect({ url: embedded.url, max: 1 })
    db = { sql, url: embedded.url, max: 1 }
    stop = async () => {
      await sql.end()
      await embedded.stop()
    }
  }
  await Db.migrate(db.sql)
  await Accounts.syncPlans(db.sql, plans)
  afterAll(stop)
  return db
}
