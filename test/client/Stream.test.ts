import { describe, expect, test } from 'bun:test'
import { createParser, type EventSourceMessage } from 'eventsource-parser'
import fc from 'fast-check'
import { ClientError, PaymentFailedError } from '../../src/client/Errors.ts'
import * as Stream from '../../src/client/Stream.ts'
import * as Events from '../../src/payment/Events.ts'
import { cutAt } from '../helpers/Cut.ts'

const channelId = `0x${'ab'.repeat(32)}` as const
const need = Events.needVoucher({
  channelId,
  requiredCumulative: 10n,
  acceptedCumulative: 5n,
  deposit: 100n,
})
const receipt = Events.receipt({
  status: 'success',
  method: 'evm',
  timestamp: '2026-01-01T00:00:00Z',
  reference: channelId,
  spent: 7n,
})

const body = (chunks: string[]) =>
  new ReadableStream<Uint8Array>({
    start(c) {
      for (const chunk of chunks) c.enqueue(new TextEncoder().encode(chunk))
      c.close()
    },
  })

async function events(stream: ReadableStream<Uint8Array>) {
  const got: EventSourceMessage[] = []
  const parser = createParser({ onEvent: (e) => got.push(e) })
  const text = await new Response(stream).text()
  parser.feed(text)
  return got
}

/** Splits `text` at the given fractions, to feed it in arbitrary chunks. */
const split = (text: string, cuts: number[]) =>
  cutAt(
    text,
    cuts.map((c) => Math.floor(c * text.length)),
  )

const handlers = (seen: { needs: unknown[]; receipts: unknown[] }): Stream.Handlers => ({
  async onNeedVoucher(n) {
    seen.needs.push(n)
  },
  onReceipt(r) {
    seen.receipts.push(r)
  },
})

describe('strip', () => {
  test('behavior: payment events go to the handlers, the rest passes through in order', async () => {
    const seen = { needs: [] as unknown[], receipts: [] as unknown[] }
    const text = [
      Stream.serialize({ data: '{"a":1}' }),
      Stream.serialize({ event: need.event, data: JSON.stringify(need.data) }),
      Stream.serialize({ data: '{"a":2}', id: '7' }),
      Stream.serialize({ event: receipt.event, data: JSON.stringify(receipt.data) }),
      Stream.serialize({ data: '[DONE]' }),
    ].join('')
    const got = await events(Stream.strip(body([text]), handlers(seen)))
    expect(got.map((e) => e.data)).toEqual(['{"a":1}', '{"a":2}', '[DONE]'])
    expect(got[1]!.id).toBe('7')
    expect(seen.needs).toEqual([
      { channelId, requiredCumulative: 10n, acceptedCumulative: 5n, deposit: 100n },
    ])
    expect(seen.receipts).toMatchObject([{ reference: channelId, spent: '7' }])
  })

  test('error: a failing payment ends the stream with its error', async () => {
    const boom = new Error('limit')
    const text = Stream.serialize({ event: need.event, data: JSON.stringify(need.data) })
    const stream = Stream.strip(body([text, Stream.serialize({ data: 'x' })]), {
      onNeedVoucher: () => Promise.reject(boom),
      onReceipt() {},
    })
    expect(await new Response(stream).text().catch((e) => e)).toBe(boom)
  })

  test('behavior: a payment-receipt event that cannot be read is dropped, as a malformed Payment-Receipt header is: the answer around it still reaches the reader; an unreadable payment-need-voucher still ends the stream', async () => {
    const seen = { needs: [] as unknown[], receipts: [] as unknown[] }
    const words = ['a', 'b'].map((w) => Stream.serialize({ data: w }))
    const bad = Stream.serialize({
      event: receipt.event,
      data: '{"status":"success","method":"evm"}',
    })
    const stream = Stream.strip(body([words[0]!, bad, words[1]!]), handlers(seen))
    expect(await new Response(stream).text()).toBe(words.join(''))
    expect(seen.receipts).toEqual([])
    const unreadable = Stream.serialize({ event: need.event, data: '{"channelId":"x"}' })
    const failing = Stream.strip(body([words[0]!, unreadable, words[1]!]), handlers(seen))
    // The server's failure, a client error (as a malformed challenge is), naming the event.
    const error = await new Response(failing).text().catch((e: unknown) => e)
    expect(error).toBeInstanceOf(PaymentFailedError)
    expect(error).toBeInstanceOf(ClientError)
    expect((error as Error).message).toContain('payment-need-voucher')
  })

  test('behavior: a failing payment ends the stream after the events that came before it, even in the same read', async () => {
    const boom = new Error('limit')
    const words = ['a', 'b', 'c'].map((w) => Stream.serialize({ data: w })).join('')
    const text = words + Stream.serialize({ event: need.event, data: JSON.stringify(need.data) })
    const reader = Stream.strip(body([text]), {
      onNeedVoucher: () => Promise.reject(boom),
      onReceipt() {},
    }).getReader()
    // The reader comes late, after the failure: it still gets the three words first.
    await Bun.sleep(20)
    let got = ''
    const error = await (async () => {
      while (true) {
        const { value, done } = await reader.read()
        if (done) return undefined
        got += new TextDecoder().decode(value)
      }
    })().catch((e) => e)
    expect(got).toBe(words)
    expect(error).toBe(boom)
  })

  test('behavior: any events in any chunking: non-payment events pass through unchanged (property)', async () => {
    const event = fc.record({
      event: fc.option(fc.stringMatching(/^[a-z-]{1,12}$/), { nil: undefined }),
      id: fc.option(fc.stringMatching(/^[a-z0-9]{1,8}$/), { nil: undefined }),
      data: fc.string({ maxLength: 40 }).map((s) => s.replace(/\r/g, '')),
    })
    await fc.assert(
      fc.asyncProperty(
        fc.array(event, { maxLength: 8 }),
        fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 6 }),
        async (list, cuts) => {
          const text = list.map(Stream.serialize).join('')
          const seen = { needs: [] as unknown[], receipts: [] as unknown[] }
          const got = await events(Stream.strip(body(split(text, cuts)), handlers(seen)))
          const kept = list.filter(
            (e) => e.event !== Events.needVoucherEvent && e.event !== Events.receiptEvent,
          )
          expect(got.map((e) => e.data)).toEqual(kept.map((e) => e.data))
          expect(got.map((e) => e.event)).toEqual(kept.map((e) => e.event))
        },
      ),
      { numRuns: 2000 },
    )
  })
})
