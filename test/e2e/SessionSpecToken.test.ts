/**
 * draft-evm-session-00, "Server-Paid Fees": servers MUST NOT advertise `feePayer: true` for
 * tokens whose authorization paths they cannot service (and "Relayed / Gasless Operations
 * Profile": a server MUST NOT advertise a capability whose backing function it cannot use).
 * A gateway whose currency is a plain ERC-20 (no EIP-3009 `receiveWithAuthorization`) can
 * only take client-broadcast opens and top-ups: its challenge must not offer `feePayer` nor
 * the `authorization` credential type.
 */
import { afterAll, expect, test } from 'bun:test'
import { readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { resolve } from 'node:path'
import type { Hex } from 'viem'
import { privateKeyToAccount } from 'viem/accounts'
import { deployContract, waitForTransactionReceipt } from 'viem/actions'
import { challengeOf, PayingSession } from '../../src/client/Session.ts'
import * as Channels from '../../src/ledger/Channels.ts'
import * as ChainEscrow from '../../src/payment/evm/ChainEscrow.ts'
import * as Anvil from '../helpers/Anvil.ts'
import * as Gateway from '../helpers/Gateway.ts'

const chain = await Anvil.start()
afterAll(() => chain.stop())

/** A plain OpenZeppelin ERC-20. */
const PLAIN = `// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;
import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
contract PlainUSD is ERC20 {
    constructor() ERC20("Plain USD", "PUSD") { _mint(msg.sender, 1e18); }
    function decimals() public pure override returns (uint8) { return 6; }
}`

/** An ERC-20 with EIP-3009 in its original `(v, r, s)` form only (as USDC before v2.2). */
const VRS = `// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;
import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
contract PlainUSD is ERC20 {
    mapping(address => mapping(bytes32 => bool)) public authorizationState;
    constructor() ERC20("VRS USD", "VUSD") { _mint(msg.sender, 1e18); }
    function decimals() public pure override returns (uint8) { return 6; }
    function receiveWithAuthorization(address, address, uint256, uint256, uint256, bytes32, uint8, bytes32, bytes32) external pure {
        revert("not in this test");
    }
}`

/** Token `source` (its contract named PlainUSD), compiled with the npm solc the contracts use. */
function compilePlainToken(source = PLAIN): { abi: unknown[]; bytecode: Hex } {
  const require = createRequire(import.meta.url)
  const solc = require('solc') as { compile(input: string, cb: unknown): string }
  const root = resolve(import.meta.dir, '../..')
  const input = {
    language: 'Solidity',
    sources: { 'PlainUSD.sol': { content: source } },
    settings: {
      evmVersion: 'cancun',
      optimizer: { enabled: true, runs: 200 },
      outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object'] } },
    },
  }
  const output = JSON.parse(
    solc.compile(JSON.stringify(input), {
      import: (path: string) => {
        try {
          return { contents: readFileSync(resolve(root, 'node_modules', path), 'utf8') }
        } catch {
          return { error: `not found: ${path}` }
        }
      },
    }),
  ) as {
    errors?: { severity: string; formattedMessage: string }[]
    contracts: Record<
      string,
      Record<string, { abi: unknown[]; evm: { bytecode: { object: string } } }>
    >
  }
  const errors = (output.errors ?? []).filter((e) => e.severity === 'error')
  if (errors.length > 0) throw new Error(errors.map((e) => e.formattedMessage).join('\n'))
  const artifact = output.contracts['PlainUSD.sol']!.PlainUSD!
  return { abi: artifact.abi, bytecode: `0x${artifact.evm.bytecode.object}` }
}

/** Deploys token `source` (see compilePlainToken); its address. */
async function deployed(source = PLAIN): Promise<Hex> {
  const { abi, bytecode } = compilePlainToken(source)
  const hash = await deployContract(chain.payeeClient, {
    abi: abi as never,
    bytecode,
    account: chain.payeeClient.account,
    chain: chain.payeeClient.chain,
  })
  return (await waitForTransactionReceipt(chain.payeeClient, { hash })).contractAddress!
}

test('the EIP-3009 probe: the development token (the bytes-signature form) has it; a plain ERC-20, or one with only the (v, r, s) form, has not', async () => {
  const has = (token: Hex) => ChainEscrow.hasEip3009(chain.payeeClient, token, chain.escrowAddress)
  expect(await has(chain.currencyAddress)).toBe(true)
  expect(await has(await deployed())).toBe(false)
  expect(await has(await deployed(VRS))).toBe(false)
})

test('a gateway whose currency has no EIP-3009 does not advertise feePayer or the authorization credential type', async () => {
  const contractAddress = await deployed()
  const gw = await Gateway.create({
    chain: { ...Gateway.chainOf(chain), currencyAddress: contractAddress! },
    payments: { challengeSecret: 'test-challenge-secret-0123456789' },
  })
  const res = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    body: JSON.stringify({ model: 'fake', messages: [{ role: 'user', content: 'hi' }] }),
  })
  expect(res.status).toBe(402)
  const challenge = challengeOf(res.headers.get('www-authenticate'))!
  const details = (
    challenge.request as { methodDetails: { feePayer?: boolean; credentialTypes?: string[] } }
  ).methodDetails
  expect(details.feePayer === true).toBe(false)
  expect(details.credentialTypes ?? ['hash']).not.toContain('authorization')
  // An EIP-3009 open sent anyway is refused (a type the challenge did not offer) before
  // anything is submitted.
  const session = new PayingSession({
    account: privateKeyToAccount(chain.payers[0]!.privateKey),
    challenge,
    tokenDomain: {
      name: 'Plain USD',
      version: '1',
      chainId: chain.chainId,
      verifyingContract: contractAddress!,
    },
  })
  const open = await session.openWithAuthorization({ deposit: 100_000n, initial: 0n })
  const refused = await fetch(`${gw.url}/v1/chat/completions`, {
    method: 'POST',
    headers: { authorization: open },
  })
  expect(refused.status).toBe(402)
  expect(((await refused.json()) as { type: string }).type).toBe(
    'https://paymentauth.org/problems/verification-failed',
  )
  expect(await Channels.get(gw.sql, session.channelId!)).toBeUndefined()
}, 60_000)
