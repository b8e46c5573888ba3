/** Reading a gateway's SSE stream in tests, as a paying client does. */

export type Event = { event: string | undefined; data: string }

/** Reads an SSE response event by event, answering `payment-need-voucher` with `onNeed`. */
export async function read(
  res: Response,
  onNeed: (data: Record<string, string>) => Promise<void>,
): Promise<Event[]> {
  const events: Event[] = []
  const reader = res.body!.getReader()
  const decoder = new TextDecoder()
  let buffer = ''
  while (true) {
    const { value, done } = await reader.read()
    if (done) break
    buffer += decoder.decode(value, { stream: true })
    let at = buffer.indexOf('\n\n')
    while (at >= 0) {
      const e = parsed(buffer.slice(0, at))
      buffer = buffer.slice(at + 2)
      at = buffer.indexOf('\n\n')
      events.push(e)
      if (e.event === 'payment-need-voucher') await onNeed(JSON.parse(e.data))
    }
  }
  return events
}

/** One SSE event block. */
const parsed = (block: string): Event => ({
  event: /^event: (.+)$/m.exec(block)?.[1],
  data: /^data: (.*)$/m.exec(block)?.[1] ?? '',
})

/** The events complete in raw SSE text (a stream read part way: a cut last block is left out). */
export const events = (raw: string): Event[] =>
  raw
    .slice(0, raw.lastIndexOf('\n\n') + 2)
    .split('\n\n')
    .filter(Boolean)
    .map(parsed)

/** The JSON `data:` events complete in raw SSE text (chunks, usage, errors), parsed. */
export const json = (raw: string): Record<string, unknown>[] =>
  events(raw)
    .filter((e) => e.data.startsWith('{'))
    .map((e) => JSON.parse(e.data) as Record<string, unknown>)

/** The completion text carried by the plain `data:` chunks. */
export const text = (events: Event[]): string =>
  events
    .filter((e) => !e.event && e.data.startsWith('{'))
    .map(
      (e) =>
        (JSON.parse(e.data) as { choices?: { delta?: { content?: string } }[] }).choices?.[0]?.delta
          ?.content ?? '',
    )
    .join('')
