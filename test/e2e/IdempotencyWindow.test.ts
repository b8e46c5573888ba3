/**
 * A completed Idempotency-Key is remembered for `idempotencyWindowSeconds`, then the gateway's
 * sweep forgets it, and a request sent with it again is a new request: run and charged. Every
 * request sent with a key wrote a row, and nothing ever deleted one.
 */
import { expect, test } from 'bun:test'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create({ idempotencyWindowSeconds: 3600 }, undefined, { sweepMs: 50 })
const body = { model: 'fake', messages: [{ role: 'user', content: 'hello there' }] }

test('behavior: a key older than the window is forgotten by the sweep, and a request sent with it again is run and charged as a new one', async () => {
  const { id, key } = await gw.account()
  const first = await gw.complete(key, body, { 'idempotency-key': 'window-1' })
  expect(first.status).toBe(200)
  await first.arrayBuffer()
  const again = await gw.complete(key, body, { 'idempotency-key': 'window-1' })
  expect(again.status).toBe(409)
  expect(((await again.json()) as { error: { code: string } }).error.code).toBe(
    'idempotency_key_reused',
  )
  await Batch.settled(gw.sql)
  const keys = () =>
    gw.sql`select key, request_id from idempotency_keys where account_id = ${id} order by key`
  // A young key of the same account stays.
  const young = await gw.complete(key, body, { 'idempotency-key': 'window-2' })
  expect(young.status).toBe(200)
  await young.arrayBuffer()
  await Batch.settled(gw.sql)

  // Sweeps ran meanwhile (every 50 ms) and kept both: they are within the window.
  await Bun.sleep(200)
  expect((await keys()).map((k) => k.key)).toEqual(['window-1', 'window-2'])
  // First used, and its request ended, an hour and a minute ago.
  const [aged] = await gw.sql`
    update idempotency_keys set created_at = now() - interval '61 minutes'
    where account_id = ${id} and key = 'window-1' returning request_id`
  await gw.sql`
    update usage set created_at = now() - interval '61 minutes' where id = ${aged!.request_id}`
  for (let i = 0; i < 60 && (await keys()).length > 1; i++) await Bun.sleep(50)
  expect((await keys()).map((k) => k.key)).toEqual(['window-2'])

  const retry = await gw.complete(key, body, { 'idempotency-key': 'window-1' })
  expect(retry.status).toBe(200)
  await retry.arrayBuffer()
  const retryId = retry.headers.get('x-request-id')!
  expect(retryId).not.toBe(first.headers.get('x-request-id'))
  const l = await Gateway.ledger(gw.sql, id)
  expect(l.usage).toBe(3)
  const [k] = await gw.sql`
    select state, request_id from idempotency_keys where account_id = ${id} and key = 'window-1'`
  expect(k).toEqual({ state: 'completed', request_id: retryId })
  expect(gw.logs.filter((line) => line.includes('Idempotency-Keys failed'))).toEqual([])
}, 15_000)
