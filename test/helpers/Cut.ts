/** `text` cut at the positions `at` (any order, repeats allowed): a stream's chunks. */
export function cutAt(text: string, at: readonly number[]): string[] {
  const out: string[] = []
  let from = 0
  for (const c of [...new Set(at)].sort((a, b) => a - b)) {
    out.push(text.slice(from, c))
    from = c
  }
  out.push(text.slice(from))
  return out
}
