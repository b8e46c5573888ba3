import { describe, expect, test } from 'bun:test'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create()

function as(key: string, path: string, init: RequestInit = {}) {
  return fetch(`${gw.url}/v1${path}`, {
    ...init,
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
  })
}
type Listing = { data: { id: string }[]; has_more: boolean; next_cursor: string | null }
const listing = async (res: Response) => {
  expect(res.status).toBe(200)
  return (await res.json()) as Listing
}
const param = async (res: Response) =>
  ((await res.json()) as { error: { param: string | null } }).error.param

/** An account with `n` usage rows (written as the ledger writes them) and `n` more grants. */
async function busy(n: number) {
  const account = await gw.account({ credits: 1_000 })
  for (let i = 0; i < n; i++) {
    await gw.sql`insert into usage (id, account_id, model, stream, prompt_tokens, completion_tokens, cost, status)
      values (${crypto.randomUUID()}, ${account.id}, 'fake', false, 1, 1, 3, 'ok')`
    expect((await gw.admin(`/accounts/${account.id}/credits`, { amount: '1' })).status).toBe(200)
  }
  return account
}

describe('cursors', () => {
  test('error: a cursor of another account or another listing is a 400 naming it, not a position in this one', async () => {
    const a = await busy(3)
    const b = await busy(3)
    const usage = await listing(await as(a.key, '/usage?limit=1'))
    const transactions = await listing(await as(a.key, '/credits/transactions?limit=1'))
    const accounts = await listing(await gw.admin('/accounts?limit=1'))
    for (const c of [usage, transactions, accounts]) expect(c.next_cursor).not.toBeNull()

    for (const res of [
      // Account a's cursors on account b's listings.
      await as(b.key, `/usage?cursor=${usage.next_cursor}`),
      await as(b.key, `/credits/transactions?cursor=${transactions.next_cursor}`),
      await gw.admin(`/accounts/${b.id}/usage?cursor=${usage.next_cursor}`),
      await gw.admin(`/accounts/${b.id}/transactions?cursor=${transactions.next_cursor}`),
      // A cursor of another listing, of the same shape.
      await as(a.key, `/usage?cursor=${accounts.next_cursor}`),
      await gw.admin(`/accounts?cursor=${usage.next_cursor}`),
    ]) {
      expect(res.status).toBe(400)
      expect(await param(res)).toBe('cursor')
    }

    // The same listing of the same account, asked by the operator: the walk goes on.
    const next = await listing(
      await gw.admin(`/accounts/${a.id}/usage?cursor=${usage.next_cursor}`),
    )
    const all = await listing(await as(a.key, '/usage'))
    expect(next.data.map((d) => d.id)).toEqual(all.data.slice(1).map((d) => d.id))
  })

  test('behavior: the operator naming the account in capitals gets cursors of the same listing, which the key holder and the lower-case path take', async () => {
    const a = await busy(3)
    const upper = a.id.toUpperCase()
    const usage = await listing(await gw.admin(`/accounts/${upper}/usage?limit=1`))
    const transactions = await listing(await gw.admin(`/accounts/${upper}/transactions?limit=1`))
    const allUsage = (await listing(await as(a.key, '/usage'))).data.map((d) => d.id)
    const allTransactions = (await listing(await as(a.key, '/credits/transactions'))).data.map(
      (d) => d.id,
    )
    for (const [res, all] of [
      [await as(a.key, `/usage?cursor=${usage.next_cursor}`), allUsage],
      [await gw.admin(`/accounts/${a.id}/usage?cursor=${usage.next_cursor}`), allUsage],
      [
        await as(a.key, `/credits/transactions?cursor=${transactions.next_cursor}`),
        allTransactions,
      ],
      [
        await gw.admin(`/accounts/${a.id}/transactions?cursor=${transactions.next_cursor}`),
        allTransactions,
      ],
    ] as const)
      expect((await listing(res)).data.map((d) => d.id)).toEqual(all.slice(1))
    // And the key holder's cursor on the operator's path in capitals.
    const mine = await listing(await as(a.key, '/usage?limit=1'))
    const walked = await listing(
      await gw.admin(`/accounts/${upper}/usage?cursor=${mine.next_cursor}`),
    )
    expect(walked.data.map((d) => d.id)).toEqual(allUsage.slice(1))
  })
})

describe('bodies', () => {
  test('error: a field the endpoint does not take is a 400 naming it, and nothing is written', async () => {
    const { id, key } = await gw.account({ credits: 1_000 })
    const before = await Gateway.ledger(gw.sql, id)
    const [{ accounts }] =
      (await gw.sql`select count(*)::int as accounts from accounts`) as unknown as [
        { accounts: number },
      ]
    const cases: [() => Promise<Response>, string][] = [
      // An operator who thinks the account starts with credits, or a note went with a grant.
      [() => gw.admin('/accounts', { name: 'acme', plan: 'pro', credits: '5000' }), 'credits'],
      [() => gw.admin(`/accounts/${id}/credits`, { amount: '5', memo: 'welcome' }), 'memo'],
      [
        () => gw.admin(`/accounts/${id}/keys`, { name: 'ci', expires_at: '2027-01-01' }),
        'expires_at',
      ],
      [() => gw.admin(`/accounts/${id}`, { plan: 'pro', balance: '5' }, 'PATCH'), 'balance'],
      [
        () =>
          as(key, '/keys', {
            method: 'POST',
            body: JSON.stringify({ name: 'ci', scopes: ['chat'] }),
          }),
        'scopes',
      ],
    ]
    for (const [send, field] of cases) {
      const res = await send()
      expect(res.status).toBe(400)
      const { error } = (await res.json()) as {
        error: { type: string; param: string; message: string }
      }
      expect(error).toMatchObject({ type: 'invalid_request_error', param: field })
      expect(error.message).toContain(field)
    }
    expect(await Gateway.ledger(gw.sql, id)).toEqual(before)
    const [after] = (await gw.sql`select count(*)::int as accounts from accounts`) as unknown as [
      { accounts: number },
    ]
    expect(after.accounts).toBe(accounts)
    const [{ keys }] =
      (await gw.sql`select count(*)::int as keys from api_keys where account_id = ${id}`) as unknown as [
        { keys: number },
      ]
    expect(keys).toBe(1)
  })
})

describe('admin token', () => {
  test('behavior: an admin token configured with its line break (a secret read from a file) opens the admin API', async () => {
    const token = 'mounted-admin-token-0123456789'
    const other = await Gateway.create({ adminToken: `${token}\n` })
    const res = await fetch(`${other.url}/admin/accounts`, {
      headers: { authorization: `Bearer ${token}` },
    })
    expect(res.status).toBe(200)
    const wrong = await fetch(`${other.url}/admin/accounts`, {
      headers: { authorization: `Bearer ${token}x` },
    })
    expect(wrong.status).toBe(401)
  })
})

describe('revoking keys', () => {
  test('behavior: a key may revoke itself (its answer is its last); another account key is a 404 and stays active', async () => {
    const a = await gw.account()
    const b = await gw.account()
    const bKeys = (await (await as(b.key, '/keys')).json()) as { data: { id: string }[] }
    const bKey = bKeys.data[0]!.id
    const foreign = await as(a.key, `/keys/${bKey}`, { method: 'DELETE' })
    expect(foreign.status).toBe(404)
    expect(((await foreign.json()) as { error: { code: string } }).error.code).toBe('key_not_found')
    expect((await as(b.key, '/credits')).status).toBe(200)

    const own = (await (await as(a.key, '/keys')).json()) as { data: { id: string }[] }
    const self = await as(a.key, `/keys/${own.data[0]!.id}`, { method: 'DELETE' })
    expect(self.status).toBe(200)
    expect(await self.json()).toEqual({ id: own.data[0]!.id, revoked: true })
    for (const path of ['/keys', '/credits', '/usage'])
      expect((await as(a.key, path)).status).toBe(401)
    const stream = await gw.complete(a.key, {
      model: 'fake',
      stream: true,
      messages: [{ role: 'user', content: 'hi' }],
    })
    expect(stream.status).toBe(401)
    // The account had no other key: the operator makes it one.
    const made = await gw.admin(`/accounts/${a.id}/keys`, { name: 'again' })
    expect(made.status).toBe(201)
    expect((await as(((await made.json()) as { key: string }).key, '/credits')).status).toBe(200)
  })
})

describe('revoking keys on two instances', () => {
  test('behavior: a key revoked on one instance gets 401 at once on another that knew it good, whatever the route, body or Idempotency-Key; revoked from both at once, one is told 200 and the place is freed once', async () => {
    const other = await gw.another()
    const { id, key } = await gw.account()
    const made = (await (
      await as(key, '/keys', { method: 'POST', body: '{"name":"doomed"}' })
    ).json()) as { id: string; key: string }
    const on = (url: string, path: string, init: RequestInit = {}, headers = {}) =>
      fetch(`${url}/v1${path}`, {
        ...init,
        headers: {
          authorization: `Bearer ${made.key}`,
          'content-type': 'application/json',
          ...headers,
        },
      })
    // A long prompt: the other instance remembers the key as good (no lookup before counting).
    const long = JSON.stringify({
      model: 'fake',
      messages: [{ role: 'user', content: 'word '.repeat(300) }],
    })
    const short = JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] })
    for (const body of [long, short]) {
      const res = await on(
        other.url,
        '/chat/completions',
        { method: 'POST', body },
        {
          'idempotency-key': `once-${body.length}`,
        },
      )
      expect(res.status).toBe(200)
      await res.text()
    }
    expect((await on(other.url, '/credits')).status).toBe(200)

    expect((await gw.admin(`/accounts/${id}/keys/${made.id}`, undefined, 'DELETE')).status).toBe(
      200,
    )
    for (const body of [long, short]) {
      expect((await on(other.url, '/chat/completions', { method: 'POST', body })).status).toBe(401)
      const replay = await on(
        other.url,
        '/chat/completions',
        { method: 'POST', body },
        {
          'idempotency-key': `once-${body.length}`,
        },
      )
      expect(replay.status).toBe(401)
    }
    for (const path of ['/credits', '/keys', '/usage', '/credits/transactions'])
      expect((await on(other.url, path)).status).toBe(401)

    // The same key revoked through both instances at once.
    const twice = (await (
      await as(key, '/keys', { method: 'POST', body: '{"name":"twice"}' })
    ).json()) as { id: string }
    const answers = await Promise.all(
      [gw.url, other.url].map((url) =>
        fetch(`${url}/v1/keys/${twice.id}`, {
          method: 'DELETE',
          headers: { authorization: `Bearer ${key}` },
        }),
      ),
    )
    expect(answers.map((r) => r.status).sort()).toEqual([200, 404])
    // One key is active: nine more fit, not ten.
    const more = await Promise.all(
      Array.from({ length: 10 }, () =>
        as(key, '/keys', { method: 'POST', body: '{"name":"more"}' }),
      ),
    )
    expect(more.filter((r) => r.status === 201)).toHaveLength(9)
  })
})

describe('limits', () => {
  test('error: a limit not written as a decimal integer from 1 to 200 is a 400 naming limit, on every listing', async () => {
    const a = await busy(2)
    const listings = [
      (q: string) => as(a.key, `/usage?${q}`),
      (q: string) => as(a.key, `/credits/transactions?${q}`),
      (q: string) => gw.admin(`/accounts?${q}`),
      (q: string) => gw.admin(`/accounts/${a.id}/usage?${q}`),
      (q: string) => gw.admin(`/accounts/${a.id}/transactions?${q}`),
    ]
    // Number() reads the last five as 100, 16, 5, 5 and 5.
    const bad = [
      '0',
      '-1',
      '201',
      '1'.repeat(30),
      'abc',
      '',
      '1.5',
      '1e2',
      '0x10',
      '+5',
      '%205',
      '5.0',
    ]
    for (const list of listings) {
      for (const limit of bad) {
        const res = await list(`limit=${limit}`)
        expect(res.status).toBe(400)
        expect(await param(res)).toBe('limit')
      }
      expect((await listing(await list('limit=1'))).data).toHaveLength(1)
      expect((await listing(await list('limit=200'))).has_more).toBe(false)
    }
  })
})
