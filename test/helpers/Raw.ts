/** Requests written by hand on a socket, for what fetch would not send. */
import { connect } from 'node:net'

/**
 * Sends, to the server on `port`, `lines` (the head, CRLF-joined) and `first`, the start of a
 * body that never ends; the answer, which must come while the body is still being sent (else
 * a timeout fails the test).
 */
export function answeredEarly(port: number | string, lines: string[], first: Uint8Array) {
  return new Promise<{ status: number; head: string; body: string }>((resolve, reject) => {
    const socket = connect(Number(port), '127.0.0.1')
    const timer = setTimeout(() => {
      socket.destroy()
      reject(new Error('no answer while the body was unfinished'))
    }, 5_000)
    let text = ''
    socket.on('data', (d: Buffer) => {
      text += d.toString('latin1')
      const end = text.indexOf('\r\n\r\n')
      if (end < 0) return
      const length = /content-length: *(\d+)/i.exec(text.slice(0, end))
      if (length && text.length >= end + 4 + Number(length[1])) {
        clearTimeout(timer)
        socket.destroy()
        resolve({
          status: Number(text.slice(9, 12)),
          head: text.slice(0, end),
          body: text.slice(end + 4, end + 4 + Number(length[1])),
        })
      }
    })
    socket.on('error', () => {})
    socket.write(`${lines.join('\r\n')}\r\n\r\n`)
    socket.write(first)
  })
}
