/**
 * The HTTP application: routes, middleware, and the one place errors are rendered.
 * `create(deps)` builds it; main.ts serves it.
 */
import { Hono } from 'hono'
import { cors } from 'hono/cors'
import { matchedRoutes } from 'hono/route'
import {
  DatabaseUnavailableError,
  GatewayError,
  InvalidRequestError,
  MethodNotAllowedError,
  NotFoundError,
  PayloadTooLargeError,
  WithoutPaymentError,
} from '../Errors.ts'
import { Lru } from '../Lru.ts'
import * as Db from '../ledger/Db.ts'
import * as ReceiptKeys from '../ledger/ReceiptKeys.ts'
import * as Problem from '../payment/Problem.ts'
import type { Deps } from './Deps.ts'
import * as Auth from './middleware/Auth.ts'
import * as Parse from './Parse.ts'
import * as Payments from './Payments.ts'
import * as Account from './routes/Account.ts'
import * as Admin from './routes/Admin.ts'
import * as Channels from './routes/Channels.ts'
import * as Chat from './routes/Chat.ts'
import * as Models from './routes/Models.ts'

export type { Deps }

const COMPLETIONS = '/v1/chat/completions'

/** The response headers a browser's script may read (CORS): what clients and SDKs read. */
const EXPOSED = [
  'x-request-id',
  'x-ratelimit-limit-requests',
  'x-ratelimit-remaining-requests',
  'x-ratelimit-reset-requests',
  'retry-after',
  'retry-after-ms',
  'x-should-retry',
  'x-tollway-upstream',
  'www-authenticate',
  'payment-receipt',
]

/** Builds the app. */
export function create(deps: Deps): Hono {
  // A trailing slash is the same path (`/v1/chat/completions/`: clients that join a base URL
  // ending in a slash send one).
  const app = new Hono({ strict: false })
  const limit = deps.config.maxBodyBytes

  // Browsers (CORS): a page on an allowed origin may call the API with its key in a header,
  // and read the headers a client needs (the request id, limits, waits, payment receipts).
  // Only requests that carry an Origin (a browser's) go through it.
  const origins = deps.config.corsOrigins
  const browsers =
    origins.length > 0
      ? cors({
          origin: origins.includes('*') ? '*' : origins,
          // Every method a route takes: PATCH of an account, and a voucher sent to the
          // completions path by any method (a preflight that leaves one out blocks it).
          allowMethods: ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'],
          exposeHeaders: EXPOSED,
          maxAge: 600,
        })
      : undefined
  // One middleware for both (each layer costs every request a dispatch step). A Host header
  // that is no host (`a b`, `x/y`, empty) reaches here with a URL that is only a path, which
  // the router reads wrongly (it looks for the path after a scheme and host, so
  // `/v1/admin/accounts` would be served as `/admin/accounts`): refused before any route runs.
  app.use('*', (c, next) => {
    if (!c.req.url.startsWith('http'))
      throw new InvalidRequestError('The Host header is not a valid host name.', 'invalid_host')
    if (browsers && c.req.raw.headers.has('origin')) return browsers(c, next)
    return next()
  })

  // Every answer counted by route pattern (not path: ids would make the labels unbounded);
  // first, so that what the body limit refuses counts too.
  app.use('*', async (c, next) => {
    await next()
    // The route the path matched (the last match that is not middleware, which matches every
    // method), whatever answered: a 401 of the auth middleware counts under its route.
    const route = matchedRoutes(c).findLast((r) => r.method !== 'ALL')
    const label = !route
      ? 'unmatched'
      : route.path === Models.pattern
        ? Models.routeLabel(deps, c.req.path)
        : route.path
    deps.metrics.answered(c.req.method, label, c.res.status)
  })

  // A completion request may be longer (inline images, audio, files): the route reads one over
  // `limit`, or without a declared length, only once its credential proves good.
  const completions = Math.max(limit, deps.config.maxCompletionBodyBytes)
  const tooLarge = (most: number) =>
    new PayloadTooLargeError(`The request body is over the ${most}-byte limit.`, 'body_too_large')
  app.use('*', (c, next) => {
    // A declared length is checked without touching the body: reading `body` here would
    // turn the handler's `text()` into a stream read.
    const headers = c.req.raw.headers
    const length = headers.get('content-length')
    const most = () => (c.req.path === COMPLETIONS ? completions : limit)
    if (length === null || headers.has('transfer-encoding')) {
      // Sent without a length (chunked): counted as the handler reads it, which it may not
      // (hono's bodyLimit reads it whole first, a stranger's too).
      if (c.req.raw.body) c.req.raw = counted(c.req.raw, most(), tooLarge)
      return next()
    }
    const n = Parse.declared(length)
    if (n > limit && n > most()) throw tooLarge(most())
    return next()
  })

  app.get('/health', (c) => c.json({ status: 'ok' }))
  app.get('/metrics', Auth.admin(deps), async (c) =>
    c.body(await deps.metrics.text(), 200, { 'content-type': deps.metrics.contentType }),
  )
  // The key completion receipts are signed with (see metering/Receipt.ts): this instance's, or
  // with `key_id` the one of that id, which another instance on the database (or this one,
  // before its key changed) signed with.
  /**
   * Keys of other instances found by their id: an id names one key (its public key's hash), so
   * a key found is kept, and asked again it costs no database read (anyone may ask).
   */
  const receiptKeys = new Lru<string, string>(1_024)
  /** A key asked for by its id never changes: clients and caches may keep it. */
  const IMMUTABLE = { 'cache-control': 'public, max-age=31536000, immutable' }
  app.get('/v1/receipts/key', async (c) => {
    const signer = deps.receipts
    const keyId = c.req.query('key_id')
    // Without an id, this instance's key now: it changes with RECEIPT_KEY. An instance that
    // signs none has none, but answers for a key_id all the same: a receipt another instance
    // on the database signed is checked on whichever instance a client reaches.
    if (keyId === undefined) {
      if (!signer)
        throw new NotFoundError(
          'This gateway signs no receipts (receipts are off in its configuration).',
          'receipts_off',
        )
      return c.json(
        { algorithm: 'Ed25519', key_id: signer.keyId, public_key: signer.publicKey },
        200,
        { 'cache-control': 'no-cache' },
      )
    }
    if (signer && keyId === signer.keyId)
      return c.json(
        { algorithm: 'Ed25519', key_id: keyId, public_key: signer.publicKey },
        200,
        IMMUTABLE,
      )
    if (!/^[0-9a-f]{16}$/.test(keyId))
      throw new InvalidRequestError(
        "key_id is a receipt's key_id: 16 lowercase hex digits.",
        'invalid_value',
        { param: 'key_id' },
      )
    let publicKey = receiptKeys.get(keyId)
    if (publicKey === undefined) {
      publicKey = await ReceiptKeys.find(deps.sql, keyId)
      if (!publicKey)
        throw new NotFoundError(
          `No instance of this gateway signed receipts with key ${keyId}.`,
          'receipt_key_unknown',
        )
      receiptKeys.set(keyId, publicKey)
    }
    return c.json({ algorithm: 'Ed25519', key_id: keyId, public_key: publicKey }, 200, IMMUTABLE)
  })
  app.route('/v1/models', Models.routes(deps))
  app.route(COMPLETIONS, Chat.routes(deps))
  app.route('/v1/channels', Channels.routes(deps))
  app.route('/v1', Account.routes(deps))
  app.route('/admin/channels', Channels.admin(deps))
  app.route('/admin', Admin.routes(deps))

  app.notFound((c) => {
    // The completions path takes other methods than POST only with a Payment credential, as
    // its route answers them: an OPTIONS (which none carries) gets the same 405, `Allow: POST`.
    if (c.req.path === COMPLETIONS || c.req.path === `${COMPLETIONS}/`) throw Chat.postOnly()
    // A path served to other methods is a 405 naming them (HEAD wherever GET is).
    const allowed = ['GET', 'POST', 'DELETE', 'PUT', 'PATCH'].filter((m) =>
      routed(app, m, c.req.path),
    )
    if (allowed.includes('GET')) allowed.splice(1, 0, 'HEAD')
    if (allowed.length > 0)
      throw new MethodNotAllowedError(
        `No route ${c.req.method} ${c.req.path}; it takes ${allowed.join(', ')}.`,
        allowed.join(', '),
      )
    throw new NotFoundError(`No route ${c.req.method} ${c.req.path}.`, 'route_not_found')
  })

  app.onError((e, c) => {
    let error =
      e instanceof GatewayError
        ? e
        : isMalformedBody(e)
          ? new InvalidRequestError('The request body could not be read.', 'invalid_body')
          : Db.isUnreachable(e)
            ? new DatabaseUnavailableError({ cause: e })
            : undefined
    if (error instanceof DatabaseUnavailableError)
      deps.log.warn({ err: (e as Error).message }, 'database unreachable')
    // The client went away, and its request's work ended with the abort: nobody reads the
    // answer, and it is no bug of the gateway's (the charge was settled where it stopped).
    if (!error && c.req.raw.signal.aborted) {
      deps.log.info({ reason: (e as Error).message }, 'client went away')
      return c.body(null, 499 as 400)
    }
    if (!error) {
      deps.log.error(
        {
          err: {
            name: (e as Error).name,
            message: (e as Error).message,
            stack: (e as Error).stack,
          },
        },
        'unhandled error',
      )
      return c.json(
        {
          error: {
            type: 'server_error',
            message: 'The gateway failed; this is a bug.',
            code: 'internal_error',
            param: null,
          },
        },
        500,
      )
    }
    if ((error.status === 401 || error.status === 402) && !Payments.hasPaymentChallenge(error))
      Payments.withChallenges(
        error,
        Payments.authenticate(
          Payments.offered(c, deps.payments, deps.config.trustProxy),
          deps.router.models()[0]?.pricing,
          c.req.header('accept-payment'),
        ),
      )
    // The core draft ("Denial of Service"): challenges issued and credentials refused are
    // limited per client address: a refused Payment credential (a payment problem, or a 401),
    // a key that is no key (a 401), a challenge to a request with no credential. Not a key
    // holder's other refusals (an empty balance, a bad parameter: a 429 in their place would
    // have the OpenAI SDKs send them again), nor a payer's that are not about its payment.
    const payment = Payments.isPayment(c.req.header('authorization'))
    if (
      deps.payments &&
      (error.status === 401 ||
        (payment && error instanceof Problem.PaymentProblem) ||
        (!payment &&
          Auth.rawKey(c) === undefined &&
          error.status === 402 &&
          Payments.hasPaymentChallenge(error)))
    ) {
      const over = Payments.overRefusals(deps.payments, c, deps.config.trustProxy, true)
      if (over) {
        deps.metrics.refusalLimited()
        error = over
      }
    }
    // The core draft: no 402 without a Payment challenge. A gateway that takes payments but
    // may offer none on this request (plain HTTP from another machine) refuses with a 403.
    if (error.status === 402 && deps.payments && !Payments.hasPaymentChallenge(error))
      error = new WithoutPaymentError(error)
    for (const [k, v] of Object.entries(error.headers)) c.header(k, v)
    // Every answer of the completions path carries an x-request-id (OpenAI's SDKs report it
    // with the error): one refused before its route ran (a body over the limit, a
    // Content-Length or Host that is none) gets its own here.
    if (c.req.path === COMPLETIONS && !c.res.headers.has('x-request-id'))
      c.header('x-request-id', Chat.newRequestId())
    // The core draft ("Retry Behavior"): a 402 says when the client may retry. With what its
    // Payment challenge asks for (a credential, a voucher), at once. (A key holder's 402
    // without one waits for credits: no time can be given.)
    if (
      error.status === 402 &&
      Payments.hasPaymentChallenge(error) &&
      !Object.keys(error.headers).some((k) => /^retry-after$/i.test(k))
    )
      c.header('retry-after', '0')
    if (error instanceof Problem.PaymentProblem)
      return c.body(JSON.stringify(error.toProblem()), error.status as 400, {
        'content-type': Problem.contentType,
      })
    return c.json(error.toJSON(), error.status as 400)
  })

  return app
}

/** Whether `app` has a route (not a middleware, which takes every method) for `method` at `path`. */
function routed(app: Hono, method: string, path: string): boolean {
  const [matches] = app.router.match(method, path) as unknown as [
    [[unknown, { method: string }], unknown][],
  ]
  return matches.some(([[, route]]) => route.method === method)
}

/** `request` with its body cut short by `tooLarge(most)` when it runs past `most` bytes. */
function counted(request: Request, most: number, tooLarge: (most: number) => Error): Request {
  let size = 0
  const body = request.body!.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        size += chunk.byteLength
        if (size > most) controller.error(tooLarge(most))
        else controller.enqueue(chunk)
      },
    }),
  )
  return new Request(request, { body, duplex: 'half' } as RequestInit)
}

function isMalformedBody(e: unknown): boolean {
  return e instanceof TypeError && /body|decode/i.test(e.message)
}
