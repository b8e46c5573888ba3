/**
 * Which gateway instances are gone, from PostgreSQL's own view of its sessions: an instance's
 * pool names its sessions (`application_name`, Db.instanceName) and a reservation records the
 * name of the session that wrote it (migration 0016). An instance killed outright (SIGKILL, out
 * of memory, its machine gone) leaves no session behind as soon as PostgreSQL sees its
 * connections close, so its reservations are released within a sweep or two instead of after
 * their lease, which held a plan's concurrency (and the credits) ten minutes. No heartbeat is
 * written: an instance is alive while it has a session, and it keeps one open for that
 * (`present`: the LISTEN connection, which postgres.js never retires and opens again when lost).
 */
import type { Sql } from './Db.ts'

/**
 * Keeps a session of this instance open for as long as it runs (a LISTEN on a channel nobody
 * notifies; one connection with the Waker's). Resolves to its stop.
 */
export async function present(sql: Sql): Promise<() => Promise<void>> {
  const { unlisten } = await sql.listen('tollway_presence', () => {})
  return unlisten
}

/**
 * The instances whose reservations are a dead instance's: named by reservations, without a
 * session for `afterMs` by this instance's count (seen absent first at one sweep, still absent
 * at a later one: an instance whose connections all dropped for a moment opens them again).
 * None while this instance cannot see its own session (a role that may not read others'
 * sessions sees none, an embedded database or a pooler that renames sessions): what it cannot
 * see it does not judge.
 */
export function watcher(sql: Sql, afterMs: number) {
  const absentSince = new Map<string, number>()
  return async function dead(): Promise<string[]> {
    const [row] = await sql`
      select exists (select 1 from pg_stat_activity
                      where application_name = current_setting('application_name')
                        and pid <> pg_backend_pid()) as seen,
             array(select distinct r.instance from reservations r
                    where r.instance like 'tollway/%'
                      and not exists (select 1 from pg_stat_activity a
                                       where a.application_name = r.instance)) as absent`
    if (!row?.seen) {
      absentSince.clear()
      return []
    }
    const now = Date.now()
    const absent = new Set(row.absent as string[])
    for (const name of absentSince.keys()) if (!absent.has(name)) absentSince.delete(name)
    const dead: string[] = []
    for (const name of absent) {
      const since = absentSince.get(name)
      if (since === undefined) absentSince.set(name, now)
      else if (now - since >= afterMs) dead.push(name)
    }
    return dead
  }
}
