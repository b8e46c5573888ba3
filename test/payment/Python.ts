/**
 * An independent implementation to cross-check ours against: python3's standard library (present on
 * dev and CI machines). One process per batch, one JSON line in and one line out per input.
 */

/** Runs a python3 program that reads JSON lines on stdin and prints one result line per input. */
export function run(program: string, inputs: readonly unknown[]): string[] {
  const stdin = `${inputs.map((input) => JSON.stringify(input)).join('\n')}\n`
  const result = Bun.spawnSync(['python3', '-c', program], {
    stdin: new TextEncoder().encode(stdin),
    env: { ...process.env, PYTHONIOENCODING: 'utf-8' },
  })
  if (result.exitCode !== 0) throw new Error(`python3 failed: ${result.stderr.toString()}`)
  const lines = result.stdout.toString().split('\n')
  lines.pop()
  return lines
}
