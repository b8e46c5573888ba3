import { afterAll, beforeAll, describe, expect, test } from 'bun:test'
import { secp256k1 } from '@noble/curves/secp256k1.js'
import fc from 'fast-check'
import { type Address, bytesToHex, type Hex, hashTypedData, keccak256, toHex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import { InvalidVoucherSignatureError } from '../../src/chain/Errors.ts'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Voucher from '../../src/chain/Voucher.ts'
import * as Anvil from '../helpers/Anvil.ts'

// The fixed vector shared with contracts/test/PaymentChannelEscrow.t.sol
// (test_voucherDigest_matchesFixedVector). Expected values were produced by viem's hashTypedData
// and signTypedData with anvil's first development key, and the contract reproduces them.
const vector = {
  chainId: 31337,
  escrow: '0x1111111111111111111111111111111111111111',
  channelId: keccak256(toHex('tollway voucher vector')),
  cumulativeAmount: 1234567n,
  digest: '0x5d0078a5fcb744204550d5478405071f1bf253c07e88fec79f911cdb281a86ad',
  privateKey: '0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80',
  signature:
    '0x0ac2a70ec0a818d3194cf5871cf3959c3ee3a073f9d19201bcb31f0f8f4c96583d1d5d315a0374c0a08fa182431ae2649f4c1eeb758504d2d3c1d3cd78ae696c1b',
} as const

const N = secp256k1.Point.Fn.ORDER

const hex32 = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((b) => bytesToHex(b))
const key = fc
  .uint8Array({ minLength: 32, maxLength: 32 })
  .filter((b) => secp256k1.utils.isValidSecretKey(b))
  .map((b) => bytesToHex(b))
const uint128 = fc.bigInt({ min: 0n, max: (1n << 128n) - 1n })

/** The same signature with s' = n - s and v flipped: recovers the same signer, but malleable. */
function highS(signature: Hex): Hex {
  const s = BigInt(`0x${signature.slice(66, 130)}`)
  const v = Number.parseInt(signature.slice(130), 16)
  return `${signature.slice(0, 66)}${(N - s).toString(16).padStart(64, '0')}${(55 - v).toString(16)}` as Hex
}

function reason(f: () => void): string | undefined {
  try {
    f()
    return undefined
  } catch (error) {
    if (error instanceof InvalidVoucherSignatureError) return error.reason
    throw error
  }
}

describe('digest', () => {
  test('behavior: matches the fixed vector and viem hashTypedData', () => {
    expect(Voucher.digest(vector)).toBe(vector.digest)
    expect(hashTypedData(Voucher.typedData(vector))).toBe(vector.digest)
  })

  test('behavior: agrees with viem hashTypedData for random vouchers', () => {
    fc.assert(
      fc.property(
        hex32,
        uint128,
        fc.integer({ min: 1, max: 2 ** 40 }),
        hex32,
        (channelId, amount, chainId, a) => {
          const scope = { chainId, escrow: `0x${a.slice(2, 42)}` as Address }
          const voucher = { ...scope, channelId, cumulativeAmount: amount }
          expect(Voucher.digest(voucher)).toBe(hashTypedData(Voucher.typedData(voucher)))
        },
      ),
      { numRuns: 2_000 },
    )
  })

  test('error: rejects an amount above uint128', () => {
    expect(reason(() => Voucher.digest({ ...vector, cumulativeAmount: 1n << 128n }))).toBe(
      'malformed',
    )
  })
})

describe('sign', () => {
  test('behavior: produces the fixed vector signature', async () => {
    const account = privateKeyToAccount(vector.privateKey)
    expect(await Voucher.sign(account, vector)).toBe(vector.signature)
  })
})

describe('createVerifier', () => {
  test('behavior: accepts the fixed vector from its signer', () => {
    const verifier = Voucher.createVerifier(vector)
    const signer = privateKeyToAccount(vector.privateKey).address
    expect(() => verifier.verify({ ...vector, signer })).not.toThrow()
    expect(verifier.digest(vector)).toBe(vector.digest)
  })

  test("behavior: a signer's key is recovered once, then its vouchers are checked against it; a voucher checked before is not checked again", async () => {
    const verifier = Voucher.createVerifier(vector)
    const account = privateKeyToAccount(vector.privateKey)
    const signed = async (cumulativeAmount: bigint) => ({
      ...vector,
      cumulativeAmount,
      signer: account.address,
      signature: await Voucher.sign(account, { ...vector, cumulativeAmount }),
    })
    const [a, b, c] = await Promise.all([signed(10n), signed(20n), signed(30n)])
    verifier.verify(a)
    verifier.verify(b)
    verifier.verify(c)
    verifier.verify(b)
    expect(verifier.stats).toEqual({ recovered: 1, keyed: 2, cached: 1 })
    // Another key's signature for a known signer fails on the known-key path as recovery
    // would: signer-mismatch; nothing is counted as verified.
    const other = privateKeyToAccount(keccak256(toHex('other')))
    const forged = {
      ...vector,
      cumulativeAmount: 40n,
      signer: account.address,
      signature: await Voucher.sign(other, { ...vector, cumulativeAmount: 40n }),
    }
    expect(() => verifier.verify(forged)).toThrow(
      expect.objectContaining({ reason: 'signer-mismatch' }),
    )
    expect(verifier.stats).toEqual({ recovered: 1, keyed: 2, cached: 1 })
  })

  test('behavior: agrees with viem recoverTypedDataAddress on valid and mutated signatures', async () => {
    const scope = { chainId: 31337, escrow: '0x5FbDB2315678afecb367f032d93F642f64180aa3' } as const
    await fc.assert(
      fc.asyncProperty(
        key,
        fc.array(fc.tuple(hex32, uint128), { minLength: 1, maxLength: 4 }),
        fc.constantFrom('none', 'high-s', 'flip-v', 'other-amount', 'byte'),
        fc.nat(64),
        async (privateKey, vouchers, mutation, position) => {
          const account = privateKeyToAccount(privateKey)
          const verifier = Voucher.createVerifier(scope)
          // Half the runs start with the signer's key known (the fast known-key path).
          if (position % 2 === 0) {
            const warm = { ...scope, channelId: keccak256(toHex('warm')), cumulativeAmount: 1n }
            verifier.verify({
              ...warm,
              signature: await Voucher.sign(account, warm),
              signer: account.address,
            })
          }
          for (const [channelId, cumulativeAmount] of vouchers) {
            const voucher = { ...scope, channelId, cumulativeAmount }
            let signature = await Voucher.sign(account, voucher)
            let claimed = voucher
            if (mutation === 'high-s') signature = highS(signature)
            if (mutation === 'flip-v')
              signature =
                `${signature.slice(0, 130)}${signature.endsWith('1b') ? '1c' : '1b'}` as Hex
            if (mutation === 'other-amount')
              claimed = { ...voucher, cumulativeAmount: (cumulativeAmount + 1n) % (1n << 128n) }
            if (mutation === 'byte') {
              const i = 2 + position * 2
              const flipped = (Number.parseInt(signature.slice(i, i + 2), 16) ^ 1)
                .toString(16)
                .padStart(2, '0')
              signature = `${signature.slice(0, i)}${flipped}${signature.slice(i + 2)}` as Hex
            }
            // The reference: viem's generic recovery, plus the escrow's low-s and v rules.
            let recovered: Address | undefined
            try {
              recovered = await Voucher.recoverSigner({ ...claimed, signature })
            } catch {}
            const s = BigInt(`0x${signature.slice(66, 130)}`)
            const v = Number.parseInt(signature.slice(130), 16)
            const expected = recovered === account.address && s <= N / 2n && (v === 27 || v === 28)
            // A verifier that has never seen the key recovers it: the reference reason.
            const cold = reason(() =>
              Voucher.createVerifier(scope).verify({
                ...claimed,
                signature,
                signer: account.address,
              }),
            )
            expect(cold === undefined).toBe(expected)
            // Twice: the second call goes through the known-key (or verified-cache) path, which
            // must give the same reason (invalid vs signer-mismatch are two problem types).
            for (let i = 0; i < 2; i++) {
              const got = reason(() =>
                verifier.verify({ ...claimed, signature, signer: account.address }),
              )
              expect(got).toBe(cold)
            }
          }
        },
      ),
      { numRuns: 300 },
    )
    // CPU-bound (about 2,400 recoveries): near bun's 5 s default on a loaded 2-core machine.
  }, 30_000)

  test('error: high-s signature', async () => {
    const account = privateKeyToAccount(vector.privateKey)
    const verifier = Voucher.createVerifier(vector)
    const signature = highS(vector.signature)
    // viem recovers the same signer from the malleable copy; the escrow and the verifier refuse it.
    expect(await Voucher.recoverSigner({ ...vector, signature })).toBe(account.address)
    expect(reason(() => verifier.verify({ ...vector, signature, signer: account.address }))).toBe(
      'high-s',
    )
  })

  test('error: 64-byte compact signature', () => {
    const account = privateKeyToAccount(vector.privateKey)
    const verifier = Voucher.createVerifier(vector)
    const compact = `0x${vector.signature.slice(2, 130)}` as Hex
    expect(
      reason(() => verifier.verify({ ...vector, signature: compact, signer: account.address })),
    ).toBe('malformed')
  })

  test('error: v other than 27 or 28', () => {
    const account = privateKeyToAccount(vector.privateKey)
    const verifier = Voucher.createVerifier(vector)
    const signature = `${vector.signature.slice(0, 130)}00` as Hex
    expect(reason(() => verifier.verify({ ...vector, signature, signer: account.address }))).toBe(
      'bad-v',
    )
  })

  test('error: signer mismatch, before and after the key is known', async () => {
    const account = privateKeyToAccount(vector.privateKey)
    const other = privateKeyToAccount(keccak256(toHex('other')))
    const verifier = Voucher.createVerifier(vector)
    const forged = await Voucher.sign(other, vector)
    expect(
      reason(() => verifier.verify({ ...vector, signature: forged, signer: account.address })),
    ).toBe('signer-mismatch')
    verifier.verify({ ...vector, signer: account.address })
    expect(
      reason(() => verifier.verify({ ...vector, signature: forged, signer: account.address })),
    ).toBe('signer-mismatch')
  })

  test('error: a signature no key recovers from is invalid, before and after the key is known', () => {
    const account = privateKeyToAccount(vector.privateKey)
    const verifier = Voucher.createVerifier(vector)
    // r = 5 is not the x of a curve point (x^3 + 7 is not a square mod p): nothing recovers.
    const signature = `0x${5n.toString(16).padStart(64, '0')}${vector.signature.slice(66)}` as Hex
    expect(reason(() => verifier.verify({ ...vector, signature, signer: account.address }))).toBe(
      'invalid',
    )
    verifier.verify({ ...vector, signer: account.address })
    expect(reason(() => verifier.verify({ ...vector, signature, signer: account.address }))).toBe(
      'invalid',
    )
  })

  test('error: a voucher for another channel, escrow or chain', async () => {
    const account = privateKeyToAccount(vector.privateKey)
    const verifier = Voucher.createVerifier(vector)
    verifier.verify({ ...vector, signer: account.address })
    const elsewhere = [
      { ...vector, channelId: keccak256(toHex('another channel')) },
      { ...vector, escrow: '0x2222222222222222222222222222222222222222' as const },
      { ...vector, chainId: 1 },
    ]
    for (const voucher of elsewhere) {
      const signature = await Voucher.sign(account, voucher)
      expect(
        reason(() =>
          verifier.verify({
            ...vector,
            channelId: vector.channelId,
            signature,
            signer: account.address,
          }),
        ),
      ).toBe('signer-mismatch')
    }
  })
})

describe('createThreadedVerifier', () => {
  test('behavior: on a worker thread, the same verdict as the verifier in this thread, for valid and mutated signatures', async () => {
    const threaded = Voucher.createThreadedVerifier(vector)
    const local = Voucher.createVerifier(vector)
    afterAll(() => threaded.close())
    const account = privateKeyToAccount(vector.privateKey)
    const other = privateKeyToAccount(keccak256(toHex('another signer')))
    const outcome = async (f: () => Promise<void> | void) => {
      try {
        await f()
        return 'valid'
      } catch (e) {
        if (e instanceof InvalidVoucherSignatureError) return e.reason
        return `error: ${(e as Error).message}`
      }
    }
    const cases: { cumulativeAmount: bigint; signature: Hex; signer: Address }[] = [
      {
        cumulativeAmount: vector.cumulativeAmount,
        signature: vector.signature,
        signer: account.address,
      },
      {
        cumulativeAmount: vector.cumulativeAmount,
        signature: vector.signature,
        signer: other.address,
      },
      {
        cumulativeAmount: vector.cumulativeAmount + 1n,
        signature: vector.signature,
        signer: account.address,
      },
      {
        cumulativeAmount: vector.cumulativeAmount,
        signature: highS(vector.signature),
        signer: account.address,
      },
      {
        cumulativeAmount: vector.cumulativeAmount,
        signature: `0x${vector.signature.slice(2, 130)}` as Hex,
        signer: account.address,
      },
      {
        cumulativeAmount: vector.cumulativeAmount,
        signature: `0x${5n.toString(16).padStart(64, '0')}${vector.signature.slice(66)}` as Hex,
        signer: account.address,
      },
      { cumulativeAmount: 1n << 129n, signature: vector.signature, signer: account.address },
    ]
    const verdicts: string[] = []
    for (const c of cases) {
      const v = { channelId: vector.channelId, ...c }
      const expected = await outcome(() => local.verify(v))
      expect(await outcome(() => threaded.verify(v))).toBe(expected)
      verdicts.push(expected)
    }
    expect(verdicts.slice(0, 6)).toEqual([
      'valid',
      'signer-mismatch',
      'signer-mismatch',
      'high-s',
      'malformed',
      'invalid',
    ])
    // Many at once: every answer goes to its own question.
    const many = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        outcome(() => threaded.verify({ channelId: vector.channelId, ...cases[i % 2]! })),
      ),
    )
    expect(many).toEqual(
      Array.from({ length: 50 }, (_, i) => (i % 2 ? 'signer-mismatch' : 'valid')),
    )
  })

  test('error: after close, a check in flight is refused, not left waiting', async () => {
    const threaded = Voucher.createThreadedVerifier(vector)
    const pending = threaded.verify({
      ...vector,
      signature: vector.signature,
      signer: privateKeyToAccount(vector.privateKey).address,
    })
    threaded.close()
    await expect(pending).rejects.toThrow('closed')
  })
})

describe('digest (against the contract)', () => {
  let chain: Anvil.TestChain
  beforeAll(async () => {
    chain = await Anvil.start()
  })
  afterAll(() => chain?.stop())

  test("behavior: equals the escrow's voucherDigest for random vouchers", async () => {
    await fc.assert(
      fc.asyncProperty(hex32, uint128, async (channelId, cumulativeAmount) => {
        const scope = { chainId: chain.chainId, escrow: chain.escrowAddress }
        const onChain = await Escrow.voucherDigest(chain.payeeClient, {
          ...scope,
          channelId,
          cumulativeAmount,
        })
        expect(Voucher.digest({ ...scope, channelId, cumulativeAmount })).toBe(onChain)
      }),
      { numRuns: 50 },
    )
  })
})
