/**
 * The `tollway` command as a subprocess (bin/tollway) against a gateway started here, with
 * real anvil for the paying commands.
 */
import { afterAll, describe, expect, test } from 'bun:test'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { networkInterfaces, tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Hex } from 'viem'
import * as Escrow from '../../src/chain/Escrow.ts'
import * as Token from '../../src/chain/Token.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Cli from '../helpers/Cli.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chain = await Anvil.start({ accounts: 13 })
afterAll(() => chain.stop())
const gw = await Gateway.create({
  chain: Gateway.chainOf(chain),
  payments: { challengeSecret: 'test-challenge-secret-0123456789', voucherTimeoutMs: 5_000 },
})
const dataDir = mkdtempSync(join(tmpdir(), 'tollway-cli-'))

function cli(args: string[], env: Record<string, string> = {}) {
  return Cli.run([Cli.bin, ...args], {
    TOLLWAY_URL: gw.url,
    TOLLWAY_ADMIN_TOKEN: gw.config.adminToken!,
    TOLLWAY_DATA_DIR: dataDir,
    ...env,
  })
}
const json = async (args: string[], env?: Record<string, string>) => {
  const r = await cli([...args, '--json'], env)
  expect(r.stderr).toBe('')
  expect(r.code).toBe(0)
  return JSON.parse(r.stdout)
}

describe('usage', () => {
  test('behavior: --help on the command and on a subcommand', async () => {
    const main = await cli(['--help'])
    expect(main.code).toBe(0)
    expect(main.stdout).toContain('chat "prompt"')
    const chat = await cli(['chat', '--help'])
    expect(chat.code).toBe(0)
    expect(chat.stdout).toContain('--trust-escrow')
  })

  test('error: an unknown command, subcommand or option exits 2', async () => {
    expect((await cli(['nope'])).code).toBe(2)
    expect((await cli(['keys', 'nope'])).code).toBe(2)
    const bogus = await cli(['keys', 'list', '--bogus'])
    expect(bogus.code).toBe(2)
    expect(bogus.stderr).toContain('unknown option --bogus; see tollway --help')
    expect((await cli(['credits', 'grant', 'a', 'ten'])).code).toBe(2)
    // A gateway setting tried as an option (npm start -- --port 8793): where it goes instead.
    const port = await cli(['serve', '--port', '8793'])
    expect(port.code).toBe(2)
    expect(port.stderr).toContain(
      "unknown option --port; the gateway's PORT is set in the environment (PORT=… npm start)",
    )
  })

  test('error: with --json, an option that fails to parse is reported as JSON too; a negative amount goes after --', async () => {
    const bad = await cli(['accounts', 'get', 'x', '--json', '--bogus'])
    expect(bad.code).toBe(2)
    expect(JSON.parse(bad.stderr).error.message).toContain('--bogus')
    const { id } = await json(['accounts', 'create', '--name', 'debit'])
    await json(['credits', 'grant', id, '10'])
    // Without --, the amount reads as an option: the error says where it goes.
    const unmarked = await cli(['credits', 'grant', id, '-4'])
    expect(unmarked.code).toBe(2)
    expect(unmarked.stderr).toContain(
      'a negative number goes after -- (tollway credits grant <account> -- -4)',
    )
    const debit = await cli(['credits', 'grant', id, '--json', '--', '-4'])
    expect(debit.code).toBe(0)
    expect(JSON.parse(debit.stdout).balance).toBe('6')
  })

  test('error: a bad setting from the environment exits 2 naming the option and the variable', async () => {
    const url = await cli(['channels', 'list'], { TOLLWAY_URL: 'not a url' })
    expect(url.code).toBe(2)
    expect(url.stderr).toContain('--url / TOLLWAY_URL')
    const total = await cli(['channel', 'status'], { TOLLWAY_MAX_TOTAL: '1e6' })
    expect(total.code).toBe(2)
    expect(total.stderr).toContain('--max-total / TOLLWAY_MAX_TOTAL')
    // A channel of no deposit cannot open (the escrow reverts it, at the gateway's gas).
    const zero = await cli(['chat', 'hi', '--max-deposit', '0'])
    expect(zero.code).toBe(2)
    expect(zero.stderr).toContain('--max-deposit / TOLLWAY_MAX_DEPOSIT')
    // A number that is none, or out of range, is said as what the option takes.
    for (const limit of ['abc', '1.5', '0', '201']) {
      const r = await cli(['accounts', 'list', '--limit', limit])
      expect(r.code).toBe(2)
      expect(r.stderr).toBe('tollway: --limit: must be a whole number from 1 to 200\n')
    }
    for (const timeout of ['abc', '0', '3601']) {
      const r = await cli(['accounts', 'list'], { TOLLWAY_TIMEOUT: timeout })
      expect(r.code).toBe(2)
      expect(r.stderr).toBe(
        'tollway: --timeout / TOLLWAY_TIMEOUT: must be a number of seconds, above 0 and at most 3600\n',
      )
    }
    // An option wins over its variable.
    const fixed = await cli(['channels', 'list', '--url', gw.url], { TOLLWAY_URL: 'not a url' })
    expect(fixed.code).toBe(0)
  })

  test('error: a channels.json that is not JSON is a usage error (exit 2: the user repairs it), not a server error', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tollway-cli-store-'))
    writeFileSync(join(dir, 'channels.json'), '{ not json')
    const r = await cli(['channel', 'status', '--escrow', chain.escrowAddress], {
      TOLLWAY_WALLET_KEY: chain.payers[5]!.privateKey,
      TOLLWAY_DATA_DIR: dir,
    })
    expect(r.stderr).toContain(`The channel store ${join(dir, 'channels.json')} is not JSON`)
    expect(r.code).toBe(2)
  })

  test('error: a channel store that cannot be written (its directory is a file) is a usage error (exit 2) naming it', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tollway-cli-store-'))
    const notDir = join(dir, 'data')
    writeFileSync(notDir, 'a file, not a directory')
    const r = await cli(['channel', 'status', '--escrow', chain.escrowAddress], {
      TOLLWAY_WALLET_KEY: chain.payers[5]!.privateKey,
      TOLLWAY_DATA_DIR: notDir,
    })
    expect(r.stderr).toContain(`The channel store ${join(notDir, 'channels.json')} cannot be`)
    expect(r.stderr).toContain('TOLLWAY_DATA_DIR')
    expect(r.code).toBe(2)
  })
})

describe('admin', () => {
  test('behavior: accounts create, credits grant, keys create | list | revoke', async () => {
    const account = await json(['accounts', 'create', '--name', 'cli', '--plan', 'unlimited'])
    expect(account).toMatchObject({ name: 'cli', plan: 'unlimited' })
    expect(await json(['credits', 'grant', account.id, '5000', '--note', 'hi'])).toEqual({
      balance: '5000',
    })
    const key = await json(['keys', 'create', account.id, '--name', 'laptop'])
    expect(key.key).toBeString()
    const keys = await json(['keys', 'list', account.id])
    expect(keys).toHaveLength(1)
    expect(keys[0]).toMatchObject({ id: key.id, name: 'laptop', revoked_at: null })
    const human = await cli(['accounts', 'get', account.id])
    expect(human.stdout).toContain('balance 5000')
    expect(await json(['keys', 'revoke', key.id], { TOLLWAY_API_KEY: key.key })).toMatchObject({
      revoked: true,
    })
    expect((await json(['keys', 'list', account.id]))[0].revoked_at).toBeString()
    // A revoked key is not counted among the account's keys: it opens nothing.
    expect(human.stdout).toContain(', 1 active key\n')
    const after = await cli(['accounts', 'get', account.id])
    expect(after.stdout).toContain(', 0 active keys (1 revoked)\n')
  })

  test('error: names the gateway holds with control characters (kept from before they were refused) are printed with those characters visible, not sent to the terminal', async () => {
    const account = await json(['accounts', 'create', '--name', 'escapes', '--plan', 'free'])
    await json(['keys', 'create', account.id, '--name', 'plain'])
    // An OSC window title and a screen clear, as a name made before names refused them holds.
    const name = '\u001b]0;owned\u0007\u001b[2J\u009b31m'
    await gw.sql`update api_keys set name = ${name} where account_id = ${account.id}`
    await gw.sql`update accounts set name = ${name} where id = ${account.id}`
    for (const args of [
      ['keys', 'list', account.id],
      ['accounts', 'get', account.id],
    ]) {
      const human = await cli(args)
      expect(human.code).toBe(0)
      expect(human.stdout.replace(/[\n\t]/g, '')).not.toMatch(/\p{Cc}/u)
      expect(human.stdout).toContain('\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{9b}31m')
    }
    // The JSON form keeps the name as it is (JSON escapes it).
    expect((await json(['keys', 'list', account.id]))[0].name).toBe(name)
  })

  test('behavior: accounts set moves an account to another plan; accounts list; usage of an account', async () => {
    const account = await json(['accounts', 'create', '--name', 'mover', '--plan', 'free'])
    const moved = await json(['accounts', 'set', account.id, '--plan', 'pro'])
    expect(moved).toMatchObject({ id: account.id, plan: 'pro', name: 'mover' })
    const human = await cli(['accounts', 'set', account.id, '--name', 'renamed'])
    expect(human.code).toBe(0)
    expect(human.stdout).toContain('"renamed"  plan pro')
    expect((await cli(['accounts', 'set', account.id])).code).toBe(2)
    const bad = await cli(['accounts', 'set', account.id, '--plan', 'platinum'])
    expect(bad.code).toBe(2)
    expect(bad.stderr).toContain('no plan "platinum"')
    const listed = await json(['accounts', 'list', '--limit', '1'])
    expect(listed.data.map((a: { id: string }) => a.id)).toEqual([account.id])
    // The next page: the human form says how to get it.
    const human1 = await cli(['accounts', 'list', '--limit', '1'])
    const cursor = /--cursor (\S+)/.exec(human1.stdout)![1]!
    const next = await json(['accounts', 'list', '--limit', '1', '--cursor', cursor])
    expect(next.data).toHaveLength(1)
    expect(next.data[0].id).not.toBe(account.id)

    await json(['credits', 'grant', account.id, '100000'])
    const { key } = await json(['keys', 'create', account.id])
    const res = await fetch(`${gw.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
    })
    expect(res.status).toBe(200)
    const requestId = res.headers.get('x-request-id')
    await res.text()
    const usage = await json(['usage', account.id, '--model', 'fake', '--from', '2020-01-01'])
    expect(usage.data.map((u: { id: string }) => u.id)).toEqual([requestId])
    const lines = await cli(['usage', account.id])
    expect(lines.stdout).toContain(`${requestId}  fake`)
    expect((await json(['usage', account.id, '--model', 'other'])).data).toEqual([])
    const badTime = await cli(['usage', account.id, '--from', 'soon'])
    expect(badTime.code).toBe(2)
    expect(badTime.stderr).toContain('from must be an ISO 8601 date')
    expect((await cli(['usage'])).code).toBe(2)
  })

  test('behavior: keys revoke <account> <key-id> with the admin token; error: a second revoke (404) and no account and no key exit 2', async () => {
    const account = await json(['accounts', 'create', '--name', 'revoke', '--plan', 'unlimited'])
    const key = await json(['keys', 'create', account.id])
    const human = await cli(['keys', 'revoke', account.id, key.id])
    expect(human.code).toBe(0)
    expect(human.stdout).toBe(`revoked ${key.id}\n`)
    expect((await json(['keys', 'list', account.id]))[0].revoked_at).toBeString()
    const again = await cli(['keys', 'revoke', account.id, key.id])
    expect(again.code).toBe(2)
    expect(again.stderr).toContain('No active key')
    const bare = await cli(['keys', 'revoke', key.id])
    expect(bare.code).toBe(2)
    expect(bare.stderr).toContain('<account> <key-id>')
  })

  test('error: channels settle exits 4 when the settlement was answered but did not go through', async () => {
    let status = 'reverted'
    const fake = Bun.serve({
      port: 0,
      fetch: () =>
        Response.json({
          channel: { channelId: '0x01' },
          result: { status, error: { message: 'settle reverted with AmountNotIncreasing()' } },
        }),
    })
    try {
      const env = { TOLLWAY_URL: `http://127.0.0.1:${fake.port}` }
      const reverted = await cli(['channels', 'settle', '0x01'], env)
      expect(reverted.code).toBe(4)
      expect(reverted.stdout).toContain('reverted: settle reverted with AmountNotIncreasing()')
      expect(reverted.stderr).toContain('did not go through (reverted)')
      // Before the answer it says it asks: the gateway may yet refuse (an unknown channel).
      expect(reverted.stderr).toContain('asking the gateway to settle on chain…')
      status = 'nothing'
      expect((await cli(['channels', 'settle', '0x01'], env)).code).toBe(0)
    } finally {
      fake.stop(true)
    }
  })

  test('error: a wrong admin token exits 2 with the message; --json puts the error on stderr', async () => {
    const r = await cli(['accounts', 'create', '--name', 'x', '--json'], {
      TOLLWAY_ADMIN_TOKEN: 'wrong-token-0123456789',
    })
    expect(r.code).toBe(2)
    expect(JSON.parse(r.stderr).error).toMatchObject({ code: 2 })
    expect(r.stdout).toBe('')
  })

  test('behavior: without --admin-token or TOLLWAY_ADMIN_TOKEN the data dir file is read', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tollway-cli-token-'))
    writeFileSync(join(dir, 'admin-token'), `${gw.config.adminToken}\n`)
    const r = await cli(['accounts', 'create', 'from-file', '--json'], {
      TOLLWAY_ADMIN_TOKEN: '',
      TOLLWAY_DATA_DIR: dir,
    })
    expect(r.code).toBe(0)
    expect(JSON.parse(r.stdout).name).toBe('from-file')
    const none = await cli(['channels', 'list'], {
      TOLLWAY_ADMIN_TOKEN: '',
      TOLLWAY_DATA_DIR: join(dir, 'nothing'),
    })
    expect(none.code).toBe(2)
    expect(none.stderr).toContain('admin-token')
  })

  test('error: a gateway that takes the connection and never answers: exit 4 after --timeout', async () => {
    const hole = Bun.listen({ hostname: '127.0.0.1', port: 0, socket: { data() {} } })
    try {
      const started = performance.now()
      const r = await cli(['accounts', 'get', crypto.randomUUID(), '--timeout', '0.5'], {
        TOLLWAY_URL: `http://127.0.0.1:${hole.port}`,
      })
      expect(r.code).toBe(4)
      expect(r.stderr).toContain('did not answer within 0.5 s')
      expect(performance.now() - started).toBeLessThan(10_000)
      expect((await cli(['accounts', 'list', '--timeout', 'soon'])).code).toBe(2)
      // chat too: its answer must begin within the timeout.
      const chat = await cli(
        ['chat', 'hi', '--model', 'fake', '--escrow', chain.escrowAddress, '--timeout', '0.5'],
        {
          TOLLWAY_URL: `http://127.0.0.1:${hole.port}`,
          TOLLWAY_WALLET_KEY: chain.payers[5]!.privateKey,
        },
      )
      expect(chat.code).toBe(4)
      expect(chat.stderr).toContain('did not answer within 0.5 s')
    } finally {
      hole.stop(true)
    }
  })

  test('error: no gateway at the URL exits 4', async () => {
    const r = await cli(['channels', 'list', '--url', 'http://127.0.0.1:1'])
    expect(r.code).toBe(4)
    expect(r.stderr).toContain('cannot reach the gateway')
  })
})

describe('chat', () => {
  const wallet = { TOLLWAY_WALLET_KEY: chain.payers[0]!.privateKey, TOLLWAY_RPC_URL: chain.rpcUrl }

  test('error: an escrow not trusted exits 3 and spends nothing', async () => {
    const r = await cli(['chat', 'hello', '--model', 'fake'], wallet)
    expect(r.code).toBe(3)
    expect(r.stderr.toLowerCase()).toContain(chain.escrowAddress.toLowerCase())
    // In the CLI's own words: its options, not the library's allow.escrows.
    expect(r.stderr).toContain('pass --escrow <address> (TOLLWAY_ESCROW) if you do')
    expect(r.stderr).not.toContain('allow.escrows')
    // Refused before any transaction: nothing opened, and the progress line says so.
    expect(r.stderr).toContain('opening a payment channel (on chain)… not opened')
    const payer = Buffer.from(chain.payers[0]!.address.slice(2), 'hex')
    const [row] = await gw.sql`select count(*)::int as n from channels where payer = ${payer}`
    expect(row!.n).toBe(0)
  })

  // A gateway reached over plain HTTP from another machine answers with the Bearer challenge
  // alone (README, TLS): --insecure-http cannot pay it, and the CLI says why.
  const lan = Object.values(networkInterfaces())
    .flat()
    .find((a) => a?.family === 'IPv4' && !a.internal)?.address
  test.skipIf(!lan)(
    'error: --insecure-http to a gateway that offers no Payment challenge over plain HTTP says to use its https URL',
    async () => {
      const plain = Bun.serve({
        hostname: '0.0.0.0',
        port: 0,
        fetch: () =>
          Response.json(
            { error: { type: 'auth_error', message: 'no key', code: 'missing_key' } },
            { status: 401, headers: { 'www-authenticate': 'Bearer realm="tollway"' } },
          ),
      })
      try {
        const r = await cli(
          ['chat', 'hello', '--model', 'fake', '--trust-escrow', '--insecure-http'],
          {
            TOLLWAY_URL: `http://${lan}:${plain.port}`,
            TOLLWAY_WALLET_KEY: chain.payers[1]!.privateKey,
          },
        )
        expect(r.code).toBe(3)
        expect(r.stderr).toContain('only over HTTPS')
      } finally {
        plain.stop(true)
      }
    },
  )

  test('behavior: a wallet key alone (no TOLLWAY_RPC_URL) opens a channel and pays', async () => {
    const payer = chain.payers[1]!
    const r = await cli(
      ['chat', 'hello', 'wallet', '--model', 'fake', '--trust-escrow', '--json'],
      {
        TOLLWAY_WALLET_KEY: payer.privateKey,
      },
    )
    expect(r.code).toBe(0)
    const out = JSON.parse(r.stdout)
    expect(out.content).toBe('hello wallet')
    expect(BigInt(out.usage.cost)).toBeGreaterThan(0n)
    const [row] = await gw.sql`
      select count(*)::int as n, max(spent) as spent from channels
      where payer = ${Buffer.from(payer.address.slice(2), 'hex')}`
    expect(row!.n).toBe(1)
    expect(BigInt(row!.spent)).toBe(BigInt(out.usage.cost))
  }, 30_000)

  test('error: a missing or malformed wallet key is a usage error', async () => {
    const r = await cli(['chat', 'hello'], { TOLLWAY_WALLET_KEY: '0x12' })
    expect(r.code).toBe(2)
    expect(r.stderr).toContain('TOLLWAY_WALLET_KEY')
    const missing = await cli(['chat', 'hello'])
    expect(missing.code).toBe(2)
    expect(missing.stderr).toBe(
      'tollway: TOLLWAY_WALLET_KEY is not set: the private key (0x…) of the wallet that pays (on the development chain, a payer key that npm start prints, with --trust-escrow).\n',
    )
  })

  test('error: --max-total below the prompt cost is refused with exit 3, before any channel opens', async () => {
    const env = { ...wallet, TOLLWAY_WALLET_KEY: chain.payers[2]!.privateKey }
    // The fake model's input price: 1,000,000 base units per million tokens, so a token is a
    // base unit; "hello" as a message is 7 tokens, as the gateway counts it.
    const r = await cli(
      ['chat', 'hello', '--model', 'fake', '--trust-escrow', '--max-total', '6'],
      env,
    )
    expect(r.code).toBe(3)
    // Named as this command's option, not the client library's; nothing was opened.
    expect(r.stderr).toContain('The prompt alone costs 7 base units (7 tokens of fake')
    expect(r.stderr).toContain('over --max-total (TOLLWAY_MAX_TOTAL) 6; no channel was opened')
    expect(r.stderr).not.toContain('opening a payment channel')
    const status = await cli(['channel', 'status', '--json'], env)
    expect(JSON.parse(status.stdout)).toMatchObject({ channel: null })
    // Within --max-total, the prompt but not the answer: the channel opens, the request fails
    // on the library's limit, named as this command's option.
    const short = await cli(
      ['chat', 'hello', '--model', 'fake', '--trust-escrow', '--max-total', '8'],
      env,
    )
    expect(short.code).toBe(3)
    expect(short.stderr).toContain('--max-total (TOLLWAY_MAX_TOTAL)')
    expect(short.stderr).toContain(
      'opening a payment channel (on chain)… opened (deposit 8); the request failed:',
    )
    expect(short.stderr).not.toContain('done')
  }, 30_000)

  test('behavior: --receipt asks for the signed receipt and checks it, whole or streamed', async () => {
    const whole = await cli(
      ['chat', 'hello receipt', '--model', 'fake', '--trust-escrow', '--receipt', '--json'],
      wallet,
    )
    expect(whole.code).toBe(0)
    const out = JSON.parse(whole.stdout)
    expect(out.receipt).toMatchObject({ payer: 'channel', cost: out.usage.cost })
    const streamed = await cli(
      ['chat', 'hello receipt', '--model', 'fake', '--stream', '--trust-escrow', '--receipt'],
      wallet,
    )
    expect(streamed.code).toBe(0)
    expect(streamed.stderr).toContain(`receipt: verified, signed by key ${out.receipt.key_id}`)
    // Without it, none is asked for.
    const plain = await cli(['chat', 'hi', '--model', 'fake', '--trust-escrow', '--json'], wallet)
    expect(JSON.parse(plain.stdout)).not.toHaveProperty('receipt')
  }, 30_000)

  test('error: a stream that ends with an error event (its upstream broke mid-answer) prints what came and its cost, then exits 4 saying why', async () => {
    const r = await cli(
      [
        'chat',
        'one two three four five six',
        '--model',
        'fake-fail-mid',
        '--stream',
        '--trust-escrow',
      ],
      wallet,
    )
    expect(r.stdout.length).toBeGreaterThan(1)
    expect(r.stderr).toContain('cost: ')
    expect(r.stderr).toContain('the stream ended early')
    expect(r.code).toBe(4)
  }, 30_000)

  test('behavior: streams tokens, prints the cost; channels list | settle; channel status | close', async () => {
    const r = await cli(
      ['chat', 'hello there', '--model', 'fake', '--stream', '--trust-escrow'],
      wallet,
    )
    expect(r.stderr).toContain('cost: ')
    // The channel's total is its deposit, not the --max-total budget: said so.
    expect(r.stderr).toMatch(/signed \d+ of its deposit \d+/)
    expect(r.code).toBe(0)
    expect(r.stdout.length).toBeGreaterThan(1)
    const again = await json(['chat', 'again', '--model', 'fake'], {
      ...wallet,
      TOLLWAY_ESCROW: chain.escrowAddress,
    })
    expect(again.channelId).toMatch(/^0x/)
    expect(BigInt(again.usage.cost)).toBeGreaterThan(0n)

    const status = await json(['channel', 'status', '--trust-escrow'], wallet)
    expect(status.channel.channelId).toBe(again.channelId)
    expect(status.server.status).toBe('open')

    const list = await json(['channels', 'list'])
    expect(list.data.map((c: { channelId: string }) => c.channelId)).toContain(again.channelId)
    const settled = await json(['channels', 'settle', again.channelId])
    expect(settled.channel.channelId).toBe(again.channelId)
    // The payer signs ahead of its spending: no voucher at or below what was spent yet, and
    // the command says why rather than print a bare status.
    expect(settled.result.status).toBe('nothing')
    const human = await cli(['channels', 'settle', again.channelId])
    expect(human.code).toBe(0)
    expect(human.stdout).toContain(
      `nothing to settle: no accepted voucher at or below what the channel spent (${settled.channel.spent}) is above what is settled (0)`,
    )

    const closed = await json(['channel', 'close', '--trust-escrow'], wallet)
    expect(closed.txHash).toMatch(/^0x/)
    // The channel it closed, apart from the transaction that settled it.
    expect(closed.channelId).toBe(again.channelId)
  }, 30_000)
})

describe('a channel set apart (refused as closing)', () => {
  /** Marks channel `id` closing on the gateway (a cooperative close asked for and kept
   * waiting): its next voucher is refused, and the client sets it apart and opens another. */
  const closingOnServer = (id: string) =>
    gw.sql`update channels set close_requested_at = now(), cooperative_close = true
      where channel_id = ${Buffer.from(id.slice(2), 'hex')}`
  /** Pays once, has the gateway refuse that channel as closing, pays again on a new one:
   * the first channel's id, set apart. */
  const setApart = async (wallet: Record<string, string>) => {
    const old = (await json(['chat', 'hi', '--model', 'fake', '--trust-escrow'], wallet))
      .channelId as string
    await closingOnServer(old)
    const next = await json(['chat', 'hi', '--model', 'fake', '--trust-escrow'], wallet)
    expect(next.channelId).not.toBe(old)
    return old
  }
  const onChain = (id: string) =>
    Escrow.getChannel(chain.payeeClient, { escrow: chain.escrowAddress, channelId: id as Hex })

  test('behavior: channel close closes the channel in use, then the one set apart', async () => {
    const wallet = { TOLLWAY_WALLET_KEY: chain.payers[4]!.privateKey }
    const old = await setApart(wallet)
    // Two channels at least: channels list pages, and its human form says how.
    const human = await cli(['channels', 'list', '--limit', '1'])
    const cursor = /--cursor (\S+)/.exec(human.stdout)![1]!
    const [one] = (await json(['channels', 'list', '--limit', '1'])).data
    const [two] = (await json(['channels', 'list', '--limit', '1', '--cursor', cursor])).data
    expect(two.channelId).not.toBe(one.channelId)
    const first = await json(['channel', 'close', '--trust-escrow'], wallet)
    expect(first.channelId).not.toBe(old)
    const second = await json(['channel', 'close', '--trust-escrow'], wallet)
    expect(second.channelId).toBe(old)
    expect((await onChain(old))!.finalized).toBe(true)
    const none = await cli(['channel', 'close', '--trust-escrow'], wallet)
    expect(none.code).toBe(2)
    expect(none.stderr).toContain('No channel with')
  }, 60_000)

  test('behavior: channel status of a channel set apart with no close requested names no withdraw time (it was 1970) but channel close', async () => {
    const wallet = { TOLLWAY_WALLET_KEY: chain.payers[6]!.privateKey }
    const old = await setApart(wallet)
    const status = await cli(['channel', 'status', '--trust-escrow'], wallet)
    expect(status.code).toBe(0)
    expect(status.stdout).toContain(
      `channel ${old}: set apart (the gateway refused it as closing); tollway channel close closes it after the channel in use`,
    )
    expect(status.stdout).not.toContain('withdraw')
    const { closing } = await json(['channel', 'status', '--trust-escrow'], wallet)
    expect(closing.channelId).toBe(old)
    expect(closing).not.toHaveProperty('withdrawableAt')
  }, 60_000)

  test('behavior: channel request-close reaches the channel set apart once the one in use is closed', async () => {
    const wallet = {
      TOLLWAY_WALLET_KEY: chain.payers[7]!.privateKey,
      TOLLWAY_RPC_URL: chain.rpcUrl,
    }
    const old = await setApart(wallet)
    await json(['channel', 'close', '--trust-escrow'], wallet)
    const r = await json(['channel', 'request-close'], wallet)
    expect(r.channelId).toBe(old)
    expect((await onChain(old))!.closeRequestedAt).toBeGreaterThan(0n)
    // Asked again, it says when to withdraw instead of that there is no channel.
    const again = await cli(['channel', 'request-close'], wallet)
    expect(again.code).toBe(2)
    expect(again.stderr).toContain(
      `channel ${old}: close requested already; run tollway channel withdraw from ${r.withdrawableAt}`,
    )
  }, 60_000)

  test('error: chat when the channel in use is refused as closing and another is set apart already exits 2 saying to close them', async () => {
    const wallet = { TOLLWAY_WALLET_KEY: chain.payers[10]!.privateKey }
    const old = await setApart(wallet)
    const inUse = (await json(['channel', 'status', '--trust-escrow'], wallet)).channel.channelId
    await closingOnServer(inUse)
    const r = await cli(['chat', 'hi', '--model', 'fake', '--trust-escrow'], wallet)
    expect(r.stderr).toContain(`Channel ${inUse} is closing, and channel ${old}, set apart before`)
    expect(r.stderr).toContain('run tollway channel close for this one (the one in use)')
    expect(r.code).toBe(2)
    expect((await json(['channel', 'close', '--trust-escrow'], wallet)).channelId).toBe(inUse)
    const next = await json(['chat', 'hi', '--model', 'fake', '--trust-escrow'], wallet)
    expect([old, inUse]).not.toContain(next.channelId)
  }, 60_000)

  /** A channel under forced close (request-close), then one refused as closing, then one in
   * use: the three channel ids, in that order. */
  const both = async (wallet: Record<string, string>) => {
    const forced = (await json(['chat', 'hi', '--model', 'fake', '--trust-escrow'], wallet))
      .channelId as string
    expect((await json(['channel', 'request-close'], wallet)).channelId).toBe(forced)
    const refused = await setApart(wallet)
    const inUse = (await json(['channel', 'status', '--trust-escrow'], wallet)).channel
      .channelId as string
    return { forced, refused, inUse }
  }

  test('behavior: with one channel under forced close and one refused as closing, channel close prints the one it closed', async () => {
    const wallet = {
      TOLLWAY_WALLET_KEY: chain.payers[8]!.privateKey,
      TOLLWAY_RPC_URL: chain.rpcUrl,
    }
    const { forced, refused, inUse } = await both(wallet)
    const first = await json(['channel', 'close', '--trust-escrow'], wallet)
    expect(first.channelId).toBe(inUse)
    // Next the one refused as closing (the one under forced close waits for withdraw): the
    // line names that one, the one the close went to.
    const second = await cli(['channel', 'close', '--trust-escrow'], wallet)
    expect(second.code).toBe(0)
    expect(second.stdout).toContain(`closed channel ${refused} (set apart: refused as closing)`)
    expect((await onChain(refused))!.finalized).toBe(true)
    expect((await onChain(forced))!.finalized).toBe(false)
    // Each says which it was.
    expect(first.kind).toBe('in-use')
  }, 60_000)

  test('error: request-close while another channel of the gateway is under forced close exits 2 saying to withdraw it first; status shows both; --channel names the channel to act on', async () => {
    const wallet = {
      TOLLWAY_WALLET_KEY: chain.payers[9]!.privateKey,
      TOLLWAY_RPC_URL: chain.rpcUrl,
    }
    const { forced, refused, inUse } = await both(wallet)
    const status = await json(['channel', 'status', '--trust-escrow'], wallet)
    expect(
      status.setApart.map((c: { channelId: string; kind: string }) => [c.channelId, c.kind]),
    ).toEqual([
      [forced, 'forced-close'],
      [refused, 'refused'],
    ])
    const human = await cli(['channel', 'status', '--trust-escrow'], wallet)
    expect(human.stdout).toContain(`channel ${forced}: close requested`)
    expect(human.stdout).toContain(`channel ${refused}: set apart`)
    const r = await cli(['channel', 'request-close'], wallet)
    expect(r.stderr).toContain(`channel ${forced}`)
    expect(r.stderr).toContain('tollway channel withdraw')
    expect(r.code).toBe(2)
    // Nothing was sent for the channel in use.
    expect((await onChain(inUse))!.closeRequestedAt).toBe(0n)
    // Withdraw names only the channel under forced close.
    const wrong = await cli(['channel', 'withdraw', '--channel', refused], wallet)
    expect(wrong.code).toBe(2)
    expect(wrong.stderr).toContain(`channel ${refused}`)
    const unknown = await cli(['channel', 'close', '--channel', `0x${'ab'.repeat(32)}`], wallet)
    expect(unknown.code).toBe(2)
    // The one named is closed, whichever the default would have been.
    const named = await json(['channel', 'close', '--trust-escrow', '--channel', refused], wallet)
    expect(named).toMatchObject({ channelId: refused, kind: 'refused' })
    expect((await onChain(refused))!.finalized).toBe(true)
    expect((await json(['channel', 'status', '--trust-escrow'], wallet)).channel.channelId).toBe(
      inUse,
    )
  }, 60_000)
})

// Last in the file: it moves block time 15 minutes forward.
describe('channel request-close | withdraw', () => {
  const payer = chain.payers[3]!
  const wallet = { TOLLWAY_WALLET_KEY: payer.privateKey, TOLLWAY_RPC_URL: chain.rpcUrl }

  test('error: request-close without TOLLWAY_RPC_URL is a usage error naming it; without a channel too', async () => {
    const none = await cli(['channel', 'request-close'], wallet)
    expect(none.code).toBe(2)
    expect(none.stderr).toContain('No open channel')
    expect((await cli(['chat', 'hi', '--model', 'fake', '--trust-escrow'], wallet)).code).toBe(0)
    const r = await cli(['channel', 'request-close'], { TOLLWAY_WALLET_KEY: payer.privateKey })
    expect(r.code).toBe(2)
    expect(r.stderr).toContain('TOLLWAY_RPC_URL')
    const w = await cli(['channel', 'withdraw'], wallet)
    expect(w.code).toBe(2)
    expect(w.stderr).toContain('request-close first')
    // It names the channels there are, and what each is.
    const { channel } = await json(['channel', 'status', '--trust-escrow'], wallet)
    expect(w.stderr).toContain(`(there is ${channel.channelId} (in use))`)
  }, 30_000)

  test("error: request-close with a TOLLWAY_RPC_URL nothing answers on exits 4 with one line naming it, not viem's page; nothing is closed", async () => {
    const probe = Bun.listen({ hostname: '127.0.0.1', port: 0, socket: { data() {} } })
    const dead = `http://127.0.0.1:${probe.port}`
    probe.stop(true)
    // A provider's URL, its key in the path: the line names the node by its origin alone.
    const rpcUrl = `${dead}/v3/secret-provider-key`
    const r = await cli(['channel', 'request-close'], { ...wallet, TOLLWAY_RPC_URL: rpcUrl })
    expect(r.code).toBe(4)
    const lines = r.stderr.trim().split('\n')
    expect(lines.at(-1)).toContain(
      `The chain's node at ${dead} (--rpc-url / TOLLWAY_RPC_URL): HTTP request failed`,
    )
    expect(r.stderr).not.toContain('secret-provider-key')
    expect(r.stderr).not.toContain('Request body')
    expect(r.stderr).not.toContain('Docs:')
    expect(lines).toHaveLength(2) // the progress line, then the error
    const { channel } = await json(['channel', 'status', '--trust-escrow'], wallet)
    expect(channel).not.toBeNull()
  }, 30_000)

  test('behavior: request-close says when withdraw becomes possible; withdraw before then exits 3, after the grace period it returns the unsettled deposit', async () => {
    const { channel } = await json(['channel', 'status', '--trust-escrow'], wallet)
    const human = await cli(['channel', 'request-close'], wallet)
    expect(human.code).toBe(0)
    expect(human.stderr).toContain('requesting a close on the escrow (on chain)')
    expect(human.stderr).toContain('done')
    const at = human.stdout.match(/withdraw from (\S+)/)?.[1]
    expect(at).toBeDefined()
    // What the gateway may take meanwhile: a voucher signed ahead of the spending, not less.
    expect(human.stdout).toContain(
      'the gateway may settle what was spent, with the lowest voucher you signed that covers it',
    )
    const onChain = (await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: channel.channelId,
    }))!
    expect(onChain.closeRequestedAt).toBeGreaterThan(0n)
    expect(Date.parse(at!)).toBe(Number(onChain.closeRequestedAt + Escrow.closeGracePeriod) * 1000)

    const status = await json(['channel', 'status', '--trust-escrow'], wallet)
    expect(status.channel).toBeNull()
    expect(status.closing.channelId).toBe(channel.channelId)

    const early = await cli(['channel', 'withdraw', '--json'], wallet)
    expect(early.code).toBe(3)
    expect(JSON.parse(early.stderr).error.message).toContain(at!)

    await chain.increaseTime(Number(Escrow.closeGracePeriod))
    const before = await Token.balanceOf(chain.payeeClient, {
      token: chain.currencyAddress,
      owner: payer.address,
    })
    const r = await json(['channel', 'withdraw'], wallet)
    expect(r.channelId).toBe(channel.channelId)
    const after = await Escrow.getChannel(chain.payeeClient, {
      escrow: chain.escrowAddress,
      channelId: channel.channelId,
    })
    expect(after!.finalized).toBe(true)
    expect(BigInt(r.refund)).toBe(after!.deposit - after!.settled)
    expect(BigInt(r.refund) + BigInt(r.paid)).toBe(BigInt(channel.deposit))
    expect(
      await Token.balanceOf(chain.payeeClient, {
        token: chain.currencyAddress,
        owner: payer.address,
      }),
    ).toBe(before + BigInt(r.refund))
    expect((await json(['channel', 'status', '--trust-escrow'], wallet)).closing).toBeUndefined()
  }, 60_000)
})
