/** What the HTTP layer needs, wired by main.ts. */

import type { Config } from '../Config.ts'
import type * as Settlement from '../chain/Settlement.ts'
import type { Logger } from '../Logger.ts'
import type { Sql } from '../ledger/Db.ts'
import type { Waker } from '../ledger/Waker.ts'
import type { Signer } from '../metering/Receipt.ts'
import type { Router } from '../upstream/Router.ts'
import type { Drain } from './Drain.ts'
import type { Metrics } from './Metrics.ts'
import type { Payments } from './Payments.ts'

export type Deps = {
  config: Config
  sql: Sql
  router: Router
  log: Logger
  adminToken: string
  metrics: Metrics
  /** MPP payments; absent when no chain is configured. */
  payments?: Payments | undefined
  waker?: Waker | undefined
  settlement?: Settlement.Worker | undefined
  /** Signs completion receipts; absent when `receipts` is off. */
  receipts?: Signer | undefined
  /** The streams under way, which a stop ends with an error event (absent: none are ended). */
  drain?: Drain | undefined
}
