/** The model list, one model, with prices and context lengths, and per-model health. */
import { Hono } from 'hono'
import type { Model } from '../../upstream/Router.ts'
import type { Deps } from '../Deps.ts'

export function routes(deps: Deps) {
  const app = new Hono()
  const created = Math.floor(Date.now() / 1000)

  const render = (m: Model) => ({
    id: m.id,
    object: 'model',
    created,
    owned_by: m.routes[0]!.provider.name,
    pricing: { input: m.pricing.input.toString(), output: m.pricing.output.toString() },
    context_length: m.contextLength,
    max_output_tokens: m.maxOutputTokens ?? null,
  })

  app.get('/', (c) => c.json({ object: 'list', data: deps.router.models().map(render) }))

  // Model ids may contain slashes ("org/name"), so one pattern takes both a model and its
  // health: a model id as it is, else `<id>/health`.
  app.get('/:id{.+}', (c) => {
    const id = c.req.param('id')
    const health = isHealth(deps, id)
    if (!health) return c.json(render(deps.router.model(id)))
    const m = deps.router.model(id.slice(0, -'/health'.length))
    return c.json({ model: m.id, status: deps.router.status(m) })
  })

  return app
}

/** Whether a model path's id (`:id{.+}`) asks for the health of a model: `<id>/health`. */
function isHealth(deps: Deps, id: string): boolean {
  return id.endsWith('/health') && !deps.router.has(id)
}

/** The pattern a model's path counts under: `/v1/models/:id` or `/v1/models/:id/health`. */
export const pattern = '/v1/models/:id{.+}'

/**
 * The route a path of `pattern` is counted under (`tollway_http_requests_total`): a model, or
 * its health. One pattern serves both (ids may hold slashes), and counted as one a monitor's
 * health probes could not be told from model lookups.
 */
export function routeLabel(deps: Deps, path: string): string {
  const id = path.slice('/v1/models/'.length).replace(/\/$/, '')
  return isHealth(deps, id) ? '/v1/models/:id/health' : '/v1/models/:id'
}
