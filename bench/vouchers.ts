/**
 * Voucher verifications per second on one core (this is a single JS thread), in one run:
 * - viem's generic path: `recoverTypedDataAddress` per voucher, compared with the signer;
 * - the fast path: `Voucher.createVerifier` (key recovered once per channel, then verified
 *   against it with precomputed tables), with its verified-voucher cache off;
 * - the fast path's first voucher of a channel (recovery + table precomputation);
 * - the fast path on an exact replay (the verified-voucher cache).
 *
 *   bun bench/vouchers.ts   → prints a table and writes bench/results/vouchers.json
 */
import { type Hex, keccak256, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import * as Voucher from '../src/chain/Voucher.ts'
import * as Harness from './Harness.ts'

const scope = { chainId: 31337, escrow: '0x5FbDB2315678afecb367f032d93F642f64180aa3' } as const
const channels = 8
const perChannel = 250

type Signed = Voucher.Scope & Voucher.Voucher & { signature: Hex; signer: Hex }

async function vouchers(): Promise<Signed[]> {
  const out: Signed[] = []
  for (let c = 0; c < channels; c++) {
    const account = privateKeyToAccount(keccak256(toHex(`bench payer ${c}`)))
    const channelId = keccak256(toHex(`bench channel ${c}`))
    for (let i = 1; i <= perChannel; i++) {
      const voucher = { ...scope, channelId, cumulativeAmount: BigInt(i) * 1_000n }
      out.push({
        ...voucher,
        signature: await Voucher.sign(account, voucher),
        signer: account.address,
      })
    }
  }
  // Interleave channels the way concurrent streams would deliver them.
  return out.sort((a, b) => Number(a.cumulativeAmount - b.cumulativeAmount))
}

/** Runs `f` over the inputs for at least `ms`, returns operations per second. */
async function rate<T>(inputs: T[], f: (input: T) => unknown, ms = 2_000): Promise<number> {
  let n = 0
  const start = performance.now()
  while (performance.now() - start < ms) {
    for (const input of inputs) {
      await f(input)
      n++
      if (performance.now() - start >= ms) break
    }
  }
  return Math.round(n / ((performance.now() - start) / 1_000))
}

export async function run(): Promise<{ name: string; results: Record<string, number> }> {
  const signed = await vouchers()

  const generic = await rate(signed, async (v) => {
    if ((await Voucher.recoverSigner(v)) !== v.signer) throw new Error('bad voucher')
  })

  // Steady state: the verified-voucher cache is off (size 0) so every voucher is really verified;
  // the first voucher of each channel recovers the key and builds its tables.
  const verifier = Voucher.createVerifier({ ...scope, cacheSize: 0 })
  const fast = await rate(signed, (v) => verifier.verify(v))

  // First voucher of a channel: recovery, address check and table precomputation.
  const firsts = signed.filter((v) => v.cumulativeAmount === 1_000n)
  const first = await rate(firsts, (v) => Voucher.createVerifier(scope).verify(v), 1_000)

  const cachedVerifier = Voucher.createVerifier(scope)
  for (const v of signed) cachedVerifier.verify(v)
  const cached = await rate(signed, (v) => cachedVerifier.verify(v), 500)

  return {
    name: 'vouchers',
    results: {
      'viem recoverTypedDataAddress (vouchers/s)': generic,
      'fast path (vouchers/s)': fast,
      'fast path, first voucher of a channel (vouchers/s)': first,
      'fast path, exact replay from cache (vouchers/s)': cached,
    },
  }
}

if (import.meta.main) {
  const { name, results } = await run()
  Harness.report(
    name,
    { name, cpus: 1, results },
    [
      '| voucher verification, one core | per second |',
      '|---|---:|',
      ...Object.entries(results).map(
        ([label, value]) => `| ${label} | ${value.toLocaleString('en-US')} |`,
      ),
    ].join('\n'),
  )
}
