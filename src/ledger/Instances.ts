/**
 * Which gateway instances are dead, by their heartbeats: an instance's pool names its sessions
 * (`application_name` `tollway/<random>`, Db.connect), a reservation records the name of
 * the session that wrote it (migration 0016), and each instance writes its heartbeat under that
 * name (migration 0017) every few seconds. An instance killed outright (SIGKILL, out of
 * memory, its machine gone) beats no more, and another instance's sweep releases its
 * reservations once its heartbeat is older than the threshold, instead of after their lease,
 * which held a plan's concurrency (and the credits) ten minutes. An instance cut off from the
 * database for longer than the threshold is taken for dead too: its requests under way are
 * charged what they had recorded as delivered, as the lease sweep charges them.
 */
import type { Sql } from './Db.ts'

/**
 * The name this instance's sessions carry, when it is one of ours (`tollway/…`): undefined
 * where the database does not keep it (a pooler that renames sessions, the embedded server),
 * and then no reservation of this instance is judged by heartbeats.
 */
export async function nameOf(sql: Sql): Promise<string | undefined> {
  const [row] = await sql`select current_setting('application_name') as name`
  const name = row?.name as string | undefined
  return name?.startsWith('tollway/') ? name : undefined
}

/** Writes the heartbeat of instance `name`. */
export async function beat(sql: Sql, name: string): Promise<void> {
  await sql`
    insert into tollway_instances (name) values (${name})
    on conflict (name) do update set seen_at = now()`
}

/**
 * The instances whose reservations are a dead instance's: named by reservations, their last
 * heartbeat older than `afterMs`. An instance without a heartbeat at all is not judged (one
 * that does not beat: an instance beats before it serves).
 */
export async function dead(sql: Sql, afterMs: number): Promise<string[]> {
  const rows = await sql`
    select distinct r.instance from reservations r
    join tollway_instances i on i.name = r.instance
    where i.seen_at < now() - make_interval(secs => ${afterMs / 1000})`
  return rows.map((r) => r.instance as string)
}

/**
 * Ends the sessions that instances taken for dead (their heartbeat older than `afterMs`) still
 * have open, this one's own excepted; the names of those instances. An instance whose machine
 * is gone leaves its sessions behind, and PostgreSQL keeps them, and what they hold, until TCP
 * keepalive gives up, hours later: the settlement lock taken for a pass (Settlements.withLock),
 * the chain sender's lock (Db.exclusive), a transaction's row locks. Held, the first kept every
 * other instance from settling, and from reading back the payers' forced closes, whose grace
 * period is 15 minutes. An instance only cut off from the database (taken for dead all the
 * same, its reservations released) opens new sessions once it reaches it again. Only sessions
 * of a role this one is a member of (the others' it may not end).
 */
export async function endSessions(sql: Sql, afterMs: number): Promise<string[]> {
  const rows = await sql`
    select a.application_name as name, pg_terminate_backend(a.pid) as ended
    from pg_stat_activity a
    join tollway_instances i on i.name = a.application_name
    where i.seen_at < now() - make_interval(secs => ${afterMs / 1000})
      and a.application_name <> current_setting('application_name')
      and a.pid <> pg_backend_pid()
      and pg_has_role(a.usesysid, 'member')`
  return [...new Set(rows.map((r) => r.name as string))]
}

/** Forgets heartbeats older than a day (instances long stopped). */
export async function forget(sql: Sql): Promise<void> {
  await sql`delete from tollway_instances where seen_at < now() - interval '1 day'`
}
