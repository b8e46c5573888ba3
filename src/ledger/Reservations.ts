/**
 * Admission and reservations for API-key requests: the SQL functions of
 * migrations/0001_ledger.sql; admissions and finishes are batched under load (Batch.ts).
 */
import * as Batch from './Batch.ts'
import { inOrder } from './Batch.ts'
import type { Sql } from './Db.ts'
import type { Waker } from './Waker.ts'

export type AdmitInput = {
  keyHash: Uint8Array
  model: string
  stream: boolean
  minTier: number
  promptTokens: number
  /** Credits wanted for the request (prompt + output estimate). */
  want: bigint
  /** Least credits that admit it; as much of `want` as is free is held. */
  need: bigint
  idempotencyKey: string | null
  /** SHA-256 of the request body; only needed with an idempotency key. */
  fingerprint: Uint8Array | null
  requestId: string
  leaseSeconds: number
}

export type Admitted = {
  status: 'ok'
  accountId: string
  keyId: string
  held: bigint
  rateLimit: number | null
  rateRemaining: number | null
}

export type Refused =
  | { status: 'unauthorized' }
  | { status: 'tier'; accountId: string }
  | {
      status: 'idempotency_mismatch' | 'idempotency_in_progress' | 'idempotency_completed'
      otherRequest: string
    }
  | {
      status: 'concurrency' | 'rate' | 'quota' | 'wallet'
      retryAfterMs: number
      rateLimit: number | null
      rateRemaining: number | null
    }
  | {
      status: 'insufficient'
      available: bigint
      rateLimit: number | null
      rateRemaining: number | null
    }

/** Authenticates, checks the plan and reserves credits, atomically. */
export function admit(sql: Sql, i: AdmitInput): Promise<Admitted | Refused> {
  return Batch.of(sql, 'admit', () => ({
    one: (i: AdmitInput) => admitOne(sql, i),
    many: (items: AdmitInput[]) => admitMany(sql, items),
  })).run(i)
}

async function admitOne(sql: Sql, i: AdmitInput): Promise<Admitted | Refused> {
  const [r] = await sql`
    select * from tollway_admit(${i.keyHash}, ${i.model}, ${i.stream}, ${i.minTier}, ${i.promptTokens},
      ${sql.typed.numeric(i.want)}, ${sql.typed.numeric(i.need)}, ${i.idempotencyKey},
      ${i.fingerprint}, ${i.requestId}, ${i.leaseSeconds})`
  return admission(r!)
}

async function admitMany(sql: Sql, items: AdmitInput[]): Promise<(Admitted | Refused)[]> {
  const json = items.map((i) => ({
    keyHash: Buffer.from(i.keyHash).toString('hex'),
    model: i.model,
    stream: i.stream,
    minTier: i.minTier,
    promptTokens: i.promptTokens,
    want: i.want.toString(),
    need: i.need.toString(),
    idempotencyKey: i.idempotencyKey,
    fingerprint: i.fingerprint ? Buffer.from(i.fingerprint).toString('hex') : null,
    requestId: i.requestId,
    leaseSeconds: i.leaseSeconds,
  }))
  const rows = await sql`select * from tollway_admit_many(${sql.json(json)})`
  return inOrder(rows, items.length, admission)
}

// biome-ignore lint/suspicious/noExplicitAny: a row of tollway_admit
function admission(row: any): Admitted | Refused {
  const limits = { rateLimit: row.rate_limit, rateRemaining: row.rate_remaining }
  switch (row.status) {
    case 'ok':
      return {
        status: 'ok',
        accountId: row.account_id,
        keyId: row.key_id,
        held: row.held,
        ...limits,
      }
    case 'unauthorized':
      return { status: 'unauthorized' }
    case 'tier':
      return { status: 'tier', accountId: row.account_id }
    case 'idempotency_mismatch':
    case 'idempotency_in_progress':
    case 'idempotency_completed':
      return { status: row.status, otherRequest: row.other_request }
    case 'insufficient':
      return { status: 'insufficient', available: row.available, ...limits }
    default:
      return { status: row.status, retryAfterMs: Number(row.retry_after_ms), ...limits }
  }
}

/**
 * Adds `amount` to a reservation and renews its lease; the new total, undefined if the
 * payer cannot cover it, or 'superseded' for a channel stream another stream replaced.
 * `delivered`, the cost of what the request has sent so far, is recorded either way: it is
 * what the sweep charges should the instance die.
 */
export async function extend(
  sql: Sql,
  input: { id: string; amount: bigint; leaseSeconds: number; delivered?: bigint | undefined },
): Promise<bigint | undefined | 'superseded'> {
  const delivered = input.delivered === undefined ? null : sql.typed.numeric(input.delivered)
  const [row] = await sql`
    select tollway_extend(${input.id}, ${sql.typed.numeric(input.amount)}, ${input.leaseSeconds},
      ${delivered}) as held`
  const held = row?.held ?? undefined
  return held === -1n ? 'superseded' : held
}

export type Finish = {
  id: string
  cost: bigint
  promptTokens: number
  completionTokens: number
  status: string
  latencyMs: number
  ttftMs: number | null
}

/**
 * Charges the request (never beyond what the account can pay), releases the rest of its
 * reservation and writes the usage row. Undefined if the reservation was already finished.
 */
export function finish(sql: Sql, f: Finish): Promise<Finished | undefined> {
  return Batch.of(sql, 'finish', () => ({
    one: (f: Finish) => finishOne(sql, f),
    many: (items: Finish[]) => finishMany(sql, items),
  })).run(f)
}

type Finished = { charged: bigint; balance: bigint }

async function finishOne(sql: Sql, f: Finish): Promise<Finished | undefined> {
  const [row] = await sql`
    select * from tollway_finish(${f.id}, ${sql.typed.numeric(f.cost)}, ${f.promptTokens},
      ${f.completionTokens}, ${f.status}, ${f.latencyMs}, ${f.ttftMs})`
  return row ? { charged: row.charged, balance: row.balance } : undefined
}

async function finishMany(sql: Sql, items: Finish[]): Promise<(Finished | undefined)[]> {
  const json = items.map((f) => ({ ...f, cost: f.cost.toString() }))
  const rows = await sql`select * from tollway_finish_many(${sql.json(json)})`
  return inOrder<Finished | undefined>(
    rows,
    items.length,
    (row) => ({ charged: row.charged as bigint, balance: row.balance as bigint }),
    () => undefined,
  )
}

/**
 * Releases reservations whose lease ran out (their instance died), charging what each had
 * delivered by its last extend (the block in flight is lost, nothing more); a usage row
 * records them as `abandoned`. Returns how many were released.
 */
export async function sweep(sql: Sql): Promise<number> {
  const rows = await sql`
    select r.id, f.charged from (
      select id, delivered from reservations where expires_at < clock_timestamp() limit 100
    ) r, tollway_finish(r.id, r.delivered, 0, 0, 'abandoned', null, null) f`
  return rows.length
}

/**
 * A live reservation of credits (the metering layer's `Reservation`): extends and settles
 * through the functions above. `settle` runs at most once.
 */
export function reservation(sql: Sql, input: { id: string; held: bigint; leaseSeconds: number }) {
  let held = input.held
  let superseded = false
  let settled: Promise<{ charged: bigint }> | undefined
  return {
    id: input.id,
    get held() {
      return held
    },
    /** A newer stream on the same channel took over: this one must end. */
    get superseded() {
      return superseded
    },
    async extend(amount: bigint, delivered?: bigint): Promise<boolean> {
      const total = await extend(sql, {
        id: input.id,
        amount,
        leaseSeconds: input.leaseSeconds,
        delivered,
      })
      if (total === 'superseded') superseded = true
      if (total === undefined || total === 'superseded') return false
      held = total
      return true
    },
    settle(o: {
      cost: bigint
      promptTokens: number
      completionTokens: number
      status: string
      latencyMs: number
      ttftMs: number | null
    }): Promise<{ charged: bigint }> {
      settled ??= finish(sql, { id: input.id, ...o }).then((r) => ({ charged: r?.charged ?? 0n }))
      return settled
    },
  }
}

/**
 * A reservation paid from a payment channel: like `reservation`, and when the channel's
 * authorized balance runs short it waits (up to `timeoutMs`) for a voucher that covers
 * `required`, accepted on this instance or another.
 */
export function channelReservation(
  sql: Sql,
  input: {
    id: string
    held: bigint
    leaseSeconds: number
    channelId: string
    waker: Waker
    timeoutMs: number
  },
) {
  const r = reservation(sql, input)
  return Object.assign(r, {
    async waitForFunds(required: bigint, signal: AbortSignal): Promise<boolean> {
      if (r.superseded) return false
      const timeout = AbortSignal.timeout(input.timeoutMs)
      while (true) {
        const looked = new AbortController()
        const any = AbortSignal.any([signal, timeout, looked.signal])
        if (any.aborted) return false
        // Listen before looking: a voucher accepted between the stream's last look and
        // this wait (its wake-up gone by) must not leave the stream asleep until the poll.
        const woken = input.waker.next(input.channelId, any)
        // Renews the lease too, so a long wait is not mistaken for a dead instance.
        const covered = await r.extend(required > r.held ? required - r.held : 0n)
        if (covered || r.superseded) {
          looked.abort()
          return covered
        }
        if (!(await woken)) return false
      }
    },
  })
}
