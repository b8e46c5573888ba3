/**
 * RFC 9110 §11 authentication header syntax, the part MPP needs: a `WWW-Authenticate` value is a
 * comma-separated list of challenges, `auth-scheme [ 1*SP ( token68 / #auth-param ) ]`, where
 * `auth-param = token BWS "=" BWS ( token / quoted-string )`. Commas separate both challenges and
 * parameters, so a comma followed by `token BWS "="` continues the current challenge and anything
 * else starts a new one. Quoted strings may hold commas, `=` and escaped quotes.
 */
import { PaymentParseError } from './Errors.ts'

/** One challenge: its scheme as sent, and either a token68 or parameters (names lowercased). */
export type Challenge = { scheme: string; token68?: string; params: Map<string, string> }

const TCHAR = /[!#$%&'*+\-.^_`|~0-9A-Za-z]/
const TOKEN68 = /[A-Za-z0-9\-._~+/]/
const QDTEXT_OR_PAIRED = /[\t \x21-\x7e\x80-\xff]/

function fail(message: string): never {
  throw new PaymentParseError('challenge', message)
}

/** Parses a whole `WWW-Authenticate` value into its challenges; throws PaymentParseError. */
export function parse(value: string): Challenge[] {
  let i = 0
  const n = value.length
  const challenges: Challenge[] = []

  const isWs = (c: string | undefined) => c === ' ' || c === '\t'
  const skipWs = () => {
    while (i < n && isWs(value[i])) i++
  }
  const readToken = (): string => {
    const start = i
    while (i < n && TCHAR.test(value[i]!)) i++
    return value.slice(start, i)
  }
  /**
   * True when `token BWS "=" BWS value` starts at the cursor. `==` and a `=` followed by nothing
   * (end or comma) are token68 padding instead, as in `Negotiate oYH=` or `Basic abc=, …`.
   */
  const paramAhead = (): boolean => {
    const save = i
    const name = readToken()
    skipWs()
    let ok = name.length > 0 && value[i] === '=' && value[i + 1] !== '='
    if (ok) {
      i++
      skipWs()
      ok = i < n && value[i] !== ','
    }
    i = save
    return ok
  }
  const readQuoted = (): string => {
    i++ // opening quote
    let out = ''
    while (i < n) {
      const c = value[i]!
      if (c === '"') {
        i++
        return out
      }
      if (c === '\\') {
        const next = value[i + 1]
        if (next === undefined || !QDTEXT_OR_PAIRED.test(next))
          fail('Bad escape in a quoted string.')
        out += next
        i += 2
        continue
      }
      if (!QDTEXT_OR_PAIRED.test(c)) fail('A quoted string holds a control character.')
      out += c
      i++
    }
    return fail('A quoted string is not terminated.')
  }

  while (true) {
    // Empty list elements (`, ,`) are allowed by the list syntax (RFC 9110 §5.6.1).
    skipWs()
    while (value[i] === ',') {
      i++
      skipWs()
    }
    if (i >= n) break
    const scheme = readToken()
    if (!scheme) fail(`Expected an auth-scheme at position ${i}.`)
    const challenge: Challenge = { scheme, params: new Map() }
    challenges.push(challenge)
    if (i >= n) break
    if (value[i] === ',') continue
    if (!isWs(value[i])) fail(`Expected a space after the scheme ${scheme}.`)
    skipWs()
    if (i >= n || value[i] === ',') continue

    if (!paramAhead()) {
      // token68: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
      const start = i
      while (i < n && TOKEN68.test(value[i]!)) i++
      if (i === start) fail(`Expected a token68 or auth-param after ${scheme}.`)
      while (value[i] === '=') i++
      challenge.token68 = value.slice(start, i)
      skipWs()
      if (i < n && value[i] !== ',') fail('Unexpected text after a token68.')
      continue
    }

    // #auth-param, until a comma is followed by something that is not `token BWS =`.
    while (true) {
      const name = readToken().toLowerCase()
      skipWs()
      i++ // '='
      skipWs()
      let paramValue: string
      if (value[i] === '"') paramValue = readQuoted()
      else {
        paramValue = readToken()
        if (!paramValue) fail(`The parameter ${name} has no value.`)
      }
      // RFC 9110 §11.2: each parameter name MUST only occur once per challenge.
      if (challenge.params.has(name)) fail(`The parameter ${name} occurs twice.`)
      challenge.params.set(name, paramValue)
      skipWs()
      if (i >= n) break
      if (value[i] !== ',') fail(`Expected a comma after the parameter ${name}.`)
      // Look past empty list elements for another parameter of this challenge.
      const save = i
      while (value[i] === ',' || isWs(value[i])) i++
      if (i < n && paramAhead()) continue
      i = save
      break
    }
  }
  return challenges
}

/** A token or, when needed, an RFC 9110 quoted-string (`"` and `\` escaped). */
export function quote(value: string): string {
  for (const c of value)
    if (!QDTEXT_OR_PAIRED.test(c))
      throw new PaymentParseError(
        'challenge',
        'A parameter holds a character a header cannot carry (control or beyond U+00FF).',
      )
  return `"${value.replace(/[\\"]/g, (c) => `\\${c}`)}"`
}
