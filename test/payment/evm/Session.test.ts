import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import { getAddress } from 'viem'
import * as Challenge from '../../../src/payment/Challenge.ts'
import * as Credential from '../../../src/payment/Credential.ts'
import * as Session from '../../../src/payment/evm/Session.ts'
import { PaymentProblem } from '../../../src/payment/Problem.ts'

// Values from the draft-evm-session-00 examples, with elided hex filled in.
const channelId = '0x6d0f4fdf1f2f6a1f6c1b0fbd6a7d5c2c0a8d3d7b1f6a9c1b3e2d4a5b6c7d8e9f'
const salt = '0xaaaa1234bbbb5678cccc9012dddd3456eeee7890ffff1234aaaa5678bbbb9012'
const hash = '0x9f8e7d6c5b4a39281700abcdef1234567890abcdef1234567890abcdef123456'
const payer = '0xaabbccddee11223344556677889900aabbccddee'
const signer = '0x742d35cc6634c0532925a3b844bc9e7595f8fe00'
const escrow = '0x1234567890abcdef1234567890abcdef12345678'
const currency = '0x74b7F16337b8972027F6196A17a631ac6dE26d22'
const sig: Session.Hex = `0x${'ab'.repeat(64)}1b`
const sig2: Session.Hex = `0x${'cd'.repeat(64)}1c`
const nonce = `0x${'bb'.repeat(32)}`

const requestWire = {
  amount: '100',
  unitType: 'llm_token',
  suggestedDeposit: '5000000',
  currency,
  recipient: signer,
  methodDetails: {
    escrowContract: escrow,
    chainId: 196,
    minVoucherDelta: '10000',
    feePayer: true,
    credentialTypes: ['permit2', 'authorization', 'hash'],
  },
}

const eip3009 = {
  from: payer,
  to: escrow,
  value: '10000000',
  validAfter: '0',
  validBefore: '1743523500',
  nonce,
}

const payloads = {
  openHash: {
    action: 'open',
    type: 'hash',
    channelId,
    hash,
    cumulativeAmount: '0',
    signature: sig,
    authorizedSigner: signer,
    salt,
  },
  openAuthorization: {
    action: 'open',
    type: 'authorization',
    channelId,
    authorization: eip3009,
    signature: sig,
    cumulativeAmount: '0',
    voucherSignature: sig2,
    authorizedSigner: signer,
    salt,
  },
  openPermit2: {
    action: 'open',
    type: 'permit2',
    channelId,
    authorization: {
      from: payer,
      permitted: { token: currency, amount: '10000000' },
      nonce: '1',
      deadline: '1743523500',
      witness: { payee: signer, salt, authorizedSigner: signer },
    },
    signature: sig,
    cumulativeAmount: '0',
    voucherSignature: sig2,
    authorizedSigner: signer,
    salt,
  },
  topUpHash: { action: 'topUp', type: 'hash', channelId, hash, additionalDeposit: '5000000' },
  topUpAuthorization: {
    action: 'topUp',
    type: 'authorization',
    channelId,
    salt,
    authorization: { ...eip3009, value: '5000000' },
    signature: sig,
    additionalDeposit: '5000000',
  },
  topUpPermit2: {
    action: 'topUp',
    type: 'permit2',
    channelId,
    authorization: {
      from: payer,
      permitted: { token: currency, amount: '5000000' },
      nonce: '2',
      deadline: '1743523500',
      witness: { channelId },
    },
    signature: sig,
    additionalDeposit: '5000000',
  },
  voucher: { action: 'voucher', channelId, cumulativeAmount: '250000', signature: sig },
  voucherDeposit: {
    action: 'voucher',
    channelId,
    cumulativeAmount: '15000000',
    signature: sig,
    deposit: {
      action: 'topUp',
      type: 'authorization',
      salt,
      authorization: { ...eip3009, value: '5000000' },
      signature: sig2,
    },
  },
  close: { action: 'close', channelId, cumulativeAmount: '500000', signature: sig },
} as const

const challenge = Challenge.from({
  secret: 's',
  realm: 'api.llm-service.com',
  method: 'evm',
  intent: 'session',
  request: requestWire,
  expires: '2099-01-01T00:00:00Z',
})
const source = Session.source({ chainId: 196, address: payer })

function credential(payload: Record<string, unknown>, withSource = true) {
  return Credential.deserialize(
    Credential.serialize(
      Credential.from({ challenge, payload, ...(withSource ? { source } : {}) }),
    ),
  )
}

function problem(f: () => unknown, kind: string, status: number) {
  try {
    f()
  } catch (error) {
    expect(error).toBeInstanceOf(PaymentProblem)
    expect((error as PaymentProblem).kind).toBe(kind as never)
    expect((error as PaymentProblem).status).toBe(status)
    return
  }
  throw new Error(`expected ${kind}`)
}

describe('fromCredential', () => {
  test('behavior: every action and type of the draft parses, amounts as bigint', () => {
    for (const payload of Object.values(payloads)) {
      const parsed = Session.fromCredential(credential(payload))
      expect(parsed.payload.action).toBe(payload.action)
      expect(parsed.source).toEqual({ chainId: 196, address: payer })
    }
    const open = Session.fromCredential(credential(payloads.openPermit2)).payload
    expect(
      open.action === 'open' && open.type === 'permit2' && open.authorization.permitted,
    ).toEqual({
      token: currency.toLowerCase() as Session.Address,
      amount: 10000000n,
    })
    const v = Session.fromCredential(credential(payloads.voucher)).payload
    expect(v.action === 'voucher' && v.cumulativeAmount).toBe(250000n)
  })

  test('behavior: source is optional for voucher, close and authorization types', () => {
    for (const p of [payloads.voucher, payloads.close, payloads.openAuthorization])
      expect(Session.fromCredential(credential(p, false)).source).toBeUndefined()
  })

  test('behavior: uint128 max is accepted, hex is normalized to lowercase', () => {
    const max = (2n ** 128n - 1n).toString()
    const p = Session.fromCredential(
      credential({
        ...payloads.voucher,
        cumulativeAmount: max,
        channelId: channelId.toUpperCase().replace('0X', '0x'),
      }),
    ).payload
    expect(p.action === 'voucher' && p.cumulativeAmount).toBe(2n ** 128n - 1n)
    expect(p.channelId).toBe(channelId)
  })

  test('error: amounts over 2^128-1, negative, leading zeros, numbers (400 malformed)', () => {
    for (const cumulativeAmount of [(2n ** 128n).toString(), '-1', '01', '1e3', 1000, ''])
      problem(
        () => Session.fromCredential(credential({ ...payloads.voucher, cumulativeAmount })),
        'malformed-credential',
        400,
      )
  })

  test('error: bad hex lengths, compact signatures, unknown action or type', () => {
    for (const payload of [
      { ...payloads.voucher, channelId: channelId.slice(0, -2) },
      { ...payloads.voucher, signature: `0x${'ab'.repeat(64)}` },
      { ...payloads.voucher, action: 'settle' },
      { ...payloads.openHash, type: 'permit' },
      { ...payloads.openAuthorization, voucherSignature: undefined },
      { ...payloads.topUpAuthorization, salt: undefined },
    ])
      problem(() => Session.fromCredential(credential(payload)), 'malformed-credential', 400)
  })

  test('error: hash types need a did:pkh source', () => {
    problem(
      () => Session.fromCredential(credential(payloads.openHash, false)),
      'malformed-credential',
      400,
    )
    problem(
      () =>
        Session.fromCredential(
          Credential.deserialize(
            Credential.serialize(
              Credential.from({ challenge, payload: payloads.topUpHash, source: 'did:key:z6Mk' }),
            ),
          ),
        ),
      'malformed-credential',
      400,
    )
  })

  test('error: cross-field rules of the draft', () => {
    const bad = [
      { ...payloads.topUpAuthorization, additionalDeposit: '1' },
      { ...payloads.topUpPermit2, additionalDeposit: '1' },
      {
        ...payloads.topUpPermit2,
        authorization: { ...payloads.topUpPermit2.authorization, witness: { channelId: hash } },
      },
      { ...payloads.openPermit2, salt: hash },
      { ...payloads.openPermit2, authorizedSigner: undefined },
      {
        ...payloads.voucherDeposit,
        deposit: { ...payloads.voucherDeposit.deposit, salt: undefined },
      },
      {
        ...payloads.voucherDeposit,
        deposit: { ...payloads.voucherDeposit.deposit, authorizedSigner: signer },
      },
      {
        ...payloads.voucherDeposit,
        deposit: { ...payloads.voucherDeposit.deposit, action: 'open', salt: undefined },
      },
    ]
    for (const payload of bad)
      problem(() => Session.fromCredential(credential(payload)), 'malformed-credential', 400)
  })

  test('error: a credential for another method or intent', () => {
    const other = Challenge.from({ ...challenge, secret: 's', method: 'tempo' })
    problem(
      () =>
        Session.fromCredential(
          Credential.deserialize(
            Credential.serialize(Credential.from({ challenge: other, payload: payloads.voucher })),
          ),
        ),
      'method-unsupported',
      400,
    )
  })

  test('behavior: any payload yields a typed payload or a PaymentProblem (5000 runs)', () => {
    const hex = (n: number) =>
      fc
        .uint8Array({ minLength: n, maxLength: n })
        .map((b) => `0x${Buffer.from(b).toString('hex')}`)
    const field = fc.oneof(
      hex(32),
      hex(20),
      hex(65),
      fc.bigInt({ min: -1n, max: 2n ** 129n }).map(String),
      fc.jsonValue({ maxDepth: 1 }),
    )
    const mutated = fc
      .tuple(
        fc.constantFrom(...Object.values(payloads)),
        fc.dictionary(
          fc.constantFrom(
            'action',
            'type',
            'channelId',
            'cumulativeAmount',
            'signature',
            'salt',
            'authorization',
            'deposit',
            'additionalDeposit',
            'hash',
            'authorizedSigner',
            'voucherSignature',
          ),
          field,
          { maxKeys: 3 },
        ),
      )
      .map(([p, changes]) => ({ ...p, ...changes }) as Record<string, unknown>)
    fc.assert(
      fc.property(
        fc.oneof(mutated, fc.dictionary(fc.string(), fc.jsonValue())),
        fc.option(fc.oneof(fc.constant(source), fc.string()), { nil: undefined }),
        (payload, src) => {
          try {
            const c = Credential.from({ challenge, payload, source: src })
            const parsed = Session.fromCredential(Credential.deserialize(Credential.serialize(c)))
            expect(['open', 'topUp', 'voucher', 'close']).toContain(parsed.payload.action)
          } catch (error) {
            expect(error).toBeInstanceOf(PaymentProblem)
          }
        },
      ),
      { numRuns: 5000 },
    )
  }, 30_000)
})

describe('voucherOf', () => {
  test('behavior: the voucher of open (both signature fields), voucher and close; none for topUp', () => {
    const of = (p: Record<string, unknown>) =>
      Session.voucherOf(Session.fromCredential(credential(p)).payload)
    expect(of(payloads.openHash)).toEqual({ channelId, cumulativeAmount: 0n, signature: sig })
    expect(of(payloads.openAuthorization)?.signature).toBe(sig2)
    expect(of(payloads.openPermit2)?.signature).toBe(sig2)
    expect(of(payloads.voucherDeposit)).toEqual({
      channelId,
      cumulativeAmount: 15000000n,
      signature: sig,
    })
    expect(of(payloads.close)?.cumulativeAmount).toBe(500000n)
    expect(of(payloads.topUpHash)).toBeUndefined()
  })
})

describe('check', () => {
  const req = Session.requestOf(challenge)

  test('behavior: the draft examples agree with the request', () => {
    for (const payload of Object.values(payloads))
      Session.check(Session.fromCredential(credential(payload)), req)
  })

  test('error: a type the challenge does not offer, wrong escrow, token, payee or chain', () => {
    const hashOnly = Session.requestOf(
      Challenge.from({
        ...challenge,
        secret: 's',
        request: { ...requestWire, methodDetails: { escrowContract: escrow, chainId: 196 } },
      }),
    )
    problem(
      () => Session.check(Session.fromCredential(credential(payloads.openAuthorization)), hashOnly),
      'verification-failed',
      402,
    )
    const wrong = [
      { ...payloads.openAuthorization, authorization: { ...eip3009, to: payer } },
      {
        ...payloads.openPermit2,
        authorization: {
          ...payloads.openPermit2.authorization,
          permitted: { token: payer, amount: '1' },
        },
      },
      {
        ...payloads.openPermit2,
        authorization: {
          ...payloads.openPermit2.authorization,
          witness: { ...payloads.openPermit2.authorization.witness, payee: payer },
        },
      },
    ]
    for (const payload of wrong)
      problem(
        () => Session.check(Session.fromCredential(credential(payload)), req),
        'verification-failed',
        402,
      )
    const elsewhere = Credential.deserialize(
      Credential.serialize(
        Credential.from({
          challenge,
          payload: payloads.openHash,
          source: Session.source({ chainId: 1, address: payer }),
        }),
      ),
    )
    problem(() => Session.check(Session.fromCredential(elsewhere), req), 'verification-failed', 402)
  })
})

describe('request', () => {
  test('behavior: typed request → wire object → typed request', () => {
    const typed = Session.Request.parse(requestWire)
    expect(typed.amount).toBe(100n)
    expect(typed.methodDetails.minVoucherDelta).toBe(10000n)
    expect(Session.Request.parse(Session.request(typed))).toEqual(typed)
    expect(Session.request(typed).amount).toBe('100')
    // Addresses go out EIP-55 checksummed and still parse to the same lowercase value.
    expect(Session.request(typed).currency).toBe(getAddress(currency))
    expect(Session.request(typed).recipient).toBe(getAddress(signer))
  })

  test('behavior: unknown credential types are dropped, not fatal', () => {
    const typed = Session.Request.parse({
      ...requestWire,
      methodDetails: { ...requestWire.methodDetails, credentialTypes: ['future', 'hash'] },
    })
    expect(typed.methodDetails.credentialTypes).toEqual(['hash'])
  })

  test('behavior: tokenDomain (tollway extension) round-trips; a malformed one is dropped, not fatal', () => {
    const tokenDomain = { name: 'TestUSD', version: '1' }
    const typed = Session.Request.parse({
      ...requestWire,
      methodDetails: { ...requestWire.methodDetails, tokenDomain },
    })
    expect(typed.methodDetails.tokenDomain).toEqual(tokenDomain)
    expect(Session.request(typed).methodDetails).toMatchObject({ tokenDomain })
    for (const bad of [{ name: 1, version: '1' }, 'TestUSD', null, { name: 'x' }]) {
      const t = Session.Request.parse({
        ...requestWire,
        methodDetails: { ...requestWire.methodDetails, tokenDomain: bad },
      })
      expect(t.methodDetails.tokenDomain).toBeUndefined()
      expect(t.methodDetails.chainId).toBe(196)
    }
  })
})

describe('receipt', () => {
  test('behavior: the draft per-request receipt; reference is the channelId', () => {
    const r = Session.receipt({
      challengeId: 'kM9xPqWvT2nJrHsY4aDfEb',
      channelId,
      acceptedCumulative: 250000n,
      spent: 237500n,
      chainId: 196,
      units: 500,
      timestamp: new Date('2026-04-01T12:08:30.123Z'),
    })
    expect(r).toEqual({
      method: 'evm',
      intent: 'session',
      status: 'success',
      timestamp: '2026-04-01T12:08:30Z',
      challengeId: 'kM9xPqWvT2nJrHsY4aDfEb',
      reference: channelId,
      channelId,
      chainId: 196,
      acceptedCumulative: 250000n,
      spent: 237500n,
      units: 500,
    })
    expect(Session.Receipt.parse(Credential.toWire(r))).toEqual(r)
  })
})
