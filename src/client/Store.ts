/**
 * Where the paying client keeps its channels, so a restarted agent resumes its channel instead of
 * opening (and funding) another, and what its closed channels took from `maxTotal`, so a restart
 * does not forget money already spent; and, for clients of one wallet sharing the store, what
 * each may sign (`reserve`), so that together they stay within `maxTotal`. Amounts are decimal
 * strings, so the state is plain JSON.
 */
import { createHash } from 'node:crypto'
import { readFileSync, readlinkSync, statSync, unlinkSync } from 'node:fs'
import { mkdir, open, readdir, readFile, rename, stat, unlink, writeFile } from 'node:fs/promises'
import { hostname } from 'node:os'
import { basename, dirname, join } from 'node:path'
import { z } from 'zod'
import { zombie } from '../Processes.ts'
import { ClientError, StoreInUseError } from './Errors.ts'

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
   * Claims `key` for this store (optional; a store shared by processes implements it): a
   * second client paying the same server from the same wallet through the same store (in
   * another process, or another store on the same file in this one) would overwrite this
   * one's channel, or sign vouchers this one does not know of. Throws `StoreInUseError` while
   * another holds the key: a live process, or a store of this process not released.
   */
  own?(key: string): Promise<void>
  /** Gives up every key this store claimed (optional, with `own`): another store may then
   * pay through it. The client using this store must not pay after. */
  release?(): Promise<void>
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
  /**
   * Sets what `key`'s channel may sign up to, decided against every key of the same budget at
   * one moment, with no other client's `reserve` or write in between (optional; a store that
   * clients of one wallet share, in several processes or as several stores on one file,
   * implements it). The budget's keys (`shares`, `key` among them) count what their closed
   * channels paid, and, but for `key`, the most of what their channels signed and what their
   * holders reserved. Grants `amount` when that total with it stays within `limit`, else the
   * most that does, never less than `key` holds (0n when it holds nothing and nothing fits);
   * an `amount` below what `key` holds is always granted, and gives the rest back. Returns what
   * it granted.
   *
   * A reservation counts only while the client that made it is in use: one whose process
   * ended, or whose store was released, signed nothing past what its channel's entry says (a
   * voucher leaves the client only once stored, see createFetch). Without `reserve`, a client
   * counts what other servers' channels signed as the store held it when first read: clients
   * paying other servers from the same wallet through the store at the same time each sign up
   * to `limit`.
   */
  reserve?(
    key: string,
    amount: bigint,
    budget: {
      /** The most the budget's keys may take together (`maxTotal`). */
      limit: bigint
      /** Whether a key is in the budget (the same payer's). */
      shares: (key: string) => boolean
    },
  ): Promise<bigint>
}

/**
 * What `key` is granted of `amount` (see `Store.reserve`), from one moment of the store: each
 * key's closed total, what its channel signed, and what it holds reserved (0n when none, or
 * when its holder is no longer in use).
 */
function grant(
  o: {
    keys: Iterable<string>
    closed: (k: string) => bigint
    signed: (k: string) => bigint
    reserved: (k: string) => bigint
  },
  key: string,
  amount: bigint,
  budget: Parameters<NonNullable<Store['reserve']>>[2],
): bigint {
  const held = o.reserved(key)
  if (amount <= held) return amount
  let used = 0n
  for (const k of new Set(o.keys)) {
    if (!budget.shares(k)) continue
    used += o.closed(k)
    if (k === key) continue
    const signed = o.signed(k)
    const reserved = o.reserved(k)
    used += signed > reserved ? signed : reserved
  }
  // Asking for more never loses what is held (signatures may be under way within it).
  const free = budget.limit - used
  if (free <= held) return held
  return amount < free ? amount : free
}

/** A store that lives as long as the process. */
export function memory(): Store {
  const map = new Map<string, ChannelState>()
  const totals = new Map<string, bigint>()
  // Clients sharing this store live in this process: a reservation counts until lowered.
  const reservations = new Map<string, bigint>()
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
    async reserve(key, amount, budget) {
      const granted = grant(
        {
          keys: [...map.keys(), ...totals.keys(), ...reservations.keys()],
          closed: (k) => totals.get(k) ?? 0n,
          signed: (k) => BigInt(map.get(k)?.signed ?? 0),
          reserved: (k) => reservations.get(k) ?? 0n,
        },
        key,
        amount,
        budget,
      )
      if (granted > 0n) reservations.set(key, granted)
      else reservations.delete(key)
      return granted
    },
  }
}

/** What a store of a client reserved for a key (`Store.reserve`): the amount (a decimal
 * string), and the process and store that hold it (a reservation counts while they are in use),
 * with where its pid means something (`namespace`; absent from reservations of earlier versions,
 * judged by the pid here). */
const Reservation = z.object({
  amount: Decimal,
  pid: z.number().int().positive(),
  token: z.string(),
  ns: z.string().optional(),
})
type Reservation = z.output<typeof Reservation>

/** The JSON file: channels by key, closed totals (decimal strings) by key, and reservations by
 * key (absent from files written before them; a client of an earlier version, which knows
 * nothing of them, drops them when it writes the file). */
type Content = {
  channels: Record<string, ChannelState>
  closedTotals: Record<string, string>
  reserved?: Record<string, Reservation>
}

/** How long a write waits for another process's write to the same file, ms. */
const LOCK_WAIT_MS = 10_000
/** A write lock older than this is left from a process that died mid-write, ms. */
const LOCK_STALE_MS = 30_000
/** How often a store holding claims or reservations renews its presence file, ms. */
const HEARTBEAT_MS = 10_000
/**
 * A presence file not renewed for this long is of a store whose process died (or slept as long:
 * a suspended machine), ms. It judges only holders of another pid namespace or machine, whose
 * pid says nothing here: their claims and reservations hold until then, so a dead one blocks
 * its key, and keeps what it reserved from the wallet, for this long at most.
 */
const HOLDER_STALE_MS = 120_000

/**
 * A file system failure on the store (its directory a file, no permission, a full disk) as a
 * ClientError naming the store, so that it reads as a place to repair, not a failure of the
 * server's. `doing`: 'read' or 'written'.
 */
function unusable(path: string, doing: string, e: unknown): ClientError {
  const message = (e as Error).message
  return new ClientError(
    `The channel store ${path} cannot be ${doing} (${message}); put it in a directory you can write to.`,
    { path, code: (e as NodeJS.ErrnoException).code },
    { cause: e },
  )
}

/**
 * Where this process's pid means something: the kernel's boot and the pid namespace (Linux),
 * else the host's name. Processes sharing a store file through a mounted volume (other
 * containers, other machines) have another: a pid of theirs may name no process here, or an
 * unrelated one, so their liveness cannot be told by `alive`. Written into lock and owner files
 * as a word starting with `@` (no spaces in it).
 */
const namespace = (() => {
  try {
    const boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()
    return `@${boot}/${readlinkSync('/proc/self/ns/pid')}`.replace(/\s/g, '_')
  } catch {
    return `@host:${hostname()}`.replace(/\s/g, '_')
  }
})()

/** Presence files of this process's stores, by token, and the timer renewing each. */
const presences = new Map<string, { file: string; timer: ReturnType<typeof setInterval> }>()

/** Stops renewing the presence file of store `token` and removes it: its claims and
 * reservations no longer hold for processes of other namespaces. */
function absent(token: string) {
  const p = presences.get(token)
  if (!p) return
  clearInterval(p.timer)
  presences.delete(token)
  try {
    unlinkSync(p.file)
  } catch {}
}

/** Renews presence file `f` (`line` its content) every `HEARTBEAT_MS`, without keeping the
 * process alive. Made out here: a closure inside `file` would keep its store from being collected. */
function heartbeat(f: string, line: string): ReturnType<typeof setInterval> {
  // Written again, not touched with this machine's time: dated by the file system's clock, as
  // the processes that judge it read it (see `fsNow`).
  const timer = setInterval(() => writeFile(f, line).catch(() => {}), HEARTBEAT_MS)
  timer.unref?.()
  return timer
}

/**
 * When process `pid` of this pid namespace started (clock ticks since the boot, `/proc`'s
 * field 22), which a later process given its pid does not share; undefined where /proc does not
 * tell (not Linux). Written into a lock as a word starting with `~`.
 */
function started(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // Counted after the command's closing parenthesis (field 2), which may hold spaces.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] || undefined
  } catch {
    return undefined
  }
}
const startedHere = started(process.pid)

/** Whether process `pid` is alive (on this machine). A zombie (it exited, or was killed, and its
 * parent has not reaped it: a paying script killed under `timeout -s KILL`, whose exit is never
 * waited for) is not: signal 0 reaches it, yet it holds nothing and never will. */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return !zombie(pid)
  } catch (e) {
    // EPERM: it lives, under another user.
    return (e as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/**
 * Who holds lock or owner file `p` (`<pid> <token> @<namespace> ~<start>`, the token the store
 * that took or claimed it; files of earlier versions lack the namespace and start, locks of
 * earlier versions the token, a system without /proc the start), if
 * the file reads and it is not `token`, this store's own: another process (`alive` whether it
 * still runs, and is the one that started then), or another store of this process (`alive` while it is neither released nor
 * collected); `foreign` when it is a process of another pid namespace or machine, whose pid
 * says nothing here (`alive` then true: it cannot be told dead by its pid).
 */
async function holder(
  p: string,
  token?: string,
): Promise<
  | {
      pid: number
      alive: boolean
      here: boolean
      foreign: boolean
      token?: string
      started?: string
    }
  | undefined
> {
  const words = (await readFile(p, 'utf8').catch(() => '')).trim().split(' ')
  const ns = words.find((w) => w.startsWith('@'))
  const at = words.find((w) => w.startsWith('~'))?.slice(1)
  const [first, other] = words.filter((w) => !w.startsWith('@') && !w.startsWith('~'))
  const pid = Number(first)
  if (!Number.isInteger(pid) || pid <= 0) return undefined
  // Without a namespace (an earlier version's file), judged as it was: by the pid here.
  if (ns !== undefined && ns !== namespace)
    return { pid, alive: true, here: false, foreign: true, ...(other ? { token: other } : {}) }
  if (pid !== process.pid) {
    // Not the one that wrote it when the process of that pid started at another time.
    const since = at === undefined ? undefined : started(pid)
    const live = alive(pid) && (since === undefined || since === at)
    return { pid, alive: live, here: false, foreign: false, ...(at ? { started: at } : {}) }
  }
  if (other === undefined || other === token) return undefined
  return { pid, alive: liveTokens.has(other), here: true, foreign: false, token: other }
}

/** The tokens of this process's stores that hold claims (not released, not collected). */
const liveTokens = new Set<string>()
/** The tokens of this process's stores holding a write lock (their write under way). */
const writing = new Set<string>()
/** A store collected gives its claims up (its owner files are then taken over). */
const collected = new FinalizationRegistry<string>((token) => {
  liveTokens.delete(token)
  absent(token)
})
/** Owner files this process's stores claimed, with what the claiming store wrote in them:
 * removed as the process exits (see `file().own`). */
const claims = new Map<string, string>()
process.on('exit', () => {
  for (const [f, line] of claims)
    try {
      if (readFileSync(f, 'utf8').trim() === line) unlinkSync(f)
    } catch {}
  for (const token of [...presences.keys()]) absent(token)
})

/**
 * A store in one JSON file (written whole, through a temporary file and a rename). Writes go
 * one after another, also across processes (a lock file beside it, `<path>.lock`, held for
 * the read and the write). A store that pays a server claims that server's key (`own`: an
 * owner file `<path>.<key digest>.owner` holding its pid and the store's token, removed as the
 * process exits or the store is released): two clients cannot use one channel, so a second
 * one (another process, or another `file(path)` in this one) is told, not left to overwrite
 * the first's channel. Reservations (`reserve`) are decided under the same lock, and carry the
 * pid and store token of their holder: one whose process is gone, or whose store was released
 * or collected, no longer counts.
 *
 * Owner files and reservations also say where their pid means something (`namespace`). A
 * holder of another pid namespace or machine (a container, a host sharing the file through a
 * volume) cannot be judged by its pid: its pid may name no process here, or an unrelated one.
 * A store that claims or reserves keeps a presence file, `<path>.<token>.alive`, renewed every
 * `HEARTBEAT_MS` and removed as it is released, collected, or its process exits; such a
 * holder's claims and reservations hold while its presence file exists and was renewed within
 * `HOLDER_STALE_MS` (a presence file that cannot be looked at holds too: never more than
 * `maxTotal`).
 */
export function file(path: string): Store {
  let queue: Promise<unknown> = Promise.resolve()
  /** This store's mark in its owner files, and the owner files it holds. */
  const token = crypto.randomUUID()
  const mine = new Set<string>()
  /** The owner file of `key`. */
  const ownerOf = (key: string) =>
    `${path}.${createHash('sha256').update(key).digest('hex').slice(0, 16)}.owner`
  /** What this store reserved for each key and against which budget (`lost`: taken from it,
   * see `standing`). */
  const held = new Map<
    string,
    { amount: bigint; budget: Parameters<NonNullable<Store['reserve']>>[2]; lost?: boolean }
  >()
  /** Whether this store reserved anything (its reservations are removed as it is released). */
  let reserving = false
  const lockPath = `${path}.lock`
  /** What this store writes in the write lock as it takes it: its pid, its token (another store
   * of this process tells it writing, see `stale`), where the pid means something, and when its
   * process started. */
  const lockLine = `${process.pid} ${token} ${namespace}${startedHere ? ` ~${startedHere}` : ''}`
  /** What this store writes in its owner files: its pid, token, and where the pid means something. */
  const ownerLine = `${process.pid} ${token} ${namespace}${startedHere ? ` ~${startedHere}` : ''}`
  /**
   * Now by the clock that dates the store's files (a file server's, for a volume shared between
   * machines), read off the write lock this store holds (called under it): the ages of other
   * machines' files are told on one clock, not on this machine's, which may be minutes off.
   */
  const fsNow = () => {
    try {
      return statSync(lockPath).mtimeMs
    } catch {
      return Date.now()
    }
  }
  /** Whether store `t` of another pid namespace or machine is in use: its presence file renewed
   * lately. A token that cannot name a file, or a file that cannot be looked at, counts as in use. */
  const present = (t: string): boolean => {
    if (!/^[0-9a-f-]{1,64}$/.test(t)) return true
    try {
      return fsNow() - statSync(`${path}.${t}.alive`).mtimeMs <= HOLDER_STALE_MS
    } catch (e) {
      return (e as NodeJS.ErrnoException).code !== 'ENOENT'
    }
  }
  /**
   * Removes the presence files beside the store not renewed for `HOLDER_STALE_MS` (aged by the
   * file system's clock, read off `own`, this store's presence file written just now): a process
   * killed (a Ctrl-C'd `tollway chat`, a container stopped) leaves its own, which nothing else
   * removes, one more in the store's directory each time. Such a file holds nothing already (see
   * `present`); a store alive that slept as long writes it again as it wakes.
   */
  const sweep = async (own: string) => {
    const now = (await stat(own).catch(() => undefined))?.mtimeMs
    if (now === undefined) return
    const prefix = `${basename(path)}.`
    const names = await readdir(dirname(path)).catch(() => [] as string[])
    for (const name of names) {
      if (!name.startsWith(prefix) || !/^[0-9a-f-]{1,64}\.alive$/.test(name.slice(prefix.length)))
        continue
      const f = join(dirname(path), name)
      const st = await stat(f).catch(() => undefined)
      if (st && now - st.mtimeMs > HOLDER_STALE_MS) await unlink(f).catch(() => {})
    }
  }
  /** Its writing, once (a claim and a reservation at once each started a timer: the one
   * overwritten in `presences` was never stopped, and wrote the file again after release). */
  let presenting: Promise<void> | undefined
  /** Writes this store's presence file and renews it every `HEARTBEAT_MS` (once: kept until
   * released), before any claim or reservation is written that it vouches for. */
  const presence = () =>
    (presenting ??= (async () => {
      const f = `${path}.${token}.alive`
      const line = `${process.pid} ${token} ${namespace}`
      await mkdir(dirname(path), { recursive: true }).catch(() => {})
      await writeFile(f, line).catch((e: unknown) => {
        throw unusable(path, 'written', e)
      })
      presences.set(token, { file: f, timer: heartbeat(f, line) })
      await sweep(f)
    })().catch((e: unknown) => {
      presenting = undefined
      throw e
    }))
  /** How old file `p` is at `now` (this machine's clock unless given). */
  const age = (p: string, now?: number) =>
    stat(p).then(
      (st) => (now ?? Date.now()) - st.mtimeMs,
      () => 0,
    )
  /** Whether lock file `p` was left by a process that died holding it: the pid it holds is
   * gone or another process's now, or it is older than any write takes (no pid readable, or a
   * holder of another pid namespace or machine: its pid gone here says nothing, it may be
   * writing) at `now`. */
  const stale = async (p: string, now?: number) => {
    const h = await holder(p)
    // Another store's of this process (on the same file): never taken while its write is under
    // way, however long (it was by its age, and both wrote). One not writing (left by a failed
    // removal, or a worker thread's, whose stores this module does not see), by its age.
    if (h?.here) return !writing.has(h.token as string) && (await age(p, now)) > LOCK_STALE_MS
    if (h?.alive === false) return true
    // A live writer of this namespace, told from a process given its pid later by when it
    // started: its lock is never taken, however long its write (a disk stalled, a machine
    // asleep mid-write: two writers at once lose one's update). One that does not say (an
    // earlier version's), by its age.
    if (h?.started !== undefined) return false
    return (await age(p, now)) > LOCK_STALE_MS
  }
  /**
   * Removes the write lock if it is stale (left by a process that died holding it); whether
   * it did. Under a second lock: two writers that both found it stale would otherwise both
   * remove it, the later one the lock the earlier one had taken meanwhile, and both write.
   */
  const takeOver = async (): Promise<boolean> => {
    if (!(await stale(lockPath))) return false
    const breaking = `${lockPath}.stale`
    try {
      await (await open(breaking, 'wx')).close()
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e
      // Another writer is at it; one that died at it left this one old.
      if ((await age(breaking)) > LOCK_STALE_MS) await unlink(breaking).catch(() => {})
      return false
    }
    try {
      // Looked at again under the second lock: still the stale one, not one taken since; its
      // age by the clock that dated it (the second lock was dated just now by the same).
      const now = (await stat(breaking).catch(() => undefined))?.mtimeMs
      if (!(await stale(lockPath, now))) return false
      await unlink(lockPath).catch(() => {})
      return true
    } finally {
      await unlink(breaking).catch(() => {})
    }
  }
  /** Runs `f` holding the file's write lock (waiting for another process's write). */
  const locked = async <T>(f: () => Promise<T>): Promise<T> => {
    await mkdir(dirname(path), { recursive: true }).catch((e: unknown) => {
      throw unusable(path, 'written', e)
    })
    const deadline = Date.now() + LOCK_WAIT_MS
    for (;;) {
      try {
        const lock = await open(lockPath, 'wx')
        await lock.writeFile(lockLine).finally(() => lock.close())
        writing.add(token)
        break
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw unusable(path, 'written', e)
        if (await takeOver()) continue
        if (Date.now() > deadline)
          throw new ClientError(
            `The channel store ${path} stayed locked by another process for ${LOCK_WAIT_MS / 1000} s (${lockPath}); if no other process uses the store, delete that file.`,
            { path },
          )
        else await new Promise((r) => setTimeout(r, 5 + Math.random() * 10))
      }
    }
    try {
      return await f()
    } finally {
      writing.delete(token)
      // Not another writer's, which took it from this one's stalled write (see `stillLocked`).
      if ((await readFile(lockPath, 'utf8').catch(() => '')).trim() === lockLine)
        await unlink(lockPath).catch(() => {})
    }
  }
  /**
   * Throws unless the write lock still holds what this store wrote in it (called under it, just
   * before the store file is replaced). A writer that cannot tell this one alive (of another pid
   * namespace or machine, or of an earlier version) takes a lock older than `LOCK_STALE_MS`: a
   * write stalled that long (a disk stalled, a machine asleep mid-write) lost it, and the taker,
   * which read the file after, may have written it since. Renamed over it, the taker's update was
   * lost: a channel's signed or a closed total no longer counted against maxTotal. Thrown, nothing
   * of this write is stored: `set` fails, and the voucher it would have stored does not leave
   * (createFetch sends one only once stored).
   *
   * What remains: a lock taken between this read and the rename (two system calls, the stall
   * then within them) is not seen; nothing short of a lock the file system holds for a writer
   * (which a shared volume may not offer) closes that.
   */
  const stillLocked = async () => {
    const now = (await readFile(lockPath, 'utf8').catch(() => '')).trim()
    if (now !== lockLine)
      throw new ClientError(
        `The channel store ${path} was not written: its write lock (${lockPath}) was taken over by another writer while this write stalled for over ${LOCK_STALE_MS / 1000} s (a disk stalled, a machine asleep?), and that writer may have written the store since. Nothing of this write was stored; try it again.`,
        { path },
      )
  }
  const load = async (): Promise<Content> => {
    let text: string
    try {
      text = await readFile(path, 'utf8')
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { channels: {}, closedTotals: {} }
      throw unusable(path, 'read', e)
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
      ...(isMap(content.reserved) ? { reserved: content.reserved } : {}),
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
  /** What the channel under `key` signed (0n when none), for a budget's sum: an entry that does
   * not parse cannot be counted, so it stops the reservation rather than be left out. */
  const signedOf = (c: Content, key: string) => {
    const entry = c.channels[key]
    if (entry === undefined) return 0n
    const signed = Decimal.safeParse((entry as { signed?: unknown } | null)?.signed)
    if (!signed.success)
      throw new ClientError(
        `The channel store ${path} has a malformed channel under "${key}" (signed: not a decimal string); repair it, or delete that entry to forget the channel.`,
        { path, key },
      )
    return BigInt(signed.data)
  }
  /** What is reserved under `key` (0n when none), in content whose reservations no longer in use
   * were removed (`lapse`): its holder is this store, another store of this process in use,
   * another process alive, or a store of another namespace present. */
  const reservedOf = (c: Content, key: string) => {
    const entry = c.reserved?.[key]
    if (entry === undefined) return 0n
    const parsed = Reservation.safeParse(entry)
    if (!parsed.success)
      throw new ClientError(
        `The channel store ${path} has a malformed reservation under "${key}"; repair it, or delete that entry (under "reserved").`,
        { path, key },
      )
    return BigInt(parsed.data.amount)
  }
  /**
   * Removes from `c` the reservations whose holder is no longer in use, before a grant reads it:
   * one counted as nothing but left in the file is its holder's again as it returns (a machine
   * that wakes, its presence file renewed), which finds it there and signs within it on top of
   * what was granted past it. Each is judged once: judged again as it is counted, a presence file
   * renewed or lapsing in between counted one that was removed, or left one that was not counted.
   */
  const lapse = (c: Content) => {
    for (const [k, r] of Object.entries(c.reserved ?? {})) {
      const parsed = Reservation.safeParse(r)
      if (parsed.success && !holds(parsed.data)) delete c.reserved?.[k]
    }
  }
  /** Whether reservation `r`'s holder is in use: this store, another store of this process
   * neither released nor collected, another process alive, or a store of another pid namespace
   * or machine whose presence file is renewed. */
  const holds = (r: Reservation) => {
    if (r.token === token) return true
    if (r.ns !== undefined && r.ns !== namespace) return present(r.token)
    return r.pid === process.pid ? liveTokens.has(r.token) : alive(r.pid)
  }
  /** What `grant` reads of content `c`, once its reservations no longer in use are removed. */
  const view = (c: Content) => {
    lapse(c)
    return {
      keys: [
        ...Object.keys(c.channels),
        ...Object.keys(c.closedTotals),
        ...Object.keys(c.reserved ?? {}),
      ],
      closed: (k: string) => total(c, k),
      signed: (k: string) => signedOf(c, k),
      reserved: (k: string) => reservedOf(c, k),
    }
  }
  /**
   * Before `key`'s channel is stored at `signed` (under the lock, so before its voucher leaves):
   * whether this store still holds what it claimed and reserved for it. A process of another
   * namespace judges this one by its presence file, so a store whose process was suspended past
   * `HOLDER_STALE_MS` (a machine asleep) may find its key taken over (StoreInUseError: another
   * client signs on the channel now) or its reservation removed and the budget granted to others
   * (reserved again if it still fits, else a ClientError: signing within it would take the
   * wallet past its limit). Nothing taken, it goes on: its presence file is renewed as it wakes.
   */
  const standing = async (c: Content, key: string, signed: bigint) => {
    const owner = ownerOf(key)
    if (mine.has(owner)) {
      const now = (await readFile(owner, 'utf8').catch(() => '')).trim()
      if (now !== '' && now !== ownerLine)
        throw new StoreInUseError(
          `This client's claim on ${key.split('#')[0]} in the channel store ${path} lapsed (its process was unreachable for over ${HOLDER_STALE_MS / 60_000} minutes: a machine asleep?) and another client took the channel over; this one must not sign on it. Release this paying fetch.`,
          { path, key, pid: Number(now.split(' ')[0]) },
        )
      if (now === '')
        await writeFile(owner, ownerLine).catch((e: unknown) => {
          throw unusable(path, 'written', e)
        })
    }
    const h = held.get(key)
    if (!h) return
    const entry = c.reserved?.[key] as Partial<Reservation> | undefined
    if (!h.lost && entry?.token === token) return
    // Looked at only then: an entry that does not parse is overwritten by a store that holds.
    if (signed <= signedOf(c, key)) return
    const granted = grant(view(c), key, h.amount, h.budget)
    if (!h.lost && granted >= signed) {
      c.reserved = {
        ...c.reserved,
        [key]: { amount: granted.toString(), pid: process.pid, token, ns: namespace },
      }
      h.amount = granted
      return
    }
    h.lost = true
    throw new ClientError(
      `What this client had reserved for ${key.split('#')[0]} in the channel store ${path} was given to the wallet's other clients (its process was unreachable for over ${HOLDER_STALE_MS / 60_000} minutes: a machine asleep?), and signing on would take the wallet past its limit. Release this paying fetch and make another.`,
      { path, key },
    )
  }
  // Writes one after another, so two updates never interleave their read and write.
  const update = (f: (content: Content) => void | Promise<void>) => {
    const next = queue.then(() =>
      locked(async () => {
        const content = await load()
        await f(content)
        // This store's own: a writer that took the lock from it (see `stillLocked`) may have the
        // same pid (another namespace's), and writes its temporary file meanwhile.
        const tmp = `${path}.${process.pid}.${token}.tmp`
        try {
          await writeFile(tmp, `${JSON.stringify(content, null, 2)}\n`)
        } catch (e) {
          throw unusable(path, 'written', e)
        }
        try {
          await stillLocked()
        } catch (e) {
          await unlink(tmp).catch(() => {})
          throw e
        }
        try {
          await rename(tmp, path)
        } catch (e) {
          throw unusable(path, 'written', e)
        }
      }),
    )
    queue = next.catch(() => {})
    return next
  }
  const store: Store = {
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
      update(async (c) => {
        await standing(c, key, BigInt(state.signed))
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
    async own(key) {
      const owner = ownerOf(key)
      if (mine.has(owner)) return
      await presence()
      await locked(async () => {
        const other = await holder(owner, token)
        if (other?.foreign) other.alive = other.token === undefined || present(other.token)
        if (other?.alive && other.here)
          throw new StoreInUseError(
            `Another paying client in this process pays ${key.split('#')[0]} from this wallet through the channel store ${path} (another Store.file on it); two clients cannot use one channel. Share one paying fetch, give this one a store of its own, or release() the other's store first.`,
            { path, key, pid: other.pid },
          )
        if (other?.alive && other.foreign)
          throw new StoreInUseError(
            `Another process (pid ${other.pid}, in another container or on another machine) pays ${key.split('#')[0]} from this wallet through the channel store ${path}; two processes cannot use one channel. Give this one a store of its own, or wait for that one to end (its claim lapses ${HOLDER_STALE_MS / 60_000} minutes after its last heartbeat; if it has ended, delete ${owner}).`,
            { path, key, pid: other.pid },
          )
        if (other?.alive)
          throw new StoreInUseError(
            `Another process (pid ${other.pid}) pays ${key.split('#')[0]} from this wallet through the channel store ${path}; two processes cannot use one channel. Give this one a store of its own, or wait for that one to end (if it has, delete ${owner}).`,
            { path, key, pid: other.pid },
          )
        await writeFile(owner, ownerLine).catch((e: unknown) => {
          throw unusable(path, 'written', e)
        })
      })
      mine.add(owner)
      claims.set(owner, ownerLine)
      liveTokens.add(token)
    },
    async release() {
      liveTokens.delete(token)
      for (const owner of mine) {
        await locked(async () => {
          const held = await readFile(owner, 'utf8').catch(() => '')
          if (held.trim() === ownerLine) await unlink(owner).catch(() => {})
        })
        if (claims.get(owner) === ownerLine) claims.delete(owner)
      }
      mine.clear()
      held.clear()
      // Reservations count in other processes while this one lives: given back here (after
      // the claims, which a failed write here must not keep).
      if (reserving)
        await update((c) => {
          for (const [k, r] of Object.entries(c.reserved ?? {}))
            if ((r as Partial<Reservation> | null)?.token === token) delete c.reserved?.[k]
        })
      reserving = false
      // Last: what it vouched for is gone from the files.
      absent(token)
      presenting = undefined
    },
    addClosedTotal: (key, amount) =>
      update((c) => {
        c.closedTotals[key] = (total(c, key) + amount).toString()
      }),
    async reserve(key, amount, budget) {
      reserving = true
      liveTokens.add(token)
      await presence()
      let granted = 0n
      await update((c) => {
        // Those whose holder is no longer in use count for nothing, and are removed (`lapse`): so
        // that a process given the pid of one that ended later does not make it count again (it
        // was kept, and refused the others what it held, for as long as that process lived).
        granted = grant(view(c), key, amount, budget)
        const reserved = c.reserved ?? {}
        if (granted > 0n)
          reserved[key] = { amount: granted.toString(), pid: process.pid, token, ns: namespace }
        else delete reserved[key]
        c.reserved = reserved
      })
      if (granted > 0n) held.set(key, { amount: granted, budget })
      else held.delete(key)
      return granted
    },
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
  collected.register(store, token)
  return store
}
