/**
 * Every rejection of draft-evm-session-00 ("Verification Procedure", "Error Responses"), end
 * to end: real anvil with our escrow, real PostgreSQL, the fake upstream. Each rejection
 * asserts the status, the problem media type and type URI, a fresh Payment challenge on
 * every 402, and that nothing was stored (channel row and vouchers table unchanged).
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { secp256k1 } from '@noble/curves/secp256k1.js'
import { encodeFunctionData, type Hex, keccak256, toHex, zeroAddress } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import {
  prepareTransactionRequest,
  sendRawTransaction,
  sendTransaction,
  signTransaction,
  writeContract,
} from 'viem/actions'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import * as Voucher from '../../src/chain/Voucher.ts'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Batch from '../../src/ledger/Batch.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Credential from '../../src/payment/Credential.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Paid from '../helpers/Paid.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())
const minVoucherDelta = 100n
const overrides = {
  chain: Gateway.chainOf(chain),
  payments: {
    challengeSecret: 'test-challenge-secret-0123456789',
    voucherTimeoutMs: 2_000,
    minVoucherDelta: minVoucherDelta.toString(),
  },
}
const gw = await Gateway.create(overrides)
const url = `${gw.url}/v1/chat/completions`
const tokenDomain = await Token.domain(chain.payeeClient, { token: chain.currencyAddress })
const payer = privateKeyToAccount(chain.payers[0]!.privateKey)

const freshChallenge = (at = url) => Paid.challenge(at)

/** A paying session of `account` (the payer's by default), under a fresh challenge (no
 * channel yet). */
async function paying(account: ConstructorParameters<typeof PayingSession>[0]['account'] = payer) {
  return new PayingSession({ account, challenge: await freshChallenge(), tokenDomain })
}

/** The payer's token balance. */
const payerBalance = () =>
  Token.balanceOf(chain.payeeClient, { token: chain.currencyAddress, owner: payer.address })

/** A refused open left nothing: no channel stored, none on chain, the payer's tokens kept. */
async function nothingOpened(channelId: Hex, payerBefore: bigint) {
  expect(await Channels.get(gw.sql, channelId)).toBeUndefined()
  expect(
    await Escrow.getChannel(chain.payeeClient, { escrow: chain.escrowAddress, channelId }),
  ).toBeUndefined()
  expect(await payerBalance()).toBe(payerBefore)
}

/** A channel opened (HEAD, no request) with `initial` accepted. */
async function opened(deposit = 100_000n, initial = 1_000n) {
  const s = await paying()
  const res = await fetch(url, {
    method: 'HEAD',
    headers: { authorization: await s.openWithAuthorization({ deposit, initial }) },
  })
  expect(res.status).toBe(200)
  return s
}

/** What a rejection must leave alone: the channel row and its vouchers. */
async function stored(channelId: Hex) {
  const channel = await Channels.get(gw.sql, channelId)
  const vouchers = await gw.sql`
    select cumulative_amount::text as amount, encode(signature, 'hex') as signature
    from vouchers where channel_id = ${Buffer.from(channelId.slice(2), 'hex')}
    order by cumulative_amount`
  return {
    acceptedCumulative: channel?.acceptedCumulative,
    voucherSignature: channel?.voucherSignature,
    spent: channel?.spent,
    reserved: channel?.reserved,
    deposit: channel?.deposit,
    vouchers: vouchers.map((v) => ({ ...v })),
  }
}

/** Asserts a problem response; on a 402, a fresh, valid Payment challenge. */
async function rejected(res: Response, status: number, type: string) {
  const text = await res.text()
  if (res.status !== status) console.log(text)
  expect(res.status).toBe(status)
  expect(res.headers.get('content-type')).toContain('application/problem+json')
  const problem = JSON.parse(text) as { type: string; status: number; detail: string }
  expect(problem.type).toBe(`https://paymentauth.org/problems/${type}`)
  expect(problem.status).toBe(status)
  if (status === 402) {
    const c = challengeOf(res.headers.get('www-authenticate'))
    expect(c).toBeDefined()
    expect(Challenge.verify(c!, overrides.payments.challengeSecret).valid).toBe(true)
    expect(Date.parse(c!.expires!)).toBeGreaterThan(Date.now())
    expect(res.headers.get('cache-control')).toBe('no-store')
    // The core draft's Retry Behavior: with a credential, at once.
    expect(res.headers.get('retry-after')).toBe('0')
  }
  return problem
}

/** The credential of `header` with its payload changed. */
function edit(header: string, change: (payload: Record<string, unknown>) => void): string {
  const credential = Credential.deserialize(header)
  const payload = { ...credential.payload }
  change(payload)
  return Credential.serialize({ ...credential, payload })
}

/** Sends a credential alone (POST without a body: a HEAD answer would have no problem body). */
const send = (authorization: string, method = 'POST') =>
  fetch(url, { method, headers: { authorization } })

const N = secp256k1.Point.Fn.ORDER

/** The signature with byte `i` flipped. */
function flip(signature: Hex, i: number): Hex {
  const bytes = Buffer.from(signature.slice(2), 'hex')
  bytes[i] = bytes[i]! ^ 0xff
  return `0x${bytes.toString('hex')}`
}

/** Whether any public key recovers from a 65-byte r||s||v signature over `digest`. */
function recovers(signature: Hex, digest: Hex): boolean {
  const r = BigInt(signature.slice(0, 66))
  const s = BigInt(`0x${signature.slice(66, 130)}`)
  const v = Number.parseInt(signature.slice(130), 16)
  try {
    new secp256k1.Signature(r, s, v - 27).recoverPublicKey(Buffer.from(digest.slice(2), 'hex'))
    return true
  } catch {
    return false
  }
}

/**
 * A voucher of 2,000 on the session's channel, and a copy with one byte of r flipped so that
 * the signature still recovers a key (`recoverable`, someone else's) or recovers none.
 */
async function tamperedVoucher(session: PayingSession, recoverable: boolean) {
  const header = await session.voucher(2_000n)
  const signature = Credential.deserialize(header).payload.signature as Hex
  const digest = Voucher.digest({
    chainId: chain.chainId,
    escrow: chain.escrowAddress,
    channelId: session.channelId!,
    cumulativeAmount: 2_000n,
  })
  const i = Array.from({ length: 32 }, (_, i) => i).find(
    (i) => recovers(flip(signature, i), digest) === recoverable,
  )
  expect(i).toBeDefined()
  return { header, tampered: edit(header, (p) => (p.signature = flip(signature, i!))) }
}

describe('voucher signature', () => {
  test('error: a tampered signature no key recovers from → 402 invalid-signature, nothing stored', async () => {
    const session = await opened()
    const before = await stored(session.channelId!)
    // A byte of r whose flip leaves no point with that x: unrecoverable, not someone else's.
    const { header, tampered } = await tamperedVoucher(session, false)
    await rejected(await send(tampered), 402, 'session/invalid-signature')
    expect(await stored(session.channelId!)).toEqual(before)
    // The untampered voucher still goes through.
    expect((await send(header)).status).toBe(200)
    expect((await stored(session.channelId!)).acceptedCumulative).toBe(2_000n)
  }, 30_000)

  test('error: a tampered signature that recovers another key → 402 signer-mismatch, nothing stored', async () => {
    const session = await opened()
    const before = await stored(session.channelId!)
    const { tampered } = await tamperedVoucher(session, true)
    await rejected(await send(tampered), 402, 'session/signer-mismatch')
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)

  test('error: a high-s signature (s → n−s, v flipped) → 402 invalid-signature, nothing stored', async () => {
    const session = await opened()
    const before = await stored(session.channelId!)
    const header = await session.voucher(2_000n)
    const signature = Credential.deserialize(header).payload.signature as Hex
    const s = BigInt(`0x${signature.slice(66, 130)}`)
    const v = Number.parseInt(signature.slice(130), 16)
    const high =
      `${signature.slice(0, 66)}${(N - s).toString(16).padStart(64, '0')}${(v === 27 ? 28 : 27).toString(16)}` as Hex
    // The same signer under secp256k1's malleability: only canonical low-s is accepted.
    expect(
      await Voucher.recoverSigner({
        chainId: chain.chainId,
        escrow: chain.escrowAddress,
        channelId: session.channelId!,
        cumulativeAmount: 2_000n,
        signature: high,
      }),
    ).toBe(payer.address)
    const p = await rejected(
      await send(edit(header, (p) => (p.signature = high))),
      402,
      'session/invalid-signature',
    )
    expect(p.detail).toContain('high-s')
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)

  test('error: a voucher signed by someone other than the channel signer → 402 signer-mismatch, nothing stored', async () => {
    const session = await opened()
    const before = await stored(session.channelId!)
    const thief = new PayingSession({
      account: privateKeyToAccount(keccak256(toHex('thief'))),
      challenge: session.challenge,
    })
    thief.channelId = session.channelId
    await rejected(await send(await thief.voucher(50_000n)), 402, 'session/signer-mismatch')
    // Signature first, then idempotency: a stale amount from the thief is no 200 either.
    await rejected(await send(await thief.voucher(500n)), 402, 'session/signer-mismatch')
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)

  test('error: a voucher signed for another chain id or another escrow → 402 signer-mismatch, nothing stored', async () => {
    const session = await opened()
    const before = await stored(session.channelId!)
    const header = await session.voucher(2_000n)
    for (const scope of [
      { chainId: chain.chainId + 1, escrow: chain.escrowAddress },
      { chainId: chain.chainId, escrow: chain.currencyAddress },
    ]) {
      const signature = await Voucher.sign(payer, {
        ...scope,
        channelId: session.channelId!,
        cumulativeAmount: 2_000n,
      })
      // Another domain is another digest: the signature recovers some other address.
      await rejected(
        await send(edit(header, (p) => (p.signature = signature))),
        402,
        'session/signer-mismatch',
      )
    }
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)
})

describe('voucher amount', () => {
  test('behavior: a replayed voucher (same amount) → 200 with no change', async () => {
    const session = await opened()
    const header = await session.voucher(5_000n)
    expect((await send(header)).status).toBe(200)
    const before = await stored(session.channelId!)
    expect(before.acceptedCumulative).toBe(5_000n)
    const again = await send(header)
    expect(again.status).toBe(200)
    expect(again.headers.get('payment-receipt')).not.toBeNull()
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)

  test('behavior: a decreasing voucher → 200 with no change', async () => {
    const session = await opened()
    expect((await send(await session.voucher(5_000n))).status).toBe(200)
    const before = await stored(session.channelId!)
    const lower = await send(await session.voucher(3_000n))
    expect(lower.status).toBe(200)
    expect(await stored(session.channelId!)).toEqual(before)
    expect(before.acceptedCumulative).toBe(5_000n)
  }, 30_000)

  test('error: a voucher above the deposit → 402 amount-exceeds-deposit, nothing stored', async () => {
    const session = await opened(100_000n)
    const before = await stored(session.channelId!)
    const p = await rejected(
      await send(await session.voucher(100_001n)),
      402,
      'session/amount-exceeds-deposit',
    )
    expect(p).toMatchObject({ deposit: '100000', acceptedCumulative: '1000' })
    expect(await stored(session.channelId!)).toEqual(before)
    // Exactly the deposit is fine.
    expect((await send(await session.voucher(100_000n))).status).toBe(200)
  }, 30_000)

  test('error: a cumulative amount above 2^128−1 → 400 malformed-credential, nothing stored', async () => {
    const session = await opened()
    const before = await stored(session.channelId!)
    const header = edit(await session.voucher(2_000n), (p) => {
      p.cumulativeAmount = (1n << 128n).toString()
    })
    await rejected(await send(header), 400, 'malformed-credential')
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)

  test('error: a voucher raising the amount by less than minVoucherDelta → 402 delta-too-small, nothing stored', async () => {
    const session = await opened()
    const before = await stored(session.channelId!)
    const p = await rejected(
      await send(await session.voucher(1_000n + minVoucherDelta - 1n)),
      402,
      'session/delta-too-small',
    )
    expect(p).toMatchObject({ minVoucherDelta: minVoucherDelta.toString() })
    expect(await stored(session.channelId!)).toEqual(before)
    expect((await send(await session.voucher(1_000n + minVoucherDelta))).status).toBe(200)
  }, 30_000)
})

describe('close', () => {
  test('behavior: a final voucher raising the amount by less than minVoucherDelta still closes the channel', async () => {
    const session = await opened()
    // Spend some of it, so the close has something to settle.
    const spent = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.voucher(1_000n) },
      body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'a b c' }] }),
    })
    expect(spent.status).toBe(200)
    const close = await send(await session.close(1_000n + minVoucherDelta - 1n))
    expect(close.status).toBe(200)
    const channel = (await Channels.get(gw.sql, session.channelId!))!
    expect(channel.finalized).toBe(true)
    // The final voucher was recorded like any; the payee never takes more than was spent.
    expect(channel.acceptedCumulative).toBe(1_000n + minVoucherDelta - 1n)
    expect((await stored(session.channelId!)).vouchers.map((v) => v.amount)).toEqual([
      '1000',
      (1_000n + minVoucherDelta - 1n).toString(),
    ])
    expect(channel.settled).toBeLessThanOrEqual(channel.spent)
  }, 30_000)
})

describe('challenge', () => {
  test('error: an expired challenge → 402 challenge-not-found with a fresh one; the same voucher then goes through', async () => {
    const short = await Gateway.create(
      { ...overrides, payments: { ...overrides.payments, challengeExpiresSeconds: 3 } },
      { db: gw.db, upstream: gw.upstream },
    )
    const shortUrl = `${short.url}/v1/chat/completions`
    const session = new PayingSession({
      account: payer,
      challenge: await freshChallenge(shortUrl),
      tokenDomain,
    })
    const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 1_000n })
    expect(
      (await fetch(shortUrl, { method: 'HEAD', headers: { authorization: open } })).status,
    ).toBe(200)
    // Expiry is to the second: four seconds is past it (three give the open time on a busy box).
    await Bun.sleep(4_100)
    const before = await stored(session.channelId!)
    const res = await fetch(shortUrl, {
      method: 'HEAD',
      headers: { authorization: await session.voucher(7_000n) },
    })
    // HEAD has no body: ask again by POST to read the problem (same verdict, nothing stored).
    expect(res.status).toBe(402)
    const post = await fetch(shortUrl, {
      method: 'POST',
      headers: { authorization: await session.voucher(7_000n) },
    })
    await rejected(post, 402, 'session/challenge-not-found')
    expect(await stored(session.channelId!)).toEqual(before)
    expect(challengeOf(post.headers.get('www-authenticate'))!.request).toMatchObject({
      methodDetails: { channelId: session.channelId },
    })
    // Never a dropped voucher: the same voucher under the fresh challenge is accepted.
    session.renew(challengeOf(post.headers.get('www-authenticate'))!)
    const retried = await fetch(shortUrl, {
      method: 'HEAD',
      headers: { authorization: await session.voucher(7_000n) },
    })
    expect(retried.status).toBe(200)
    expect((await stored(session.channelId!)).acceptedCumulative).toBe(7_000n)
    await short.stop()
  }, 30_000)

  test('error: a forged challenge → 402 challenge-not-found with a fresh one, nothing stored', async () => {
    const session = await opened()
    const before = await stored(session.channelId!)
    session.renew({ ...session.challenge, request: { ...session.challenge.request, amount: '1' } })
    await rejected(
      await send(await session.voucher(5_000n), 'POST'),
      402,
      'session/challenge-not-found',
    )
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)
})

describe('channel', () => {
  test('error: a voucher for an unknown channel → 410 channel-not-found, nothing stored', async () => {
    const session = new PayingSession({ account: payer, challenge: await freshChallenge() })
    session.channelId = keccak256(toHex('no such channel'))
    await rejected(
      await send(await session.voucher(5_000n), 'POST'),
      410,
      'session/channel-not-found',
    )
    expect(await Channels.get(gw.sql, session.channelId)).toBeUndefined()
  }, 30_000)

  test('error: a voucher on a closed channel → 410 channel-finalized, nothing stored', async () => {
    const session = await opened()
    const close = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.close(1_000n) },
    })
    expect(close.status).toBe(200)
    const before = await stored(session.channelId!)
    expect((await Channels.get(gw.sql, session.channelId!))!.finalized).toBe(true)
    await rejected(
      await send(await session.voucher(5_000n), 'POST'),
      410,
      'session/channel-finalized',
    )
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)
})

describe('a known replay ahead of a request', () => {
  const completion = (authorization: string) =>
    fetch(url, {
      method: 'POST',
      headers: { authorization, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'one two' }] }),
    })

  test('behavior: a request carrying an accepted voucher again is served without storing it again', async () => {
    const session = await opened(100_000n, 50_000n)
    const header = await session.voucher(50_000n) // the open's amount: a replay
    const before = await stored(session.channelId!)
    const checked = Batch.stats(gw.sql).voucher?.items ?? 0
    for (let i = 0; i < 3; i++) {
      const res = await completion(header)
      expect(res.status).toBe(200)
      expect(
        ((await res.json()) as { choices: { message: { content: string } }[] }).choices[0]!.message
          .content,
      ).toBe('one two')
    }
    const after = await stored(session.channelId!)
    expect(after.vouchers).toEqual(before.vouchers)
    // Not sent to the database at all: the admission read the channel.
    expect(Batch.stats(gw.sql).voucher?.items ?? 0).toBe(checked)
    expect(after.spent!).toBeGreaterThan(before.spent!)
  }, 30_000)

  test('error: its signature is still checked: a tampered one → 402 invalid-signature or signer-mismatch, nothing served', async () => {
    const session = await opened(100_000n, 50_000n)
    const header = await session.voucher(50_000n)
    expect((await completion(header)).status).toBe(200) // known to this instance now
    const signature = Credential.deserialize(header).payload.signature as Hex
    const before = await stored(session.channelId!)
    const res = await completion(
      edit(header, (p) => {
        p.signature = flip(signature, 40)
      }),
    )
    expect(res.status).toBe(402)
    const problem = (await res.json()) as { type: string }
    expect(problem.type).toMatch(/session\/(invalid-signature|signer-mismatch)$/)
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)

  test('error: on a channel closed since → 410 channel-finalized, nothing served', async () => {
    const session = await opened(100_000n, 50_000n)
    const header = await session.voucher(50_000n)
    expect((await completion(header)).status).toBe(200)
    const spent = (await Channels.get(gw.sql, session.channelId!))!.spent
    const close = await fetch(url, {
      method: 'POST',
      headers: { authorization: await session.close(spent) },
    })
    expect(close.status).toBe(200)
    const before = await stored(session.channelId!)
    await rejected(await completion(header), 410, 'session/channel-finalized')
    expect(await stored(session.channelId!)).toEqual(before)
  }, 30_000)
})

describe('topUp', () => {
  test('error: a topUp whose EIP-3009 signature is wrong → 409 transaction-reverted, deposit unchanged', async () => {
    const session = await opened(100_000n)
    const before = await stored(session.channelId!)
    const header = edit(await session.topUp(50_000n), (p) => {
      p.signature = flip(p.signature as Hex, 40)
    })
    await rejected(await send(header), 409, 'session/transaction-reverted')
    expect(await stored(session.channelId!)).toEqual(before)
    const onChain = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: session.channelId!,
    })
    expect(onChain!.deposit).toBe(100_000n)
    // A genuine one raises the deposit, and vouchers up to it are taken.
    expect((await send(await session.topUp(50_000n))).status).toBe(200)
    expect((await send(await session.voucher(150_000n))).status).toBe(200)
    expect((await stored(session.channelId!)).deposit).toBe(150_000n)
  }, 30_000)

  test('error: a topUp of an unknown channel → 410 channel-not-found, nothing submitted', async () => {
    const session = await paying()
    session.channelId = keccak256(toHex('no such channel either'))
    const payerBefore = await payerBalance()
    await rejected(await send(await session.topUp(50_000n)), 410, 'session/channel-not-found')
    expect(await Channels.get(gw.sql, session.channelId)).toBeUndefined()
    expect(await payerBalance()).toBe(payerBefore)
  }, 30_000)
})

describe('open', () => {
  test('error: an authorization open whose EIP-3009 signature is wrong → 409 transaction-reverted, nothing stored', async () => {
    const session = await paying()
    const header = edit(
      await session.openWithAuthorization({ deposit: 100_000n, initial: 1_000n }),
      (p) => {
        p.signature = flip(p.signature as Hex, 40)
      },
    )
    const payerBefore = await payerBalance()
    await rejected(await send(header, 'POST'), 409, 'session/transaction-reverted')
    await nothingOpened(session.channelId!, payerBefore)
  }, 30_000)

  test('error: an authorization open whose voucher is not signed by the payer → 402 signer-mismatch before anything is submitted, nothing stored', async () => {
    const session = await paying()
    const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 1_000n })
    const thief = privateKeyToAccount(keccak256(toHex('thief')))
    const forged = await Voucher.sign(thief, {
      chainId: chain.chainId,
      escrow: chain.escrowAddress,
      channelId: session.channelId!,
      cumulativeAmount: 1_000n,
    })
    const payerBefore = await payerBalance()
    await rejected(
      await send(edit(open, (p) => (p.voucherSignature = forged))),
      402,
      'session/signer-mismatch',
    )
    // The gateway spent no gas and the payer's deposit stayed with the payer.
    await nothingOpened(session.channelId!, payerBefore)
    // The genuine open still works afterwards.
    expect((await send(open)).status).toBe(200)
  }, 30_000)

  test('error: an authorization open of a channel opened already some other way (its authorization never used) → 402 verification-failed, refused whole; the same open credential sent again after it opened the channel is answered 200', async () => {
    const session = await paying()
    const salt = keccak256(toHex(`opened another way ${crypto.randomUUID()}`))
    const header = await session.openWithAuthorization({ deposit: 100_000n, initial: 1_000n, salt })
    // The payer opens the same channel itself (same parameters, same id), with a deposit of
    // its own: the authorization above is never used.
    const { channelId } = await Escrow.open(chain.payerClient(0), {
      escrow: chain.escrowAddress,
      payee: chain.payee.address,
      token: chain.currencyAddress,
      deposit: 50_000n,
      salt,
    })
    expect(channelId).toBe(session.channelId!)
    const payerBefore = await payerBalance()
    await rejected(await send(header), 402, 'verification-failed')
    expect(await payerBalance()).toBe(payerBefore)
    expect(await Channels.get(gw.sql, channelId)).toBeUndefined()

    // A genuine authorization open, sent twice (its answer lost): the second is the same.
    const genuine = await paying()
    const open = await genuine.openWithAuthorization({ deposit: 100_000n, initial: 1_000n })
    expect((await send(open)).status).toBe(200)
    expect((await send(open)).status).toBe(200)
  }, 30_000)

  test('error: an authorization reused for another channel → 409 transaction-reverted, nothing stored', async () => {
    const first = await paying()
    const used = await first.openWithAuthorization({ deposit: 100_000n, initial: 1_000n })
    expect((await send(used)).status).toBe(200)
    const firstHeader = Credential.deserialize(used)
    // The authorization (and its nonce, bound to the first salt) under another salt.
    const other = await paying()
    const salt = keccak256(toHex('another salt'))
    const header = edit(
      await other.openWithAuthorization({ deposit: 100_000n, initial: 1_000n, salt }),
      (p) => {
        p.authorization = firstHeader.payload.authorization
        p.signature = firstHeader.payload.signature
      },
    )
    await rejected(await send(header, 'POST'), 409, 'session/transaction-reverted')
    expect(await Channels.get(gw.sql, other.channelId!)).toBeUndefined()
  }, 30_000)

  test('error: a top-up carrying the authorization another channel was opened with → 409 transaction-reverted, deposit unchanged', async () => {
    const first = await paying()
    const used = await first.openWithAuthorization({ deposit: 100_000n, initial: 1_000n })
    expect((await send(used)).status).toBe(200)
    const firstHeader = Credential.deserialize(used)
    const other = await paying()
    expect(
      (await send(await other.openWithAuthorization({ deposit: 50_000n, initial: 1_000n }))).status,
    ).toBe(200)
    const header = edit(await other.topUp(100_000n), (p) => {
      p.authorization = firstHeader.payload.authorization
      p.signature = firstHeader.payload.signature
    })
    await rejected(await send(header, 'POST'), 409, 'session/transaction-reverted')
    expect((await Channels.get(gw.sql, other.channelId!))!.deposit).toBe(50_000n)
  }, 30_000)

  test('error: a hash open whose transaction reverted → 409 transaction-reverted at once, nothing stored', async () => {
    const client = chain.payerClient(1)
    const channelId = keccak256(toHex('never opened'))
    // A mined transaction to our escrow with status 0x0 (withdraw of no channel reverts);
    // the gas is given so that viem sends it instead of refusing it at estimation.
    const hash = await writeContract(client, {
      account: client.account,
      chain: client.chain,
      address: chain.escrowAddress,
      abi: Escrow.abi,
      functionName: 'withdraw',
      args: [channelId],
      gas: 200_000n,
    })
    const header = await (await paying(client.account as never)).openWithHash({
      channelId,
      salt: keccak256(toHex('salt')),
      hash,
      initial: 1_000n,
    })
    await rejected(await send(header), 409, 'session/transaction-reverted')
    expect(await Channels.get(gw.sql, channelId)).toBeUndefined()
  }, 30_000)

  test('error: a hash open naming a transaction the chain has never seen is refused within seconds, not after the receipt wait (30 s)', async () => {
    const channelId = keccak256(toHex('made-up open'))
    const header = await (await paying()).openWithHash({
      channelId,
      salt: keccak256(toHex('salt')),
      hash: keccak256(toHex(`no such transaction ${Date.now()}`)),
      initial: 1_000n,
    })
    const started = Date.now()
    const res = await send(header)
    expect(Date.now() - started).toBeLessThan(20_000)
    const text = await res.text()
    expect(res.status).toBe(402)
    expect(JSON.parse(text).detail).toContain('does not know the transaction')
    expect(await Channels.get(gw.sql, channelId)).toBeUndefined()
  }, 60_000)

  test('behavior: a hash open whose transaction reaches the chain a moment after its credential is accepted', async () => {
    const client = chain.payerClient(2)
    const deposit = 10_000n
    const salt = keccak256(toHex(`late broadcast ${Date.now()}`))
    await Token.approve(client, {
      token: chain.currencyAddress,
      spender: chain.escrowAddress,
      amount: deposit,
    })
    const request = await prepareTransactionRequest(client, {
      account: client.account,
      chain: client.chain,
      to: chain.escrowAddress,
      data: encodeFunctionData({
        abi: Escrow.abi,
        functionName: 'open',
        args: [chain.payee.address, chain.currencyAddress, deposit, salt, zeroAddress],
      }),
      gas: 500_000n,
    })
    const serialized = await signTransaction(client, request as never)
    const channelId = Escrow.computeChannelId({
      payer: client.account.address,
      payee: chain.payee.address,
      token: chain.currencyAddress,
      salt,
      escrow: chain.escrowAddress,
      chainId: chain.chainId,
    })
    const header = await (await paying(client.account as never)).openWithHash({
      channelId,
      salt,
      hash: keccak256(serialized),
      initial: 1_000n,
    })
    const answer = send(header, 'HEAD')
    await Bun.sleep(1_000)
    await sendRawTransaction(client, { serializedTransaction: serialized })
    expect((await answer).status).toBe(200)
    expect((await Channels.get(gw.sql, channelId))!.deposit).toBe(deposit)
  }, 60_000)

  test('error: a hash open whose transaction is not an open of our escrow → 402 verification-failed, nothing stored', async () => {
    const client = chain.payerClient(1)
    const hash = await sendTransaction(client, {
      account: client.account,
      chain: client.chain,
      to: chain.payee.address,
      value: 1n,
    })
    const channelId = keccak256(toHex('not opened'))
    const header = await (await paying(client.account as never)).openWithHash({
      channelId,
      salt: keccak256(toHex('salt')),
      hash,
      initial: 1_000n,
    })
    await rejected(await send(header, 'POST'), 402, 'verification-failed')
    expect(await Channels.get(gw.sql, channelId)).toBeUndefined()
  }, 30_000)
})
