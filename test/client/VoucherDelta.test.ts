/**
 * A server's minVoucherDelta (the evm draft: a voucher must raise the cumulative amount by at
 * least it, else delta-too-small): the paying fetch raises by at least that much, or sends
 * what it signed again, and the channel keeps paying.
 */
import { afterAll, expect, test } from 'bun:test'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'
import * as Payer from '../helpers/Payer.ts'

const chain = await Anvil.start({ accounts: 2 }) // the payee and one payer
afterAll(() => chain.stop())
const delta = 10_000n // the draft's example
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: {
    challengeSecret: 'test-challenge-secret-0123456789',
    minVoucherDelta: delta.toString(),
  },
})

test('behavior: requests after the first raise the voucher by at least minVoucherDelta, or send the last again; every one is served', async () => {
  const { fetch, openai } = Payer.client(chain, gw.url, 0, {
    margin: 10_000n,
    limits: { maxDeposit: 5_000_000n, maxTotal: 5_000_000n },
  })
  const accepted: bigint[] = []
  for (let i = 0; i < 4; i++) {
    const r = await openai.chat.completions.create({
      model: 'fake',
      messages: [{ role: 'user', content: `hello ${i}` }],
    })
    expect(r.choices[0]!.message.content).toBe(`hello ${i}`)
    const channel = await fetch.channel(gw.url)
    const view = (await (
      await globalThis.fetch(`${gw.url}/v1/channels/${channel!.channelId}`)
    ).json()) as {
      acceptedCumulative: string
    }
    accepted.push(BigInt(view.acceptedCumulative))
  }
  // The second request's voucher (the first's margin spent a little) is a raise: by delta.
  expect(accepted[1]! - accepted[0]!).toBe(delta)
  for (let i = 1; i < accepted.length; i++) {
    const raise = accepted[i]! - accepted[i - 1]!
    expect(raise === 0n || raise >= delta).toBe(true)
  }
}, 30_000)
