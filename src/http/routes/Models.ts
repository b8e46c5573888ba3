/** The model list, with prices and context lengths, and per-model health. */
import { Hono } from 'hono'
import type { Deps } from '../Deps.ts'

export function routes(deps: Deps) {
  const app = new Hono()
  const created = Math.floor(Date.now() / 1000)

  app.get('/', (c) =>
    c.json({
      object: 'list',
      data: deps.router.models().map((m) => ({
        id: m.id,
        object: 'model',
        created,
        owned_by: m.provider.name,
        pricing: { input: m.pricing.input.toString(), output: m.pricing.output.toString() },
        context_length: m.contextLength,
      })),
    }),
  )

  // Model ids may contain slashes ("org/name").
  app.get('/:id{.+}/health', (c) => {
    const m = deps.router.model(c.req.param('id'))
    return c.json({ model: m.id, status: deps.router.status(m) })
  })

  return app
}
