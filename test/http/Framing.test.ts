/**
 * Requests framed oddly on the wire, sent over a raw socket (fetch would not send them): a
 * Content-Length given twice, a Host that is no host. Each gets a typed 4xx, never a 500, a
 * body read past the limit, or a route other than the one asked for.
 */
import { expect, test } from 'bun:test'
import { connect } from 'node:net'
import fc from 'fast-check'
import { InvalidRequestError } from '../../src/Errors.ts'
import { declared } from '../../src/http/Parse.ts'
import * as Gateway from '../helpers/Gateway.ts'

const gw = await Gateway.create({ maxCompletionBodyBytes: 2 * 1024 * 1024 })
const { port } = new URL(gw.url)

/** Sends `head` (CRLF-joined lines) and `body`; the status and body of the answer. */
function raw(lines: string[], body: Uint8Array = new Uint8Array()) {
  return new Promise<{ status: number; body: string }>((resolve, reject) => {
    const socket = connect(Number(port), '127.0.0.1')
    const chunks: Buffer[] = []
    socket.on('data', (d: Buffer) => {
      chunks.push(d)
      const text = Buffer.concat(chunks).toString('latin1')
      const end = text.indexOf('\r\n\r\n')
      if (end < 0) return
      const length = /content-length: *(\d+)/i.exec(text.slice(0, end))
      if (length && text.length >= end + 4 + Number(length[1])) {
        socket.destroy()
        resolve({
          status: Number(text.slice(9, 12)),
          body: text.slice(end + 4, end + 4 + Number(length[1])),
        })
      }
    })
    socket.on('error', (e) => {
      if (chunks.length === 0) reject(e)
    })
    socket.on('close', () => {
      const text = Buffer.concat(chunks).toString('latin1')
      const end = text.indexOf('\r\n\r\n')
      resolve({ status: Number(text.slice(9, 12)), body: end < 0 ? '' : text.slice(end + 4) })
    })
    socket.write(`${lines.join('\r\n')}\r\n\r\n`)
    // Written in parts: a server that refuses at the head closes before the rest is sent.
    const write = (at: number) => {
      if (at >= body.length || socket.destroyed) return
      socket.write(body.subarray(at, at + 65536), () => write(at + 65536))
    }
    write(0)
  })
}

const code = (body: string) => (JSON.parse(body) as { error: { code: string } }).error.code

test('a Content-Length sent twice is held to the body limit: 413 before the body is read', async () => {
  const size = gw.config.maxCompletionBodyBytes * 2
  const res = await raw(
    [
      'POST /v1/chat/completions HTTP/1.1',
      'Host: 127.0.0.1',
      'Content-Type: application/json',
      `Content-Length: ${size}`,
      `Content-Length: ${size}`,
    ],
    new Uint8Array(size).fill(0x20),
  )
  expect(res.status).toBe(413)
  expect(code(res.body)).toBe('body_too_large')
})

test('a Content-Length sent twice under the limit is served as one', async () => {
  const { key } = await gw.account()
  const body = new TextEncoder().encode(
    JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
  )
  const res = await raw(
    [
      'POST /v1/chat/completions HTTP/1.1',
      'Host: 127.0.0.1',
      `Authorization: Bearer ${key}`,
      'Content-Type: application/json',
      `Content-Length: ${body.length}`,
      `Content-Length: ${body.length}`,
      'Connection: close',
    ],
    body,
  )
  expect(res.status).toBe(200)
  expect((JSON.parse(res.body) as { object: string }).object).toBe('chat.completion')
})

test('a Host that is no host name: 400 invalid_host on every route, never another route', async () => {
  for (const host of ['a b', 'x/y', 'x|y']) {
    for (const path of ['/health', '/v1/admin/accounts', '/xx/v1/credits', '/nowhere']) {
      const res = await raw([
        `GET ${path} HTTP/1.1`,
        `Host: ${host}`,
        `Authorization: Bearer ${gw.config.adminToken}`,
        'Connection: close',
      ])
      expect({ host, path, status: res.status }).toEqual({ host, path, status: 400 })
      expect(code(res.body)).toBe('invalid_host')
    }
  }
  // A good Host still reaches its route.
  const ok = await raw(['GET /health HTTP/1.1', 'Host: 127.0.0.1', 'Connection: close'])
  expect(ok.status).toBe(200)
})

test('property: a declared length is the largest of its listed values, or refused as no length', () => {
  fc.assert(
    fc.property(fc.array(fc.nat(), { minLength: 1, maxLength: 4 }), (values) => {
      expect(declared(values.join(', '))).toBe(Math.max(...values))
    }),
  )
  fc.assert(
    fc.property(fc.string(), (text) => {
      let length: number | undefined
      try {
        length = declared(text)
      } catch (e) {
        expect(e).toBeInstanceOf(InvalidRequestError)
        return
      }
      // Taken only when every part is digits, and never NaN.
      for (const part of text.split(',')) expect(part.trim()).toMatch(/^\d+$/)
      expect(Number.isNaN(length)).toBe(false)
    }),
  )
})
