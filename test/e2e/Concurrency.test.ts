import { expect, test } from 'bun:test'
import * as Tokenizer from '../../src/metering/Tokenizer.ts'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()

test('behavior: 200 parallel streams against credits for 50 → never below zero, charges equal tokens delivered, 402 for the rest', async () => {
  const content = Array.from({ length: 20 }, (_, i) => `word${i}`).join(' ')
  const messages = [{ role: 'user', content }]
  const prompt = Tokenizer.prompt(messages)
  const completion = content
    .split(' ')
    .map((w, i) => Tokenizer.count(i ? ` ${w}` : w))
    .reduce((a, b) => a + b, 0)
  const perRequest = BigInt(prompt + 2 * completion)
  const credits = perRequest * 50n
  const { id, key } = await gw.account({ credits })

  const run = async () => {
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'fake-slow', messages, stream: true }),
    })
    if (res.status !== 200) return { status: res.status, tokens: 0, cost: 0n, text: '' }
    const body = await res.text()
    let text = ''
    let cost = 0n
    let tokens = 0
    for (const line of body.split('\n')) {
      if (!line.startsWith('data: {')) continue
      const d = JSON.parse(line.slice(6))
      text += d.choices?.[0]?.delta?.content ?? ''
      if (d.usage) {
        cost = BigInt(d.usage.cost)
        tokens = d.usage.completion_tokens
      }
    }
    return { status: 200, tokens, cost, text }
  }
  const results = await Promise.all(Array.from({ length: 200 }, run))

  const ok = results.filter((r) => r.status === 200)
  const refused = results.filter((r) => r.status !== 200)
  expect(refused.every((r) => r.status === 402 || r.status === 429)).toBe(true)
  expect(ok.length).toBeGreaterThanOrEqual(50)
  // Every admitted stream was charged exactly for the words it delivered.
  for (const r of ok) {
    const delivered = r.text
      .split(' ')
      .filter(Boolean)
      .map((w, i) => Tokenizer.count(i ? ` ${w}` : w))
      .reduce((a, b) => a + b, 0)
    expect(r.tokens).toBe(delivered)
    expect(r.cost).toBe(BigInt(prompt + 2 * delivered))
  }
  const l = await Gateway.ledger(gw.sql, id)
  const charged = ok.reduce((s, r) => s + r.cost, 0n)
  expect(l.balance).toBeGreaterThanOrEqual(0n)
  expect(l.balance).toBe(credits - charged)
  expect(l.sum).toBe(l.balance)
  expect(l.usage_cost).toBe(charged)
  expect(l.reserved).toBe(0n)
  expect(l.active_requests).toBe(0)
  expect(l.open_reservations).toBe(0n)
  // What was delivered is what the credits paid for: nearly all of it used.
  expect(l.balance).toBeLessThan(perRequest)
}, 60_000)
