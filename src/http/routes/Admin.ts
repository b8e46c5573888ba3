/** Operator API: accounts, credits and keys (create, revoke). Needs the admin token. */
import { Hono } from 'hono'
import { z } from 'zod'
import { ConflictError, InvalidRequestError, NotFoundError, noRetry } from '../../Errors.ts'
import * as Accounts from '../../ledger/Accounts.ts'
import * as ApiKeys from '../../ledger/ApiKeys.ts'
import * as Credits from '../../ledger/Credits.ts'
import * as Usage from '../../ledger/Usage.ts'
import type { Deps } from '../Deps.ts'
import * as Auth from '../middleware/Auth.ts'
import * as Parse from '../Parse.ts'

export const MAX_ACTIVE_KEYS = 10

/**
 * Text that is stored: PostgreSQL's text holds no NUL character, nor half a surrogate pair
 * (sent as UTF-8 it would become U+FFFD: stored other than answered). No other control
 * character either: names and notes reach the operator's terminal (`tollway keys list` prints
 * the names a key holder gave its keys), where an escape sequence in one would act on it.
 */
const Text = (max: number, min = 0) =>
  z
    .string()
    .min(min)
    .max(max)
    .refine(
      (t) => !/\p{Cc}/u.test(t),
      'must not contain a control character (U+0000 to U+001F, U+007F to U+009F)',
    )
    .refine((t) => t.isWellFormed(), 'must be well-formed Unicode (no lone surrogate)')

/**
 * A name (of an account, of a key): stored text, and something to tell it by, which a name of
 * only spaces is not (a list of keys would show a blank). A credit note may be blank: it is
 * optional, and a blank one says no less than none.
 */
const Name = (max: number) =>
  Text(max, 1).refine((t) => t.trim().length > 0, 'must not be blank (only spaces)')

// Bodies are strict: a field the endpoint does not take is a 400 naming it, not dropped (an
// account created with `"credits"`, a grant with `"memo"`, a key with `"expires_at"` would
// otherwise be answered as if it had been done).
const CreateAccount = z
  .object({
    name: Name(200),
    plan: z.string().min(1).optional(),
  })
  .strict()

const UpdateAccount = z
  .object({ name: Name(200).optional(), plan: z.string().min(1).optional() })
  .strict()
  .refine((u) => u.name !== undefined || u.plan !== undefined, 'name or plan is required')

/**
 * A signed amount of base units, not zero: a decimal string, or a JSON number written as an
 * integer, which reaches here as the text it was written as (`GRANT_LITERAL`). As a double,
 * `1.0000000000000001` and `1e3` were integers (1 and 1000): a fraction or an exponent was
 * taken as another amount than the one written.
 */
const Amount = z
  .string({ error: 'must be an integer number of base units' })
  .regex(/^-?\d{1,78}$/, 'must be an integer number of base units')
  .transform((v) => BigInt(v))
  .refine((v) => v !== 0n, 'must not be zero')
/** The grant fields whose JSON numbers are read as written (Parse.json). */
const GRANT_LITERAL: ReadonlySet<string> = new Set(['amount'])

const Grant = z.object({ amount: Amount, note: Text(500).optional() }).strict()
export const CreateKey = z.object({ name: Name(200) }).strict()

/** Creates a key for an account, or a 409 at the active-key limit. */
export async function createKey(deps: Deps, accountId: string, name: string) {
  const created = await ApiKeys.create(deps.sql, { accountId, name, max: MAX_ACTIVE_KEYS })
  if (!created)
    throw new ConflictError(
      `The account already has ${MAX_ACTIVE_KEYS} active keys; revoke one first.`,
      'key_limit_reached',
      { headers: { ...noRetry } },
    )
  return { ...created, name }
}

export function routes(deps: Deps) {
  const app = new Hono()
  app.use('*', Auth.admin(deps))

  /** A configured plan's name, or a 400 listing the plans. */
  const knownPlan = (plan: string) => {
    // Own keys only: `in` also finds `toString` and `__proto__`.
    if (!Object.hasOwn(deps.config.plans, plan))
      throw new InvalidRequestError(
        `plan: no plan "${plan.slice(0, 64)}"; plans: ${Object.keys(deps.config.plans).join(', ')}.`,
        'invalid_value',
        { param: 'plan' },
      )
    return plan
  }
  const found = async (id: string) => {
    const account = await Accounts.get(deps.sql, id)
    if (!account) throw new NotFoundError(`No account with id "${id}".`, 'account_not_found')
    return account
  }

  app.post('/accounts', async (c) => {
    const input = await Parse.body(c, CreateAccount)
    const plan = knownPlan(input.plan ?? deps.config.defaultPlan)
    const id = await Accounts.create(deps.sql, { name: input.name, plan })
    return c.json({ id, name: input.name, plan }, 201)
  })

  app.get('/accounts', async (c) => {
    const page = await Parse.listing(() => Accounts.list(deps.sql, Parse.page(c)))
    return c.json({ ...page, data: page.data.map(renderAccount) })
  })

  app.get('/accounts/:id', async (c) => {
    const id = Parse.id(c.req.param('id'), 'account')
    const account = await found(id)
    const keys = await ApiKeys.list(deps.sql, id)
    return c.json({ ...renderAccount(account), keys: keys.map(renderKey) })
  })

  app.patch('/accounts/:id', async (c) => {
    const id = Parse.id(c.req.param('id'), 'account')
    const input = await Parse.body(c, UpdateAccount)
    if (input.plan !== undefined) knownPlan(input.plan)
    const account = await Accounts.update(deps.sql, id, input)
    if (!account) throw new NotFoundError(`No account with id "${id}".`, 'account_not_found')
    return c.json(renderAccount(account))
  })

  app.get('/accounts/:id/usage', async (c) => {
    const id = Parse.id(c.req.param('id'), 'account')
    await found(id)
    return c.json(
      await Parse.listing(() =>
        Usage.list(deps.sql, { accountId: id, ...Parse.page(c), ...Parse.usageFilter(c) }),
      ),
    )
  })

  app.get('/accounts/:id/transactions', async (c) => {
    const id = Parse.id(c.req.param('id'), 'account')
    await found(id)
    return c.json(
      await Parse.listing(() =>
        Credits.transactions(deps.sql, { accountId: id, ...Parse.page(c) }),
      ),
    )
  })

  app.post('/accounts/:id/credits', async (c) => {
    const id = Parse.id(c.req.param('id'), 'account')
    const input = await Parse.body(c, Grant, GRANT_LITERAL)
    const balance = await Credits.grant(deps.sql, {
      accountId: id,
      amount: input.amount,
      note: input.note ?? null,
    }).catch((e: unknown) => {
      if (e instanceof Credits.BalanceOverflowError)
        throw new InvalidRequestError(
          'amount: the balance would pass the largest the ledger holds (78 digits).',
          'invalid_value',
          { param: 'amount' },
        )
      throw e
    })
    if (balance === undefined) {
      const account = await Accounts.get(deps.sql, id)
      if (!account) throw new NotFoundError(`No account with id "${id}".`, 'account_not_found')
      throw new ConflictError(
        account.reserved > 0n
          ? `The balance is ${account.balance}, of which requests under way hold ${account.reserved}; a debit of ${-input.amount} would take it below that.`
          : `The balance is ${account.balance}; a debit of ${-input.amount} would take it below zero.`,
        'insufficient_balance',
        {
          details: { balance: account.balance.toString(), reserved: account.reserved.toString() },
          // Only a grant, or the end of the requests that hold credits (a stream's minutes),
          // changes the answer: the SDKs' retries a second or two later would repeat it, and a
          // debit is for the operator to send again on the balance it now sees.
          headers: { ...noRetry },
        },
      )
    }
    return c.json({ balance: balance.toString() })
  })

  app.post('/accounts/:id/keys', async (c) => {
    const id = Parse.id(c.req.param('id'), 'account')
    const input = await Parse.body(c, CreateKey)
    if (!(await Accounts.get(deps.sql, id)))
      throw new NotFoundError(`No account with id "${id}".`, 'account_not_found')
    return c.json(await createKey(deps, id, input.name), 201)
  })

  app.delete('/accounts/:id/keys/:keyId', async (c) => {
    const accountId = Parse.id(c.req.param('id'), 'account')
    const id = Parse.id(c.req.param('keyId'), 'key')
    if (!(await ApiKeys.revoke(deps.sql, { accountId, id })))
      throw new NotFoundError(
        `No active key with id "${id}" on account "${accountId}".`,
        'key_not_found',
      )
    return c.json({ id, revoked: true })
  })

  return app
}

/** An account as the admin API shows it. */
function renderAccount(a: Accounts.Account) {
  return {
    id: a.id,
    name: a.name,
    plan: a.plan,
    balance: a.balance.toString(),
    reserved: a.reserved.toString(),
    active_requests: a.activeRequests,
    month_tokens: a.monthTokens.toString(),
    created_at: a.createdAt.toISOString(),
  }
}

/** The public form of a key: never the key itself. */
export function renderKey(k: ApiKeys.Key) {
  return {
    id: k.id,
    name: k.name,
    prefix: k.prefix,
    created_at: k.createdAt.toISOString(),
    revoked_at: k.revokedAt?.toISOString() ?? null,
  }
}
