/** The paying client: `import { createFetch } from 'tollway/client'`. */

export type { Receipt } from '../metering/Receipt.ts'
export { resultDigest as receiptDigest, verify as verifyReceipt } from '../metering/Receipt.ts'
export * from './Errors.ts'
export { createFetch, type Options, type PayingFetch } from './Fetch.ts'
export { challengeOf, PayingSession } from './Session.ts'
export type { ChannelState } from './Store.ts'
export * as Store from './Store.ts'
