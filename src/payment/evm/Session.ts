/**
 * The `evm` method's `session` intent (draft-evm-session-00): the challenge `request`, the
 * credential `payload` of each action, the receipt, and the payer `source`. Schemas parse the wire
 * (decimal strings, hex) into tollway's types (bigint money, lowercase hex); builders go back.
 * A second method (tempo) is one more module beside this one.
 *
 * Decisions where the draft leaves room:
 * - Hex (addresses, bytes32, signatures) is accepted in any case and normalized to lowercase, so
 *   addresses compare by value as the draft requires ("MUST be compared by decoded 20-byte value").
 *   EIP-55 checksums are not checked: the draft makes them a display SHOULD.
 * - Signatures must be 65 bytes. Compact 64-byte (EIP-2098) ones are refused (the draft: MAY accept).
 * - Decimal strings are canonical: no sign, no leading zeros, no exponent.
 * - Deposit-like amounts (cumulativeAmount, additionalDeposit, EIP-3009 `value`, Permit2
 *   `permitted.amount`, request amounts) are bounded by 2^128−1 (the escrow's uint128); EIP-3009
 *   `validAfter`/`validBefore` and Permit2 `nonce`/`deadline` by 2^256−1 (uint256).
 * - Cross-field rules the draft states for a payload alone are checked here (topUp
 *   `additionalDeposit` equals the authorization amount; a Permit2 witness equals the payload's
 *   channelId / salt / authorizedSigner; `deposit.salt` presence). Rules that need the challenge
 *   request (payee, escrow, token, credentialTypes) are in `check`.
 * - `deposit.authorizedSigner` on a `topUp` deposit is refused (the draft: only for `open`).
 * - A malformed payload is the `malformed-credential` problem with status 400 (this draft's
 *   "Error Responses": 400 for a malformed payload or missing fields).
 */
import { getAddress } from 'viem'
import { z } from 'zod'
import * as Challenge from '../Challenge.ts'
import type * as Credential from '../Credential.ts'
import * as Encoding from '../Encoding.ts'
import * as Problem from '../Problem.ts'

export const method = 'evm'
export const intent = 'session'

export const maxUint128 = (1n << 128n) - 1n
export const maxUint256 = (1n << 256n) - 1n
export const zeroAddress = '0x0000000000000000000000000000000000000000'

/**
 * Voucher submissions a server SHOULD accept per second per session ("Denial of Service"). Not
 * enforced here (this layer is pure); the route's limiter uses it.
 */
export const maxVouchersPerSecond = 10

export type Address = `0x${string}`
export type Hex = `0x${string}`

const lower = <T extends string>(s: string) => s.toLowerCase() as T

/** A 20-byte address, normalized to lowercase. */
export const Address = z
  .string()
  .regex(/^0x[0-9a-fA-F]{40}$/, 'must be a 0x-prefixed 20-byte address')
  .transform(lower<Address>)
/** 32 bytes as 0x-hex (channelId, hash, salt, EIP-3009 nonce), normalized to lowercase. */
export const Bytes32 = z
  .string()
  .regex(/^0x[0-9a-fA-F]{64}$/, 'must be 0x-prefixed 32-byte hex')
  .transform(lower<Hex>)
/** A 65-byte r||s||v signature, normalized to lowercase. */
export const Signature = z
  .string()
  .regex(/^0x[0-9a-fA-F]{130}$/, 'must be a 0x-prefixed 65-byte signature')
  .transform(lower<Hex>)

function decimal(max: bigint, name: string) {
  const digits = max.toString().length
  return z
    .string()
    .regex(new RegExp(`^(0|[1-9][0-9]{0,${digits - 1}})$`), `must be a decimal ${name} string`)
    .transform((s) => BigInt(s))
    .refine((n) => n <= max, `must be at most 2^${name === 'uint128' ? 128 : 256}-1`)
}
/** A decimal string of a uint128 (amounts), as bigint. */
export const Uint128 = decimal(maxUint128, 'uint128')
/** A decimal string of a uint256 (timestamps, Permit2 nonces), as bigint. */
export const Uint256 = decimal(maxUint256, 'uint256')
/** chainId: a JSON number (the draft's encoding), a positive safe integer. */
export const ChainId = z.number().int().positive().max(Number.MAX_SAFE_INTEGER)

export const CredentialType = z.enum(['permit2', 'authorization', 'hash'])
export type CredentialType = z.output<typeof CredentialType>

/** The `methodDetails.tokenDomain` extension: the currency's EIP-712 domain name and version. */
export const TokenDomain = z.object({
  name: z.string().max(256),
  version: z.string().max(256),
})
export type TokenDomain = z.output<typeof TokenDomain>

/** The challenge `request` of evm/session ("Request Schema"). Unknown members are dropped. */
export const Request = z.object({
  amount: Uint128,
  unitType: z.string().optional(),
  suggestedDeposit: Uint128.optional(),
  currency: Address,
  recipient: Address,
  description: z.string().optional(),
  externalId: z.string().optional(),
  methodDetails: z.object({
    chainId: ChainId,
    escrowContract: Address,
    channelId: Bytes32.optional(),
    minVoucherDelta: Uint128.optional(),
    feePayer: z.boolean().optional(),
    // Unknown future types are kept out rather than failing the whole request.
    credentialTypes: z
      .array(z.string())
      .transform((types) =>
        types.filter((t): t is CredentialType => CredentialType.safeParse(t).success),
      )
      .optional(),
    permit2Contract: Address.optional(),
    /**
     * tollway's extension (the draft has no field for it): the `currency` token's EIP-712
     * domain name and version, the rest of that domain being `chainId` and `currency`. With it a
     * payer signs the EIP-3009 `authorization` of a `feePayer` open without reading the chain.
     * A malformed one is dropped, as other clients ignore it.
     */
    tokenDomain: TokenDomain.optional().catch(undefined),
  }),
})
export type Request = z.output<typeof Request>
/**
 * The wire `request` object of a typed request, for `Challenge.from`: amounts as decimal strings,
 * request addresses EIP-55 checksummed (the draft's display SHOULD), channelId lowercase.
 */
export function request(input: Request): Record<string, unknown> {
  const details = input.methodDetails
  return Encoding.toWire({
    ...input,
    currency: getAddress(input.currency),
    recipient: getAddress(input.recipient),
    methodDetails: {
      ...details,
      escrowContract: getAddress(details.escrowContract),
      permit2Contract: details.permit2Contract && getAddress(details.permit2Contract),
    },
  }) as Record<string, unknown>
}

/** EIP-3009 authorization (`type="authorization"`). */
export const Eip3009 = z.object({
  from: Address,
  to: Address,
  value: Uint128,
  validAfter: Uint256,
  validBefore: Uint256,
  nonce: Bytes32,
})
export type Eip3009 = z.output<typeof Eip3009>

const TokenPermissions = z.object({ token: Address, amount: Uint128 })
const permit2 = <W extends z.ZodType>(witness: W) =>
  z.object({
    from: Address,
    permitted: TokenPermissions,
    nonce: Uint256,
    deadline: Uint256,
    witness,
  })
/** Permit2 authorization for `open`: witness `ChannelOpenWitness(payee, salt, authorizedSigner)`. */
export const Permit2Open = permit2(
  z.object({ payee: Address, salt: Bytes32, authorizedSigner: Address }),
)
export type Permit2Open = z.output<typeof Permit2Open>
/** Permit2 authorization for `topUp`: witness `ChannelTopUpWitness(channelId)`. */
export const Permit2TopUp = permit2(z.object({ channelId: Bytes32 }))
export type Permit2TopUp = z.output<typeof Permit2TopUp>

const openCommon = {
  action: z.literal('open'),
  channelId: Bytes32,
  cumulativeAmount: Uint128,
  authorizedSigner: Address.optional(),
  salt: Bytes32,
}

/** open, client-broadcast (`feePayer: false`): the tx hash of `open()`. */
export const OpenHash = z.object({
  ...openCommon,
  type: z.literal('hash'),
  hash: Bytes32,
  signature: Signature,
})
/** open, server-submitted via EIP-3009 (`openWithAuthorization`). */
export const OpenAuthorization = z.object({
  ...openCommon,
  type: z.literal('authorization'),
  authorization: Eip3009,
  signature: Signature,
  voucherSignature: Signature,
})
/** open, server-submitted via Permit2 (`openWithPermit2`). */
export const OpenPermit2 = z.object({
  ...openCommon,
  type: z.literal('permit2'),
  authorization: Permit2Open,
  signature: Signature,
  voucherSignature: Signature,
})

/** topUp, client-broadcast: the tx hash of `topUp()`. */
export const TopUpHash = z.object({
  action: z.literal('topUp'),
  type: z.literal('hash'),
  channelId: Bytes32,
  hash: Bytes32,
  additionalDeposit: Uint128,
})
/** topUp via EIP-3009 (`topUpWithAuthorization`); `salt` is the `topUpSalt`. */
export const TopUpAuthorization = z.object({
  action: z.literal('topUp'),
  type: z.literal('authorization'),
  channelId: Bytes32,
  salt: Bytes32,
  authorization: Eip3009,
  signature: Signature,
  additionalDeposit: Uint128,
})
/** topUp via Permit2 (`topUpWithPermit2`); no salt. */
export const TopUpPermit2 = z.object({
  action: z.literal('topUp'),
  type: z.literal('permit2'),
  channelId: Bytes32,
  authorization: Permit2TopUp,
  signature: Signature,
  additionalDeposit: Uint128,
})

/** The optional deposit merged into a voucher (`open` or `topUp`, authorization or permit2). */
export const Deposit = z.discriminatedUnion('type', [
  z.object({
    action: z.enum(['open', 'topUp']),
    type: z.literal('authorization'),
    authorization: Eip3009,
    signature: Signature,
    salt: Bytes32.optional(),
    authorizedSigner: Address.optional(),
  }),
  z.object({
    action: z.enum(['open', 'topUp']),
    type: z.literal('permit2'),
    authorization: z.union([Permit2Open, Permit2TopUp]),
    signature: Signature,
    salt: Bytes32.optional(),
    authorizedSigner: Address.optional(),
  }),
])
export type Deposit = z.output<typeof Deposit>

/** voucher: a new cumulative voucher, optionally with a deposit. */
export const Voucher = z.object({
  action: z.literal('voucher'),
  channelId: Bytes32,
  cumulativeAmount: Uint128,
  signature: Signature,
  deposit: Deposit.optional(),
})
/** close: the final voucher; the server calls `close`. */
export const Close = z.object({
  action: z.literal('close'),
  channelId: Bytes32,
  cumulativeAmount: Uint128,
  signature: Signature,
})

/** Every evm/session payload, by `action` then `type`, with the draft's cross-field rules. */
export const Payload = z
  .discriminatedUnion('action', [
    z.discriminatedUnion('type', [OpenHash, OpenAuthorization, OpenPermit2]),
    z.discriminatedUnion('type', [TopUpHash, TopUpAuthorization, TopUpPermit2]),
    Voucher,
    Close,
  ])
  .superRefine((p, ctx) => {
    const issue = (message: string, path: (string | number)[]) =>
      ctx.addIssue({ code: 'custom', message, path })
    if (p.action === 'open' && p.type === 'permit2') {
      const w = p.authorization.witness
      if (w.salt !== p.salt) issue('must equal salt', ['authorization', 'witness', 'salt'])
      if (w.authorizedSigner !== (p.authorizedSigner ?? zeroAddress))
        issue('must equal authorizedSigner (zero when omitted)', [
          'authorization',
          'witness',
          'authorizedSigner',
        ])
    }
    if (
      p.action === 'topUp' &&
      p.type === 'authorization' &&
      p.additionalDeposit !== p.authorization.value
    )
      issue('must equal authorization.value', ['additionalDeposit'])
    if (p.action === 'topUp' && p.type === 'permit2') {
      if (p.additionalDeposit !== p.authorization.permitted.amount)
        issue('must equal authorization.permitted.amount', ['additionalDeposit'])
      if (p.authorization.witness.channelId !== p.channelId)
        issue('must equal channelId', ['authorization', 'witness', 'channelId'])
    }
    if (p.action === 'voucher' && p.deposit) {
      const d = p.deposit
      const at = (...path: string[]) => ['deposit', ...path]
      if (d.action === 'open' && d.salt === undefined) issue('is required to open', at('salt'))
      if (d.action === 'topUp' && d.type === 'authorization' && d.salt === undefined)
        issue('is required for an EIP-3009 topUp', at('salt'))
      if (d.action === 'topUp' && d.authorizedSigner !== undefined)
        issue('applies only to open', at('authorizedSigner'))
      if (d.type === 'permit2') {
        const w = d.authorization.witness
        if (d.action === 'open') {
          if (!('payee' in w)) issue('must be a ChannelOpenWitness', at('authorization', 'witness'))
          else {
            if (w.salt !== d.salt)
              issue('must equal deposit.salt', at('authorization', 'witness', 'salt'))
            if (w.authorizedSigner !== (d.authorizedSigner ?? zeroAddress))
              issue(
                'must equal deposit.authorizedSigner (zero when omitted)',
                at('authorization', 'witness', 'authorizedSigner'),
              )
          }
        } else if (!('channelId' in w) || w.channelId !== p.channelId)
          issue('must be a ChannelTopUpWitness of channelId', at('authorization', 'witness'))
      }
    }
  })
export type Payload = z.output<typeof Payload>
export type Open = Extract<Payload, { action: 'open' }>
export type TopUp = Extract<Payload, { action: 'topUp' }>
export type VoucherPayload = Extract<Payload, { action: 'voucher' }>
export type ClosePayload = Extract<Payload, { action: 'close' }>

/**
 * The voucher a payload carries, for `chain/Voucher.createVerifier`: open (the initial voucher;
 * `voucherSignature` for server-submitted opens), voucher and close. topUp carries none.
 */
export function voucherOf(
  payload: Payload,
): { channelId: Hex; cumulativeAmount: bigint; signature: Hex } | undefined {
  switch (payload.action) {
    case 'open':
      return {
        channelId: payload.channelId,
        cumulativeAmount: payload.cumulativeAmount,
        signature: payload.type === 'hash' ? payload.signature : payload.voucherSignature,
      }
    case 'voucher':
    case 'close':
      return {
        channelId: payload.channelId,
        cumulativeAmount: payload.cumulativeAmount,
        signature: payload.signature,
      }
    case 'topUp':
      return undefined
  }
}

/** `did:pkh:eip155:<chainId>:<address>` (the draft's RECOMMENDED `source`). */
export const Source = z
  .string()
  .regex(
    /^did:pkh:eip155:([1-9][0-9]{0,15}):(0x[0-9a-fA-F]{40})$/,
    'must be did:pkh:eip155:<chainId>:<address>',
  )
  .transform((s) => {
    const [, , , chainId, address] = s.split(':')
    return { chainId: Number(chainId), address: address!.toLowerCase() as Address }
  })
export type Source = z.output<typeof Source>

/** The `source` DID of a payer on a chain. */
export function source(parameters: { chainId: number; address: Address }): string {
  return `did:pkh:eip155:${parameters.chainId}:${parameters.address.toLowerCase()}`
}

/** A parsed evm/session credential: the envelope, its typed payload and the payer from `source`. */
export type Parsed = {
  credential: Credential.Credential
  payload: Payload
  source: Source | undefined
}

/**
 * Types an evm/session credential's payload. Throws the `malformed-credential` problem (status 400,
 * this draft's status for a malformed payload) when the payload or the `source` rule is violated:
 * `source` is REQUIRED for `type="hash"`.
 */
export function fromCredential(credential: Credential.Credential): Parsed {
  if (credential.challenge.method !== method || credential.challenge.intent !== intent)
    throw Problem.methodUnsupported(
      `This credential is for ${credential.challenge.method}/${credential.challenge.intent}, not evm/session.`,
    )
  const parsed = Payload.safeParse(credential.payload)
  if (!parsed.success) {
    const issue = parsed.error.issues[0]
    throw malformed(`Invalid evm session payload: ${issue?.path.join('.')}: ${issue?.message}`)
  }
  const payload = parsed.data
  let payer: Source | undefined
  if (credential.source !== undefined) {
    const s = Source.safeParse(credential.source)
    // Only hash credentials rely on source; elsewhere a non-did:pkh source is tolerated, unused.
    if (s.success) payer = s.data
    else if ('type' in payload && payload.type === 'hash')
      throw malformed('source must be did:pkh:eip155:<chainId>:<address> for a hash credential.')
  }
  if ('type' in payload && payload.type === 'hash' && payer === undefined)
    throw malformed('source (did:pkh) is required when payload.type is "hash".')
  return { credential, payload, source: payer }
}

/** The actions of this draft. */
export const actions: readonly string[] = ['open', 'topUp', 'voucher', 'close']

/**
 * The draft's "Common Verification" step 2, before the challenge is looked up (steps 3-5):
 * `payload.action` is one this draft defines; else `malformed-credential` (400).
 */
export function recognize(payload: unknown): void {
  const action = (payload as { action?: unknown } | null)?.action
  if (typeof action !== 'string' || !actions.includes(action))
    throw malformed(`payload.action must be one of ${actions.join(', ')}.`)
}

function malformed(detail: string): Problem.PaymentProblem {
  return Problem.malformedCredential(detail, {}, { status: 400 })
}

/** Types the `request` of an evm/session challenge; throws `malformed-credential` (400) if invalid. */
export function requestOf(challenge: Challenge.Challenge): Request {
  const parsed = Request.safeParse(challenge.request)
  if (!parsed.success) {
    const issue = parsed.error.issues[0]
    throw malformed(`Invalid evm session request: ${issue?.path.join('.')}: ${issue?.message}`)
  }
  return parsed.data
}

/**
 * The rules that tie a payload to the challenge's request: the credential type is one the server
 * offered (`credentialTypes`, default `["hash"]`), the payee is `recipient`, the EIP-3009 `to` is
 * the escrow, the Permit2 token is `currency`, and the chain of a did:pkh `source` matches.
 * Throws `verification-failed` (402) naming the first mismatch.
 */
export function check(parsed: Parsed, req: Request): void {
  const { payload } = parsed
  const allowed = req.methodDetails.credentialTypes ?? ['hash']
  const type =
    'type' in payload
      ? payload.type
      : payload.action === 'voucher'
        ? payload.deposit?.type
        : undefined
  if (type !== undefined && !allowed.includes(type))
    throw fail(`This challenge accepts credential types ${allowed.join(', ')}, not ${type}.`)
  if (parsed.source && parsed.source.chainId !== req.methodDetails.chainId)
    throw fail('source names a different chain than the challenge.')
  const auth =
    'authorization' in payload
      ? { action: payload.action, authorization: payload.authorization }
      : payload.action === 'voucher' && payload.deposit
        ? { action: payload.deposit.action, authorization: payload.deposit.authorization }
        : undefined
  if (!auth) return
  const a = auth.authorization
  if ('to' in a && a.to !== req.methodDetails.escrowContract)
    throw fail('authorization.to must be the escrow contract.')
  if ('permitted' in a) {
    if (a.permitted.token !== req.currency)
      throw fail('authorization.permitted.token must be the request currency.')
    if ('payee' in a.witness && a.witness.payee !== req.recipient)
      throw fail('authorization.witness.payee must be the request recipient.')
  }
}

function fail(detail: string): Problem.PaymentProblem {
  return Problem.verificationFailed(detail)
}

/** The evm/session receipt ("Receipt Generation"). */
export const Receipt = z.object({
  method: z.literal(method),
  intent: z.literal(intent),
  status: z.literal('success'),
  timestamp: Challenge.DateTime,
  reference: Bytes32,
  challengeId: z.string().min(1),
  channelId: Bytes32,
  acceptedCumulative: Uint128,
  spent: Uint128,
  chainId: ChainId,
  units: z.number().int().nonnegative().optional(),
  txHash: Bytes32.optional(),
  confirmations: z.number().int().nonnegative().optional(),
})
export type Receipt = z.output<typeof Receipt>

/**
 * A receipt from the session's state; `reference` is the channelId (the draft: MUST equal it) and
 * `timestamp` defaults to now, to the second.
 */
export function receipt(parameters: {
  challengeId: string
  channelId: Hex
  acceptedCumulative: bigint
  spent: bigint
  chainId: number
  units?: number | undefined
  txHash?: Hex | undefined
  confirmations?: number | undefined
  timestamp?: Date | undefined
}): Receipt {
  const { timestamp, ...rest } = parameters
  return {
    method,
    intent,
    status: 'success',
    timestamp: Challenge.timestamp(timestamp ?? new Date()),
    reference: parameters.channelId,
    ...rest,
  }
}
