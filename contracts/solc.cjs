#!/usr/bin/env node
// forge's `solc` setting points here: forge speaks to a native solc binary, but this project
// compiles with the npm `solc` (WASM) package, whose own CLI rejects forge's flags. This wrapper
// answers `--version` and `--standard-json` (stdin -> stdout) the way a native solc does.
'use strict'
const fs = require('node:fs')
const path = require('node:path')
const solc = require('solc')

const args = process.argv.slice(2)
if (args.includes('--version')) {
  process.stdout.write(`solc, the solidity compiler commandline interface\nVersion: ${solc.version()}\n`)
  process.exit(0)
}

// Import roots: --base-path and every --include-path forge passes, then the cwd.
const roots = []
for (let i = 0; i < args.length; i++) {
  if ((args[i] === '--base-path' || args[i] === '--include-path') && args[i + 1]) roots.push(args[++i])
}
roots.push(process.cwd())

function findImports(importPath) {
  for (const root of roots) {
    const file = path.resolve(root, importPath)
    if (fs.existsSync(file)) return { contents: fs.readFileSync(file, 'utf8') }
  }
  if (fs.existsSync(importPath)) return { contents: fs.readFileSync(importPath, 'utf8') }
  return { error: `File not found: ${importPath}` }
}

const input = fs.readFileSync(0, 'utf8')
process.stdout.write(solc.compile(input, { import: findImports }))
