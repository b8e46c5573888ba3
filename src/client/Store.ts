/**
 * Where the paying client keeps its channels, so a restarted agent resumes its channel instead of
 * opening (and funding) another. Amounts are decimal strings, so the state is plain JSON.
 */
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises'
import { dirname } from 'node:path'
import { ClientError } from './Errors.ts'

/** One open channel, as the client knows it. */
export type ChannelState = {
  channelId: `0x${string}`
  chainId: number
  escrow: `0x${string}`
  currency: `0x${string}`
  recipient: `0x${string}`
  /** The deposit, base units (decimal string). */
  deposit: string
  /** The highest cumulative amount signed (decimal string). */
  signed: string
  /** The URL the channel was last used with (close() posts there). */
  url: string
}

/** A key/value store of channel states; implement it to keep channels elsewhere. */
export type Store = {
  get(key: string): Promise<ChannelState | undefined>
  set(key: string, state: ChannelState): Promise<void>
  delete(key: string): Promise<void>
}

/** A store that lives as long as the process. */
export function memory(): Store {
  const map = new Map<string, ChannelState>()
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
  }
}

/** A store in one JSON file (written whole, through a temporary file and a rename). */
export function file(path: string): Store {
  let queue: Promise<unknown> = Promise.resolve()
  const load = async (): Promise<Record<string, ChannelState>> => {
    let text: string
    try {
      text = await readFile(path, 'utf8')
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return {}
      throw e
    }
    try {
      return JSON.parse(text) as Record<string, ChannelState>
    } catch (cause) {
      throw new ClientError(
        `The channel store ${path} is not JSON; repair it, or move it away to start afresh (open channels in it are then forgotten).`,
        { path },
        { cause },
      )
    }
  }
  // Writes one after another, so two updates never interleave their read and write.
  const update = (f: (all: Record<string, ChannelState>) => void) => {
    const next = queue.then(async () => {
      const all = await load()
      f(all)
      await mkdir(dirname(path), { recursive: true })
      const tmp = `${path}.${process.pid}.tmp`
      await writeFile(tmp, `${JSON.stringify(all, null, 2)}\n`)
      await rename(tmp, path)
    })
    queue = next.catch(() => {})
    return next
  }
  return {
    async get(key) {
      await queue
      return (await load())[key]
    },
    set: (key, state) =>
      update((all) => {
        all[key] = state
      }),
    delete: (key) =>
      update((all) => {
        delete all[key]
      }),
  }
}
