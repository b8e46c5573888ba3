import { describe, expect, test } from 'bun:test'
import fc from 'fast-check'
import * as Chat from '../../src/upstream/Chat.ts'

const chunkLike = fc.record(
  {
    id: fc.oneof(fc.string(), fc.integer()),
    object: fc.constant('chat.completion.chunk'),
    created: fc.oneof(fc.integer(), fc.string()),
    model: fc.string(),
    choices: fc.oneof(
      fc.array(
        fc.record(
          {
            index: fc.oneof(fc.nat(), fc.string()),
            delta: fc.oneof(
              fc.record(
                {
                  role: fc.oneof(fc.constant('assistant'), fc.integer()),
                  content: fc.oneof(fc.string(), fc.constant(null), fc.integer()),
                  reasoning_content: fc.oneof(fc.string(), fc.constant(null)),
                  tool_calls: fc.array(
                    fc.record({ function: fc.record({ arguments: fc.string() }) }),
                  ),
                },
                { requiredKeys: [] },
              ),
              fc.jsonValue(),
            ),
            finish_reason: fc.oneof(
              fc.constantFrom('stop', 'length'),
              fc.constant(null),
              fc.integer(),
            ),
          },
          { requiredKeys: [] },
        ),
        { maxLength: 3 },
      ),
      fc.jsonValue(),
    ),
    usage: fc.oneof(
      fc.constant(null),
      fc.record(
        {
          prompt_tokens: fc.oneof(fc.nat(), fc.double()),
          completion_tokens: fc.nat(),
          total_tokens: fc.integer(),
        },
        { requiredKeys: [] },
      ),
    ),
  },
  { requiredKeys: [] },
)

describe('asChunk', () => {
  test('property: the hand-written fast path accepts only what the Chunk schema accepts, with the same result', () => {
    fc.assert(
      fc.property(fc.oneof(chunkLike, fc.jsonValue()), (value) => {
        if (JSON.stringify(value).includes('__proto__')) return // the caller's rule
        const fast = Chat.asChunk(structuredClone(value))
        if (fast === undefined) return
        const parsed = Chat.Chunk.safeParse(structuredClone(value))
        expect(parsed.success).toBe(true)
        expect(fast).toEqual(parsed.data as never)
      }),
      { numRuns: 5000 },
    )
  })

  test('behavior: the common chunk takes the fast path; tool calls and odd shapes do not', () => {
    expect(
      Chat.asChunk({ choices: [{ index: 0, delta: { content: 'hi' }, finish_reason: null }] }),
    ).toBeDefined()
    expect(
      Chat.asChunk({ choices: [], usage: { prompt_tokens: 1, completion_tokens: 2 } }),
    ).toBeDefined()
    expect(Chat.asChunk({ choices: [{ index: 0, delta: { tool_calls: [] } }] })).toBeUndefined()
    expect(Chat.asChunk({ choices: 'x' })).toBeUndefined()
    expect(Chat.asChunk([])).toBeUndefined()
  })
})
