/**
 * The development chain `npm start` runs when no chain is configured, and the chain tests run on:
 * an anvil child process on a free loopback port with PaymentChannelEscrow and TestUSD deployed
 * and TestUSD minted to the dev accounts. Account 0 deploys, mints and is the payee (gateway);
 * the others are funded payers.
 */
import { existsSync, renameSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { type Address, getAddress, getContractAddress, type Hex, toHex } from 'viem'
import { mnemonicToAccount } from 'viem/accounts'
import {
  deployContract,
  getChainId,
  getCode,
  readContract,
  waitForTransactionReceipt,
  writeContract,
} from 'viem/actions'
import * as Client from './Client.ts'
import { DevChainError } from './Errors.ts'
import * as EscrowArtifact from './generated/PaymentChannelEscrow.ts'
import * as TestUSDArtifact from './generated/TestUSD.ts'

export type Options = {
  /** Default 31337. */
  chainId?: number | undefined
  /** Dev accounts, the payee included; default 10. */
  accounts?: number | undefined
  /** TestUSD base units minted to each payer; default 1,000,000 TUSD. */
  mint?: bigint | undefined
  /** Path of the anvil binary; default the one from the @foundry-rs/anvil package. */
  anvilPath?: string | undefined
  /**
   * Where anvil keeps the chain between runs (loaded at start when it exists, written every
   * second and at exit): a gateway restarted on its data dir finds its channels, deposits and
   * contracts where its database says they are. Default: none, a fresh chain every start.
   */
  stateFile?: string | undefined
  /**
   * anvil's port on 127.0.0.1; default 0, a free one. A port another process holds is given
   * up for a free one (`DevChain.portTaken` says so): a second gateway on one machine still
   * starts.
   */
  port?: number | undefined
}

export type Account = { address: Address; privateKey: Hex }

export type DevChain = {
  rpcUrl: string
  chainId: number
  escrowAddress: Address
  currencyAddress: Address
  /** The gateway's account: deployer, TestUSD minter, payee of channels. */
  payee: Account
  /** Funded accounts for trying the client (and for tests). */
  payers: Account[]
  /** Stops anvil; safe to call twice. */
  stop(): Promise<void>
  /** A state file anvil could not load, moved to this path (the chain started afresh). */
  setAside?: string | undefined
  /** The port asked for (`Options.port`), which another process held: anvil is on another. */
  portTaken?: number | undefined
}

/** anvil's well-known development mnemonic: these keys are public, never use them elsewhere. */
export const mnemonic = 'test test test test test test test test test test test junk'

/**
 * Runs a command (anvil) and ends it when this process ends, however it ends: a `kill -9`
 * of the gateway runs no exit handler, and anvil would be left holding its port. The shell
 * checks every second that its parent is alive (a parent killed that nobody has reaped yet,
 * a zombie, is not: signals still find it, and anvil held the port a restart asked for); a
 * signal to the shell ends both at once, and the shell exits only once anvil has (so a
 * stopped chain's port no longer answers).
 */
const WATCHED = `"$@" & child=$!
trap 'kill $child 2>/dev/null; wait $child; exit 0' INT TERM HUP
parent=$PPID
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  case "\${s##*') '}" in Z*|X*) return 1 ;; esac
}
while alive "$parent" && kill -0 "$child" 2>/dev/null; do sleep 1 & wait $!; done
kill $child 2>/dev/null
wait $child`

/**
 * Starts anvil, deploys the contracts and funds the payers. A state file anvil cannot load
 * (truncated by a full disk, say) is moved aside, `<file>.unreadable-<time>`, and the chain
 * starts afresh (`setAside` says where it went).
 */
export async function start(options: Options = {}): Promise<DevChain> {
  try {
    return await onPort(options)
  } catch (e) {
    const file = options.stateFile
    // Only when anvil itself says it could not read the file (any other failure, a timeout
    // say, leaves a good state where it is).
    const unreadable = e instanceof DevChainError && /for '--state/.test(e.details ?? '')
    if (!unreadable || !file || !existsSync(file)) throw e
    const aside = `${file}.unreadable-${new Date().toISOString().replace(/[:.]/g, '-')}`
    renameSync(file, aside)
    return { ...(await onPort(options)), setAside: aside }
  }
}

/** `run` on the port asked for, or on a free one if another process holds that. */
async function onPort(options: Options): Promise<DevChain> {
  try {
    return await run(options)
  } catch (e) {
    const taken = e instanceof DevChainError && /Address already in use/i.test(e.details ?? '')
    if (!taken || !options.port) throw e
    return { ...(await run({ ...options, port: 0 })), portTaken: options.port }
  }
}

async function run(options: Options): Promise<DevChain> {
  const chainId = options.chainId ?? 31337
  const count = options.accounts ?? 10
  const command = [
    options.anvilPath ?? anvilPath(),
    '--host',
    '127.0.0.1',
    '--port',
    String(options.port ?? 0),
    '--chain-id',
    String(chainId),
    '--accounts',
    String(count),
    '--mnemonic',
    mnemonic,
    ...(options.stateFile ? ['--state', options.stateFile, '--state-interval', '1'] : []),
  ]
  const resumed = options.stateFile !== undefined && existsSync(options.stateFile)
  let anvil: Bun.Subprocess<'ignore', 'pipe', 'pipe'>
  try {
    anvil = Bun.spawn(['sh', '-c', WATCHED, 'sh', ...command], {
      stdout: 'pipe',
      stderr: 'pipe',
      stdin: 'ignore',
    })
  } catch (cause) {
    throw new DevChainError(`Could not run anvil (${command[0]}): run npm install.`, { cause })
  }
  // If this process dies without calling stop(), do not leave anvil behind.
  const killOnExit = () => anvil.kill()
  process.once('exit', killOnExit)
  let stopped = false
  const stop = async () => {
    if (stopped) return
    stopped = true
    process.off('exit', killOnExit)
    anvil.kill()
    await anvil.exited
  }

  try {
    const rpcUrl = await listening(anvil)
    const accounts = devAccounts(count)
    const payee = accounts[0]!
    const payers = accounts.slice(1)
    const client = Client.from({
      rpcUrl,
      chainId,
      privateKey: payee.privateKey,
      pollingInterval: 50,
    })
    if ((await getChainId(client)) !== chainId)
      throw new DevChainError('anvil reports another chain id')

    const amount = options.mint ?? 1_000_000_000_000n
    // A chain resumed from its state file has the contracts where the first run put them (the
    // payee's first two transactions): deployed once.
    const first = {
      escrowAddress: getContractAddress({ from: payee.address, nonce: 0n }),
      currencyAddress: getContractAddress({ from: payee.address, nonce: 1n }),
    }
    const deployed =
      resumed &&
      (await getCode(client, { address: first.escrowAddress })) !== undefined &&
      (await getCode(client, { address: first.currencyAddress })) !== undefined
    if (deployed) {
      // The mints were a payer each, in order: a start killed midway (anvil dumps its state as
      // it exits) funded only the first payers, and the others stayed without tokens on every
      // later start. Counted by the supply (only the payee mints, nothing burns), not by the
      // payee's nonce: the gateway's settlements and closes raise that, so a data dir that had
      // served since such a kill skipped a payer a transaction.
      const supply = (await readContract(client, {
        address: first.currencyAddress,
        abi: TestUSDArtifact.abi,
        functionName: 'totalSupply',
      })) as bigint
      await mint(client, first.currencyAddress, payers.slice(Number(supply / amount)), amount)
      return { rpcUrl, chainId, ...first, payee, payers, stop }
    }
    const { escrowAddress, currencyAddress } = await deploy(client)
    await mint(client, currencyAddress, payers, amount)
    return { rpcUrl, chainId, escrowAddress, currencyAddress, payee, payers, stop }
  } catch (error) {
    await stop()
    throw error instanceof DevChainError
      ? error
      : new DevChainError('Could not start the development chain.', { cause: error })
  }
}

/** Mints `amount` TestUSD to each payer, in order (one transaction each); waits for the last. */
async function mint(
  client: Client.WalletClient,
  token: Address,
  payers: Account[],
  amount: bigint,
) {
  let last: Hex | undefined
  for (const payer of payers)
    last = await writeContract(client, {
      address: token,
      abi: TestUSDArtifact.abi,
      functionName: 'mint',
      args: [payer.address, amount],
    })
  if (last) await waitForTransactionReceipt(client, { hash: last })
}

/** The environment that points a gateway at this chain (what `Config.load` reads). */
export function env(
  chain: Pick<DevChain, 'rpcUrl' | 'chainId' | 'escrowAddress' | 'currencyAddress' | 'payee'>,
): Record<string, string> {
  return {
    CHAIN_RPC_URL: chain.rpcUrl,
    CHAIN_ID: String(chain.chainId),
    ESCROW_ADDRESS: chain.escrowAddress,
    CURRENCY_ADDRESS: chain.currencyAddress,
    PAYEE_PRIVATE_KEY: chain.payee.privateKey,
  }
}

/** Deploys PaymentChannelEscrow and TestUSD from the client's account (which can then mint). */
export async function deploy(
  client: Client.WalletClient,
): Promise<{ escrowAddress: Address; currencyAddress: Address }> {
  const escrowHash = await deployContract(client, {
    abi: EscrowArtifact.abi,
    bytecode: EscrowArtifact.bytecode,
  })
  const tokenHash = await deployContract(client, {
    abi: TestUSDArtifact.abi,
    bytecode: TestUSDArtifact.bytecode,
  })
  const [escrow, token] = await Promise.all([
    waitForTransactionReceipt(client, { hash: escrowHash }),
    waitForTransactionReceipt(client, { hash: tokenHash }),
  ])
  if (
    !escrow.contractAddress ||
    !token.contractAddress ||
    escrow.status !== 'success' ||
    token.status !== 'success'
  )
    throw new DevChainError('Deploying the contracts failed.', {
      details: `${escrowHash} ${tokenHash}`,
    })
  return {
    escrowAddress: getAddress(escrow.contractAddress),
    currencyAddress: getAddress(token.contractAddress),
  }
}

/** Human-readable lines describing a dev chain, for the gateway to print at start-up. */
export function summary(chain: Omit<DevChain, 'stop'>): string[] {
  return [
    'Development chain (anvil) — keys below are public test keys, never use them elsewhere',
    `  RPC URL:          ${chain.rpcUrl}`,
    `  chain id:         ${chain.chainId}`,
    `  escrow:           ${chain.escrowAddress}`,
    `  token (TestUSD):  ${chain.currencyAddress}`,
    `  payee (gateway):  ${chain.payee.address}`,
    ...chain.payers
      .slice(0, 2)
      .map((payer, i) => `  payer ${i + 1}:          ${payer.address} key ${payer.privateKey}`),
  ]
}

/** The first `count` accounts of anvil's development mnemonic. */
export function devAccounts(count: number): Account[] {
  return Array.from({ length: count }, (_, addressIndex) => {
    const account = mnemonicToAccount(mnemonic, { addressIndex })
    const key = account.getHdKey().privateKey
    if (!key) throw new DevChainError('Could not derive a development key.')
    return { address: account.address, privateKey: toHex(key) }
  })
}

/** The native anvil binary of this platform (not the node shim, so kill() reaches anvil itself). */
export function anvilPath(): string {
  const arch = process.arch === 'arm64' ? 'arm64' : 'amd64'
  const platform = process.platform === 'win32' ? 'win32' : process.platform
  const pkg = `@foundry-rs/anvil-${platform}-${arch}`
  try {
    const require = createRequire(import.meta.url)
    const bin = process.platform === 'win32' ? 'anvil.exe' : 'anvil'
    return join(dirname(require.resolve(`${pkg}/package.json`)), 'bin', bin)
  } catch (cause) {
    throw new DevChainError(`anvil is not installed for this platform: run npm install (${pkg}).`, {
      cause,
    })
  }
}

/** Resolves the RPC URL once anvil prints `Listening on host:port`; keeps draining its output. */
async function listening(anvil: Bun.Subprocess<'ignore', 'pipe', 'pipe'>): Promise<string> {
  const reader = anvil.stdout.getReader()
  const decoder = new TextDecoder()
  let output = ''
  const timeout = setTimeout(() => anvil.kill(), 15_000)
  try {
    for (;;) {
      const { value, done } = await reader.read()
      if (done) {
        const stderr = await new Response(anvil.stderr).text()
        throw new DevChainError('anvil exited before it was ready.', {
          details: `${output}\n${stderr}`,
        })
      }
      output += decoder.decode(value, { stream: true })
      const match = /Listening on (\S+)/.exec(output)
      if (match) {
        void drain(reader)
        void new Response(anvil.stderr).text()
        return `http://${match[1]}`
      }
    }
  } finally {
    clearTimeout(timeout)
  }
}

/** anvil logs every request; an unread pipe would fill up and stall it. */
async function drain(reader: { read(): Promise<{ done: boolean }> }) {
  try {
    while (!(await reader.read()).done) {}
  } catch {
    // anvil stopped
  }
}
