/**
 * The OpenAI SSE stream of a metered completion. A chunk is read from the upstream only
 * once the client's socket has taken the previous one, so a slow client (or a stream
 * waiting for funds) holds the upstream through TCP backpressure instead of buffering.
 * (Hono's streamSSE helper pushes, which is why this builds the ReadableStream itself.)
 */
import type { Context } from 'hono'
import type { GatewayError } from '../Errors.ts'
import type { Frame, Usage } from '../metering/Meter.ts'
import type { Digest } from '../metering/Receipt.ts'
import { type Chunk, generated, type Received } from '../upstream/Chat.ts'

const encoder = new TextEncoder()
const DONE = encoder.encode('data: [DONE]\n\n')

/** One `data:` event. JSON never contains a raw newline, so one line suffices. */
function line(value: unknown): string {
  return `data: ${JSON.stringify(value)}\n\n`
}

/** Encodes one `data:` event. */
export function data(value: unknown): Uint8Array {
  return encoder.encode(line(value))
}

/** Whether a chunk ends its choice (the one that carries the usage without include_usage). */
function finishes(chunk: Chunk): boolean {
  for (const c of chunk.choices) if (c.finish_reason) return true
  return false
}

/** Encodes a named event (names are ours, never user input). */
export function event(name: string, value: unknown): Uint8Array {
  return encoder.encode(`event: ${name}\ndata: ${JSON.stringify(value)}\n\n`)
}

/** What a quiet stream writes to keep its connection: a comment, which SSE readers skip. */
const KEEP_ALIVE = encoder.encode(': keep-alive\n\n')

/** A stream the heartbeat watches: when it last wrote, and how to write a comment. */
type Watched = { last: number; quietMs: number; writing: boolean; beat: () => void }
const watched = new Set<Watched>()
let ticker: ReturnType<typeof setInterval> | undefined
/** The ticker's clock (ms): a write stamps it, no clock read per write. */
let tick = 0
/**
 * One ticker for every stream, each second: a stream that wrote nothing for its `quietMs`
 * (an upstream thinking before its first words, or pausing; a channel stream waiting for a
 * voucher) writes a comment, so that proxies and clients that cut an idle connection (60 s
 * is common; Bun's own server, 255 s) keep it.
 */
function watch(w: Watched): () => void {
  watched.add(w)
  if (ticker === undefined) {
    tick = performance.now()
    ticker = setInterval(() => {
      tick = performance.now()
      for (const s of watched) if (!s.writing && tick - s.last >= s.quietMs) s.beat()
    }, 1_000)
    ticker.unref()
  }
  w.last = tick
  return () => {
    watched.delete(w)
    if (watched.size === 0 && ticker !== undefined) {
      clearInterval(ticker)
      ticker = undefined
    }
  }
}

export type Options = {
  frames: AsyncGenerator<Frame, void, undefined>
  /** Quiet this long (ms), the stream writes a keep-alive comment (default 15 s). */
  keepAliveMs?: number
  /** The model id the client asked for (upstream chunks may name their own). */
  model: string
  /** `stream_options.include_usage`: usage in a chunk of its own with empty `choices`. */
  includeUsage: boolean
  /** Cancels the upstream when the client goes away. */
  abort: () => void
  /** Runs once when the stream is over, whichever way. */
  done: () => void
  /** Reports an unexpected failure of the stream. */
  onError?: (e: unknown) => void
  /** Renders frames other than chunks and the end (payment events). */
  extra?: (frame: Frame) => Promise<Uint8Array | undefined>
  /** The signed receipt the final usage chunk carries as `tollway_receipt` (see metering/Receipt.ts). */
  receipt?: (usage: Usage) => unknown
  /**
   * Fed the generated text of each chunk as it is written, for the receipt's `result_sha256`:
   * here, not where the chunks are metered, because a finishing chunk held for the usage goes
   * out after chunks the upstream wrote later, and the digest is of the text as the client
   * joins it.
   */
  digest?: Digest | undefined
  /** Events to send after the final usage chunk, before `[DONE]` (the payment receipt). */
  beforeDone?: () => Promise<Uint8Array | undefined>
  /**
   * Headers of the stream's response besides its own (the `Payment-Receipt` it starts with).
   * A `Cache-Control` among them is added to the stream's `no-cache`.
   */
  headers?: Record<string, string>
}

/**
 * Builds the response. Without `include_usage` the usage rides on the final chunk, the one
 * with the finish_reason, which is held back until the usage is known; chunks the upstream
 * sends after it go out ahead of it.
 */
export function response(c: Context, o: Options): Response {
  const digest = o.digest
  /** Feeds the digest a chunk's text, as it is written. */
  const hash = (chunk: Chunk) => {
    if (digest) for (const choice of chunk.choices) digest.update(generated(choice.delta))
  }
  let last: Received | undefined
  /** The finishing chunk held to carry the usage (without include_usage), to the end. */
  let held: Chunk | undefined
  /** Whether a chunk with a finish reason went out (or is held to carry the usage). */
  let finishSent = false
  let finished = false
  const finish = () => {
    if (!finished) {
      finished = true
      o.done()
    }
  }

  // What OpenAI's chunks always carry and some upstreams leave out (GetInference's are
  // `{"choices":[{"delta":{"content":"…"}}]}`): `id`, `object`, `created`, and a role on each
  // choice's first delta. OpenAI's SDKs type them as always there, and their stream helper
  // (`chat.completions.stream`, `runTools`) fails a choice that never had a role ("missing
  // role for choice 0"). The stream's id and time are its first chunk's (made up when it had
  // none), and every chunk carries them: OpenAI's chunks share theirs, and clients keep one id
  // a stream, so an upstream's id or time that comes later, or changes, is replaced.
  let id: string | undefined
  let created: number | undefined
  const roled = new Set<number>()
  /** `chunk` with what it left out (or gave otherwise) filled in, or undefined when nothing. */
  const completed = (chunk: Chunk): Chunk | undefined => {
    id ??= chunk.id ?? `chatcmpl-${crypto.randomUUID()}`
    created ??= chunk.created ?? Math.floor(Date.now() / 1000)
    let choices: Chunk['choices'] | undefined
    for (const [i, choice] of chunk.choices.entries()) {
      if (roled.has(choice.index)) continue
      roled.add(choice.index)
      if (typeof choice.delta.role === 'string') continue
      choices ??= [...chunk.choices]
      choices[i] = { ...choice, delta: { ...choice.delta, role: 'assistant' } }
    }
    if (
      choices === undefined &&
      chunk.id === id &&
      chunk.object !== undefined &&
      chunk.created === created
    )
      return undefined
    return {
      ...chunk,
      id,
      object: chunk.object ?? 'chat.completion.chunk',
      created,
      ...(choices ? { choices } : {}),
    }
  }

  // The upstream's JSON text is forwarded as is when it names the model the client asked
  // for, or with its model field swapped when that field is found exactly once (an upstream
  // spelling it otherwise, or repeating it nested, goes through JSON.stringify).
  const ours = `"model":${JSON.stringify(o.model)}`
  let theirs: { model: string; field: string } | undefined
  const forwarded = (r: Received): string | undefined => {
    const json = r.json
    const model = r.text === undefined ? r.chunk.model : r.model
    if (json === undefined || typeof model !== 'string') return undefined
    if (model === o.model) return json
    if (theirs?.model !== model) theirs = { model, field: `"model":${JSON.stringify(model)}` }
    const at = json.indexOf(theirs.field)
    if (at < 0 || json.indexOf(theirs.field, at + 1) >= 0) return undefined
    return json.slice(0, at) + ours + json.slice(at + theirs.field.length)
  }

  const render = async (frame: Frame): Promise<(string | Uint8Array)[]> => {
    switch (frame.kind) {
      case 'chunks': {
        // One write for the batch: `data:` events joined in a string (the sink encodes it).
        let text = ''
        for (const r of frame.chunks) {
          last = r
          // A template read (`r.text` set) has no finish reason: its chunk is not built (nor
          // completed: a template is learned only from a chunk that has its object, and after
          // its choice's first delta, which went the full way), unless its id or time is not
          // the stream's (the template's chunk came after one without them, or changed them).
          const finishing = r.text === undefined && finishes(r.chunk)
          const filled =
            r.text === undefined || r.id !== id || r.created !== created
              ? completed(r.chunk)
              : undefined
          const chunk = filled ?? r.chunk
          if (finishing) finishSent = true
          // The finishing chunk stays held to the end; chunks after it (Azure sends one of
          // content_filter_results, `finish_reason: null`) go out ahead of it, so the one
          // finish_reason comes last, with the usage. (Let out when the next chunk came, it
          // left the usage to a second finishing chunk.) Not a usage chunk of its own
          // (`choices: []`): a client that did not ask for one may read `choices[0]`; and
          // the usage belongs on the last chunk, whose `usage` OpenAI's Python stream helper
          // keeps. Only a second finishing chunk (an upstream repeating it) lets it out.
          if (!o.includeUsage && finishing) {
            if (held) {
              text += line(held)
              hash(held)
            }
            held = { ...chunk, model: o.model }
          } else {
            // A template read knows its text without building the chunk.
            if (r.text !== undefined) digest?.update(r.text)
            else hash(r.chunk)
            const json = filled ? undefined : forwarded(r)
            text += json === undefined ? line({ ...chunk, model: o.model }) : `data: ${json}\n\n`
          }
        }
        return text.length > 0 ? [text] : []
      }
      case 'end': {
        const after = await o.beforeDone?.()
        return [
          ...final(frame.usage, frame.finishReason, frame.error),
          ...(after ? [after] : []),
          DONE,
        ]
      }
      default: {
        const extra = await o.extra?.(frame)
        return extra ? [extra] : []
      }
    }
  }

  const final = (usage: Usage, finishReason: string | null, error?: GatewayError): Uint8Array[] => {
    const chunk = last?.chunk as
      | (Chunk & { system_fingerprint?: unknown; service_tier?: unknown })
      | undefined
    const base = {
      id: id ?? `chatcmpl-${crypto.randomUUID()}`,
      object: 'chat.completion.chunk',
      created: created ?? Math.floor(Date.now() / 1000),
      model: o.model,
      // As the upstream's chunks carry them (OpenAI's usage chunk repeats them).
      ...(chunk?.system_fingerprint != null
        ? { system_fingerprint: chunk.system_fingerprint }
        : {}),
      ...(chunk?.service_tier != null ? { service_tier: chunk.service_tier } : {}),
    }
    const out: Uint8Array[] = []
    const finishing = { ...base, choices: [{ index: 0, delta: {}, finish_reason: finishReason }] }
    // The held chunk goes out with the receipt: its text is the last the digest takes.
    if (held) hash(held)
    const receipt = o.receipt?.(usage)
    const metered = receipt === undefined ? { usage } : { usage, tollway_receipt: receipt }
    if (o.includeUsage) {
      // A stream cut short (credits, a voucher, a newer stream) never had the upstream's
      // finishing chunk: the client still gets its finish_reason, before the usage chunk.
      if (!finishSent && finishReason !== null) out.push(data(finishing))
      out.push(data({ ...base, choices: [], ...metered }))
    } else if (held) out.push(data({ ...held, ...metered }))
    // No finishing chunk came (a stream cut short): the gateway's carries the usage.
    else out.push(data({ ...finishing, ...metered }))
    held = undefined
    if (error) out.push(data(error.toJSON()))
    return out
  }

  // The client went away (or the stream is over): stop the upstream and the metering once.
  let stopped = false
  let started = false
  const stop = async () => {
    if (stopped) return
    stopped = true
    o.abort()
    // A generator never started skips its `finally` on return(), and the metering settles the
    // request there: run it to its end instead (its upstream aborted, it ends at once).
    if (!started)
      try {
        while (!(await o.frames.next()).done) {}
      } catch {}
    await o.frames.return()
    finish()
  }

  // A direct stream: each batch is written straight to the socket and flushed, with no
  // queue in between; a write the client has not taken yet is awaited, so a slow client
  // (or a stream waiting for funds) holds the upstream through TCP backpressure.
  const body = new ReadableStream({
    type: 'direct',
    async pull(controller) {
      const quiet: Watched = {
        last: 0, // stamped by `watch`
        quietMs: o.keepAliveMs ?? 15_000,
        writing: false,
        beat: () => {
          quiet.last = tick
          try {
            controller.write(KEEP_ALIVE)
            controller.flush()
          } catch {}
        },
      }
      /** Writes and flushes; false when the client is gone. */
      const write = async (parts: (string | Uint8Array)[]): Promise<boolean> => {
        quiet.writing = true
        try {
          for (const p of parts) {
            const n = controller.write(p)
            if ((typeof n === 'number' ? n : await n) === 0) return false
          }
          const f = controller.flush()
          if (typeof f !== 'number') await f
          return true
        } finally {
          quiet.writing = false
          quiet.last = tick
        }
      }
      started = true
      const unwatch = watch(quiet)
      try {
        while (true) {
          const next = await o.frames.next()
          if (next.done) break
          const parts = await render(next.value)
          if (parts.length > 0 && !(await write(parts))) return stop()
        }
        finish()
        controller.close()
      } catch (e) {
        if (stopped) return
        // Metering turns every expected failure into an `end` frame; this is a bug. Say so
        // in the stream instead of cutting the connection.
        o.onError?.(e)
        finish()
        controller.write(
          data({
            error: {
              type: 'server_error',
              message: 'The gateway failed mid-stream.',
              code: 'internal_error',
              param: null,
            },
          }),
        )
        controller.write(DONE)
        controller.close()
      } finally {
        unwatch()
      }
    },
    cancel: stop,
  })

  const { 'Cache-Control': cache, ...headers } = o.headers ?? {}
  return c.newResponse(body, 200, {
    ...headers,
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': cache ? `${cache}, no-cache` : 'no-cache',
    connection: 'keep-alive',
  })
}
