/**
 * The Accept-Payment request header (draft-httpauth-payment-00, "Client Payment Preferences"):
 * `#payment-range` where `payment-range = (method / "*") "/" (intent / "*") [ weight ]`, and
 * `rank` applies it to the (method, intent) pairs a server can offer.
 *
 * Decisions where the draft leaves room:
 * - `weight` is RFC 9110's `OWS ";" OWS "q=" qvalue`; parameters other than `q` are malformed.
 * - The most specific matching range decides an offer's q: exact/exact, then method/*, then
 *   *\/intent (a method is what the client must have tooling for), then *\/*. Among equally
 *   specific duplicates, the first listed wins.
 * - A malformed header, or one under which no offer has q>0, leaves the server's normal set
 *   (the draft: servers MAY ignore it in both cases).
 */
import { PaymentParseError } from './Errors.ts'

/** One preference: method and intent, `*` for any, and its weight in [0, 1]. */
export type Range = { method: string; intent: string; q: number }

/** A (method, intent) pair the server can offer, plus anything the caller carries along. */
export type Offer = { method: string; intent: string }

/** Largest header `deserialize` reads. */
export const maxHeaderBytes = 4096

const RANGE =
  /^([a-z]+|\*)\/([A-Za-z0-9-]+|\*)(?:[ \t]*;[ \t]*[qQ]=(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?))?$/

/** Parses an Accept-Payment value; throws PaymentParseError if malformed. */
export function deserialize(value: string): Range[] {
  if (value.length > maxHeaderBytes)
    throw new PaymentParseError('accept-payment', `Accept-Payment is over ${maxHeaderBytes} bytes.`)
  const ranges: Range[] = []
  for (const element of value.split(',')) {
    const item = element.trim()
    // Empty list elements are allowed (RFC 9110 §5.6.1).
    if (item === '') continue
    const match = RANGE.exec(item)
    if (!match)
      throw new PaymentParseError('accept-payment', 'Use method/intent[;q=0.5], e.g. evm/session.')
    ranges.push({
      method: match[1]!,
      intent: match[2]!,
      q: match[3] === undefined ? 1 : Number(match[3]),
    })
  }
  return ranges
}

/** The header value of some ranges (q omitted when 1). */
export function serialize(ranges: readonly Range[]): string {
  return ranges.map((r) => `${r.method}/${r.intent}${r.q === 1 ? '' : `;q=${r.q}`}`).join(', ')
}

function specificity(range: Range): number {
  return (range.method === '*' ? 0 : 2) + (range.intent === '*' ? 0 : 1)
}

/** The q a client gives an offer: from its most specific matching range; undefined if none. */
export function weight(ranges: readonly Range[], offer: Offer): number | undefined {
  let best: Range | undefined
  for (const range of ranges) {
    if (range.method !== '*' && range.method !== offer.method) continue
    if (range.intent !== '*' && range.intent !== offer.intent) continue
    if (best === undefined || specificity(range) > specificity(best)) best = range
  }
  return best?.q
}

/**
 * The offers a client prefers, best first: those with q>0 by descending q, server order kept among
 * equals. No header (null/undefined) means anything goes: the offers unchanged. A malformed header,
 * or none of the offers acceptable, also yields the offers unchanged.
 */
export function rank<T extends Offer>(
  offers: readonly T[],
  header: string | null | undefined,
): T[] {
  if (header === null || header === undefined) return [...offers]
  let ranges: Range[]
  try {
    ranges = deserialize(header)
  } catch {
    return [...offers]
  }
  const weighted = offers
    .map((offer, index) => ({ offer, index, q: weight(ranges, offer) ?? 0 }))
    .filter((w) => w.q > 0)
  if (weighted.length === 0) return [...offers]
  // Array.prototype.sort is stable, so equal q keeps the server's order.
  return weighted.sort((a, b) => b.q - a.q).map((w) => w.offer)
}
