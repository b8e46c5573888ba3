import { afterAll, expect, test } from 'bun:test'
import net from 'node:net'
import postgres from 'postgres'
import * as Db from '../src/ledger/Db.ts'

const base = process.env.DATABASE_URL!

test('A: DATABASE_URL with application_name: a stuck call closes the idle holder too', async () => {
  const url = new URL(base)
  url.searchParams.set('application_name', 'myapp')
  const sql = Db.connect({ url: url.toString(), max: 3 })
  afterAll(() => sql.end({ timeout: 1 }))
  const lost: string[] = []
  Db.deadline(sql, 1000, (w) => lost.push(w))
  const [n] = await sql`select current_setting('application_name') as n`
  console.log('application_name of pool sessions:', n!.n)
  const holder = await sql.reserve()
  await holder`begin`
  await holder`select pg_advisory_xact_lock(5151)`
  await expect(Db.answered(sql, sql`select pg_advisory_xact_lock(5151)`)).rejects.toBeInstanceOf(Db.DatabaseTimeoutError)
  for (let i = 0; i < 30 && lost.length === 0; i++) await Bun.sleep(100)
  console.log('lost', lost, Db.lostConnections(sql))
  let holderOk = true
  try { await holder`select 1` } catch (e) { holderOk = false; console.log('holder failed:', (e as any).code) }
  console.log('holder still usable:', holderOk)
  try { holder.release() } catch {}
}, 15_000)

/** A proxy to the server; connections after the first `direct` are delayed `delay` ms before forwarding. */
async function slowNew(direct: number, delay: number) {
  const to = new URL(base); let count = 0
  const server = net.createServer((c) => {
    const n = count++
    const go = () => {
      const up = net.connect(Number(to.port || 5432), to.hostname)
      c.pipe(up); up.pipe(c)
      c.on('error', () => up.destroy()); up.on('error', () => c.destroy())
      c.on('close', () => up.destroy()); up.on('close', () => c.destroy())
    }
    if (n < direct) go()
    else { c.pause(); setTimeout(() => { c.resume(); go() }, delay) }
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  afterAll(() => void server.close())
  const u = new URL(base); u.hostname = '127.0.0.1'; u.port = String((server.address() as net.AddressInfo).port)
  return u.toString()
}

test('B: a stuck connection that answers before endStuck terminates: its next, healthy call is killed', async () => {
  const sql = Db.connect({ url: await slowNew(1, 1000), max: 1 })
  afterAll(() => sql.end({ timeout: 1 }))
  const lost: string[] = []
  Db.deadline(sql, 1000, (w) => lost.push(w))
  const other = postgres(base, { max: 1, onnotice: () => {} })
  afterAll(() => other.end({ timeout: 1 }))
  const locker = await other.reserve()
  await locker`begin`
  await locker`select pg_advisory_xact_lock(5252)`
  const t0 = performance.now()
  const q = Db.answered(sql, sql`select pg_advisory_xact_lock(5252)`)
  await expect(q).rejects.toBeInstanceOf(Db.DatabaseTimeoutError)
  // detection happens by t0 + 1250 + 250; the terminate comes about 1 s later (slow new connection)
  await Bun.sleep(Math.max(0, t0 + 1700 - performance.now()))
  await locker`commit`; locker.release()
  await Bun.sleep(100)
  let outcome = 'answered'
  try { await sql`select pg_sleep(1.5)` } catch (e) { outcome = `failed: ${(e as any).code} ${(e as any).message}` }
  console.log('next healthy call:', outcome, 'lost', lost, Db.lostConnections(sql))
}, 15_000)
