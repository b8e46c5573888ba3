/** The key holder's own account: keys, credits, transactions and usage. */
import { Hono } from 'hono'
import { NotFoundError } from '../../Errors.ts'
import * as ApiKeys from '../../ledger/ApiKeys.ts'
import * as Credits from '../../ledger/Credits.ts'
import * as Usage from '../../ledger/Usage.ts'
import type { Deps } from '../Deps.ts'
import * as Auth from '../middleware/Auth.ts'
import * as Parse from '../Parse.ts'
import { CreateKey, createKey, renderKey } from './Admin.ts'

export function routes(deps: Deps) {
  const app = new Hono<{ Variables: Auth.KeyVariables }>()
  // Per path, not '*': this app is mounted at /v1 beside other routes.
  const auth = Auth.key(deps)
  for (const path of ['/keys', '/keys/*', '/credits', '/credits/*', '/usage', '/usage/*'])
    app.use(path, auth)

  app.post('/keys', async (c) => {
    const input = await Parse.body(c, CreateKey)
    return c.json(await createKey(deps, c.get('accountId'), input.name), 201)
  })

  app.get('/keys', async (c) => {
    const keys = await ApiKeys.list(deps.sql, c.get('accountId'))
    return c.json({ object: 'list', data: keys.map(renderKey) })
  })

  app.delete('/keys/:id', async (c) => {
    const id = Parse.id(c.req.param('id'), 'key')
    if (!(await ApiKeys.revoke(deps.sql, { accountId: c.get('accountId'), id })))
      throw new NotFoundError(`No active key with id "${id}" on this account.`, 'key_not_found')
    return c.json({ id, revoked: true })
  })

  app.get('/credits', async (c) => {
    const b = (await Credits.balance(deps.sql, c.get('accountId')))!
    return c.json({
      balance: b.balance.toString(),
      reserved: b.reserved.toString(),
      available: (b.balance - b.reserved).toString(),
    })
  })

  app.get('/credits/transactions', async (c) =>
    c.json(
      await Parse.listing(() =>
        Credits.transactions(deps.sql, { accountId: c.get('accountId'), ...Parse.page(c) }),
      ),
    ),
  )

  app.get('/usage', async (c) =>
    c.json(
      await Parse.listing(() =>
        Usage.list(deps.sql, {
          accountId: c.get('accountId'),
          ...Parse.page(c),
          ...Parse.usageFilter(c),
        }),
      ),
    ),
  )

  // One request's usage, by the id its response carried in `x-request-id`.
  app.get('/usage/:id', async (c) => {
    const id = Parse.id(c.req.param('id'), 'usage')
    const row = await Usage.get(deps.sql, { accountId: c.get('accountId'), id })
    if (!row)
      throw new NotFoundError(
        `No usage with id "${id}" on this account (a request still under way has none yet).`,
        'usage_not_found',
      )
    return c.json(row)
  })

  return app
}
