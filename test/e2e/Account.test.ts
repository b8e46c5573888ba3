import { describe, expect, test } from 'bun:test'
import OpenAI from 'openai'
import * as Page from '../../src/ledger/Page.ts'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()

function as(key: string, path: string, init: RequestInit = {}) {
  return fetch(`${gw.url}/v1${path}`, {
    ...init,
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
  })
}
const chat = (key: string) =>
  as(key, '/chat/completions', {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'one two three' }] }),
  })

describe('admin API', () => {
  test('error: without the admin token → 401', async () => {
    const res = await fetch(`${gw.url}/admin/accounts`, { method: 'POST', body: '{"name":"x"}' })
    expect(res.status).toBe(401)
    expect(res.headers.get('www-authenticate')).toBe('Bearer realm="tollway"')
    const wrong = await fetch(`${gw.url}/admin/accounts`, {
      method: 'POST',
      headers: { authorization: 'Bearer not-the-token' },
      body: '{"name":"x"}',
    })
    expect(wrong.status).toBe(401)
  })

  test('behavior: accounts, credits and keys', async () => {
    const created = await gw.admin('/accounts', { name: 'acme', plan: 'pro' })
    expect(created.status).toBe(201)
    const { id } = (await created.json()) as { id: string }
    const credited = await gw.admin(`/accounts/${id}/credits`, { amount: '5000', note: 'welcome' })
    expect(await credited.json()).toEqual({ balance: '5000' })
    expect(await (await gw.admin(`/accounts/${id}/credits`, { amount: -1000 })).json()).toEqual({
      balance: '4000',
    })
    const key = await gw.admin(`/accounts/${id}/keys`, { name: 'ci' })
    expect(key.status).toBe(201)
    const k = (await key.json()) as { id: string; key: string; prefix: string }
    expect(k.key.startsWith(k.prefix)).toBe(true)
    expect(k.key).toMatch(/^tw_[A-Za-z0-9_-]{43}$/)
    const account = (await (await gw.admin(`/accounts/${id}`)).json()) as Record<string, unknown>
    expect(account).toMatchObject({ id, name: 'acme', plan: 'pro', balance: '4000', reserved: '0' })
    expect(JSON.stringify(account)).not.toContain(k.key)
    // The raw key is stored nowhere: only its hash.
    const [n] =
      await gw.sql`select count(*)::int as n from api_keys where encode(hash, 'escape') like ${`%${k.key}%`} or prefix = ${k.key}`
    expect(n!.n).toBe(0)
  })

  test('error: bad input → 400/404/409 naming the problem', async () => {
    expect((await gw.admin('/accounts', { name: '' })).status).toBe(400)
    const badPlan = await gw.admin('/accounts', { name: 'x', plan: 'platinum' })
    expect(badPlan.status).toBe(400)
    expect(((await badPlan.json()) as { error: { param: string } }).error.param).toBe('plan')
    const { id } = (await (await gw.admin('/accounts', { name: 'x' })).json()) as { id: string }
    expect((await gw.admin(`/accounts/${id}/credits`, { amount: '1.5' })).status).toBe(400)
    expect((await gw.admin(`/accounts/${id}/credits`, { amount: 0 })).status).toBe(400)
    const overdraw = await gw.admin(`/accounts/${id}/credits`, { amount: '-1' })
    expect(overdraw.status).toBe(409)
    // Only a grant (or requests under way ending) changes the answer: the SDKs do not send it again.
    expect(overdraw.headers.get('x-should-retry')).toBe('false')
    expect(((await overdraw.json()) as { error: { message: string } }).error.message).toBe(
      'The balance is 0; a debit of 1 would take it below zero.',
    )
    expect((await gw.admin('/accounts/not-a-uuid')).status).toBe(404)
    expect((await gw.admin(`/accounts/${crypto.randomUUID()}`)).status).toBe(404)
    expect((await gw.admin(`/accounts/${crypto.randomUUID()}/credits`, { amount: 5 })).status).toBe(
      404,
    )
    expect((await gw.admin(`/accounts/${crypto.randomUUID()}/keys`, { name: 'k' })).status).toBe(
      404,
    )
  })

  test('behavior: PATCH /admin/accounts/{id} moves an account to another plan at once (free to pro opens a pro model)', async () => {
    const { id, key } = await gw.account({ plan: 'free' })
    const premium = () =>
      as(key, '/chat/completions', {
        method: 'POST',
        body: JSON.stringify({ model: 'org/premium', messages: [{ role: 'user', content: 'hi' }] }),
      })
    expect((await premium()).status).toBe(403)
    const patched = await gw.admin(`/accounts/${id}`, { plan: 'pro', name: 'upgraded' }, 'PATCH')
    expect(patched.status).toBe(200)
    expect(await patched.json()).toMatchObject({ id, plan: 'pro', name: 'upgraded' })
    const res = await premium()
    expect(res.status).toBe(200)
    await res.text()
    // The month's tokens so far are still counted, and shown.
    const account = (await (await gw.admin(`/accounts/${id}`)).json()) as { month_tokens: string }
    expect(Number(account.month_tokens)).toBeGreaterThan(0)
    // Only the name changes when only the name is given.
    const renamed = await gw.admin(`/accounts/${id}`, { name: 'again' }, 'PATCH')
    expect(await renamed.json()).toMatchObject({ plan: 'pro', name: 'again' })

    for (const [body, param] of [
      [{ plan: 'platinum' }, 'plan'],
      [{ plan: 'toString' }, 'plan'],
      [{ name: '' }, 'name'],
      [{}, null],
      [{ balance: '5' }, null],
    ] as const) {
      const bad = await gw.admin(`/accounts/${id}`, body, 'PATCH')
      expect(bad.status).toBe(400)
      if (param)
        expect(((await bad.json()) as { error: { param: string } }).error.param).toBe(param)
    }
    expect(
      (await gw.admin(`/accounts/${crypto.randomUUID()}`, { plan: 'pro' }, 'PATCH')).status,
    ).toBe(404)
    const after = (await (await gw.admin(`/accounts/${id}`)).json()) as Record<string, unknown>
    expect(after).toMatchObject({ plan: 'pro', name: 'again' })
  })

  test('behavior: the operator lists accounts and reads an account usage and transactions', async () => {
    const a = await gw.account()
    const b = await gw.account()
    expect((await chat(b.key)).status).toBe(200)
    // Newest first, in pages.
    const first = (await (await gw.admin('/accounts?limit=1')).json()) as {
      data: { id: string; balance: string }[]
      next_cursor: string
    }
    expect(first.data.map((d) => d.id)).toEqual([b.id])
    const second = (await (
      await gw.admin(`/accounts?limit=1&cursor=${first.next_cursor}`)
    ).json()) as {
      data: { id: string }[]
    }
    expect(second.data.map((d) => d.id)).toEqual([a.id])
    expect((await gw.admin('/accounts?cursor=nope')).status).toBe(400)

    const usage = (await (await gw.admin(`/accounts/${b.id}/usage`)).json()) as {
      data: { model: string; cost: string }[]
    }
    expect(usage.data).toHaveLength(1)
    expect(usage.data[0]!.model).toBe('fake')
    const tx = (await (await gw.admin(`/accounts/${b.id}/transactions`)).json()) as {
      data: { kind: string; amount: string }[]
    }
    expect(tx.data.map((t) => t.kind).sort()).toEqual(['grant', 'usage'])
    expect(BigInt(tx.data.find((t) => t.kind === 'usage')!.amount)).toBe(
      -BigInt(usage.data[0]!.cost),
    )
    expect(
      ((await (await gw.admin(`/accounts/${a.id}/usage`)).json()) as { data: unknown[] }).data,
    ).toEqual([])
    expect((await gw.admin(`/accounts/${crypto.randomUUID()}/usage`)).status).toBe(404)
    expect((await gw.admin(`/accounts/${crypto.randomUUID()}/transactions`)).status).toBe(404)
    expect((await gw.admin(`/accounts/${b.id}/usage?from=soon`)).status).toBe(400)
  })

  test('behavior: DELETE /admin/accounts/{id}/keys/{keyId} revokes at once; again, or on another account, is a 404', async () => {
    const { id, key } = await gw.account()
    expect((await chat(key)).status).toBe(200)
    const account = (await (await gw.admin(`/accounts/${id}`)).json()) as {
      keys: { id: string }[]
    }
    const keyId = account.keys[0]!.id
    const other = await gw.account()
    const wrong = await gw.admin(`/accounts/${other.id}/keys/${keyId}`, undefined, 'DELETE')
    expect(wrong.status).toBe(404)
    expect((await chat(key)).status).toBe(200)
    const res = await gw.admin(`/accounts/${id}/keys/${keyId}`, undefined, 'DELETE')
    expect(res.status).toBe(200)
    expect(await res.json()).toEqual({ id: keyId, revoked: true })
    expect((await chat(key)).status).toBe(401)
    const again = await gw.admin(`/accounts/${id}/keys/${keyId}`, undefined, 'DELETE')
    expect(again.status).toBe(404)
    expect(((await again.json()) as { error: { code: string } }).error.code).toBe('key_not_found')
    const unauthorized = await fetch(`${gw.url}/admin/accounts/${id}/keys/${keyId}`, {
      method: 'DELETE',
    })
    expect(unauthorized.status).toBe(401)
  })
})

describe('key holder API', () => {
  test('behavior: at most 10 active keys; the 11th is a 409; revoking frees a place', async () => {
    const { key } = await gw.account()
    const made = await Promise.all(
      Array.from({ length: 12 }, (_, i) =>
        as(key, '/keys', { method: 'POST', body: JSON.stringify({ name: `k${i}` }) }),
      ),
    )
    const statuses = made.map((r) => r.status).sort()
    // One key exists already: 9 more fit, even when asked for concurrently.
    expect(statuses.filter((s) => s === 201)).toHaveLength(9)
    expect(statuses.filter((s) => s === 409)).toHaveLength(3)
    const refused = made.find((r) => r.status === 409)!
    expect(refused.headers.get('x-should-retry')).toBe('false')
    expect(((await refused.json()) as { error: { code: string } }).error.code).toBe(
      'key_limit_reached',
    )
    const list = (await (await as(key, '/keys')).json()) as {
      data: { id: string; prefix: string }[]
    }
    expect(list.data).toHaveLength(10)
    expect(JSON.stringify(list)).not.toContain(key)
    const victim = list.data.find((k) => !key.startsWith(k.prefix))!
    expect((await as(key, `/keys/${victim.id}`, { method: 'DELETE' })).status).toBe(200)
    expect((await as(key, `/keys/${victim.id}`, { method: 'DELETE' })).status).toBe(404)
    expect((await as(key, '/keys', { method: 'POST', body: '{"name":"again"}' })).status).toBe(201)
  })

  test('behavior: a revoked key gets 401 at once', async () => {
    const { key } = await gw.account()
    const made = (await (
      await as(key, '/keys', { method: 'POST', body: '{"name":"temp"}' })
    ).json()) as {
      id: string
      key: string
    }
    expect((await chat(made.key)).status).toBe(200)
    expect((await as(key, `/keys/${made.id}`, { method: 'DELETE' })).status).toBe(200)
    expect((await chat(made.key)).status).toBe(401)
    expect((await as(made.key, '/credits')).status).toBe(401)
    expect((await chat(key)).status).toBe(200)
  })

  test('behavior: credits, transactions and usage with cursor pagination', async () => {
    const { key } = await gw.account({ credits: 100_000 })
    for (let i = 0; i < 5; i++) expect((await chat(key)).status).toBe(200)
    const credits = (await (await as(key, '/credits')).json()) as {
      balance: string
      available: string
    }
    const usage1 = (await (await as(key, '/usage?limit=2')).json()) as {
      data: {
        id: string
        cost: string
        prompt_tokens: number
        completion_tokens: number
        latency_ms: number
        time_to_first_token_ms: number
        status: string
        model: string
      }[]
      has_more: boolean
      next_cursor: string
    }
    expect(usage1.data).toHaveLength(2)
    expect(usage1.has_more).toBe(true)
    expect(usage1.data[0]).toMatchObject({ model: 'fake', status: 'ok' })
    expect(usage1.data[0]!.latency_ms).toBeGreaterThanOrEqual(0)
    expect(usage1.data[0]!.time_to_first_token_ms).toBeGreaterThanOrEqual(0)
    const seen = [...usage1.data]
    let cursor: string | null = usage1.next_cursor
    while (cursor) {
      const page = (await (
        await as(key, `/usage?limit=2&cursor=${cursor}`)
      ).json()) as typeof usage1
      seen.push(...page.data)
      cursor = page.has_more ? page.next_cursor : null
    }
    expect(new Set(seen.map((u) => u.id)).size).toBe(5)
    const spent = seen.reduce((s, u) => s + BigInt(u.cost), 0n)
    expect(BigInt(credits.balance)).toBe(100_000n - spent)
    const tx = (await (await as(key, '/credits/transactions?limit=10')).json()) as {
      data: { amount: string; kind: string }[]
    }
    expect(tx.data).toHaveLength(6)
    expect(tx.data.at(-1)).toMatchObject({ kind: 'grant', amount: '100000' })
    expect(tx.data.reduce((s, t) => s + BigInt(t.amount), 0n)).toBe(BigInt(credits.balance))
    expect((await as(key, '/usage?limit=0')).status).toBe(400)
  })
})

describe('admin and key input', () => {
  test('error: a plan name an object inherits, NUL or a lone surrogate in stored text, a balance past 78 digits → 400 naming the field, nothing written', async () => {
    const { id, key } = await gw.account({ credits: 1000 })
    const before = await Gateway.ledger(gw.sql, id)
    const cases: [() => Promise<Response>, string][] = [
      [() => gw.admin('/accounts', { name: 'a', plan: 'toString' }), 'plan'],
      [() => gw.admin('/accounts', { name: 'a', plan: '__proto__' }), 'plan'],
      [() => gw.admin('/accounts', { name: 'a\u0000b' }), 'name'],
      [() => gw.admin(`/accounts/${id}/credits`, { amount: '5', note: 'x\u0000y' }), 'note'],
      [() => gw.admin(`/accounts/${id}/keys`, { name: 'x\u0000y' }), 'name'],
      [
        () => as(key, '/keys', { method: 'POST', body: JSON.stringify({ name: 'a\u0000' }) }),
        'name',
      ],
      // Half a surrogate pair: stored as UTF-8 it would become U+FFFD, not what was answered.
      [() => as(key, '/keys', { method: 'POST', body: '{"name":"a\\ud800b"}' }), 'name'],
      [() => gw.admin('/accounts', { name: 'a\udc00' }), 'name'],
      [() => gw.admin(`/accounts/${id}/credits`, { amount: '5', note: '\ud83d' }), 'note'],
    ]
    for (const [send, param] of cases) {
      const res = await send()
      expect(res.status).toBe(400)
      expect(((await res.json()) as { error: { param: string } }).error.param).toBe(param)
    }
    expect(await Gateway.ledger(gw.sql, id)).toEqual(before)
    const [{ n }] =
      (await gw.sql`select count(*)::int as n from api_keys where account_id = ${id}`) as unknown as [
        { n: number },
      ]
    expect(n).toBe(1)

    const rich = await gw.account({ credits: 0 })
    const big = '9'.repeat(77)
    for (let i = 0; i < 10; i++)
      expect((await gw.admin(`/accounts/${rich.id}/credits`, { amount: big })).status).toBe(200)
    const balance = (await Gateway.ledger(gw.sql, rich.id)).balance
    const over = await gw.admin(`/accounts/${rich.id}/credits`, { amount: big })
    expect(over.status).toBe(400)
    expect(((await over.json()) as { error: { param: string } }).error.param).toBe('amount')
    expect((await Gateway.ledger(gw.sql, rich.id)).balance).toBe(balance)
    // 78 digits is what the ledger holds: taken; 79 is not a number of base units.
    const richest = await gw.account({ credits: 0 })
    const most = '9'.repeat(78)
    const granted = await gw.admin(`/accounts/${richest.id}/credits`, { amount: most })
    expect(granted.status).toBe(200)
    expect(await granted.json()).toEqual({ balance: most })
    const beyond = await gw.admin(`/accounts/${richest.id}/credits`, { amount: `1${most}` })
    expect(beyond.status).toBe(400)
  })

  test('error: an amount written as a JSON number with a fraction or an exponent is a 400 naming amount, not the integer JavaScript rounds it to; an integer is taken as written', async () => {
    const { id } = await gw.account({ credits: 0 })
    const grant = (amount: string) =>
      fetch(`${gw.url}/admin/accounts/${id}/credits`, {
        method: 'POST',
        headers: { authorization: `Bearer ${gw.config.adminToken}` },
        body: `{"amount":${amount}}`,
      })
    // Each of these is an integer once parsed into a double (1, 2^52, 1000, 1).
    for (const amount of ['1.0000000000000001', '4503599627370496.5', '1e3', '1.0', '0.1e1']) {
      const res = await grant(amount)
      expect(res.status).toBe(400)
      expect(((await res.json()) as { error: { param: string } }).error.param).toBe('amount')
    }
    expect((await Gateway.ledger(gw.sql, id)).balance).toBe(0n)
    // Past 2^53 as written, where a double would have made it 9007199254740992.
    const exact = await grant('9007199254740993')
    expect(exact.status).toBe(200)
    expect(await exact.json()).toEqual({ balance: '9007199254740993' })
    expect(await (await grant('-3')).json()).toEqual({ balance: '9007199254740990' })
  })

  test('error: a control character in a key name, an account name or a note (an escape sequence for the operator terminal) → 400 naming the field, nothing written', async () => {
    const { id, key } = await gw.account({ credits: 1000 })
    const before = await Gateway.ledger(gw.sql, id)
    const name = async () =>
      ((await (await gw.admin(`/accounts/${id}`)).json()) as { name: string }).name
    const named = await name()
    const cases: [() => Promise<Response>, string][] = [
      // A key holder's key name, which `tollway keys list` prints: an OSC title and a clear.
      [
        () =>
          as(key, '/keys', {
            method: 'POST',
            body: JSON.stringify({ name: '\u001b]0;owned\u0007\u001b[2J' }),
          }),
        'name',
      ],
      [() => gw.admin(`/accounts/${id}/keys`, { name: 'a\nb' }), 'name'],
      [() => gw.admin('/accounts', { name: 'a\u001b[31mb' }), 'name'],
      // C1 controls: U+009B is the 8-bit CSI.
      [() => gw.admin(`/accounts/${id}`, { name: 'x\u009b2J' }, 'PATCH'), 'name'],
      [() => gw.admin(`/accounts/${id}/credits`, { amount: '5', note: 'x\u007fy' }), 'note'],
      [() => gw.admin(`/accounts/${id}/credits`, { amount: '5', note: 'a\tb' }), 'note'],
    ]
    for (const [send, param] of cases) {
      const res = await send()
      expect(res.status).toBe(400)
      expect(((await res.json()) as { error: { param: string } }).error.param).toBe(param)
    }
    expect(await Gateway.ledger(gw.sql, id)).toEqual(before)
    expect(await name()).toBe(named)
    const [{ n }] =
      (await gw.sql`select count(*)::int as n from api_keys where account_id = ${id}`) as unknown as [
        { n: number },
      ]
    expect(n).toBe(1)
    // Printable text of any script, and spaces, are names as before.
    const fine = await as(key, '/keys', {
      method: 'POST',
      body: JSON.stringify({ name: 'Zoë\u00a0ノート 🔑' }),
    })
    expect(fine.status).toBe(201)
    expect(((await fine.json()) as { name: string }).name).toBe('Zoë\u00a0ノート 🔑')
  })

  test('error: a key name or an account name of only spaces → 400 naming the field, nothing written; a blank credit note is taken', async () => {
    const { id, key } = await gw.account({ credits: 1000 })
    const name = async () =>
      ((await (await gw.admin(`/accounts/${id}`)).json()) as { name: string }).name
    const named = await name()
    const accounts = async () =>
      ((await gw.sql`select count(*)::int as n from accounts`) as unknown as [{ n: number }])[0].n
    const before = await accounts()
    const blank = ' \u00a0\u3000 '
    const cases: (() => Promise<Response>)[] = [
      () => as(key, '/keys', { method: 'POST', body: JSON.stringify({ name: '   ' }) }),
      () => gw.admin(`/accounts/${id}/keys`, { name: ' ' }),
      () => gw.admin('/accounts', { name: blank }),
      () => gw.admin(`/accounts/${id}`, { name: '  ' }, 'PATCH'),
    ]
    for (const send of cases) {
      const res = await send()
      expect(res.status).toBe(400)
      expect(((await res.json()) as { error: unknown }).error).toMatchObject({
        type: 'invalid_request_error',
        code: 'invalid_value',
        param: 'name',
        message: 'name: must not be blank (only spaces)',
      })
    }
    expect(await name()).toBe(named)
    expect(await accounts()).toBe(before)
    const [{ n }] =
      (await gw.sql`select count(*)::int as n from api_keys where account_id = ${id}`) as unknown as [
        { n: number },
      ]
    expect(n).toBe(1)
    // A note is optional: a blank one is a note that says nothing.
    const noted = await gw.admin(`/accounts/${id}/credits`, { amount: '5', note: '  ' })
    expect(noted.status).toBe(200)
    // Spaces around a name are kept: it is the name as given.
    const spaced = await gw.admin(`/accounts/${id}/keys`, { name: ' laptop ' })
    expect(spaced.status).toBe(201)
    expect(((await spaced.json()) as { name: string }).name).toBe(' laptop ')
  })
})

describe('cursors', () => {
  test('error: a date or a cursor in year 0000 (which PostgreSQL has not), in UTC too, or with a zone offset past 15:59 is a 400 naming it, not a 500', async () => {
    const { id, key } = await gw.account()
    // Cursors of these listings (their scope first), of a time PostgreSQL cannot read.
    const cursor = (scope: string, time: string) =>
      Page.cursor([scope, time, '00000000-0000-0000-0000-000000000000'])
    const usage = Page.scope('usage', id)
    const accounts = Page.scope('accounts')
    const zero = '0000-01-01 00:00:00+00'
    // An offset that moves the time into year 0 in UTC; a zone offset past PostgreSQL's 15:59.
    const offset = '2026-01-01 00:00:00+05:99'
    const answers = [
      [await as(key, `/usage?cursor=${cursor(usage, zero)}`), 'cursor'],
      [await gw.admin(`/accounts?cursor=${cursor(accounts, zero)}`), 'cursor'],
      [await as(key, '/usage?from=0000-01-01'), 'from'],
      [await as(key, '/usage?from=0001-01-01T00:00%2B00:01'), 'from'],
      [await as(key, '/usage?to=0001-01-01T00:30%2B01:00'), 'to'],
      [await as(key, `/usage?cursor=${cursor(usage, offset)}`), 'cursor'],
      [await gw.admin(`/accounts?cursor=${cursor(accounts, offset)}`), 'cursor'],
    ] as const
    for (const [res, param] of answers) {
      expect(res.status).toBe(400)
      expect(((await res.json()) as { error: { param: string } }).error.param).toBe(param)
    }
  })

  const pages = async (key: string, path: string) => {
    const seen: string[] = []
    let cursor: string | null = null
    for (let i = 0; i < 100; i++) {
      const res = await as(key, `${path}?limit=3${cursor ? `&cursor=${cursor}` : ''}`)
      expect(res.status).toBe(200)
      const page = (await res.json()) as { data: { id: string }[]; next_cursor: string | null }
      seen.push(...page.data.map((d) => String(d.id)))
      cursor = page.next_cursor
      if (!cursor) break
    }
    return seen
  }

  test('behavior: usage pages give every row once, when rows share a time and within one millisecond', async () => {
    const { id, key } = await gw.account()
    // As a batch writes them: one time for many rows; and times apart by microseconds only.
    const times = [
      ...Array.from({ length: 8 }, () => '2026-01-01 00:00:00.123456+00'),
      ...Array.from({ length: 5 }, (_, i) => `2026-01-01 00:00:00.12345${i}+00`),
    ]
    for (const t of times)
      await gw.sql`insert into usage (id, account_id, model, stream, prompt_tokens, completion_tokens, cost, status, created_at)
        values (${crypto.randomUUID()}, ${id}, 'fake', false, 1, 1, 3, 'ok', ${t}::text::timestamptz)`
    const seen = await pages(key, '/usage')
    expect(seen).toHaveLength(times.length)
    expect(new Set(seen).size).toBe(times.length)
  })

  test('behavior: one request by its x-request-id, and usage filtered by model, key and time', async () => {
    const { id, key } = await gw.account()
    const res = await chat(key)
    expect(res.status).toBe(200)
    const requestId = res.headers.get('x-request-id')!
    const body = (await res.json()) as { usage: { total_tokens: number; cost: string } }
    const one = await as(key, `/usage/${requestId}`)
    expect(one.status).toBe(200)
    const row = (await one.json()) as Record<string, unknown>
    expect(row).toMatchObject({
      id: requestId,
      model: 'fake',
      status: 'ok',
      total_tokens: body.usage.total_tokens,
      cost: body.usage.cost,
    })
    // Another account cannot read it; an id that is not a UUID is a 404 as well.
    const other = await gw.account()
    for (const [k, path] of [
      [other.key, `/usage/${requestId}`],
      [key, `/usage/${crypto.randomUUID()}`],
      [key, '/usage/not-a-uuid'],
    ] as const) {
      const missing = await as(k, path)
      expect(missing.status).toBe(404)
      expect(((await missing.json()) as { error: { code: string } }).error.code).toBe(
        'usage_not_found',
      )
    }

    // Rows of two models, two keys and two days.
    const second = (await (
      await as(key, '/keys', { method: 'POST', body: '{"name":"b"}' })
    ).json()) as {
      id: string
    }
    const rows = [
      ['fake', null, '2026-01-01 10:00:00+00'],
      ['org/premium', null, '2026-01-01 23:59:59.999999+00'],
      ['fake', second.id, '2026-01-02 00:00:00+00'],
      ['fake', second.id, '2026-01-03 12:00:00+00'],
    ] as const
    const ids: string[] = []
    for (const [model, keyId, t] of rows) {
      const rowId = crypto.randomUUID()
      ids.push(rowId)
      await gw.sql`insert into usage (id, account_id, key_id, model, stream, prompt_tokens, completion_tokens, cost, status, created_at)
        values (${rowId}, ${id}, ${keyId}, ${model}, false, 1, 1, 3, 'ok', ${t}::text::timestamptz)`
    }
    const listed = async (query: string) => {
      const r = await as(key, `/usage?${query}`)
      expect(r.status).toBe(200)
      return ((await r.json()) as { data: { id: string }[] }).data.map((d) => d.id)
    }
    expect(await listed('model=org%2Fpremium')).toEqual([ids[1]!])
    expect(await listed(`key_id=${second.id}`)).toEqual([ids[3]!, ids[2]!])
    // from inclusive, to exclusive; a date is UTC midnight.
    expect(await listed('from=2026-01-01&to=2026-01-02')).toEqual([ids[1]!, ids[0]!])
    // A year under 100 is that year (JS's Date.UTC reads it as 19xx).
    expect(await listed('from=0050-01-01&to=2026-01-02')).toEqual([ids[1]!, ids[0]!])
    expect(await listed('from=2026-01-02T00:00:00Z&to=2026-01-03')).toEqual([ids[2]!])
    expect(await listed('from=2026-01-02T01:00:00%2B01:00&to=2026-01-02T00:00:01Z')).toEqual([
      ids[2]!,
    ])
    expect(await listed('model=fake&from=2026-01-01&to=2026-01-04&limit=1')).toEqual([ids[3]!])
    // Pages of a filtered listing stay filtered.
    const first = (await (
      await as(key, '/usage?model=fake&from=2026-01-01&to=2026-01-04&limit=2')
    ).json()) as { data: { id: string }[]; next_cursor: string }
    expect(first.data.map((d) => d.id)).toEqual([ids[3]!, ids[2]!])
    expect(
      await listed(`model=fake&from=2026-01-01&to=2026-01-04&limit=2&cursor=${first.next_cursor}`),
    ).toEqual([ids[0]!])

    for (const [query, param] of [
      ['from=2026-02-30', 'from'],
      // In UTC that is year 10000, which the database cannot read back.
      ['from=9999-12-31T23:59:59-23:59', 'from'],
      ['from=yesterday', 'from'],
      ['to=2026-01-01T10:00:00', 'to'],
      ['to=2026-01-01T25:00:00Z', 'to'],
      ['key_id=nope', 'key_id'],
      ['model=', 'model'],
    ] as const) {
      const bad = await as(key, `/usage?${query}`)
      expect(bad.status).toBe(400)
      expect(((await bad.json()) as { error: { param: string } }).error.param).toBe(param)
    }
  })

  test('error: a cursor of a time that does not exist, or an id beyond the database, is a 400', async () => {
    const { id, key } = await gw.account()
    // Cursors of these listings (their scope first) whose position cannot be.
    const usage = (time: string) =>
      Page.cursor([Page.scope('usage', id), time, crypto.randomUUID()])
    const transactions = (row: string) => Page.cursor([Page.scope('transactions', id), row])
    for (const [path, c] of [
      ['/usage', usage('2024-13-45 10:00:00+00')],
      ['/usage', usage('2024-02-30 10:00:00+00')],
      ['/usage', usage('2024-02-28 24:00:00+00')],
      ['/credits/transactions', transactions('9999999999999999999')],
    ] as const) {
      const res = await as(key, `${path}?cursor=${c}`)
      expect(res.status).toBe(400)
      expect(((await res.json()) as { error: { type: string } }).error.type).toBe(
        'invalid_request_error',
      )
    }
    // The largest id a row can have is still a cursor.
    expect(
      (await as(key, `/credits/transactions?cursor=${transactions('9223372036854775807')}`)).status,
    ).toBe(200)
  })
})

describe('models', () => {
  test('behavior: the OpenAI SDK retrieves one model, with a slash in its id; an unknown one is its NotFoundError', async () => {
    const { key } = await gw.account()
    const openai = gw.openai(key)
    const m = await openai.models.retrieve('org/premium')
    expect(m).toMatchObject({ id: 'org/premium', object: 'model' })
    expect((m as unknown as { pricing: { input: string } }).pricing.input).toBeString()
    expect((await openai.models.retrieve('fake')).id).toBe('fake')
    const missing = await openai.models.retrieve('nope').catch((e: unknown) => e)
    expect(missing).toBeInstanceOf(OpenAI.APIError)
    expect((missing as InstanceType<typeof OpenAI.APIError>).status).toBe(404)
    // Health still answers for an id with a slash.
    const health = await (await fetch(`${gw.url}/v1/models/org/premium/health`)).json()
    expect(health).toEqual({ model: 'org/premium', status: 'ready' })
  })

  test('behavior: GET /v1/models lists prices as decimal strings and context lengths', async () => {
    const res = (await (await fetch(`${gw.url}/v1/models`)).json()) as {
      object: string
      data: { id: string; pricing: { input: string; output: string }; context_length: number }[]
    }
    expect(res.object).toBe('list')
    expect(res.data.find((m) => m.id === 'fake')).toMatchObject({
      object: 'model',
      pricing: { input: '1000000', output: '2000000' },
      context_length: 4096,
    })
  })

  test('behavior: model health follows the upstream: ready, unavailable after repeated 5xx (503 no_upstream_available)', async () => {
    const health = async (id: string) =>
      (await (await fetch(`${gw.url}/v1/models/${id}/health`)).json()) as {
        model: string
        status: string
      }
    expect(await health('org/premium')).toEqual({ model: 'org/premium', status: 'ready' })
    expect(await health('fake-500')).toEqual({ model: 'fake-500', status: 'ready' })
    const { key } = await gw.account()
    const send = () =>
      as(key, '/chat/completions', {
        method: 'POST',
        body: JSON.stringify({ model: 'fake-500', messages: [{ role: 'user', content: 'x' }] }),
      })
    for (let i = 0; i < 3; i++) expect((await send()).status).toBe(502)
    expect((await health('fake-500')).status).toBe('unavailable')
    const refused = await send()
    expect(refused.status).toBe(503)
    expect(((await refused.json()) as { error: { type: string } }).error.type).toBe(
      'no_upstream_available',
    )
    expect(refused.headers.get('retry-after')).not.toBeNull()
    expect((await fetch(`${gw.url}/v1/models/nope/health`)).status).toBe(404)
  })

  test('behavior: clients that go away before the first token do not count against the upstream', async () => {
    const { key } = await gw.account()
    for (const stream of [true, false])
      for (let i = 0; i < 3; i++) {
        const gone = new AbortController()
        const res = as(key, '/chat/completions', {
          method: 'POST',
          signal: gone.signal,
          body: JSON.stringify({
            model: 'fake-slow',
            stream,
            messages: [{ role: 'user', content: 'one two three four' }],
          }),
        }).catch((e: unknown) => e)
        await Bun.sleep(15)
        gone.abort()
        await res
        await Bun.sleep(30)
      }
    const health = (await (await fetch(`${gw.url}/v1/models/fake-slow/health`)).json()) as {
      status: string
    }
    expect(health.status).toBe('ready')
    const next = await as(key, '/chat/completions', {
      method: 'POST',
      body: JSON.stringify({ model: 'fake-slow', messages: [{ role: 'user', content: 'one' }] }),
    })
    expect(next.status).toBe(200)
  })

  test('behavior: GET /health', async () => {
    expect(await (await fetch(`${gw.url}/health`)).json()).toEqual({ status: 'ok' })
  })
})
