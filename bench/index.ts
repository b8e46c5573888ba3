/** `npm run bench`: every benchmark, results written to bench/results/. */
const benches = [
  'gateway.ts',
  'conversations.ts',
  'streams.ts',
  'meter.ts',
  'vouchers.ts',
  'payments.ts',
]
for (const b of benches) {
  console.log(`\n## ${b}\n`)
  const proc = Bun.spawn([process.execPath, `${import.meta.dir}/${b}`], {
    stdout: 'inherit',
    stderr: 'inherit',
  })
  if ((await proc.exited) !== 0) process.exit(1)
}
