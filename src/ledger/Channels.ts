/**
 * Server-side accounting of payment channels (migrations/0002_channels.sql): the state
 * read from the escrow, accepted vouchers, and admission of requests paid from a channel.
 * Channel ids and addresses are 0x-hex in code and bytea in the database.
 */
import * as Batch from './Batch.ts'
import { inOrder } from './Batch.ts'
import type { Sql } from './Db.ts'
import * as Db from './Db.ts'
import * as Page from './Page.ts'

export type Hex = `0x${string}`

export type Channel = {
  channelId: Hex
  chainId: number
  escrow: Hex
  payer: Hex
  payee: Hex
  token: Hex
  signer: Hex
  deposit: bigint
  acceptedCumulative: bigint
  voucherSignature: Hex | null
  spent: bigint
  reserved: bigint
  settled: bigint
  closeRequestedAt: Date | null
  /** The close asked for is the payer's cooperative one (not a forced close on chain). */
  cooperativeClose: boolean
  finalized: boolean
  createdAt: Date
  updatedAt: Date
}

/** On-chain facts about a channel, as verified from the escrow. */
export type OnChain = Pick<
  Channel,
  | 'channelId'
  | 'chainId'
  | 'escrow'
  | 'payer'
  | 'payee'
  | 'token'
  | 'signer'
  | 'deposit'
  | 'settled'
  | 'finalized'
> & { closeRequested: boolean }

const bytes = (hex: string) => Buffer.from(hex.slice(2), 'hex')
const hex = (b: Uint8Array | null): Hex | null =>
  b ? (`0x${Buffer.from(b).toString('hex')}` as Hex) : null

function from(r: Record<string, unknown>): Channel {
  return {
    channelId: hex(r.channel_id as Uint8Array)!,
    chainId: Number(r.chain_id),
    escrow: hex(r.escrow as Uint8Array)!,
    payer: hex(r.payer as Uint8Array)!,
    payee: hex(r.payee as Uint8Array)!,
    token: hex(r.token as Uint8Array)!,
    signer: hex(r.signer as Uint8Array)!,
    deposit: r.deposit as bigint,
    acceptedCumulative: r.accepted_cumulative as bigint,
    voucherSignature: hex(r.voucher_signature as Uint8Array | null),
    spent: r.spent as bigint,
    reserved: r.reserved as bigint,
    settled: r.settled as bigint,
    closeRequestedAt: (r.close_requested_at as Date | null) ?? null,
    cooperativeClose: (r.cooperative_close as boolean | undefined) ?? false,
    finalized: r.finalized as boolean,
    createdAt: r.created_at as Date,
    updatedAt: r.updated_at as Date,
  }
}

/**
 * Records what the escrow says about a channel: creates it, or raises its deposit and
 * settled amount and marks a close request or finalization. Amounts never go down.
 */
export async function observe(
  sql: Sql,
  c: OnChain,
  options: {
    /**
     * The state was read after this time (the database's, from `clock`) and after a top-up
     * the chain confirmed: one that shows no close requested clears a forced close's mark
     * made before then (the escrow resets closeRequestedAt on topUp), never a cooperative
     * close's.
     */
    toppedUpAt?: string
  } = {},
): Promise<Channel> {
  const reopen = options.toppedUpAt && !c.closeRequested && !c.finalized
  // A channel first seen here already settled on chain (the database restored from before its
  // settlements, say): what was settled was spent and paid, by a voucher the payer signed that
  // is now public (the settle's calldata). The row starts there, settled, spent and accepted
  // alike, so that no voucher at or below it pays for a request again.
  const settled = sql.typed.numeric(c.settled)
  const [row] = await sql`
    insert into channels (channel_id, chain_id, escrow, payer, payee, token, signer, deposit, settled,
      spent, accepted_cumulative, close_requested_at, finalized)
    values (${bytes(c.channelId)}, ${c.chainId}, ${bytes(c.escrow)}, ${bytes(c.payer)}, ${bytes(c.payee)},
      ${bytes(c.token)}, ${bytes(c.signer)}, ${sql.typed.numeric(c.deposit)}, ${settled},
      ${settled}, ${settled}, ${c.closeRequested ? sql`now()` : null}, ${c.finalized})
    on conflict (channel_id) do update set
      deposit = greatest(channels.deposit, excluded.deposit),
      -- The chain's settled, never above what this row has spent (settled <= spent).
      settled = greatest(channels.settled, least(${settled}, channels.spent)),
      -- Kept while the chain shows none: the settlement worker marks cooperative closes before
      -- the chain shows them. Cleared only after a top-up, when the chain read after it shows
      -- no close requested and the mark is older than that read (a forced close the top-up
      -- cancelled); never a cooperative close's.
      close_requested_at = case
        when ${c.closeRequested} then coalesce(channels.close_requested_at, now())
        when ${
          reopen
            ? sql`not channels.cooperative_close and not channels.finalized
          and channels.close_requested_at < ${options.toppedUpAt!}::text::timestamptz`
            : sql`false`
        }
          then null
        else channels.close_requested_at end,
      finalized = channels.finalized or excluded.finalized
    returning *`
  return from(row!)
}

/** The database's clock, as text (to the microsecond; see `observe`'s `toppedUpAt`). */
export async function clock(sql: Sql): Promise<string> {
  const [r] = await sql`select clock_timestamp()::text as t`
  return r!.t as string
}

/** One channel, or undefined. */
export async function get(sql: Sql, channelId: Hex): Promise<Channel | undefined> {
  const [row] = await sql`select * from channels where channel_id = ${bytes(channelId)}`
  return row ? from(row) : undefined
}

/**
 * What a channel has to pay with, as its admission reads it: the highest voucher accepted, the
 * deposit, what is spent or held (`taken`), and whether it is open (neither closed nor
 * closing); undefined for no such channel. Within the database deadline (Db.answered).
 */
export async function funds(
  sql: Sql,
  channelId: Hex,
): Promise<
  { acceptedCumulative: bigint; deposit: bigint; taken: bigint; open: boolean } | undefined
> {
  const [row] = await Db.answered(
    sql,
    sql`select accepted_cumulative, deposit, spent + reserved as taken,
        not finalized and close_requested_at is null as open
      from channels where channel_id = ${bytes(channelId)}`,
  )
  return row
    ? {
        acceptedCumulative: row.accepted_cumulative as bigint,
        deposit: row.deposit as bigint,
        taken: row.taken as bigint,
        open: row.open as boolean,
      }
    : undefined
}

/**
 * The highest voucher of the channel the gateway settled on chain or put in a settle
 * transaction (recorded before it is sent: public from then on, its calldata), 0 when none.
 * A close transaction's voucher is not counted: it is the payer's own close, which the payer
 * may send again.
 */
export async function settledPublicly(sql: Sql, channelId: Hex): Promise<bigint> {
  const [row] = await Db.answered(
    sql,
    sql`select greatest(ch.settled, (select max(ct.cumulative_amount) from chain_transactions ct
        where ct.channel_id = ch.channel_id and ct.kind = 'settle')) as published
      from channels ch where ch.channel_id = ${bytes(channelId)}`,
  )
  return (row?.published as bigint | null | undefined) ?? 0n
}

export type VoucherOutcome =
  | 'accepted'
  | 'replay'
  | 'delta_too_small'
  | 'exceeds_deposit'
  | 'not_found'
  | 'finalized'
  | 'close_requested'

type Voucher = { channelId: Hex; cumulativeAmount: bigint; signature: Hex; minDelta: bigint }
type VoucherResult = {
  status: VoucherOutcome
  acceptedCumulative: bigint
  deposit: bigint
  spent: bigint
}

/**
 * Records a voucher whose signature the caller verified. Durable before it returns (the
 * balance it adds may be used at once), and wakes streams waiting on the channel. Batched
 * under load (Batch.ts): vouchers that arrive together share one commit.
 */
export function acceptVoucher(sql: Sql, v: Voucher): Promise<VoucherResult> {
  return Batch.of(sql, 'voucher', () => ({
    one: (v: Voucher) => acceptOne(sql, v),
    many: (items: Voucher[]) => acceptMany(sql, items),
  })).run(v)
}

const voucherResult = (row: Record<string, unknown>): VoucherResult => ({
  status: row.status as VoucherOutcome,
  acceptedCumulative: (row.accepted_cumulative as bigint | null) ?? 0n,
  deposit: (row.deposit as bigint | null) ?? 0n,
  spent: (row.spent as bigint | null) ?? 0n,
})

async function acceptOne(sql: Sql, v: Voucher): Promise<VoucherResult> {
  const [row] = await sql`
    select * from tollway_accept_voucher(${bytes(v.channelId)}, ${sql.typed.numeric(v.cumulativeAmount)},
      ${bytes(v.signature)}, ${sql.typed.numeric(v.minDelta)})`
  return voucherResult(row!)
}

async function acceptMany(sql: Sql, items: Voucher[]): Promise<VoucherResult[]> {
  const json = items.map((v) => ({
    channelId: v.channelId.slice(2),
    amount: v.cumulativeAmount.toString(),
    signature: v.signature.slice(2),
    minDelta: v.minDelta.toString(),
  }))
  const rows = await sql`select * from tollway_accept_voucher_many(${sql.json(json)})`
  return inOrder(rows, items.length, voucherResult)
}

export type Admission =
  | { status: 'ok'; held: bigint; acceptedCumulative: bigint; deposit: bigint; spent: bigint }
  | {
      status: 'idempotency_mismatch' | 'idempotency_in_progress' | 'idempotency_completed'
      otherRequest: string
    }
  | {
      status: 'insufficient'
      available: bigint
      acceptedCumulative: bigint
      deposit: bigint
      spent: bigint
    }
  /** Paid with a voucher at or below one the gateway put in a transaction (public). */
  | { status: 'public_voucher'; acceptedCumulative: bigint; deposit: bigint; spent: bigint }
  | { status: 'not_found' | 'finalized' | 'close_requested' }

/** Holds between `need` and `want` of the channel's authorized balance for one request. */
export type AdmitInput = {
  channelId: Hex
  model: string
  stream: boolean
  want: bigint
  need: bigint
  requestId: string
  leaseSeconds: number
  /** With its body's SHA-256: a duplicate is never charged again. */
  idempotencyKey?: string | null
  fingerprint?: Uint8Array | null
  /**
   * The cumulative amount of the voucher that pays for the request: one the gateway made
   * public (in a settle or close transaction, sent or to be sent) pays for none.
   */
  voucher?: bigint | undefined
}

/**
 * Channel batches (admissions, charges) under way at once: each waits for a durable commit,
 * and channels do not wait on one another. Every batch locks its channels in id order, so
 * batches under way together cannot deadlock.
 */
export const CHANNEL_BATCHES = 4

/** Holds between `need` and `want` of the channel's authorized balance for a request.
 * Batched under load (Batch.ts): admissions that arrive together share one commit. */
/** `gone`: whether its caller gave up while it waited (see Batch.run). */
export function admit(sql: Sql, i: AdmitInput, gone?: () => boolean): Promise<Admission> {
  return Batch.of(sql, 'channelAdmit', () => ({
    many: (items: AdmitInput[]) => admitMany(sql, items),
    inFlight: CHANNEL_BATCHES,
    // A batch whose connection failed may have committed: an admission run again would fail
    // on its own request id. It fails out of reach, its hold released (Reservations).
    again: (_: AdmitInput, e: unknown) => !Db.isUnreachable(e),
  })).run(i, gone)
}

async function admitMany(sql: Sql, items: AdmitInput[]): Promise<Admission[]> {
  const json = items.map((i) => ({
    channelId: i.channelId.slice(2),
    model: i.model,
    stream: i.stream,
    want: i.want.toString(),
    need: i.need.toString(),
    requestId: i.requestId,
    leaseSeconds: i.leaseSeconds,
    idempotencyKey: i.idempotencyKey ?? null,
    fingerprint: i.fingerprint ? Buffer.from(i.fingerprint).toString('hex') : null,
    voucher: i.voucher?.toString() ?? null,
  }))
  const rows = await sql`select * from tollway_channel_admit_many(${sql.json(json)})`
  return inOrder(rows, items.length, admission)
}

function admission(row: Record<string, unknown>): Admission {
  const state = {
    acceptedCumulative: row.accepted_cumulative as bigint,
    deposit: row.deposit as bigint,
    spent: row.spent as bigint,
  }
  if (row.status === 'ok') return { status: 'ok', held: row.held as bigint, ...state }
  if (row.status === 'insufficient')
    return { status: 'insufficient', available: row.available as bigint, ...state }
  if (row.status === 'public_voucher') return { status: 'public_voucher', ...state }
  if (typeof row.status === 'string' && row.status.startsWith('idempotency_'))
    return { status: row.status, otherRequest: row.other_request as string } as Admission
  return { status: row.status } as Admission
}

/**
 * Records an amount settled on-chain (never lower than before). Above what was spent (the
 * voucher a closing channel is settled with covers `spent`), `spent` is raised to it first,
 * as far as the payer authorized beyond what it holds, so `settled <= spent` holds.
 */
export async function settled(
  sql: Sql,
  i: { channelId: Hex; settled: bigint; finalized?: boolean },
): Promise<void> {
  // A settlement above `spent` (a close's voucher that covers it, see Settlements.ts) raises
  // `spent` to it, as far as the payer authorized beyond what it holds: the payer paid that.
  const amount = sql.typed.numeric(i.settled)
  await sql`
    update channels set
      spent = greatest(spent, least(${amount}, accepted_cumulative - reserved)),
      settled = greatest(settled,
        least(${amount}, greatest(spent, least(${amount}, accepted_cumulative - reserved)))),
      finalized = finalized or ${i.finalized ?? false}
    where channel_id = ${bytes(i.channelId)}`
}

/**
 * Closes, in the database, the open channels of `escrow` that `exists` says the chain does not
 * have: a development chain started afresh (its state file lost or unreadable) while the
 * database kept its channels, which it would otherwise go on serving unfunded. Returns them.
 */
export async function closeMissing(
  sql: Sql,
  escrow: Hex,
  exists: (channelId: Hex) => Promise<boolean>,
): Promise<Hex[]> {
  const open = await sql`
    select channel_id from channels where escrow = ${bytes(escrow)} and not finalized`
  const missing: Hex[] = []
  for (const r of open) {
    const channelId = hex(r.channel_id as Uint8Array)!
    if (!(await exists(channelId))) missing.push(channelId)
  }
  if (missing.length > 0)
    await sql`update channels set finalized = true, close_requested_at = coalesce(close_requested_at, now())
      where channel_id in ${sql(missing.map(bytes))}`
  return missing
}

/** Lists channels, most recently active first. */
export async function list(
  sql: Sql,
  input: { limit: number; cursor?: string },
): Promise<Page.Page<Channel>> {
  const after = Page.parse(input.cursor, [Page.shapes.timestamp, /^[0-9a-f]{64}$/])
  const rows = await sql`
    select *, updated_at::text as position from channels
    ${after ? sql`where (updated_at, channel_id) < (${after[0]!}::text::timestamptz, ${Buffer.from(after[1]!, 'hex')})` : sql``}
    order by updated_at desc, channel_id desc limit ${input.limit + 1}`
  return Page.from(rows, input.limit, from, (r) => [
    r.position,
    Buffer.from(r.channel_id).toString('hex'),
  ])
}
