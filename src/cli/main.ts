/**
 * The `tollway` command: serve a gateway, operate one through its admin API, and chat with
 * one paying from a wallet. Exit codes: 0 ok, 2 usage, 3 payment refused, 4 server/network.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { z } from 'zod'
import { CliError, exitCodes, ServerError, UsageError } from './Errors.ts'
import * as Http from './Http.ts'

const help = {
  main: `Usage: tollway <command> [options]

Commands:
  serve                                   run a gateway (what npm start runs)
  accounts create --name N [--plan P]     create an account
  accounts get <account>                  show an account, its balance and keys
  accounts list [--limit N] [--cursor C]  accounts, newest first
  accounts set <account> [--plan P] [--name N]  move an account to another plan, or rename it
  usage <account> [--model M] [--from T] [--to T] [--limit N] [--cursor C]  an account's requests
  credits grant <account> <amount> [--note T]  grant (or, negative after --, debit) base units
  keys create <account> [--name N]        create an API key (shown once)
  keys list <account>                     list an account's keys
  keys revoke <account> <key-id>          revoke a key (or: keys revoke <key-id> --api-key K)
  channels list [--limit N] [--cursor C]  payment channels, most recently active first
  channels settle <channel-id>            settle a channel now
  chat "prompt" [--model M] [--stream] [--receipt]  chat, paying from TOLLWAY_WALLET_KEY
                                          (limits: --max-deposit, --max-total; see chat --help)
  channel status | close                  your channel with the gateway
  channel request-close | withdraw        force a close on chain when the gateway stops answering

Global options:
  --url U          the gateway (TOLLWAY_URL, default http://127.0.0.1:8787)
  --admin-token T  admin token (TOLLWAY_ADMIN_TOKEN or ADMIN_TOKEN, or $TOLLWAY_DATA_DIR/admin-token)
  --json           machine-readable output
  --timeout S      seconds to wait for the gateway's answer (TOLLWAY_TIMEOUT; default 30, and
                   300 for channels settle, which waits for its transaction)
  -h, --help       help for any command

Exit codes: 0 ok, 2 usage error, 3 payment refused, 4 server or network error.`,
  serve: `Usage: tollway serve

Runs a gateway configured by the environment and the JSON file TOLLWAY_CONFIG names (see the README,
"Configuration"). With nothing configured: embedded PGlite, a development chain, the echo model.`,
  accounts: `Usage:
  tollway accounts create --name N [--plan P] [--json]
  tollway accounts get <account> [--json]
  tollway accounts list [--limit N] [--cursor C] [--json]
  tollway accounts set <account> [--plan P] [--name N] [--json]
A new plan applies from the account's next request. Needs the admin token.`,
  usage: `Usage: tollway usage <account> [--model M] [--from T] [--to T] [--limit N] [--cursor C] [--json]
An account's requests, newest first: tokens, cost, status. --from (inclusive) and --to
(exclusive) take ISO 8601 dates (2026-11-01, UTC midnight) or date-times with a zone.
Needs the admin token.`,
  credits: `Usage: tollway credits grant <account> <amount> [--note T] [--json]
amount: base units, an integer; a negative amount debits (after --, as in
tollway credits grant <account> -- -5, so that it is not read as an option). Needs the admin token.`,
  keys: `Usage:
  tollway keys create <account> [--name N] [--json]   (admin token)
  tollway keys list <account> [--json]                (admin token)
  tollway keys revoke <account> <key-id> [--json]     (admin token)
  tollway keys revoke <key-id> --api-key K [--json]   (a key of the same account; TOLLWAY_API_KEY)`,
  channels: `Usage:
  tollway channels list [--limit N] [--cursor C] [--json]
  tollway channels settle <channel-id> [--json]
Needs the admin token.`,
  chat: `Usage: tollway chat "prompt" [--model M] [--stream] [--receipt] [--json]

Pays per token through a payment channel from TOLLWAY_WALLET_KEY (a private key, 0x…).
When the gateway pays the gas (feePayer) the channel opens by EIP-3009 signature: the
wallet key is all you need (no RPC URL, no gas). TOLLWAY_RPC_URL (--rpc-url) is needed only
for opens from your own account and for forced closes (tollway channel request-close).

Options:
  --model M          the model (default: the gateway's first)
  --stream           print tokens as they arrive
  --receipt          ask for the gateway's signed receipt and check it against its key and
                     the answer (a receipt that does not verify exits 4)
  --escrow A         an escrow contract you trust (repeatable; TOLLWAY_ESCROW, comma-separated)
  --trust-escrow     trust whatever escrow the gateway names (TOLLWAY_TRUST_ESCROW=1); only for
                     a development chain or a gateway you run yourself
  --insecure-http    pay a gateway on another machine over plain HTTP (TOLLWAY_INSECURE_HTTP=1);
                     anyone on the way could replay your vouchers: a test network only
                     (https, and http to this machine, need no flag)
  --max-deposit N    the most one channel holds, base units (TOLLWAY_MAX_DEPOSIT; default
                     10000000)
  --max-total N      the most your vouchers may total, base units (TOLLWAY_MAX_TOTAL; default
                     10000000), over every
                     channel $TOLLWAY_DATA_DIR/channels.json keeps (earlier commands' and closed
                     ones' too): a budget for the wallet at this gateway, not per command
  --rpc-url U        the chain's RPC URL (TOLLWAY_RPC_URL): only for opens from your own
                     account and for channel request-close | withdraw
The cost line goes to stderr; tokens to stdout.`,
  channel: `Usage:
  tollway channel status                       your channels with the gateway (kept in
                                               $TOLLWAY_DATA_DIR/channels.json)
  tollway channel close [--channel C]          ask the gateway to close and settle it
  tollway channel request-close [--channel C]  when the gateway stops answering: start a forced
                                               close on the escrow yourself (your transaction, your gas)
  tollway channel withdraw [--channel C]       15 minutes after request-close: take back what the
                                               gateway has not settled
Each takes --json. A channel the gateway refused as closing is set apart (status shows it): close takes the
channel in use, then that one, then one under forced close; request-close the one in use,
then that one (one forced close at a time: withdraw the one before first); --channel <id>
names the channel instead. Each prints the channel it acted on.
Needs TOLLWAY_WALLET_KEY; request-close and withdraw also TOLLWAY_RPC_URL (--rpc-url).
See tollway chat --help for the escrow options.`,
} as const

const options = {
  url: { type: 'string' },
  'admin-token': { type: 'string' },
  'api-key': { type: 'string' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
  name: { type: 'string' },
  plan: { type: 'string' },
  note: { type: 'string' },
  limit: { type: 'string' },
  cursor: { type: 'string' },
  model: { type: 'string' },
  stream: { type: 'boolean' },
  receipt: { type: 'boolean' },
  escrow: { type: 'string', multiple: true },
  'trust-escrow': { type: 'boolean' },
  'insecure-http': { type: 'boolean' },
  'max-deposit': { type: 'string' },
  'max-total': { type: 'string' },
  'rpc-url': { type: 'string' },
  channel: { type: 'string' },
  timeout: { type: 'string' },
  from: { type: 'string' },
  to: { type: 'string' },
} as const

const BaseUnits = z
  .string()
  .regex(/^\d{1,77}$/, 'must be a whole number of base units')
  .transform((v) => BigInt(v))

/** What --limit and --timeout take, said whatever was wrong (zod's own words name its types:
 * "expected number, received NaN"). */
const limitIs = 'must be a whole number from 1 to 200'
const timeoutIs = 'must be a number of seconds, above 0 and at most 3600'

/**
 * Everything a command reads from its options and the environment, read once by `run` (an option
 * wins over its variable; an empty variable counts as unset). Wallet values are checked by the
 * wallet commands, so a stray TOLLWAY_WALLET_KEY does not break the admin ones.
 */
const Settings = z.object({
  url: z.url(),
  json: z.boolean(),
  limit: z.coerce
    .number({ error: limitIs })
    .int({ error: limitIs })
    .min(1, { error: limitIs })
    .max(200, { error: limitIs })
    .optional(),
  maxDeposit: BaseUnits.refine((v) => v > 0n, 'must be at least 1'),
  maxTotal: BaseUnits,
  dataDir: z.string().min(1),
  adminToken: z.string().optional(),
  apiKey: z.string().optional(),
  walletKey: z.string().optional(),
  rpcUrl: z.url().optional(),
  /** Seconds an admin call waits for the gateway's answer. */
  timeout: z.coerce
    .number({ error: timeoutIs })
    .positive({ error: timeoutIs })
    .max(3600, { error: timeoutIs })
    .optional(),
  escrows: z.array(z.string()),
  trustEscrow: z.boolean(),
  insecureHttp: z.boolean(),
})
export type Settings = z.infer<typeof Settings>

/** Where each setting comes from, for messages. */
const sources: Record<string, string> = {
  url: '--url / TOLLWAY_URL',
  limit: '--limit',
  maxDeposit: '--max-deposit / TOLLWAY_MAX_DEPOSIT',
  maxTotal: '--max-total / TOLLWAY_MAX_TOTAL',
  dataDir: 'TOLLWAY_DATA_DIR',
  rpcUrl: '--rpc-url / TOLLWAY_RPC_URL',
  timeout: '--timeout / TOLLWAY_TIMEOUT',
}

export type Env = Record<string, string | undefined>

/** The settings of one run from its parsed options and environment. */
function settings(values: ReturnType<typeof parse>['values'], env: Env): Settings {
  const e = (name: string) => (env[name] === '' ? undefined : env[name])
  const parsed = Settings.safeParse({
    url: values.url ?? e('TOLLWAY_URL') ?? 'http://127.0.0.1:8787',
    json: values.json ?? false,
    limit: values.limit,
    maxDeposit: values['max-deposit'] ?? e('TOLLWAY_MAX_DEPOSIT') ?? '10000000',
    maxTotal: values['max-total'] ?? e('TOLLWAY_MAX_TOTAL') ?? '10000000',
    dataDir: e('TOLLWAY_DATA_DIR') ?? '.tollway',
    // ADMIN_TOKEN too: the variable the gateway itself reads.
    adminToken: values['admin-token'] ?? e('TOLLWAY_ADMIN_TOKEN') ?? e('ADMIN_TOKEN'),
    apiKey: values['api-key'] ?? e('TOLLWAY_API_KEY'),
    walletKey: e('TOLLWAY_WALLET_KEY'),
    rpcUrl: values['rpc-url'] ?? e('TOLLWAY_RPC_URL'),
    timeout: values.timeout ?? e('TOLLWAY_TIMEOUT'),
    escrows: [...(values.escrow ?? []), ...(e('TOLLWAY_ESCROW')?.split(',').filter(Boolean) ?? [])],
    trustEscrow: values['trust-escrow'] ?? e('TOLLWAY_TRUST_ESCROW') === '1',
    insecureHttp: values['insecure-http'] ?? e('TOLLWAY_INSECURE_HTTP') === '1',
  })
  if (!parsed.success)
    throw new UsageError(
      parsed.error.issues
        .map((i) => {
          const key = String(i.path[0])
          return `${sources[key] ?? `--${key}`}: ${i.message}`
        })
        .join('\n'),
    )
  return parsed.data
}

/** What a command writes; replaced in tests. `tty`: stderr is a terminal (progress dots). */
export type Io = { out: (s: string) => void; err: (s: string) => void; tty: boolean }

export type Context = {
  args: string[]
  values: ReturnType<typeof parse>['values']
  settings: Settings
  io: Io
}

function parse(argv: string[]) {
  try {
    return parseArgs({ args: argv, options, allowPositionals: true, strict: true })
  } catch (e) {
    const unknown = /^Unknown option '(-{1,2}[^']+)'/.exec((e as Error).message)?.[1]
    if (unknown) {
      // The gateway's own settings are environment variables (`PORT=8793 npm start`).
      const name = unknown.replace(/^-+/, '').split('=')[0]!.toUpperCase().replaceAll('-', '_')
      const setting = SERVE_ENV.includes(name)
        ? `; the gateway's ${name} is set in the environment (${name}=… npm start)`
        : ''
      // A negative number (`credits grant <account> -5`, a debit) reads as an option.
      const negative = /^-\d/.test(unknown)
        ? `; a negative number goes after -- (tollway credits grant <account> -- ${unknown})`
        : ''
      throw new UsageError(`unknown option ${unknown}${setting}${negative}; see tollway --help`)
    }
    throw new UsageError((e as Error).message)
  }
}

/** Settings `tollway serve` reads from the environment, which users try as options. */
const SERVE_ENV = [
  'PORT',
  'HOST',
  'DATABASE_URL',
  'ADMIN_TOKEN',
  'LOG_LEVEL',
  'TOLLWAY_CONFIG',
  'TOLLWAY_DATA_DIR',
]

/** The admin token: --admin-token, TOLLWAY_ADMIN_TOKEN or ADMIN_TOKEN, or the data dir's admin-token file. */
function adminToken(ctx: Context): string {
  if (ctx.settings.adminToken) return ctx.settings.adminToken
  const path = join(ctx.settings.dataDir, 'admin-token')
  try {
    return readFileSync(path, 'utf8').trim()
  } catch {
    throw new UsageError(
      `No admin token: pass --admin-token, set TOLLWAY_ADMIN_TOKEN (or ADMIN_TOKEN), or run where ${path} exists.`,
    )
  }
}

/** The gateway's admin API; `slowMs`: how long the call may take when --timeout is not given. */
const admin = (ctx: Context, slowMs?: number): Http.Target => ({
  url: ctx.settings.url,
  token: adminToken(ctx),
  // A token read from the data dir may be an earlier start's, when the gateway now runs with
  // its own ADMIN_TOKEN.
  unauthorized: ctx.settings.adminToken
    ? undefined
    : `the token was read from ${join(ctx.settings.dataDir, 'admin-token')}; a gateway started with ADMIN_TOKEN takes that one: pass it as --admin-token or TOLLWAY_ADMIN_TOKEN`,
  timeoutMs: Http.waitMs(ctx.settings, slowMs ?? 30_000),
})

/** The n-th positional argument after the command words, or a usage error naming it. */
function arg(ctx: Context, index: number, name: string): string {
  const v = ctx.args[index]
  if (!v) throw new UsageError(`Missing <${name}>.`)
  return v
}

function print(ctx: Context, value: unknown, human: string) {
  ctx.io.out(ctx.settings.json ? `${JSON.stringify(value)}\n` : `${visible(human)}\n`)
}

/**
 * `text` with its control characters (C0 and C1, but for line feeds and tabs) written as
 * `\u{…}`: what the CLI prints for people comes in part from the gateway (names, notes, error
 * messages), and printed raw, an escape sequence in a key's name (a window title, a screen
 * cleared, a clipboard written) was run by the operator's terminal.
 */
export function visible(text: string): string {
  return text.replace(/\p{Cc}/gu, (c) =>
    c === '\n' || c === '\t' ? c : `\\u{${c.charCodeAt(0).toString(16)}}`,
  )
}

type Command = (ctx: Context) => Promise<void>

const commands: Record<string, { help: string; run: Record<string, Command> | Command }> = {
  serve: {
    help: help.serve,
    run: async () => {
      const { serve } = await import('../main.ts')
      await serve()
      serving = true
    },
  },
  accounts: {
    help: help.accounts,
    run: {
      create: async (ctx) => {
        const name = ctx.values.name ?? ctx.args[2]
        if (!name) throw new UsageError('Missing --name.')
        const r = await Http.read(Created, admin(ctx), 'POST', '/admin/accounts', {
          name,
          ...(ctx.values.plan ? { plan: ctx.values.plan } : {}),
        })
        print(ctx, r, `account ${r.id} (plan ${r.plan})`)
      },
      get: async (ctx) => {
        const id = arg(ctx, 2, 'account')
        const r = await Http.read(
          Account.extend({
            keys: z.array(z.looseObject({ revoked_at: z.string().nullable().optional() })),
          }),
          admin(ctx),
          'GET',
          `/admin/accounts/${enc(id)}`,
        )
        // The keys that work; revoked ones (the gateway lists the latest 100) said apart.
        const active = r.keys.filter((k) => !k.revoked_at).length
        const revoked = r.keys.length - active
        print(
          ctx,
          r,
          `account ${r.id} "${r.name}" plan ${r.plan}: balance ${r.balance}, reserved ${r.reserved}, ${active} active ${active === 1 ? 'key' : 'keys'}${revoked ? ` (${revoked} revoked)` : ''}`,
        )
      },
      list: async (ctx) => {
        const r = await Http.read(
          page(Account),
          admin(ctx),
          'GET',
          `/admin/accounts${query({ limit: ctx.settings.limit, cursor: ctx.values.cursor })}`,
        )
        print(
          ctx,
          r,
          (r.data.map(accountLine).join('\n') || '(no accounts)') +
            (r.has_more ? `\n… more: --cursor ${r.next_cursor}` : ''),
        )
      },
      set: async (ctx) => {
        const id = arg(ctx, 2, 'account')
        const { plan, name } = ctx.values
        if (plan === undefined && name === undefined) throw new UsageError('Give --plan or --name.')
        const r = await Http.read(Account, admin(ctx), 'PATCH', `/admin/accounts/${enc(id)}`, {
          ...(plan !== undefined ? { plan } : {}),
          ...(name !== undefined ? { name } : {}),
        })
        print(ctx, r, accountLine(r))
      },
    },
  },
  usage: {
    help: help.usage,
    run: async (ctx) => {
      const id = arg(ctx, 1, 'account')
      const { model, from, to } = ctx.values
      const r = await Http.read(
        page(UsageRow),
        admin(ctx),
        'GET',
        `/admin/accounts/${enc(id)}/usage${query({ limit: ctx.settings.limit, cursor: ctx.values.cursor, model, from, to })}`,
      )
      print(
        ctx,
        r,
        (r.data
          .map(
            (u) =>
              `${u.created_at}  ${u.id}  ${u.model}  ${u.total_tokens} tokens  cost ${u.cost}  ${u.status}`,
          )
          .join('\n') || '(no usage)') + (r.has_more ? `\n… more: --cursor ${r.next_cursor}` : ''),
      )
    },
  },
  credits: {
    help: help.credits,
    run: {
      grant: async (ctx) => {
        const id = arg(ctx, 2, 'account')
        const amount = arg(ctx, 3, 'amount')
        if (!/^-?\d{1,77}$/.test(amount))
          throw new UsageError('<amount> must be an integer number of base units.')
        const r = await Http.read(
          Balance,
          admin(ctx),
          'POST',
          `/admin/accounts/${enc(id)}/credits`,
          { amount, ...(ctx.values.note ? { note: ctx.values.note } : {}) },
        )
        print(ctx, r, `balance ${r.balance}`)
      },
    },
  },
  keys: {
    help: help.keys,
    run: {
      create: async (ctx) => {
        const id = arg(ctx, 2, 'account')
        const r = await Http.read(NewKey, admin(ctx), 'POST', `/admin/accounts/${enc(id)}/keys`, {
          name: ctx.values.name ?? 'cli',
        })
        print(ctx, r, `${r.key}\n(key id ${r.id}; the key is shown only once)`)
      },
      list: async (ctx) => {
        const id = arg(ctx, 2, 'account')
        const r = await Http.read(WithKeys, admin(ctx), 'GET', `/admin/accounts/${enc(id)}`)
        print(
          ctx,
          r.keys,
          r.keys
            .map((k) => `${k.id}  ${k.prefix}…  ${k.name}${k.revoked_at ? '  (revoked)' : ''}`)
            .join('\n') || '(no keys)',
        )
      },
      revoke: async (ctx) => {
        // Two arguments: the operator's form (admin token); one: a key of the same account.
        if (ctx.args[3] !== undefined) {
          const account = arg(ctx, 2, 'account')
          const id = arg(ctx, 3, 'key-id')
          const r = await Http.request(
            admin(ctx),
            'DELETE',
            `/admin/accounts/${enc(account)}/keys/${enc(id)}`,
          )
          return print(ctx, r, `revoked ${id}`)
        }
        const id = arg(ctx, 2, 'key-id')
        const key = ctx.settings.apiKey
        if (!key)
          throw new UsageError(
            'Revoking needs the account (tollway keys revoke <account> <key-id>, with the admin token) or a key of the same account (--api-key or TOLLWAY_API_KEY).',
          )
        const r = await Http.request(
          { url: ctx.settings.url, token: key },
          'DELETE',
          `/v1/keys/${enc(id)}`,
        )
        print(ctx, r, `revoked ${id}`)
      },
    },
  },
  channels: {
    help: help.channels,
    run: {
      list: async (ctx) => {
        const q = query({ limit: ctx.settings.limit, cursor: ctx.values.cursor })
        const r = await Http.read(page(ChannelRow), admin(ctx), 'GET', `/admin/channels${q}`)
        print(
          ctx,
          r,
          (r.data
            .map(
              (c) =>
                `${c.channelId}  ${c.status}  payer ${c.payer}  deposit ${c.deposit}  accepted ${c.acceptedCumulative}  settled ${c.settled}`,
            )
            .join('\n') || '(no channels)') +
            (r.has_more ? `\n… more: --cursor ${r.next_cursor}` : ''),
        )
      },
      settle: async (ctx) => {
        const id = arg(ctx, 2, 'channel-id')
        // Said before the answer, which waits for the transaction: the gateway may yet refuse
        // (a channel it does not know, nothing to settle), so it asks, it does not settle.
        ctx.io.err(ctx.settings.json ? '' : 'asking the gateway to settle on chain…\n')
        // A settlement waits for its transaction to be mined (and for the lock): minutes.
        const r = await Http.read(
          Settled,
          admin(ctx, 300_000),
          'POST',
          `/admin/channels/${enc(id)}/settle`,
        )
        const { status, txHash, error } = r.result
        print(
          ctx,
          r,
          status === 'nothing'
            ? nothingToSettle(r.channel)
            : `${status}${txHash ? ` ${txHash}` : ''}${error ? `: ${error.message}` : ''}`,
        )
        // Answered, but not settled (reverted, failed, or busy): not a success.
        if (status !== 'confirmed' && status !== 'nothing')
          throw new ServerError(`the settlement did not go through (${status}).`)
      },
    },
  },
  chat: {
    help: help.chat,
    run: async (ctx) => (await import('./Wallet.ts')).chat(ctx),
  },
  channel: {
    help: help.channel,
    run: {
      status: async (ctx) => (await import('./Wallet.ts')).status(ctx),
      close: async (ctx) => (await import('./Wallet.ts')).close(ctx),
      'request-close': async (ctx) => (await import('./Wallet.ts')).requestClose(ctx),
      withdraw: async (ctx) => (await import('./Wallet.ts')).withdraw(ctx),
    },
  },
}

const enc = encodeURIComponent

/**
 * Why a settlement had nothing to send: the gateway settles only a voucher the payer signed at
 * or below what the channel spent, above what is settled, and a paying client signs ahead of
 * its spending, so an open channel often has none until its close.
 */
function nothingToSettle(channel?: { status?: string; spent?: string; settled?: string }): string {
  if (!channel?.status) return 'nothing to settle'
  if (channel.status !== 'open') return `nothing to settle: the channel is ${channel.status}`
  return `nothing to settle: no accepted voucher at or below what the channel spent (${channel.spent}) is above what is settled (${channel.settled}); the payer signs ahead of its spending, and its close settles what it spent`
}

/** Set once `serve` is serving: the process then keeps running after `run` returns. */
let serving = false

/** A query string of the values that are set. */
function query(values: Record<string, string | number | undefined>): string {
  const q = new URLSearchParams()
  for (const [k, v] of Object.entries(values)) if (v !== undefined) q.set(k, String(v))
  const s = q.toString()
  return s ? `?${s}` : ''
}

// What the commands read of the gateway's answers (Http.read); what else an answer holds is
// kept, for --json.
const Account = z
  .object({
    id: z.string(),
    name: z.string(),
    plan: z.string(),
    balance: z.string(),
    reserved: z.string(),
  })
  .loose()
type Account = z.output<typeof Account>
const page = <T extends z.ZodType>(item: T) =>
  z
    .object({ data: z.array(item), has_more: z.boolean(), next_cursor: z.string().nullish() })
    .loose()
const Created = z.object({ id: z.string(), plan: z.string() }).loose()
const WithKeys = z
  .object({
    keys: z.array(
      z
        .object({
          id: z.string(),
          name: z.string(),
          prefix: z.string(),
          revoked_at: z.string().nullish(),
        })
        .loose(),
    ),
  })
  .loose()
const UsageRow = z
  .object({
    id: z.string(),
    model: z.string(),
    total_tokens: z.number(),
    cost: z.string(),
    status: z.string(),
    created_at: z.string(),
  })
  .loose()
const Balance = z.object({ balance: z.string() }).loose()
const NewKey = z.object({ id: z.string(), key: z.string() }).loose()
const ChannelRow = z
  .object({
    channelId: z.string(),
    payer: z.string(),
    deposit: z.string(),
    acceptedCumulative: z.string(),
    settled: z.string(),
    status: z.string(),
  })
  .loose()
const Settled = z
  .object({
    result: z
      .object({
        status: z.string(),
        txHash: z.string().optional(),
        error: z.object({ message: z.string() }).loose().optional(),
      })
      .loose(),
    channel: z
      .object({
        status: z.string().optional(),
        spent: z.string().optional(),
        settled: z.string().optional(),
      })
      .loose()
      .optional(),
  })
  .loose()

const accountLine = (a: Account) =>
  `${a.id}  "${a.name}"  plan ${a.plan}  balance ${a.balance}  reserved ${a.reserved}`

/** Runs the CLI with `env` (the process environment, read once at the entry); the exit code. */
export async function run(argv: string[], env: Env, io: Io) {
  // Known before parsing, so that an option that fails to parse is reported as JSON too.
  let json = argv.includes('--json')
  try {
    const { values, positionals } = parse(argv)
    json = values.json ?? false
    const [name, sub] = positionals
    if (!name) {
      io.out(`${help.main}\n`)
      return values.help ? exitCodes.ok : exitCodes.usage
    }
    // Own names only: `toString` or `constructor` would find Object's members and run them.
    const command = Object.hasOwn(commands, name) ? commands[name] : undefined
    if (!command) throw new UsageError(`Unknown command "${name}". Run tollway --help.`)
    if (values.help) {
      io.out(`${command.help}\n`)
      return exitCodes.ok
    }
    const runner =
      typeof command.run === 'function'
        ? command.run
        : Object.hasOwn(command.run, sub ?? '')
          ? command.run[sub ?? '']
          : undefined
    if (!runner)
      throw new UsageError(
        `${sub ? `Unknown subcommand "${name} ${sub}"` : `Missing subcommand for "${name}"`}.\n${command.help}`,
      )
    await runner({ args: positionals, values, settings: settings(values, env), io })
    return exitCodes.ok
  } catch (e) {
    const error = e instanceof CliError ? e : (await import('./Wallet.ts')).classify(e as Error)
    io.err(
      json
        ? `${JSON.stringify({ error: { name: error.name, message: error.message, code: error.code, details: error.details } }, (_, v) => (typeof v === 'bigint' ? v.toString() : v))}\n`
        : `tollway: ${visible(error.message)}\n`,
    )
    return error.code
  }
}

if (import.meta.main) {
  const code = await run(process.argv.slice(2), process.env, {
    out: (s) => process.stdout.write(s),
    err: (s) => process.stderr.write(s),
    tty: process.stderr.isTTY,
  })
  // `serve` keeps running (whatever options came before it); everything else exits.
  if (!serving || code !== 0) process.exit(code)
}
