/**
 * Property test of what a server controls in the paying client: after an honest challenge, any
 * answers (any status, WWW-Authenticate, Payment-Receipt, problem body, stream of events with
 * payment-need-voucher and payment-receipt of any data). The paying fetch, and reading the
 * body it hands back, end in a Response or a ClientError, never anything untyped; and whatever
 * the server asks, nothing is signed past the client's limits. The server is a real HTTP server
 * of the test, speaking MPP as the drafts state it (not tollway); no chain is needed (the server
 * pays the gas and states its token's domain).
 */
import { afterAll, expect, test } from 'bun:test'
import fc from 'fast-check'
import { ClientError } from '../../src/client/index.ts'
import * as Challenge from '../../src/payment/Challenge.ts'
import * as Encoding from '../../src/payment/Encoding.ts'
import * as ScriptedPayments from '../helpers/ScriptedPayments.ts'

const limits = { maxDeposit: 1_000_000n, maxTotal: 3_000_000n }

const challenge = () => ScriptedPayments.feePaid({ tokenDomain: { name: 'TestUSD', version: '1' } })

type Answer = {
  status: number
  type: string | undefined
  challenge: 'fresh' | 'none' | string
  receipt: string | undefined
  retryAfter: string | undefined
  body: string | Uint8Array
}

/** What the server answers the credentials it gets, in turn; then 200 `{}`. */
let script: Answer[] = []
/** Every credential payload the server got. */
let got: Record<string, unknown>[] = []
const server = ScriptedPayments.serve(challenge, (payload, req) => {
  got.push(payload)
  const a = script.shift()
  if (!a) return Response.json({})
  const headers: Record<string, string> = {}
  if (a.type) headers['content-type'] = a.type
  if (a.challenge === 'fresh') headers['www-authenticate'] = Challenge.serialize(challenge())
  else if (a.challenge !== 'none') headers['www-authenticate'] = a.challenge
  if (a.receipt !== undefined) headers['payment-receipt'] = a.receipt
  if (a.retryAfter !== undefined || a.status === 429) headers['retry-after'] = a.retryAfter ?? '0'
  const empty = a.status === 204 || a.status === 304 || req.method === 'HEAD'
  // CHANNEL stands for the channel the client opened (its first credential names it).
  const body =
    typeof a.body === 'string' ? a.body.replaceAll('CHANNEL', String(got[0]?.channelId)) : a.body
  return new Response(empty ? null : body, { status: a.status, headers })
})
afterAll(() => server.stop(true))
const url = `http://127.0.0.1:${server.port}/v1/chat/completions`

const printable = (max: number) =>
  fc.string({ unit: 'binary-ascii', maxLength: max }).filter((s) => /^[\x20-\x7e]*$/.test(s))
const weird = fc.oneof(
  fc.jsonValue({ maxDepth: 1 }),
  fc.constantFrom(null, -1, '-1', '1e3', '', 'toString', `0x${'ab'.repeat(32)}`),
)
const amount = fc.oneof(
  fc.bigInt({ min: 0n, max: 10n ** 7n }).map(String),
  fc.constantFrom(`${(1n << 128n) - 1n}`, '0', '999999999999999999999999999999'),
  weird,
)
const channelId = fc.oneof(
  fc.constant('CHANNEL'),
  fc.constant('CHANNEL'),
  fc.constant(`0x${'cd'.repeat(32)}`),
  weird,
)
const receiptObject = fc.record(
  {
    method: fc.oneof(fc.constant('evm'), weird),
    intent: fc.oneof(fc.constant('session'), weird),
    status: fc.oneof(fc.constant('success'), weird),
    timestamp: fc.oneof(fc.constant(Challenge.timestamp(new Date())), weird),
    reference: channelId,
    channelId,
    acceptedCumulative: amount,
    spent: amount,
    chainId: fc.oneof(fc.constant(31337), weird),
  },
  { requiredKeys: [] },
)
const receiptHeader = fc.oneof(
  receiptObject.map((r) => Encoding.encodeJson(r)),
  printable(40),
)
const needVoucher = fc.record(
  {
    channelId,
    requiredCumulative: amount,
    acceptedCumulative: amount,
    deposit: amount,
  },
  { requiredKeys: [] },
)
const event = fc.oneof(
  needVoucher.map((d) => `event: payment-need-voucher\ndata: ${JSON.stringify(d)}\n\n`),
  receiptObject.map((d) => `event: payment-receipt\ndata: ${JSON.stringify(d)}\n\n`),
  fc
    .constantFrom('payment-need-voucher', 'payment-receipt')
    .chain((name) => printable(30).map((s) => `event: ${name}\ndata: ${s}\n\n`)),
  fc.constantFrom(
    'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n',
    'data: [DONE]\n\n',
    ': keep-alive\n\n',
    'data: {"error":{"message":"upstream failed","type":"upstream_error"}}\n\n',
  ),
)
const problem = fc.record(
  {
    type: fc.oneof(
      fc
        .constantFrom(
          'payment-required',
          'payment-insufficient',
          'verification-failed',
          'malformed-credential',
          'session/insufficient-balance',
          'session/channel-not-found',
          'session/channel-finalized',
          'session/challenge-not-found',
          'session/amount-exceeds-deposit',
          'session/delta-too-small',
        )
        .map((k) => `https://paymentauth.org/problems/${k}`),
      weird,
    ),
    title: weird,
    status: fc.oneof(fc.constantFrom(402, 410, 400), weird),
    detail: weird,
    channelId,
    requiredCumulative: amount,
    acceptedCumulative: amount,
    deposit: amount,
  },
  { requiredKeys: [] },
)
const answer: fc.Arbitrary<Answer> = fc.record({
  status: fc.constantFrom(
    200,
    200,
    200,
    204,
    400,
    401,
    402,
    402,
    402,
    404,
    409,
    410,
    429,
    500,
    503,
  ),
  type: fc.constantFrom(
    'application/json',
    'application/problem+json',
    'text/event-stream',
    'text/plain',
    undefined,
  ),
  challenge: fc.oneof(fc.constantFrom('fresh', 'none'), printable(60)),
  receipt: fc.option(receiptHeader, { nil: undefined }),
  // A 429 is retried after its Retry-After (a second when unreadable): 0, to keep runs fast.
  retryAfter: fc.option(fc.constantFrom('0', ''), { nil: undefined }),
  body: fc.oneof(
    problem.map((p) => JSON.stringify(p)),
    fc.array(event, { maxLength: 5 }).map((e) => e.join('')),
    fc.jsonValue({ maxDepth: 2 }).map((v) => JSON.stringify(v)),
    fc.uint8Array({ maxLength: 60 }),
  ),
})

/** What a credential payload signs or deposits. */
const signed = (p: Record<string, unknown>) => BigInt((p.cumulativeAmount as string) ?? 0)
const deposited = (p: Record<string, unknown>) =>
  BigInt(
    ((p.authorization as { value?: string } | undefined)?.value as string) ??
      (p.additionalDeposit as string) ??
      0,
  )

test('property: any server answers after an honest challenge end in a Response or a ClientError, and nothing is signed past the limits', async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(answer, { minLength: 1, maxLength: 4 }),
      fc.boolean(),
      async (answers, stream) => {
        script = [...answers]
        got = []
        const f = ScriptedPayments.payer({ limits })
        try {
          const res = await ScriptedPayments.chat(f, url, stream)
          await res.text()
        } catch (e) {
          if (!(e instanceof ClientError))
            console.log('UNTYPED', e, JSON.stringify(answers).slice(0, 2000))
          expect(e).toBeInstanceOf(ClientError)
        }
        for (const p of got) {
          expect(signed(p)).toBeLessThanOrEqual(limits.maxTotal)
          expect(deposited(p)).toBeLessThanOrEqual(limits.maxDeposit)
        }
      },
    ),
    { numRuns: 200, seed: 20261125 },
  )
}, 60_000)
