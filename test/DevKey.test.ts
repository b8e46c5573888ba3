/**
 * The embedded database's development key (`npm start`): its account, credits and key are made
 * together or not at all, and kept in the data dir.
 */
import { expect, test } from 'bun:test'
import { mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as Config from '../src/Config.ts'
import { devKey, tryModel } from '../src/main.ts'
import * as Postgres from './helpers/Postgres.ts'

test('error: a development key whose key cannot be made leaves no account or credits behind (one transaction); once it can, one account is made, and its kept key is used again after', async () => {
  const db = await Postgres.fresh()
  const { sql } = db
  const config = {
    dataDir: mkdtempSync(join(tmpdir(), 'tollway-devkey-')),
    plans: Config.from({}).plans,
  }
  await sql`create function refuse() returns trigger language plpgsql as
    $$ begin raise exception 'no keys today'; end $$`
  await sql`create trigger refuse before insert on api_keys for each row execute function refuse()`
  await expect(devKey(sql, config)).rejects.toThrow('no keys today')
  expect(await sql`select id from accounts where name = 'dev'`).toHaveLength(0)
  expect(await sql`select id from credit_transactions`).toHaveLength(0)

  await sql`drop trigger refuse on api_keys`
  const key = await devKey(sql, config)
  expect(readFileSync(join(config.dataDir, 'dev-key'), 'utf8').trim()).toBe(key)
  expect(await devKey(sql, config)).toBe(key)
  const accounts = await sql`select balance from accounts where name = 'dev'`
  expect(accounts).toHaveLength(1)
  expect(accounts[0]!.balance).toBe(10_000_000n)
}, 20_000)

test("behavior: the banner's curl names a model the development account's plan may use", async () => {
  const db = await Postgres.fresh()
  const { sql } = db
  const plans = Config.from({}).plans
  const config = { dataDir: mkdtempSync(join(tmpdir(), 'tollway-devkey-')), plans }
  // Made on the highest tier of its day (pro, tier 1); then a config adds a model above it,
  // first in its list.
  const key = await devKey(sql, config)
  const model = (id: string, minTier: number) =>
    ({ id, minTier }) as Config.Config['models'][number]
  const models = [model('premium', 2), model('standard', 1), model('basic', 0)]
  expect(await tryModel(sql, { models }, key)).toBe('standard')
  // Without a key (a database of the operator's), the first; with no models, the echo model.
  expect(await tryModel(sql, { models }, undefined)).toBe('premium')
  expect(await tryModel(sql, { models: [] }, key)).toBe('tollway-echo')
}, 20_000)
