/**
 * Group commit for the per-request ledger calls. A call goes to the database at once when
 * fewer than `inFlight` batches of its kind are under way (and, with `behindAtMost`, those
 * carry few enough items); otherwise it waits, and everything
 * that waited goes in the next batch: one statement (the `*_many` functions of
 * migrations/0004_batches.sql), one round trip, one commit. An idle gateway pays nothing (a
 * lone call runs as the single-item statement it always was); a busy one sends as many items
 * per statement as arrived during one round trip, so its requests no longer queue on one
 * another's row locks.
 *
 * If a batch statement fails, its items run again one by one, so one bad item fails alone.
 */
export type Options<I, O> = {
  /**
   * Runs one item (a lone call, or the fallback when a batch fails); by default `many` of
   * that item alone, so a lone call runs the batch statement too (one implementation).
   */
  one?(item: I): Promise<O>
  /** Runs several items in one statement; results in the items' order. */
  many(items: I[]): Promise<O[]>
  /** Batches under way at once (default 1). */
  inFlight?: number | undefined
  /**
   * With `inFlight` above 1: another batch goes while some are under way only if those carry
   * at most this many items in all (default: any number). A stream whose batches must run in
   * order sends them down one connection, where PostgreSQL runs them one after the other: a
   * call behind a lone one goes at once (PostgreSQL finds it waiting as soon as the one before
   * is done, rather than after a round trip to the gateway and back), and calls behind a large
   * batch still wait to go together.
   */
  behindAtMost?: number | undefined
  /** Most items in one batch (default 256). */
  maxItems?: number | undefined
  /**
   * Whether an item of a batch that failed as a whole (with `error`) runs again alone; one
   * that does not fails with that error. Default: every item runs again. An item whose effect
   * is not safe to repeat when the batch may have committed (its answer lost with the
   * connection) is better failed.
   */
  again?: ((item: I, error: unknown) => boolean) | undefined
}

type Waiting<I, O> = {
  item: I
  /** Its place in submission order. */
  seq: number
  resolve: (o: O) => void
  reject: (e: unknown) => void
  /** Whether its caller gave up on it (see `run`). */
  gone: (() => boolean) | undefined
}

/** What a call its caller gave up on while it waited is rejected with: it never ran. */
export class AbandonedError extends Error {
  override name = 'AbandonedError'
}

/**
 * What a batcher did: statements sent, items they carried, batches that failed as a whole,
 * statements sent while others were under way, and the seconds from each statement's sending to
 * its answer, summed (over `statements`: the ledger's round trip, the wait every request pays).
 */
export type Stats = {
  statements: number
  items: number
  fallbacks: number
  behind: number
  seconds: number
}

export class Batcher<I, O> {
  private readonly waiting: Waiting<I, O>[] = []
  /** Items in the batches under way. */
  private carried = 0
  private readonly inFlight: number
  private readonly behindAtMost: number
  private readonly maxItems: number
  readonly stats: Stats = { statements: 0, items: 0, fallbacks: 0, behind: 0, seconds: 0 }
  /** Items submitted; the first item of each batch under way, one entry a batch (batches
   * are runs of consecutive items, as calls wait in order), with when it was sent. */
  private submitted = 0
  private readonly starts = new Map<number, number>()
  private readonly barriers: { at: number; resolve: () => void }[] = []

  private readonly one: (item: I) => Promise<O>

  constructor(private readonly o: Options<I, O>) {
    this.one = o.one ?? (async (item) => (await o.many([item]))[0] as O)
    this.inFlight = o.inFlight ?? 1
    this.behindAtMost = o.behindAtMost ?? Number.POSITIVE_INFINITY
    this.maxItems = o.maxItems ?? 256
  }

  /**
   * Runs `item` (alone, or in a batch). `gone`: whether its caller gave up on it (a database
   * deadline passed, see Db.answered); one that gave up while it waited is not sent (an
   * AbandonedError), so that a database answering again does not run what nobody waits for
   * (an admission would take the payer's rate and hold its credits for nothing).
   */
  run(item: I, gone?: () => boolean): Promise<O> {
    const seq = this.submitted++
    const idle = this.free()
    if (idle && this.waiting.length === 0) {
      if (this.starts.size > 0) this.stats.behind++
      this.carried++
      this.stats.statements++
      this.stats.items++
      this.starts.set(seq, performance.now())
      return this.one(item).finally(() => this.done(seq, 1))
    }
    const result = new Promise<O>((resolve, reject) => {
      this.waiting.push({ item, seq, resolve, reject, gone })
    })
    if (idle) this.flush()
    return result
  }

  /** Whether another batch may go now. */
  private free(): boolean {
    const running = this.starts.size
    return running === 0 || (running < this.inFlight && this.carried <= this.behindAtMost)
  }

  /** Resolves once every item submitted so far is done. */
  barrier(): Promise<void> {
    if (this.doneUpTo() >= this.submitted) return Promise.resolve()
    const { promise, resolve } = Promise.withResolvers<void>()
    this.barriers.push({ at: this.submitted, resolve })
    return promise
  }

  /** How many items, from the first, are all done: those before the earliest one waiting
   * or under way. */
  private doneUpTo(): number {
    let first = this.waiting[0]?.seq ?? this.submitted
    for (const s of this.starts.keys()) if (s < first) first = s
    return first
  }

  private done(start: number, items: number) {
    const sent = this.starts.get(start)
    if (sent !== undefined) this.stats.seconds += (performance.now() - sent) / 1000
    this.starts.delete(start)
    this.carried -= items
    if (this.waiting.length > 0 && this.free()) this.flush()
    this.passBarriers()
  }

  private passBarriers() {
    const upTo = this.doneUpTo()
    while (this.barriers.length > 0 && this.barriers[0]!.at <= upTo)
      this.barriers.shift()!.resolve()
  }

  private flush() {
    let batch = this.waiting.splice(0, this.maxItems)
    if (batch.some((w) => w.gone?.())) {
      for (const w of batch) if (w.gone?.()) w.reject(new AbandonedError('its caller gave up'))
      batch = batch.filter((w) => !w.gone?.())
      if (batch.length === 0) {
        if (this.waiting.length > 0 && this.free()) this.flush()
        this.passBarriers()
        return
      }
    }
    const start = batch[0]!.seq
    if (this.starts.size > 0) this.stats.behind++
    this.starts.set(start, performance.now())
    this.carried += batch.length
    this.stats.statements++
    this.stats.items += batch.length
    const settle = async () => {
      if (batch.length === 1) {
        const w = batch[0]!
        await this.one(w.item).then(w.resolve, w.reject)
        return
      }
      let results: O[]
      try {
        results = await this.o.many(batch.map((w) => w.item))
      } catch (e) {
        this.stats.fallbacks++
        // One item may have failed the statement: each runs alone, in order, and fails alone.
        for (const w of batch)
          if (this.o.again?.(w.item, e) === false) w.reject(e)
          else await this.one(w.item).then(w.resolve, w.reject)
        return
      }
      batch.forEach((w, i) => {
        w.resolve(results[i] as O)
      })
    }
    void settle().finally(() => this.done(start, batch.length))
  }
}

const registry = new WeakMap<object, Map<string, Batcher<never, unknown>>>()

/** The batcher `name` of a database handle (made with `options` on first use). */
export function of<I, O>(db: object, name: string, options: () => Options<I, O>): Batcher<I, O> {
  let byName = registry.get(db)
  if (!byName) {
    byName = new Map()
    registry.set(db, byName)
  }
  let b = byName.get(name) as Batcher<I, O> | undefined
  if (!b) {
    b = new Batcher(options())
    byName.set(name, b as unknown as Batcher<never, unknown>)
  }
  return b
}

/**
 * Resolves once every call queued so far on the handle's batchers (or only on the batcher
 * `name`) has run: a read of a balance, usage or transactions waits for it, to see this
 * instance's own writes (a completion's finish may still be on its way when its response has
 * gone).
 */
export async function settled(db: object, name?: string): Promise<void> {
  const byName = registry.get(db)
  if (!byName) return
  const batchers = name === undefined ? [...byName.values()] : [byName.get(name)]
  await Promise.all(batchers.map((b) => b?.barrier()))
}

/** The stats of a database handle's batchers, by name. */
export function stats(db: object): Record<string, Stats> {
  return Object.fromEntries([...(registry.get(db) ?? [])].map(([k, b]) => [k, { ...b.stats }]))
}

/** The rows of a `*_many` function (one per item, with its `idx`) in the items' order;
 * `missing` stands for an item that returned no row. */
export function inOrder<O>(
  rows: readonly Record<string, unknown>[],
  n: number,
  map: (row: Record<string, unknown>) => O,
  missing: (i: number) => O = (i) => {
    throw new Error(`batch item ${i} returned no row`)
  },
): O[] {
  const out = new Array<O>(n)
  const seen = new Array<boolean>(n).fill(false)
  for (const row of rows) {
    const i = row.idx as number
    out[i] = map(row)
    seen[i] = true
  }
  for (let i = 0; i < n; i++) if (!seen[i]) out[i] = missing(i)
  return out
}
