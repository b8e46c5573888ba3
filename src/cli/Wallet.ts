/**
 * The wallet user's commands: `chat` paying through a channel from TOLLWAY_WALLET_KEY, and
 * `channel status | close`.
 */
import { join } from 'node:path'
import { createParser } from 'eventsource-parser'
import { type Address, BaseError, type Hex, HttpRequestError, isAddress } from 'viem'
import { z } from 'zod'
import * as Escrow from '../chain/Escrow.ts'
import { secure } from '../client/Fetch.ts'
import {
  ChainRequiredError,
  ChallengeRefusedError,
  type ChannelState,
  ChannelStateError,
  ClientError,
  CloseNotReadyError,
  challengeOf,
  createFetch,
  LimitExceededError,
  PaymentFailedError,
  type Receipt,
  receiptDigest,
  Store,
  StoreInUseError,
  verifyReceipt,
} from '../client/index.ts'
import { withoutUrls } from '../Errors.ts'
import * as Pricing from '../metering/Pricing.ts'
import { type CliError, PaymentError, ServerError, UsageError } from './Errors.ts'
import * as Http from './Http.ts'
import { type Context, visible } from './main.ts'

const WalletKey = z.string().regex(/^0x[0-9a-fA-F]{64}$/, 'must be a 0x-prefixed 32-byte hex key')

/** A client failure as a CLI error: refusals and limits are payment errors (exit 3). */
export function classify(e: Error): CliError {
  if (e instanceof CloseNotReadyError) return new PaymentError(e.message, e.details)
  if (e instanceof ChainRequiredError)
    return new UsageError(`${e.what} needs the chain: set TOLLWAY_RPC_URL or pass --rpc-url.`)
  // The client's limits are this command's options.
  if (e instanceof LimitExceededError)
    return new PaymentError(
      e.message
        .replace('limits.maxDeposit', '--max-deposit (TOLLWAY_MAX_DEPOSIT)')
        .replace('limits.maxTotal', '--max-total (TOLLWAY_MAX_TOTAL)'),
      e.details,
    )
  if (e instanceof ChallengeRefusedError)
    return new PaymentError(
      // The client's allow-list of escrows, and plain HTTP, are this command's options.
      e.message
        .replace(
          'which is not in allow.escrows; add it if you trust it.',
          'which is not one you trust: pass --escrow <address> (TOLLWAY_ESCROW) if you do, or --trust-escrow on a development chain.',
        )
        .replace('allowInsecureHttp on a test network', '--insecure-http on a test network'),
      (e as { details?: unknown }).details,
    )
  if (e instanceof PaymentFailedError) {
    // A deposit below what the gateway takes: this command's options set the deposit.
    const least = e.problem?.minimum
    return new PaymentError(
      typeof least === 'string'
        ? `${e.message} Raise --max-deposit (and --max-total, which bounds it) to at least ${least}.`
        : e.message,
    )
  }
  // The store is this command's data dir.
  if (e instanceof StoreInUseError)
    return new UsageError(
      e.message.replace(
        'Give this one a store of its own',
        'Run this one with another TOLLWAY_DATA_DIR',
      ),
    )
  // No channel that can take the step (none, not the one named, another under forced close):
  // the request itself cannot be done, as a gateway's 4xx.
  if (e instanceof ChannelStateError)
    return new UsageError(
      e.message.replace(
        'close() this one (the one in use) first, then the other',
        'run tollway channel close for this one (the one in use), then again for the other; the next chat opens another channel',
      ),
      e.details,
    )
  // The store's own failures (not JSON, a malformed entry, a lock left behind, a directory
  // that is a file) name its file: the user repairs it, or gives it another data dir.
  if (e instanceof ClientError && typeof e.details.path === 'string')
    return new UsageError(
      e.message.replace(
        'put it in a directory you can write to',
        'set TOLLWAY_DATA_DIR to a directory you can write to',
      ),
      e.details,
    )
  if (e instanceof ClientError) return new ServerError(e.message)
  // The chain's node (request-close, withdraw, an open of your own): viem's message is a page
  // (the request body, the call's arguments, its docs); one line says what failed, and where.
  if (e instanceof BaseError) {
    const http = e.walk((c) => c instanceof HttpRequestError) as HttpRequestError | null
    // Its origin only: a provider's URL often carries an API key in its path or query, and
    // this line may end up in a CI log.
    const where = http ? ` at ${origin(http.url)}` : ''
    const what = withoutUrls(e.shortMessage.replace(/\.$/, ''))
    const why = e.details && e.details !== e.shortMessage ? ` (${withoutUrls(e.details)})` : ''
    return new ServerError(
      `The chain's node${where} (--rpc-url / TOLLWAY_RPC_URL): ${what}${why}`.replace(/\s+/g, ' '),
    )
  }
  return new ServerError(`${e.name}: ${e.message}`)
}

/** A URL's scheme, host and port (`<url>` if it is none). */
function origin(url: string): string {
  try {
    return new URL(url).origin
  } catch {
    return '<url>'
  }
}

const completions = (ctx: Context) => new URL('/v1/chat/completions', ctx.settings.url).toString()

/** The gateway, with --timeout when given. */
const target = (ctx: Context): Http.Target => ({
  url: ctx.settings.url,
  timeoutMs: Http.waitMs(ctx.settings, 30_000),
})

/** The escrows to pay into: --escrow / TOLLWAY_ESCROW, plus the gateway's own when trusted. */
async function escrows(ctx: Context): Promise<Address[]> {
  const given = ctx.settings.escrows
  for (const a of given)
    if (!isAddress(a)) throw new UsageError(`--escrow / TOLLWAY_ESCROW: ${a} is not an address.`)
  if (!ctx.settings.trustEscrow) return given as Address[]
  // Ask for a challenge (an unpaid request costs nothing) and take the escrow it names.
  let res: Response
  try {
    res = await fetch(completions(ctx), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'x', messages: [{ role: 'user', content: 'x' }] }),
      signal: AbortSignal.timeout(Http.waitMs(ctx.settings, 30_000)),
    })
  } catch (e) {
    throw new ServerError(
      `cannot reach the gateway at ${ctx.settings.url}: ${(e as Error).message}`,
    )
  }
  await res.body?.cancel()
  const challenge = challengeOf(res.headers.get('www-authenticate'))
  const escrow = (challenge?.request as { methodDetails?: { escrowContract?: Address } })
    ?.methodDetails?.escrowContract
  if (!escrow)
    throw new PaymentError(
      secure(completions(ctx))
        ? 'The gateway offers no payment channel (no Payment challenge).'
        : 'The gateway offers no payment channel (no Payment challenge) over plain HTTP to another machine: a tollway gateway offers Payment challenges only over HTTPS (or to its own machine). Use its https:// URL.',
    )
  return [...(given as Address[]), escrow]
}

/**
 * The paying fetch of TOLLWAY_WALLET_KEY. `onChainOnly`: for forced closes, which talk to the
 * escrow alone (the gateway may be down), so no escrow allow-list is asked for.
 */
async function paying(ctx: Context, o: { onChainOnly?: boolean } = {}) {
  if (ctx.settings.walletKey === undefined)
    throw new UsageError(
      'TOLLWAY_WALLET_KEY is not set: the private key (0x…) of the wallet that pays (on the development chain, a payer key that npm start prints, with --trust-escrow).',
    )
  const key = WalletKey.safeParse(ctx.settings.walletKey)
  if (!key.success)
    throw new UsageError(`TOLLWAY_WALLET_KEY: ${key.error.issues[0]?.message ?? 'missing'}.`)
  return createFetch({
    account: key.data as Hex,
    rpcUrl: ctx.settings.rpcUrl,
    limits: { maxDeposit: ctx.settings.maxDeposit, maxTotal: ctx.settings.maxTotal },
    allow: { escrows: o.onChainOnly ? [] : await escrows(ctx) },
    store: Store.file(join(ctx.settings.dataDir, 'channels.json')),
    allowInsecureHttp: ctx.settings.insecureHttp,
  })
}

type Usage = { prompt_tokens?: number; completion_tokens?: number; cost?: string | number }

// What chat reads of the gateway's answer, whole or streamed: checked, so an answer that is not
// a completion is a server error naming what is wrong, not a TypeError of reading it. The
// usage and receipt are printed and checked as they came (a receipt that does not hold says
// so), so only their being objects is required.
const Content = z.object({ content: z.unknown().optional() }).loose()
const Extras = {
  usage: z.looseObject({}).optional(),
  tollway_receipt: z.looseObject({}).optional(),
}
const Chunk = z
  .object({
    choices: z.array(z.object({ delta: Content.optional() }).loose()).optional(),
    error: z
      .object({
        type: z.string().optional(),
        message: z.string().optional(),
        // Null as OpenAI's envelope allows (the gateway's own are strings).
        code: z.string().nullable().optional(),
      })
      .loose()
      .optional(),
    ...Extras,
  })
  .loose()
const Completion = z
  .object({ choices: z.array(z.object({ message: Content }).loose()), ...Extras })
  .loose()

/** `text` read as JSON with `schema`; a ServerError saying what of the gateway's `what` is wrong. */
function answer<S extends z.ZodType>(schema: S, text: string, what: string): z.output<S> {
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    throw new ServerError(`the gateway sent ${what} that is not JSON: ${text.slice(0, 200)}`)
  }
  return Http.checked(schema, json, `the gateway sent ${what} that is not a chat completion's`)
}

export async function chat(ctx: Context) {
  const prompt = ctx.args.slice(1).join(' ')
  if (!prompt) throw new UsageError('Missing "prompt". Run tollway chat --help.')
  const stream = ctx.values.stream ?? false
  const url = completions(ctx)
  const pay = await paying(ctx)
  const model = ctx.values.model ?? (await firstModel(ctx))
  const opening = !(await pay.channel(url))
  if (opening) await promptAffordable(ctx, model, prompt)
  // The answer must begin within --timeout (default a minute, three when a channel opens on
  // chain first); once it has, it may stream for as long as it takes.
  const waitMs = Http.waitMs(ctx.settings, opening ? 180_000 : 60_000)
  const abort = new AbortController()
  const timer = setTimeout(
    () =>
      abort.abort(
        new ServerError(
          `the gateway at ${ctx.settings.url} did not answer within ${waitMs / 1000} s.`,
        ),
      ),
    waitMs,
  )
  const signed = ctx.values.receipt ?? false
  const res = await progress(
    ctx,
    opening ? 'opening a payment channel' : undefined,
    () =>
      pay(url, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          ...(signed ? { 'tollway-receipt': 'true' } : {}),
        },
        body: JSON.stringify({
          model,
          stream,
          ...(stream ? { stream_options: { include_usage: true } } : {}),
          messages: [{ role: 'user', content: prompt }],
        }),
        signal: abort.signal,
      }),
    async () => {
      const channel = await pay.channel(url)
      // Nothing opened (refused before any transaction, an escrow not trusted say): not
      // "failed", which reads as a transaction that went wrong.
      return channel ? `opened (deposit ${channel.deposit}); the request failed:` : 'not opened'
    },
    // A gateway that answered without asking for payment: no channel was opened.
    async () =>
      (await pay.channel(url)) ? 'done' : 'not needed (the gateway asked for no payment)',
  )
    .catch((e: unknown) => {
      throw abort.signal.aborted ? abort.signal.reason : e
    })
    .finally(() => clearTimeout(timer))
  if (!res.ok) await Http.fail(res)
  let text = ''
  // What a receipt's result_sha256 covers: every choice's delta or message (its content,
  // reasoning and tool calls: see metering/Receipt.ts), not only the content printed.
  const received: unknown[] = []
  let usage: Usage | undefined
  let receipt: Receipt | undefined
  /** An error event the stream ended with (credits or funds ran out, the upstream failed). */
  let failed: { type?: string; message?: string; code?: string | null } | undefined
  if (stream) {
    const parser = createParser({
      onEvent: (event) => {
        if (event.event && event.event !== 'message') return
        if (event.data === '[DONE]') return
        const chunk = answer(Chunk, event.data, 'a stream event')
        if (chunk.error) failed = chunk.error
        const piece = answerText(chunk.choices?.[0]?.delta?.content)
        text += piece
        for (const c of chunk.choices ?? []) received.push(c.delta)
        // The answer as `visible` shows it: a model's text (or a gateway's) is not the
        // terminal's to run (an escape sequence in it would set a title, clear the screen).
        if (piece && !ctx.settings.json) ctx.io.out(visible(piece))
        if (chunk.usage) usage = chunk.usage as Usage
        if (chunk.tollway_receipt) receipt = chunk.tollway_receipt as Receipt
      },
    })
    const decoder = new TextDecoder()
    for await (const bytes of res.body as unknown as AsyncIterable<Uint8Array>)
      parser.feed(decoder.decode(bytes, { stream: true }))
    if (!ctx.settings.json) ctx.io.out('\n')
  } else {
    const body = answer(Completion, await res.text(), 'an answer')
    text = answerText(body.choices[0]?.message.content)
    for (const c of body.choices) received.push(c.message)
    usage = body.usage as Usage | undefined
    receipt = body.tollway_receipt as Receipt | undefined
    if (!ctx.settings.json) ctx.io.out(`${visible(text)}\n`)
  }
  const channel = await pay.channel(url)
  if (signed)
    await checkReceipt(
      ctx,
      receipt,
      receiptDigest(received as Parameters<typeof receiptDigest>[0]),
      usage,
      res.headers.get('x-request-id'),
    )
  if (ctx.settings.json)
    ctx.io.out(
      `${JSON.stringify({ content: text, usage, channelId: channel?.channelId, ...(signed ? { receipt } : {}) })}\n`,
    )
  else
    ctx.io.err(
      visible(
        `cost: ${usage?.cost ?? '?'} base units (${usage?.prompt_tokens ?? '?'} in, ${usage?.completion_tokens ?? '?'} out); channel ${channel?.channelId ?? '?'} signed ${channel?.signed ?? '?'} of its deposit ${channel?.deposit ?? '?'}\n${signed ? `receipt: verified, signed by key ${receipt!.key_id}\n` : ''}`,
      ),
    )
  // The answer was cut (what came, and its cost, are printed above): not a success.
  if (failed) {
    const message = `the stream ended early: ${failed.message ?? failed.code ?? 'an error'}${failed.code ? ` (${failed.code})` : ''}`
    throw /insufficient|payment|funds/.test(`${failed.type} ${failed.code}`)
      ? new PaymentError(message, failed)
      : new ServerError(message, failed)
  }
}

/**
 * The answer text to print of a delta's or message's content: the string, or the text parts of
 * an array of parts (Mistral's reasoning models: thinking parts, not printed, as reasoning
 * fields are not, then text parts).
 */
function answerText(content: unknown): string {
  if (typeof content === 'string') return content
  if (!Array.isArray(content)) return ''
  let s = ''
  for (const p of content)
    if (typeof p === 'object' && p !== null && p.type === 'text' && typeof p.text === 'string')
      s += p.text
  return s
}

/**
 * Checks a receipt asked for: signed by the gateway's published key, for this request (its
 * `x-request-id`), this answer's text, and its counts and charge. One missing or wrong is a
 * ServerError (exit 4): the gateway's word on the bill does not hold. (The request id too: the
 * receipt of an earlier request with the same answer and cost is signed, of this text and
 * this cost, and leaves this charge with none.)
 */
async function checkReceipt(
  ctx: Context,
  receipt: Receipt | undefined,
  digest: string,
  usage: Usage | undefined,
  requestId: string | null,
): Promise<void> {
  if (!receipt) throw new ServerError('the gateway sent no receipt, though one was asked for.')
  // The key of the instance that signed it, whichever instance is asked. A key the gateway
  // does not give (404 receipt_key_unknown, a 400 for a key_id that is none) is a receipt that
  // does not hold, not a mistake in the command (a 4xx otherwise exits 2, a usage error).
  const key = (await Http.request(
    target(ctx),
    'GET',
    `/v1/receipts/key?key_id=${encodeURIComponent(String(receipt.key_id))}`,
  ).catch((e: unknown) => {
    if (!(e instanceof UsageError)) throw e
    throw new ServerError(
      `the receipt does not hold: the gateway gives no key of its key_id ${JSON.stringify(receipt.key_id)} (${e.message}).`,
      e.details,
    )
  })) as { key_id?: unknown; public_key: string }
  // What is wrong with it, the first that is: each check, in order, says so or is undefined.
  const checks: (() => string | undefined)[] = [
    () => {
      if (verifyReceipt(receipt, key.public_key)) return undefined
      // An instance of a release without ?key_id= answers with its own key, whatever is asked.
      return key.key_id !== receipt.key_id
        ? `its key_id is ${receipt.key_id}, and the gateway gave the key of ${String(key.key_id)}`
        : 'its signature does not verify with the key of GET /v1/receipts/key'
    },
    () =>
      receipt.request_id === requestId
        ? undefined
        : `it is for request ${receipt.request_id}, the answer is of request ${requestId ?? '(none named)'}`,
    () =>
      receipt.result_sha256 === digest
        ? undefined
        : 'it is for another text than the answer received',
    () =>
      !usage || receipt.cost === usage.cost
        ? undefined
        : `it states a cost of ${receipt.cost}, the answer ${usage.cost}`,
    () =>
      !usage ||
      (receipt.prompt_tokens === usage.prompt_tokens &&
        receipt.completion_tokens === usage.completion_tokens)
        ? undefined
        : `it states ${receipt.prompt_tokens} tokens in and ${receipt.completion_tokens} out, the answer ${usage.prompt_tokens} and ${usage.completion_tokens}`,
  ]
  for (const check of checks) {
    const wrong = check()
    if (wrong !== undefined) throw new ServerError(`the receipt does not hold: ${wrong}.`)
  }
}

/**
 * Refuses, before a channel is opened for it, a prompt whose cost alone (the model's input
 * price, its tokens counted as the gateway counts them) passes --max-total: the channel would
 * open, lock its deposit, and pay for nothing. A model the list does not show, or without a
 * price, is left to the gateway to refuse.
 */
async function promptAffordable(ctx: Context, model: string, prompt: string): Promise<void> {
  const listed = (await Http.request(target(ctx), 'GET', '/v1/models').catch(() => undefined)) as
    | { data?: { id?: unknown; pricing?: { input?: unknown } }[] }
    | undefined
  const input = listed?.data?.find((m) => m.id === model)?.pricing?.input
  if (typeof input !== 'string' || !/^\d{1,78}$/.test(input)) return
  const price = { input: BigInt(input), output: 0n }
  // A token is at least a byte, and one message's framing under 16 tokens (Tokenizer.prompt):
  // when that many cannot pass the limit, nothing is counted (the tokenizer takes most of a
  // second to load).
  const most = new TextEncoder().encode(prompt).length + 16
  if (Pricing.cost(price, most, 0) <= ctx.settings.maxTotal) return
  const { prompt: count } = await import('../metering/Tokenizer.ts')
  const { promptTexts } = await import('../upstream/Chat.ts')
  const tokens = count(
    promptTexts({ messages: [{ role: 'user', content: prompt }] }).map((content) => ({ content })),
  )
  const cost = Pricing.cost(price, tokens, 0)
  if (cost > ctx.settings.maxTotal)
    throw new PaymentError(
      `The prompt alone costs ${cost} base units (${tokens} tokens of ${model} at ${input} per million), over --max-total (TOLLWAY_MAX_TOTAL) ${ctx.settings.maxTotal}; no channel was opened. Raise --max-total, or send a shorter prompt.`,
      { cost: cost.toString(), maxTotal: ctx.settings.maxTotal.toString() },
    )
}

async function firstModel(ctx: Context): Promise<string> {
  const r = await Http.read(
    z.object({ data: z.array(z.object({ id: z.string() }).loose()) }).loose(),
    target(ctx),
    'GET',
    '/v1/models',
  )
  const id = r.data[0]?.id
  if (!id) throw new ServerError('The gateway serves no models.')
  return id
}

/** When a channel under forced close can be withdrawn; undefined when no close was requested
 * (a channel set apart as refused). */
const withdrawableAt = (state: ChannelState): Date | undefined =>
  state.closeRequestedAt === undefined
    ? undefined
    : new Date(Number(BigInt(state.closeRequestedAt) + Escrow.closeGracePeriod) * 1000)

/** Where a channel of the wallet with the gateway stands: in use, set apart as refused as
 * closing (or moved off the gateway's chain), or under the wallet's forced close. */
type Kind = 'in-use' | 'refused' | 'forced-close'
const described: Record<Kind, string> = {
  'in-use': 'in use',
  refused: 'set apart: refused as closing',
  'forced-close': 'under forced close',
}
type Found = ChannelState & { kind: Kind }

/**
 * The wallet's channels with the gateway, in the order `close` takes them (the client's
 * order: in use, refused, forced close), each with its kind; one line per command resolves
 * from it which channel it means, and hands that id to the client, so that what it prints is
 * what it acted on.
 */
async function channels(pay: Awaited<ReturnType<typeof paying>>, url: string): Promise<Found[]> {
  const inUse = await pay.channel(url)
  const { forced, refused } = await pay.setApart(url)
  return [
    ...(inUse ? [{ ...inUse, kind: 'in-use' as const }] : []),
    ...(refused ? [{ ...refused, kind: 'refused' as const }] : []),
    ...(forced ? [{ ...forced, kind: 'forced-close' as const }] : []),
  ]
}

/** `--channel`, checked to be a channel id. */
function channelOption(ctx: Context): Hex | undefined {
  const id = ctx.values.channel
  if (id === undefined) return undefined
  if (!/^0x[0-9a-fA-F]{64}$/.test(id))
    throw new UsageError(`--channel: ${id} is not a channel id (0x and 64 hex digits).`)
  return id as Hex
}

/** The channels found, each with what it is, for a message: `0x… (in use), …`. */
const listed = (found: Found[]) =>
  found.map((c) => `${c.channelId} (${described[c.kind]})`).join(', ')

/** The channel `--channel` names among `found`, else the first of `found` that `fits`. */
function pick(ctx: Context, found: Found[], fits: (c: Found) => boolean, what: string): Found {
  const id = channelOption(ctx)
  const list = listed(found)
  if (id) {
    const named = found.find((c) => c.channelId.toLowerCase() === id.toLowerCase())
    if (!named)
      throw new UsageError(
        `No channel ${id} with ${ctx.settings.url}${list ? `; there are ${list}` : ''}.`,
      )
    return named
  }
  const first = found.find(fits)
  if (!first) throw new UsageError(`No channel with ${ctx.settings.url} to ${what}.`)
  return first
}

export async function status(ctx: Context) {
  const pay = await paying(ctx)
  const found = await channels(pay, completions(ctx))
  const local = found.find((c) => c.kind === 'in-use')
  // Each channel set apart: under forced close, and when it can be withdrawn; or refused as
  // closing (no close requested: nothing to withdraw yet).
  const apart = (['forced-close', 'refused'] as const)
    .flatMap((kind) => found.filter((c) => c.kind === kind))
    .map((c) => {
      const at = withdrawableAt(c)
      return { ...c, ...(at ? { withdrawableAt: at } : {}) }
    })
  if (!ctx.settings.json)
    for (const c of apart)
      ctx.io.out(
        c.withdrawableAt
          ? `channel ${c.channelId}: close requested, withdraw from ${c.withdrawableAt.toISOString()} (tollway channel withdraw)\n`
          : `channel ${c.channelId}: set apart (the gateway refused it as closing); tollway channel close closes it${local ? ' after the channel in use' : ''} (tollway channel request-close, if the gateway cannot)\n`,
      )
  // `closing`: the first set apart (under forced close first), as before `setApart` listed both.
  const closing = apart[0]
  if (!local) {
    if (ctx.settings.json)
      ctx.io.out(`${JSON.stringify({ channel: null, closing, setApart: apart })}\n`)
    else if (!closing) ctx.io.out(`no channel with ${ctx.settings.url}\n`)
    return
  }
  const { kind: _, ...channel } = local
  const server = await Http.read(
    z.looseObject({}),
    target(ctx),
    'GET',
    `/v1/channels/${local.channelId}`,
  )
  if (ctx.settings.json)
    ctx.io.out(`${JSON.stringify({ channel, server, closing, setApart: apart })}\n`)
  else
    ctx.io.out(
      visible(
        `channel ${local.channelId}: ${server.status}, deposit ${server.deposit}, signed ${local.signed}, accepted ${server.acceptedCumulative}, spent ${server.spent}, settled ${server.settled}\n`,
      ),
    )
}

export async function close(ctx: Context) {
  const pay = await paying(ctx)
  const url = completions(ctx)
  // --channel, else the channel in use, else one set apart (the gateway refused it as
  // closing, then one under forced close): the close goes to it, and the line names it.
  const channel = pick(ctx, await channels(pay, url), () => true, 'close')
  const hash = await progress(ctx, 'closing the channel', () =>
    pay.close(url, { channelId: channel.channelId }),
  )
  if (ctx.settings.json)
    ctx.io.out(
      `${JSON.stringify({ channelId: channel.channelId, kind: channel.kind, txHash: hash })}\n`,
    )
  else
    ctx.io.out(
      `closed channel ${channel.channelId} (${described[channel.kind]}): settlement transaction ${hash}\n`,
    )
}

/**
 * For a gateway that stops answering: the payer's own `requestClose` on the escrow (needs
 * TOLLWAY_RPC_URL and gas); says when `withdraw` becomes possible. One forced close at a time
 * per gateway: with another under way, it says to withdraw that one first.
 */
export async function requestClose(ctx: Context) {
  const pay = await paying(ctx, { onChainOnly: true })
  const url = completions(ctx)
  const found = await channels(pay, url)
  // --channel, else the channel in use, else one set apart as refused; one whose close was
  // requested already waits for withdraw.
  const forced = found.find((c) => c.kind === 'forced-close')
  const channel = channelOption(ctx)
    ? pick(ctx, found, () => true, 'close')
    : (found.find((c) => c.kind !== 'forced-close') ?? forced)
  if (!channel) throw new UsageError(`No open channel with ${ctx.settings.url} to close.`)
  const at = forced && withdrawableAt(forced)
  if (channel === forced && at)
    throw new UsageError(
      `channel ${forced.channelId}: close requested already; run tollway channel withdraw from ${at.toISOString()}.`,
    )
  if (forced && at && channel !== forced)
    throw new UsageError(
      `channel ${forced.channelId} is under forced close already (one at a time per gateway): run tollway channel withdraw from ${at.toISOString()}, then request-close again for channel ${channel.channelId} (${described[channel.kind]}); or tollway channel close${channel.kind === 'in-use' ? '' : ` --channel ${channel.channelId}`} if the gateway answers.`,
    )
  const r = await progress(ctx, 'requesting a close on the escrow', () =>
    pay.requestClose(url, { channelId: channel.channelId }),
  )
  if (ctx.settings.json) ctx.io.out(`${JSON.stringify({ ...r, kind: channel.kind })}\n`)
  else
    ctx.io.out(
      `close requested: ${r.txHash}\nchannel ${r.channelId} (was ${described[channel.kind]}): run tollway channel withdraw from ${r.withdrawableAt.toISOString()} (15 minutes; meanwhile the gateway may settle what was spent, with the lowest voucher you signed that covers it)\n`,
    )
}

/** After `request-close` and its 15-minute grace period: takes back the unsettled deposit. */
export async function withdraw(ctx: Context) {
  const pay = await paying(ctx, { onChainOnly: true })
  const url = completions(ctx)
  const found = await channels(pay, url)
  const forced = found.find((c) => c.kind === 'forced-close')
  const channel = channelOption(ctx) ? pick(ctx, found, () => true, 'withdraw') : forced
  if (!channel || channel !== forced)
    throw new UsageError(
      channel
        ? `channel ${channel.channelId} (${described[channel.kind]}) is not under forced close${forced ? ` (channel ${forced.channelId} is)` : ''}; run tollway channel request-close --channel ${channel.channelId} first${forced ? ', once that one is withdrawn' : ''}.`
        : `No channel with ${ctx.settings.url} is closing${found.length > 0 ? ` (there ${found.length === 1 ? 'is' : 'are'} ${listed(found)})` : ''}; run tollway channel request-close${found.length > 1 ? ' --channel <id>' : ''} first.`,
    )
  const r = await progress(ctx, 'withdrawing from the escrow', () =>
    pay.withdraw(url, { channelId: channel.channelId }),
  )
  if (ctx.settings.json)
    ctx.io.out(
      `${JSON.stringify({ ...r, refund: r.refund.toString(), paid: r.paid.toString() })}\n`,
    )
  else
    ctx.io.out(
      `withdrawn: ${r.txHash}\nchannel ${r.channelId}: ${r.refund} base units back to you, ${r.paid} kept by the gateway\n`,
    )
}

/**
 * Shows `label` on stderr while an on-chain wait runs: a dot a second on a terminal. When
 * `run` fails, `failed` words the outcome (the wait may have done its part: a channel opened
 * for a request then refused).
 */
async function progress<T>(
  ctx: Context,
  label: string | undefined,
  run: () => Promise<T>,
  failed: () => Promise<string> = async () => 'failed',
  done: () => Promise<string> = async () => 'done',
) {
  if (!label || ctx.settings.json) return run()
  ctx.io.err(`${label} (on chain)…`)
  const tty = ctx.io.tty
  const timer = tty ? setInterval(() => ctx.io.err('.'), 1_000) : undefined
  let ok = false
  try {
    const r = await run()
    ok = true
    return r
  } finally {
    clearInterval(timer)
    ctx.io.err(` ${await (ok ? done : failed)().catch(() => (ok ? 'done' : 'failed'))}\n`)
  }
}
