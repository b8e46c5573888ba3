/** Runs a command as a subprocess, as a user's shell would: its output and exit code. */
import { resolve } from 'node:path'

/** The `tollway` command of this checkout. */
export const bin = resolve(import.meta.dir, '../../bin/tollway')

export type Run = { stdout: string; stderr: string; code: number }

/** Runs `command` with only PATH and `env` in its environment (and `cwd`, if given). */
export async function run(
  command: string[],
  env: Record<string, string>,
  cwd?: string,
): Promise<Run> {
  const p = Bun.spawn(command, {
    ...(cwd ? { cwd } : {}),
    env: { PATH: process.env.PATH ?? '', ...env },
    stdout: 'pipe',
    stderr: 'pipe',
  })
  const [stdout, stderr, code] = await Promise.all([
    new Response(p.stdout).text(),
    new Response(p.stderr).text(),
    p.exited,
  ])
  return { stdout, stderr, code }
}
