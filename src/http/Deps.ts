/** What the HTTP layer needs, wired by main.ts. */
import type { Config } from '../Config.ts'
import type { Logger } from '../Logger.ts'
import type { Sql } from '../ledger/Db.ts'
import type { Router } from '../upstream/Router.ts'

export type Deps = {
  config: Config
  sql: Sql
  router: Router
  log: Logger
  adminToken: string
}
