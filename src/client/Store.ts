/**
 * Where the paying client keeps its channels, so a restarted agent resumes its channel instead of
 * opening (and funding) another, and what its closed channels took from `maxTotal`, so a restart
 * does not forget money already spent. Amounts are decimal strings, so the state is plain JSON.
 */
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises'
import { dirname } from 'node:path'
import { z } from 'zod'
import { ClientError } from './Errors.ts'

const Hex = z
  .string()
  .regex(/^0x[0-9a-fA-F]+$/)
  .transform((s) => s as `0x${string}`)
const Decimal = z.string().regex(/^\d{1,78}$/)

/** One open channel, as the client knows it (the schema a stored entry must pass). */
export const ChannelState = z.object({
  channelId: Hex,
  chainId: z.number().int().positive(),
  escrow: Hex,
  currency: Hex,
  recipient: Hex,
  /** The deposit, base units (decimal string). */
  deposit: Decimal,
  /** The highest cumulative amount signed (decimal string). */
  signed: Decimal,
  /** The URL the channel was last used with (close() posts there). */
  url: z.string(),
  /** Unix seconds of the payer's `requestClose` (decimal string), once a forced close began. */
  closeRequestedAt: Decimal.optional(),
})
export type ChannelState = z.output<typeof ChannelState>

/** A key/value store of channel states and closed totals; implement it to keep them elsewhere. */
export type Store = {
  get(key: string): Promise<ChannelState | undefined>
  set(key: string, state: ChannelState): Promise<void>
  delete(key: string): Promise<void>
  /** What the channels closed under `key` took from `maxTotal`, base units (0n when none). */
  closedTotal(key: string): Promise<bigint>
  /** Adds `amount` to `closedTotal(key)`; concurrent adds must all count. */
  addClosedTotal(key: string, amount: bigint): Promise<void>
  /**
   * Every key's closed total and channels (optional): with it, a restarted client counts
   * against `maxTotal` what it signed with servers it has not yet paid this run.
   */
  all?(): Promise<{
    channels: Record<string, ChannelState>
    closedTotals: Record<string, bigint>
    /** Keys whose entries do not parse (a payer's own stops its requests). */
    malformed?: string[]
  }>
}

/** A store that lives as long as the process. */
export function memory(): Store {
  const map = new Map<string, ChannelState>()
  const totals = new Map<string, bigint>()
  return {
    async get(key) {
      return map.get(key)
    },
    async set(key, state) {
      map.set(key, state)
    },
    async delete(key) {
      map.delete(key)
    },
    async closedTotal(key) {
      return totals.get(key) ?? 0n
    },
    async addClosedTotal(key, amount) {
      totals.set(key, (totals.get(key) ?? 0n) + amount)
    },
    async all() {
      return { channels: Object.fromEntries(map), closedTotals: Object.fromEntries(totals) }
    },
  }
}

/** The JSON file: channels by key, and closed totals (decimal strings) by key. */
type Content = { channels: Record<string, ChannelState>; closedTotals: Record<string, string> }

/**
 * A store in one JSON file (written whole, through a temporary file and a rename). Writes from
 * one store go one after another; two processes writing the same file at once may lose one.
 */
export function file(path: string): Store {
  let queue: Promise<unknown> = Promise.resolve()
  const load = async (): Promise<Content> => {
    let text: string
    try {
      text = await readFile(path, 'utf8')
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { channels: {}, closedTotals: {} }
      throw e
    }
    let json: unknown
    try {
      json = JSON.parse(text)
    } catch (cause) {
      throw new ClientError(
        `The channel store ${path} is not JSON; repair it, or move it away to start afresh (open channels in it are then forgotten).`,
        { path },
        { cause },
      )
    }
    const isMap = (v: unknown): v is Record<string, never> =>
      typeof v === 'object' && v !== null && !Array.isArray(v)
    const content = json as Partial<Content>
    if (!isMap(json) || (content.channels !== undefined && !isMap(content.channels)))
      throw new ClientError(
        `The channel store ${path} does not hold a channels object; repair it, or move it away to start afresh.`,
        { path },
      )
    // The first format was the channels map alone.
    if (!content.channels) return { channels: json, closedTotals: {} }
    return {
      channels: content.channels,
      closedTotals: isMap(content.closedTotals) ? content.closedTotals : {},
    }
  }
  const total = (c: Content, key: string) => {
    const v = c.closedTotals[key]
    if (v === undefined) return 0n
    if (typeof v !== 'string' || !/^\d{1,78}$/.test(v))
      throw new ClientError(
        `The channel store ${path} has a closed total that is not a decimal string under "${key}"; repair it.`,
        { path, key },
      )
    return BigInt(v)
  }
  // Writes one after another, so two updates never interleave their read and write.
  const update = (f: (content: Content) => void) => {
    const next = queue.then(async () => {
      const content = await load()
      f(content)
      await mkdir(dirname(path), { recursive: true })
      const tmp = `${path}.${process.pid}.tmp`
      await writeFile(tmp, `${JSON.stringify(content, null, 2)}\n`)
      await rename(tmp, path)
    })
    queue = next.catch(() => {})
    return next
  }
  return {
    async get(key) {
      await queue
      const entry = (await load()).channels[key]
      if (entry === undefined) return undefined
      const parsed = ChannelState.safeParse(entry)
      if (!parsed.success)
        throw new ClientError(
          `The channel store ${path} has a malformed channel under "${key}" (${parsed.error.issues[0]?.path.join('.')}: ${parsed.error.issues[0]?.message}); repair it, or delete that entry to forget the channel.`,
          { path, key },
        )
      return parsed.data
    },
    set: (key, state) =>
      update((c) => {
        c.channels[key] = state
      }),
    delete: (key) =>
      update((c) => {
        delete c.channels[key]
      }),
    async closedTotal(key) {
      await queue
      return total(await load(), key)
    },
    addClosedTotal: (key, amount) =>
      update((c) => {
        c.closedTotals[key] = (total(c, key) + amount).toString()
      }),
    async all() {
      await queue
      const c = await load()
      const channels: Record<string, ChannelState> = {}
      const malformed: string[] = []
      // Entries that do not parse are reported: a payer whose own they are is stopped (see
      // createFetch), another payer sharing the store is not.
      for (const [key, entry] of Object.entries(c.channels)) {
        const parsed = ChannelState.safeParse(entry)
        if (parsed.success) channels[key] = parsed.data
        else malformed.push(key)
      }
      const closedTotals: Record<string, bigint> = {}
      for (const key of Object.keys(c.closedTotals)) closedTotals[key] = total(c, key)
      return { channels, closedTotals, malformed }
    },
  }
}
