/**
 * The pool's connections under a link that fails quietly: one that drops what it carries
 * without a reset (a failover, a NAT that forgot it) is closed once a call with a deadline on
 * it goes unanswered, not kept until TCP gives up. Needs DATABASE_URL (a server to forward to).
 */
import { afterAll, expect, test } from 'bun:test'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as Db from '../../src/ledger/Db.ts'
import { forwarder } from '../helpers/Forwarder.ts'

const server = Boolean(process.env.DATABASE_URL)

/**
 * A pool of `max` through a link the test breaks (over TLS with `tls`), with a deadline of 1 s;
 * what it reports.
 */
async function pool(max: number, tls?: { key: string; cert: string }) {
  const link = await forwarder(new URL(process.env.DATABASE_URL!), { tls })
  const url = new URL(link.url)
  if (tls) url.searchParams.set('sslmode', 'require')
  const sql = Db.connect({ url: url.toString(), max })
  afterAll(() => sql.end({ timeout: 1 }))
  const lost: string[] = []
  Db.deadline(sql, 1_000, (which) => lost.push(which))
  return { link, sql, lost }
}

/** A self-signed key and certificate (PEM) for a TLS link, made with openssl. */
function certificate() {
  const dir = mkdtempSync(join(tmpdir(), 'tollway-pg-tls-'))
  const [key, cert] = [join(dir, 'key.pem'), join(dir, 'cert.pem')]
  const made = Bun.spawnSync(
    ['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1'].concat(
      ['-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=tollway-test'],
    ),
  )
  expect(made.exitCode).toBe(0)
  const pem = { key: readFileSync(key, 'utf8'), cert: readFileSync(cert, 'utf8') }
  rmSync(dir, { recursive: true })
  return pem
}

for (const tls of [false, true])
  test.skipIf(!server)(
    `error: a pool connection lost without a reset${tls ? ' (over TLS)' : ''} is closed once a call on it passes the deadline: the calls after it are answered on a new one, not held until TCP gives up`,
    async () => {
      // One connection: every call goes down it.
      const { link, sql, lost } = await pool(1, tls ? certificate() : undefined)
      expect((await Db.answered(sql, sql`select 1 as x`))[0]).toEqual({ x: 1 })
      link.drop()
      const started = performance.now()
      await expect(Db.answered(sql, sql`select 2 as x`)).rejects.toBeInstanceOf(
        Db.DatabaseTimeoutError,
      )
      expect(lost).toEqual(['pool'])
      // A moment later (postgres.js hears of the close with the socket's next event), the next
      // call goes down a new connection.
      await Bun.sleep(20)
      expect((await Db.answered(sql, sql`select 3 as x`))[0]).toEqual({ x: 3 })
      expect(performance.now() - started).toBeLessThan(3_000)
    },
    15_000,
  )

test.skipIf(!server)(
  'behavior: a statement longer than the deadline, not itself given one, is not cut while no call with a deadline goes unanswered',
  async () => {
    const { sql, lost } = await pool(2)
    const long = sql`select pg_sleep(1.6) as slept`
    // Calls with a deadline meanwhile (each answered in time) look at the sockets.
    for (let i = 0; i < 8; i++) {
      expect((await Db.answered(sql, sql`select ${i}::int as i`))[0]).toEqual({ i })
      await Bun.sleep(200)
    }
    expect((await long)[0]).toEqual({ slept: '' })
    expect(lost).toEqual([])
  },
  15_000,
)
