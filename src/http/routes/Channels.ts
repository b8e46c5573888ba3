/** Channel state for payers (GET /v1/channels/{id}) and the operator (/admin/channels). */
import { Hono } from 'hono'
import { InvalidRequestError, NotFoundError } from '../../Errors.ts'
import * as Channels from '../../ledger/Channels.ts'
import type { Deps } from '../Deps.ts'
import * as Auth from '../middleware/Auth.ts'
import * as Parse from '../Parse.ts'

const CHANNEL_ID = /^0x[0-9a-fA-F]{64}$/

function channelId(value: string): Channels.Hex {
  if (!CHANNEL_ID.test(value))
    throw new NotFoundError(`No channel with id "${value.slice(0, 80)}".`, 'channel_not_found')
  return value.toLowerCase() as Channels.Hex
}

/** The public form of a channel's accounting; amounts as decimal strings. */
export function render(c: Channels.Channel) {
  return {
    channelId: c.channelId,
    chainId: c.chainId,
    escrow: c.escrow,
    payer: c.payer,
    payee: c.payee,
    token: c.token,
    deposit: c.deposit.toString(),
    acceptedCumulative: c.acceptedCumulative.toString(),
    spent: c.spent.toString(),
    reserved: c.reserved.toString(),
    settled: c.settled.toString(),
    status: c.finalized ? 'closed' : c.closeRequestedAt ? 'closing' : 'open',
    updatedAt: c.updatedAt.toISOString(),
  }
}

async function find(deps: Deps, id: Channels.Hex) {
  const c = await Channels.get(deps.sql, id)
  if (!c) throw new NotFoundError(`No channel with id "${id}".`, 'channel_not_found')
  return c
}

/** GET /v1/channels/{channelId}: anyone who knows the id (the on-chain state is public too). */
export function routes(deps: Deps) {
  const app = new Hono()
  app.get('/:id', async (c) => c.json(render(await find(deps, channelId(c.req.param('id'))))))
  return app
}

/** /admin/channels: list them; settle one now. */
export function admin(deps: Deps) {
  const app = new Hono()
  app.use('*', Auth.admin(deps))
  app.get('/', async (c) => {
    const page = await Parse.listing(() => Channels.list(deps.sql, Parse.page(c)))
    return c.json({ ...page, data: page.data.map(render) })
  })
  app.post('/:id/settle', async (c) => {
    const id = channelId(c.req.param('id'))
    await find(deps, id)
    if (!deps.settlement)
      throw new InvalidRequestError(
        'No chain is configured, so nothing settles.',
        'settlement_unavailable',
      )
    const r = await deps.settlement.settleNow(id)
    const result = {
      status: r.status,
      ...('cumulativeAmount' in r ? { cumulativeAmount: r.cumulativeAmount.toString() } : {}),
      ...('hash' in r ? { txHash: r.hash } : {}),
      ...('error' in r ? { error: { name: r.error.name, message: r.error.message } } : {}),
      ...('retryAt' in r ? { retryAt: r.retryAt.toISOString() } : {}),
    }
    return c.json({ result, channel: render(await find(deps, id)) })
  })
  return app
}
