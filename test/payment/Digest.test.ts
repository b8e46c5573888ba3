import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Digest from '../../src/payment/Digest.ts'

describe('from', () => {
  test('behavior: RFC 9530 sha-256 of a body', () => {
    // RFC 9530 §2 example: the body `{"hello": "world"}` has this sha-256 Content-Digest.
    expect(Digest.from('{"hello": "world"}')).toBe(
      'sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:',
    )
  })
})

describe('verify', () => {
  test('behavior: matches its own digest and RFC 9530 sha-512 members', () => {
    const body = '{"hello": "world"}'
    expect(Digest.verify(Digest.from(body), body)).toBe(true)
    // RFC 9530 §2 example sha-512 value of the same body.
    expect(
      Digest.verify(
        'sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:',
        body,
      ),
    ).toBe(true)
  })

  test('error: another body, a malformed digest, no supported algorithm', () => {
    expect(Digest.verify(Digest.from('a'), 'b')).toBe(false)
    for (const digest of ['', 'sha-256=abc', 'md5=:AAAA:', 'sha-256=:!!:'])
      expect(Digest.verify(digest, 'a')).toBe(false)
  })

  test('behavior: any digest string yields a boolean (3000 runs)', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), fc.string(), (digest, body) => {
        expect(typeof Digest.verify(digest, body)).toBe('boolean')
      }),
      { numRuns: 3000 },
    )
  })
})
