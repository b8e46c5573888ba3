/**
 * Signed completion receipts: a completion asked for with `Tollway-Receipt: true` carries one
 * (the body of a whole completion, the final usage chunk of a stream), signed with the key
 * GET /v1/receipts/key publishes.
 */
import { describe, expect, test } from 'bun:test'
import { createHash } from 'node:crypto'
import fc from 'fast-check'
import { verifyReceipt } from '../../src/client/index.ts'
import * as Receipt from '../../src/metering/Receipt.ts'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()
const key = (await (await fetch(`${gw.url}/v1/receipts/key`)).json()) as {
  algorithm: string
  key_id: string
  public_key: string
}

const PROMPT = 'a receipt for every word'
const messages = [{ role: 'user' as const, content: PROMPT }]
const sha256 = (text: string) => createHash('sha256').update(text).digest('hex')

function post(
  apiKey: string,
  body: Record<string, unknown>,
  headers: Record<string, string> = { 'tollway-receipt': 'true' },
) {
  return fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${apiKey}`, ...headers },
    body: JSON.stringify({ model: 'fake', messages, ...body }),
  })
}

/** The `data:` payloads of an SSE body, `[DONE]` left out. */
function events(text: string): Record<string, unknown>[] {
  return text
    .split('\n\n')
    .map((block) =>
      block
        .split('\n')
        .find((l) => l.startsWith('data: '))
        ?.slice(6),
    )
    .filter((d): d is string => d !== undefined && d !== '[DONE]')
    .map((d) => JSON.parse(d) as Record<string, unknown>)
}

type Usage = { prompt_tokens: number; completion_tokens: number; cost: string }

describe('receipts', () => {
  test('behavior: a whole completion carries a receipt of its usage, charge and text, signed with the published key', async () => {
    const { key: apiKey } = await gw.account()
    const res = await post(apiKey, {})
    expect(res.status).toBe(200)
    const body = (await res.json()) as {
      usage: Usage
      tollway_receipt: Receipt.Receipt
      choices: { message: { content: string } }[]
    }
    expect(key.algorithm).toBe('Ed25519')
    expect(body.tollway_receipt).toMatchObject({
      version: 'tollway-receipt/1',
      key_id: key.key_id,
      request_id: res.headers.get('x-request-id')!,
      model: 'fake',
      payer: 'key',
      prompt_tokens: body.usage.prompt_tokens,
      completion_tokens: body.usage.completion_tokens,
      cost: body.usage.cost,
      status: 'ok',
      result_sha256: sha256(body.choices[0]!.message.content),
    })
    expect(verifyReceipt(body.tollway_receipt, key.public_key)).toBe(true)
    // Any change breaks it.
    for (const changed of [
      { ...body.tollway_receipt, cost: '1' },
      { ...body.tollway_receipt, completion_tokens: body.tollway_receipt.completion_tokens - 1 },
      { ...body.tollway_receipt, result_sha256: sha256('another answer') },
      { ...body.tollway_receipt, extra: true },
    ])
      expect(verifyReceipt(changed, key.public_key)).toBe(false)
  })

  test('behavior: a stream carries its receipt in the final usage chunk, over the text it streamed', async () => {
    const { key: apiKey } = await gw.account()
    for (const includeUsage of [false, true]) {
      const res = await post(apiKey, {
        stream: true,
        ...(includeUsage ? { stream_options: { include_usage: true } } : {}),
      })
      const chunks = events(await res.text())
      let text = ''
      for (const c of chunks)
        for (const choice of (c.choices ?? []) as { delta?: { content?: string } }[])
          text += choice.delta?.content ?? ''
      expect(text).toBe(PROMPT)
      const last = chunks.at(-1) as { usage: Usage; tollway_receipt: Receipt.Receipt }
      expect(last.tollway_receipt).toMatchObject({
        request_id: res.headers.get('x-request-id')!,
        cost: last.usage.cost,
        completion_tokens: last.usage.completion_tokens,
        status: 'ok',
        result_sha256: sha256(text),
      })
      expect(verifyReceipt(last.tollway_receipt, key.public_key)).toBe(true)
      // Only the final chunk has one.
      expect(chunks.filter((c) => 'tollway_receipt' in c)).toHaveLength(1)
    }
  })

  test('behavior: a stream cut where the credits ran out is receipted for what was sent and charged', async () => {
    // The prompt (207 tokens) and some 46 words: the reply (200 words) is cut.
    const { id, key: apiKey } = await gw.account({ credits: 300n })
    const res = await post(apiKey, {
      stream: true,
      messages: [{ role: 'user', content: 'word '.repeat(200) }],
    })
    expect(res.status).toBe(200)
    const chunks = events(await res.text())
    let text = ''
    for (const c of chunks)
      for (const choice of (c.choices ?? []) as { delta?: { content?: string } }[])
        text += choice.delta?.content ?? ''
    const final = chunks.find((c) => 'tollway_receipt' in c) as {
      usage: Usage
      tollway_receipt: Receipt.Receipt
    }
    expect(final.tollway_receipt.status).toBe('insufficient_funds')
    expect(final.tollway_receipt.result_sha256).toBe(sha256(text))
    expect(final.tollway_receipt.cost).toBe(final.usage.cost)
    expect(verifyReceipt(final.tollway_receipt, key.public_key)).toBe(true)
    const l = await Gateway.ledger(gw.sql, id)
    expect(300n - l.balance).toBe(BigInt(final.tollway_receipt.cost))
  })

  test('behavior: no receipt unless asked for; a Tollway-Receipt that is not true or false is a 400 before anything is held', async () => {
    const { id, key: apiKey } = await gw.account()
    const unasked: Record<string, string>[] = [
      {},
      { 'tollway-receipt': 'false' },
      { 'tollway-receipt': '0' },
    ]
    for (const headers of unasked) {
      const res = await post(apiKey, {}, headers)
      expect(res.status).toBe(200)
      expect(await res.json()).not.toHaveProperty('tollway_receipt')
      const streamed = await (await post(apiKey, { stream: true }, headers)).text()
      expect(streamed).not.toContain('"tollway_receipt"')
    }
    const balance = (await Gateway.ledger(gw.sql, id)).balance
    const res = await post(apiKey, {}, { 'tollway-receipt': 'yes please' })
    expect(res.status).toBe(400)
    const { error } = (await res.json()) as { error: { param: string; message: string } }
    expect(error.param).toBe('Tollway-Receipt')
    // Names every value it takes (1 and 0 are taken too) and what it was sent.
    expect(error.message).toContain('true or 1')
    expect(error.message).toContain('false or 0')
    expect(error.message).toContain('"yes please"')
    const l = await Gateway.ledger(gw.sql, id)
    expect(l.balance).toBe(balance)
    expect(l.reserved).toBe(0n)
  })

  test('behavior: a receipt key is a 32-byte Ed25519 seed (RFC 8032 test 1); receipts signed by another key do not verify', () => {
    const seed = Buffer.from(
      '9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60',
      'hex',
    )
    const signer = new Receipt.Signer(seed)
    expect(Buffer.from(signer.publicKey, 'base64url').toString('hex')).toBe(
      'd75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a',
    )
    const facts: Receipt.Facts = {
      request_id: 'r',
      model: 'm',
      payer: 'channel',
      prompt_tokens: 1,
      completion_tokens: 2,
      cost: '5',
      status: 'ok',
      result_sha256: sha256(''),
    }
    const r = signer.sign(facts)
    expect(verifyReceipt(r, signer.publicKey)).toBe(true)
    expect(verifyReceipt(r, key.public_key)).toBe(false)
    expect(() => new Receipt.Signer(seed.subarray(1))).toThrow(/32 bytes/)
  })

  test('behavior: a receipt signed by another instance on the same database verifies with the key GET /v1/receipts/key gives for its key_id, on any instance', async () => {
    // Another instance with a key of its own (its own data dir, no RECEIPT_KEY shared).
    const other = await Gateway.create(
      { receiptKey: '11'.repeat(32) },
      { db: gw.db, upstream: gw.upstream },
    )
    const { key: apiKey } = await other.account()
    const res = await other.complete(
      apiKey,
      { model: 'fake', messages },
      { 'tollway-receipt': 'true' },
    )
    const { tollway_receipt: receipt } = (await res.json()) as { tollway_receipt: Receipt.Receipt }
    expect(receipt.key_id).not.toBe(key.key_id)
    const fetched = (await (
      await fetch(`${gw.url}/v1/receipts/key?key_id=${receipt.key_id}`)
    ).json()) as { key_id: string; public_key: string }
    expect(fetched.key_id).toBe(receipt.key_id)
    expect(verifyReceipt(receipt, fetched.public_key)).toBe(true)
    // An id names one key for good: cacheable, and kept once found (asked again, it costs no
    // database read: the row taken away here, it is still given). Without an id, the key of
    // the moment: not to be kept.
    const again = await fetch(`${gw.url}/v1/receipts/key?key_id=${receipt.key_id}`)
    expect(again.headers.get('cache-control')).toBe('public, max-age=31536000, immutable')
    await gw.db.sql`delete from receipt_keys where key_id = ${receipt.key_id}`
    try {
      const kept = await fetch(`${gw.url}/v1/receipts/key?key_id=${receipt.key_id}`)
      expect(((await kept.json()) as { public_key: string }).public_key).toBe(fetched.public_key)
    } finally {
      await gw.db.sql`insert into receipt_keys (key_id, public_key)
        values (${receipt.key_id}, ${fetched.public_key}) on conflict do nothing`
    }
    expect((await fetch(`${gw.url}/v1/receipts/key`)).headers.get('cache-control')).toBe('no-cache')
    // Its own key, asked by key_id, and without one.
    const own = (await (await fetch(`${gw.url}/v1/receipts/key?key_id=${key.key_id}`)).json()) as {
      public_key: string
    }
    expect(own.public_key).toBe(key.public_key)
    // A key no instance signed with: a 404 saying so; a key_id that is none, a 400.
    const unknown = await fetch(`${gw.url}/v1/receipts/key?key_id=${'0'.repeat(16)}`)
    expect(unknown.status).toBe(404)
    expect(((await unknown.json()) as { error: { code: string } }).error.code).toBe(
      'receipt_key_unknown',
    )
    const bad = await fetch(`${gw.url}/v1/receipts/key?key_id=x'`)
    expect(bad.status).toBe(400)
  })

  test('property: verifying anything, receipt-shaped or not, answers false and never throws', () => {
    fc.assert(
      fc.property(fc.anything(), fc.string(), (value, publicKey) => {
        expect(verifyReceipt(value, publicKey)).toBe(false)
        expect(verifyReceipt(value, key.public_key)).toBe(false)
      }),
      { numRuns: 300 },
    )
  })
})

describe('receipts off', () => {
  test('behavior: a receipt asked for is a 400 saying so, nothing held; no key to fetch', async () => {
    const off = await Gateway.create({ receipts: false })
    const { id, key: apiKey } = await off.account()
    const ask = (receipt: boolean) =>
      fetch(`${off.url}/v1/chat/completions`, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          authorization: `Bearer ${apiKey}`,
          ...(receipt ? { 'tollway-receipt': 'true' } : {}),
        },
        body: JSON.stringify({ model: 'fake', messages }),
      })
    const res = await ask(true)
    expect(res.status).toBe(400)
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe('receipts_off')
    expect((await Gateway.ledger(off.sql, id)).reserved).toBe(0n)
    const plain = await ask(false)
    expect(plain.status).toBe(200)
    expect(await plain.json()).not.toHaveProperty('tollway_receipt')
    const keyRes = await fetch(`${off.url}/v1/receipts/key`)
    expect(keyRes.status).toBe(404)
    expect(((await keyRes.json()) as { error: { code: string } }).error.code).toBe('receipts_off')
  })

  test('behavior: an instance with receipts off still gives, by key_id, the key another instance on the database signed a receipt with', async () => {
    const on = await Gateway.create({ receiptKey: '22'.repeat(32) })
    const off = await Gateway.create({ receipts: false }, { db: on.db, upstream: on.upstream })
    const { key: apiKey } = await on.account()
    const res = await on.complete(
      apiKey,
      { model: 'fake', messages },
      { 'tollway-receipt': 'true' },
    )
    const { tollway_receipt: receipt } = (await res.json()) as { tollway_receipt: Receipt.Receipt }
    const fetched = await fetch(`${off.url}/v1/receipts/key?key_id=${receipt.key_id}`)
    expect(fetched.status).toBe(200)
    const key = (await fetched.json()) as { key_id: string; public_key: string }
    expect(key.key_id).toBe(receipt.key_id)
    expect(verifyReceipt(receipt, key.public_key)).toBe(true)
    const unknown = await fetch(`${off.url}/v1/receipts/key?key_id=${'0'.repeat(16)}`)
    expect(((await unknown.json()) as { error: { code: string } }).error.code).toBe(
      'receipt_key_unknown',
    )
  })
})
