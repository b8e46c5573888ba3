/** What the benchmarks share: a fresh database and a data dir with a config file. */
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import postgres from 'postgres'

/**
 * A fresh database `name` on the server at DATABASE_URL (its URL), or '' when unset: the
 * gateway then runs on the embedded PGlite.
 */
export async function freshDatabase(name: string): Promise<string> {
  if (!process.env.DATABASE_URL) return ''
  const admin = postgres(process.env.DATABASE_URL, { max: 1, onnotice: () => {} })
  await admin.unsafe(`drop database if exists ${name}`)
  await admin.unsafe(`create database ${name}`)
  await admin.end()
  const url = new URL(process.env.DATABASE_URL)
  url.pathname = `/${name}`
  return url.toString()
}

/** A new data dir holding `config` as config.json; returns both paths. */
export function dataDir(config: unknown): { dir: string; config: string } {
  const dir = mkdtempSync(join(tmpdir(), 'tollway-bench-'))
  const path = join(dir, 'config.json')
  writeFileSync(path, JSON.stringify(config))
  return { dir, config: path }
}
