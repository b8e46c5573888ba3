/**
 * draft-httpauth-payment-00, "Transport Security": servers MUST NOT issue Payment challenges
 * over unencrypted HTTP, and challenges and credentials travel over TLS. A gateway listening
 * beyond loopback offers Payment only over https (its own TLS, or a trusted proxy that says
 * so), and to this machine itself; plain HTTP from elsewhere gets the Bearer way in alone.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtempSync } from 'node:fs'
import { networkInterfaces, tmpdir } from 'node:os'
import { join } from 'node:path'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'

const external = Object.values(networkInterfaces())
  .flat()
  .find((a) => a && a.family === 'IPv4' && !a.internal)?.address

const chain = await Anvil.start()
afterAll(() => chain.stop())
const paid = {
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789' },
}

const body = JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] })
/** A request to the gateway's port at `host`; its status and WWW-Authenticate. */
async function ask(
  base: string,
  host: string,
  headers: Record<string, string> = {},
  init: Record<string, unknown> = {},
) {
  const url = new URL(base)
  url.hostname = host
  const res = await fetch(`${url.origin}/v1/chat/completions`, {
    method: 'POST',
    headers,
    body,
    ...init,
  })
  const text = await res.text()
  return { status: res.status, challenge: res.headers.get('www-authenticate') ?? '', text }
}

describe.skipIf(external === undefined)('beyond loopback', () => {
  test('behavior: plain HTTP from another address gets no Payment challenge, and a Payment credential is refused; loopback gets both ways in', async () => {
    const gw = await Gateway.create({ host: '0.0.0.0', ...paid })
    const far = await ask(gw.url, external!)
    expect(far.status).toBe(401)
    expect(far.challenge).toContain('Bearer')
    expect(far.challenge).not.toContain('Payment ')
    const credential = await ask(gw.url, external!, { authorization: 'Payment eyJ4IjoxfQ' })
    expect(credential.status).toBe(400)
    expect(JSON.parse(credential.text).error.code).toBe('tls_required')
    const near = await ask(gw.url, '127.0.0.1')
    expect(near.status).toBe(402)
    expect(near.challenge).toContain('Payment ')
  }, 30_000)

  test('behavior: behind a trusted TLS proxy (X-Forwarded-Proto: https) the challenge is offered; the header is ignored unless trusted', async () => {
    const proxied = await Gateway.create({ host: '0.0.0.0', trustProxy: true, ...paid })
    const forwarded = await ask(proxied.url, external!, { 'x-forwarded-proto': 'https' })
    expect(forwarded.challenge).toContain('Payment ')
    expect((await ask(proxied.url, external!)).challenge).not.toContain('Payment ')
    const untrusting = await Gateway.create({ host: '0.0.0.0', ...paid })
    const spoofed = await ask(untrusting.url, external!, { 'x-forwarded-proto': 'https' })
    expect(spoofed.challenge).not.toContain('Payment ')
  }, 30_000)

  test('behavior: served over its own TLS (tls.certFile, tls.keyFile) the gateway offers Payment to any address', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tollway-tls-'))
    const cert = join(dir, 'cert.pem')
    const key = join(dir, 'key.pem')
    const made = Bun.spawnSync([
      'openssl',
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-keyout',
      key,
      '-out',
      cert,
      '-days',
      '1',
      '-subj',
      '/CN=tollway-test',
    ])
    expect(made.exitCode).toBe(0)
    const gw = await Gateway.create({
      host: '0.0.0.0',
      tls: { certFile: cert, keyFile: key },
      ...paid,
    })
    expect(gw.url).toStartWith('https://')
    const far = await ask(gw.url, external!, {}, { tls: { rejectUnauthorized: false } })
    expect(far.status).toBe(402)
    expect(far.challenge).toContain('Payment ')
  }, 30_000)
})

test('behavior: from loopback, a request a local proxy forwarded from plain HTTP (X-Forwarded-Proto: http) gets no Payment challenge', async () => {
  const gw = await Gateway.create(paid)
  expect((await ask(gw.url, '127.0.0.1')).challenge).toContain('Payment ')
  const forwarded = await ask(gw.url, '127.0.0.1', { 'x-forwarded-proto': 'http' })
  expect(forwarded.challenge).toContain('Bearer')
  expect(forwarded.challenge).not.toContain('Payment ')
  expect((await ask(gw.url, '127.0.0.1', { 'x-forwarded-proto': 'https' })).challenge).toContain(
    'Payment ',
  )
}, 30_000)

test('error: a TLS file that cannot be read stops the start naming it; one of the two variables alone too', async () => {
  const { load } = await import('../../src/Config.ts')
  expect(() => load({ TLS_CERT_FILE: '/x/cert.pem' })).toThrow(/TLS_KEY_FILE/)
  await expect(
    Gateway.create({ tls: { certFile: '/nonexistent/cert.pem', keyFile: '/nonexistent/key.pem' } }),
  ).rejects.toThrow(/TLS_CERT_FILE \(tls.certFile\): cannot read \/nonexistent\/cert.pem/)
}, 30_000)
