/** What this machine's /proc tells of a process, for the locks that name their holder's pid. */
import { readFileSync } from 'node:fs'

/**
 * Whether process `pid` has ended and only waits for its parent to reap it (a zombie: /proc's
 * state `Z`, or `X` as it goes); false where /proc does not tell (not Linux, no such pid).
 * Signal 0 still reaches such a pid, yet it holds nothing and never will (its pid is not given
 * to another process until it is reaped): a holder killed outright under a parent that reaps
 * late, or never (a supervisor, `timeout -s KILL`), is gone.
 */
export function zombie(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    // The name may hold spaces and parentheses: the state is the field after the last `)`.
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3)
    return state === 'Z' || state === 'X'
  } catch {
    return false
  }
}
