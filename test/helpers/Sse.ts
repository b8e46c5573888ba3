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
      const block = buffer.slice(0, at)
      buffer = buffer.slice(at + 2)
      at = buffer.indexOf('\n\n')
      const event = /^event: (.+)$/m.exec(block)?.[1]
      const data = /^data: (.*)$/m.exec(block)?.[1] ?? ''
      events.push({ event, data })
      if (event === 'payment-need-voucher') await onNeed(JSON.parse(data))
    }
  }
  return events
}

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
