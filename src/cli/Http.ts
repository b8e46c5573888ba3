/** Calls to a running gateway's HTTP API; non-2xx answers become CLI errors. */
import type { z } from 'zod'
import { PaymentError, ServerError, UsageError } from './Errors.ts'

/** How long to wait for the gateway's answer: --timeout (seconds) when given, else `fallbackMs`. */
export function waitMs(settings: { timeout?: number | undefined }, fallbackMs: number): number {
  return settings.timeout !== undefined ? settings.timeout * 1000 : fallbackMs
}

/** A gateway to call; `timeoutMs` (default 30 s) bounds the wait for its answer. */
export type Target = {
  url: string
  token?: string | undefined
  timeoutMs?: number | undefined
  /** Said after a 401's message: where the token came from, when that may be why. */
  unauthorized?: string | undefined
}

/** The message of an OpenAI envelope or an RFC 9457 problem, or the status line. */
async function describe(res: Response): Promise<{ message: string; body: unknown }> {
  const text = await res.text().catch(() => '')
  try {
    const body = JSON.parse(text) as {
      error?: { message?: string }
      detail?: string
      title?: string
    }
    return {
      message: body.error?.message ?? body.detail ?? body.title ?? `HTTP ${res.status}`,
      body,
    }
  } catch {
    return { message: `HTTP ${res.status} ${text.slice(0, 200)}`.trim(), body: text }
  }
}

/** Throws the CLI error a failed response stands for: 402 → payment, the rest → server. */
export async function fail(res: Response, unauthorized?: string): Promise<never> {
  const described = await describe(res)
  const { body } = described
  const message =
    res.status === 401 && unauthorized
      ? `${described.message} (${unauthorized})`
      : described.message
  if (res.status === 402) throw new PaymentError(`payment refused: ${message}`, body)
  // What the command asked for is wrong (a bad value, an unknown id, a wrong token): the
  // user's to fix, as a usage error is; a 408, a 429 or anything with a Retry-After (a 409
  // in progress) is a matter of waiting, as a 5xx is.
  if (
    res.status >= 400 &&
    res.status < 500 &&
    res.status !== 408 &&
    res.status !== 429 &&
    !res.headers.has('retry-after')
  )
    throw new UsageError(`gateway answered ${res.status}: ${message}`, body)
  throw new ServerError(`gateway answered ${res.status}: ${message}`, body)
}

/**
 * A JSON request to the gateway; network failures, and no answer within the target's timeout (a
 * gateway that takes the connection and never answers), are server errors.
 */
export async function request(
  target: Target,
  method: string,
  path: string,
  body?: unknown,
): Promise<unknown> {
  const timeoutMs = target.timeoutMs ?? 30_000
  let res: Response
  try {
    res = await fetch(new URL(path, target.url), {
      method,
      headers: {
        ...(target.token ? { authorization: `Bearer ${target.token}` } : {}),
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    })
  } catch (e) {
    if ((e as Error).name === 'TimeoutError')
      throw new ServerError(
        `the gateway at ${target.url} did not answer within ${timeoutMs / 1000} s.`,
      )
    throw new ServerError(`cannot reach the gateway at ${target.url}: ${(e as Error).message}`)
  }
  if (!res.ok) return fail(res, target.unauthorized)
  if (res.status === 204) return {}
  const text = await res.text()
  try {
    return JSON.parse(text)
  } catch {
    throw new ServerError(
      `the gateway answered ${res.status} with a body that is not JSON: ${text.slice(0, 200)}`.trim(),
    )
  }
}

/**
 * `request`, its answer read with `schema`: a gateway (or whatever answers at its URL) whose
 * answer lacks what the command prints is a server error naming the field, not a TypeError
 * from the command's reading it.
 */
export async function read<S extends z.ZodType>(
  schema: S,
  target: Target,
  method: string,
  path: string,
  body?: unknown,
): Promise<z.output<S>> {
  const answer = await request(target, method, path, body)
  return checked(
    schema,
    answer,
    `the gateway's answer to ${method} ${path.split('?')[0]} is not one this CLI reads`,
  )
}

/**
 * `json` read with `schema`; when it does not hold, a ServerError: `what`, then the first field
 * at fault and why.
 */
export function checked<S extends z.ZodType>(schema: S, json: unknown, what: string): z.output<S> {
  const parsed = schema.safeParse(json)
  if (parsed.success) return parsed.data
  const issue = parsed.error.issues[0]!
  const field = issue.path.map(String).join('.') || 'the body'
  throw new ServerError(`${what} (${field}: ${issue.message}).`, json)
}
