#!/usr/bin/env node
// Drive an E2B-compatible control plane with the official E2B JavaScript SDK, unchanged.
//
// The SDK is configured only by the environment, as a user would: E2B_API_URL (the server)
// and E2B_API_KEY (the tenant's key). It is loaded from the pinned install `cargo xtask test`
// puts in target/tools/e2b-js (override with SANDBOXER_E2B_JS_SDK), resolved the way Node
// resolves `import { Sandbox } from 'e2b'`.
//
//   scenario.mjs lifecycle --template saas-stub --metadata run=ID [--metadata k=v] --timeout 30
//   scenario.mjs create --template saas-stub [--metadata k=v] [--timeout N]
//   scenario.mjs foreign --sandbox-id ID
//   scenario.mjs insufficient --template saas-stub [--timeout N]
//   scenario.mjs burst --template saas-stub --count 64 [--timeout N] [--kill]
//   scenario.mjs connect --sandbox-id ID [--timeout N]
//   scenario.mjs set-timeout --sandbox-id ID --timeout N [--expect-refusal]
//   scenario.mjs list [--state running] [--limit 2] [--metadata k=v]
//   scenario.mjs kill --sandbox-id ID
//
// Timeouts on the command line are seconds, as in python/scenario.py; the JS SDK takes
// milliseconds, so they are multiplied here. Each run prints one JSON object on stdout with
// the same fields as the Python client's, and exits 0 when every step behaved as the SDK
// allows, 1 otherwise (with "problems" naming each).

import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'

const repository = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
const sdkDirectory =
  process.env.SANDBOXER_E2B_JS_SDK || join(repository, 'target', 'tools', 'e2b-js')

class Report {
  constructor(scenario, sdkVersion) {
    this.fields = { sdk: 'js', sdk_version: sdkVersion, scenario, ok: true, steps: [] }
    this.problems = []
  }

  step(name, outcome) {
    this.fields.steps.push({ step: name, ...outcome })
    return outcome
  }

  expect(condition, problem) {
    if (!condition) this.problems.push(problem)
    return condition
  }

  set(fields) {
    Object.assign(this.fields, fields)
  }

  finish() {
    if (this.problems.length > 0) {
      this.fields.ok = false
      this.fields.problems = this.problems
    }
    process.stdout.write(JSON.stringify(this.fields) + '\n')
    return this.fields.ok ? 0 : 1
  }
}

function errorOutcome(error) {
  // undici reports a transport failure as TypeError('fetch failed') with the reason in `cause`.
  const cause = error?.cause ? ` (cause: ${error.cause.code ?? error.cause.name}: ${error.cause.message})` : ''
  return {
    outcome: 'raised',
    exception: error?.name ?? typeof error,
    status: error?.statusCode ?? null,
    message: String(error?.message ?? error) + cause,
  }
}

// Run one SDK call as a step; an exception is recorded, not thrown.
async function attempt(report, name, call) {
  try {
    return [true, await call()]
  } catch (error) {
    report.step(name, errorOutcome(error))
    return [false, error]
  }
}

function infoFields(info) {
  return {
    sandbox_id: info.sandboxId,
    template_id: info.templateId,
    name: info.name ?? null,
    metadata: info.metadata,
    state: info.state,
    started_at: info.startedAt.toISOString(),
    end_at: info.endAt.toISOString(),
    cpu_count: info.cpuCount,
    memory_mb: info.memoryMB,
    envd_version: info.envdVersion,
  }
}

function sameMetadata(actual, expected) {
  const keys = Object.keys(expected)
  return keys.length === Object.keys(actual).length && keys.every((k) => actual[k] === expected[k])
}

export async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      template: { type: 'string' },
      metadata: { type: 'string', multiple: true, default: [] },
      timeout: { type: 'string' },
      'new-timeout': { type: 'string', default: '60' },
      'sandbox-id': { type: 'string' },
      count: { type: 'string', default: '64' },
      kill: { type: 'boolean', default: false },
      'expect-refusal': { type: 'boolean', default: false },
      state: { type: 'string', multiple: true, default: [] },
      limit: { type: 'string' },
    },
  })
  const scenario = positionals[0]

  let sdk
  let sdkVersion = null
  try {
    const require = createRequire(join(sdkDirectory, 'package.json'))
    sdk = await import(pathToFileURL(require.resolve('e2b')).href)
    sdkVersion = require('e2b/package.json').version
  } catch (error) {
    const report = new Report(scenario, sdkVersion)
    report.expect(false, `cannot load the E2B SDK from ${sdkDirectory}: ${error.message}; run \`cargo xtask test\` first`)
    return report.finish()
  }
  const { Sandbox, NotFoundError, SandboxError } = sdk

  const report = new Report(scenario, sdkVersion)
  const seconds = (name) => (values[name] === undefined ? undefined : Number(values[name]))
  const milliseconds = (name) => (values[name] === undefined ? undefined : Number(values[name]) * 1000)
  const metadata = Object.fromEntries(
    values.metadata.map((pair) => {
      const at = pair.indexOf('=')
      if (at < 1) throw new Error(`--metadata ${pair}: expected KEY=VALUE`)
      return [pair.slice(0, at), pair.slice(at + 1)]
    })
  )
  const isNotFound = (error) => error instanceof NotFoundError
  // A refusal the SDK surfaces as its generic error: a 4xx other than 401, 404 and 429.
  const isRefusal = (error) =>
    error?.constructor === SandboxError &&
    error.statusCode >= 400 &&
    error.statusCode < 500 &&
    ![401, 404, 429].includes(error.statusCode)

  async function listAll(opts) {
    const paginator = Sandbox.list(opts)
    const pages = []
    const infos = []
    const tokens = []
    while (paginator.hasNext) {
      const items = await paginator.nextItems()
      pages.push(items.map((i) => i.sandboxId))
      infos.push(...items)
      tokens.push(paginator.nextToken ?? null)
    }
    report.step('list', { outcome: 'ok', pages, next_tokens: tokens })
    return { pages, infos }
  }

  const scenarios = {
    async lifecycle() {
      const timeoutMs = milliseconds('timeout')
      let [ok, sandbox] = await attempt(report, 'create', () =>
        Sandbox.create(values.template, { timeoutMs, metadata })
      )
      if (!report.expect(ok, 'create failed')) return
      const sandboxId = sandbox.sandboxId
      report.set({ sandbox_id: sandboxId })
      report.step('create', { outcome: 'ok', sandbox_id: sandboxId })

      let info
      ;[ok, info] = await attempt(report, 'get_info', () => sandbox.getInfo())
      if (!report.expect(ok, 'get_info after create failed')) return
      report.step('get_info', { outcome: 'ok', ...infoFields(info) })
      const firstEndAt = info.endAt
      report.expect(info.sandboxId === sandboxId, 'get_info answered another sandbox')
      report.expect(info.templateId === values.template, 'templateID differs from the one asked for')
      report.expect(sameMetadata(info.metadata, metadata), 'metadata did not come back as given')
      report.expect(info.state === 'running', 'a new sandbox is not running')
      report.expect(info.endAt > info.startedAt, 'endAt is not after startedAt')

      let listed
      ;[ok, listed] = await attempt(report, 'list', () =>
        listAll({ query: { metadata, state: ['running'] } })
      )
      if (report.expect(ok, 'list with the metadata filter failed')) {
        const ids = listed.infos.map((i) => i.sandboxId)
        report.expect(ids.includes(sandboxId), 'the metadata filter left the sandbox out')
        report.expect(
          listed.infos.every((i) => Object.entries(metadata).every(([k, v]) => i.metadata[k] === v)),
          'the metadata filter let another sandbox through'
        )
      }

      const newTimeout = seconds('new-timeout')
      ;[ok] = await attempt(report, 'set_timeout', () => sandbox.setTimeout(newTimeout * 1000))
      if (report.expect(ok, 'set_timeout failed')) {
        report.step('set_timeout', { outcome: 'ok', timeout: newTimeout })
      }

      ;[ok, info] = await attempt(report, 'get_info_after_set_timeout', () => sandbox.getInfo())
      if (report.expect(ok, 'get_info after set_timeout failed')) {
        report.step('get_info_after_set_timeout', { outcome: 'ok', ...infoFields(info) })
        report.expect(info.endAt > firstEndAt, 'set_timeout did not move endAt later')
      }

      let killed
      ;[ok, killed] = await attempt(report, 'kill', () => sandbox.kill())
      if (report.expect(ok, 'kill failed')) {
        report.step('kill', { outcome: 'ok', returned: killed })
        report.expect(killed === true, 'kill of a live sandbox did not answer true')
      }

      let error
      ;[ok, error] = await attempt(report, 'get_info_after_kill', () => sandbox.getInfo())
      report.expect(!ok && isNotFound(error), 'get_info after kill did not raise not-found')

      ;[ok, killed] = await attempt(report, 'kill_again', () => Sandbox.kill(sandboxId))
      if (report.expect(ok, 'a second kill raised instead of answering false')) {
        report.step('kill_again', { outcome: 'ok', returned: killed })
        report.expect(killed === false, 'a second kill did not answer false')
      }
    },

    async create() {
      const [ok, sandbox] = await attempt(report, 'create', () =>
        Sandbox.create(values.template, { timeoutMs: milliseconds('timeout'), metadata })
      )
      if (report.expect(ok, 'create failed')) {
        report.set({ sandbox_id: sandbox.sandboxId })
        report.step('create', { outcome: 'ok', sandbox_id: sandbox.sandboxId })
      }
    },

    // Every call on a sandbox this key does not own must look like a missing sandbox.
    async foreign() {
      const sandboxId = values['sandbox-id']
      for (const [name, call] of [
        ['get_info', () => Sandbox.getInfo(sandboxId)],
        ['set_timeout', () => Sandbox.setTimeout(sandboxId, 60_000)],
        ['connect', () => Sandbox.connect(sandboxId)],
      ]) {
        const [ok, error] = await attempt(report, name, call)
        if (ok) report.step(name, { outcome: 'ok' })
        report.expect(!ok && isNotFound(error), `${name} of a foreign sandbox did not raise not-found`)
      }
      const [ok, killed] = await attempt(report, 'kill', () => Sandbox.kill(sandboxId))
      if (report.expect(ok, 'kill of a foreign sandbox raised instead of answering false')) {
        report.step('kill', { outcome: 'ok', returned: killed })
        report.expect(killed === false, 'kill of a foreign sandbox did not answer false')
      }
      const [listedOk, listed] = await attempt(report, 'list', () => listAll({}))
      if (report.expect(listedOk, 'list failed')) {
        report.expect(
          !listed.infos.some((i) => i.sandboxId === sandboxId),
          'list shows a foreign sandbox'
        )
      }
    },

    async insufficient() {
      const [ok, result] = await attempt(report, 'create', () =>
        Sandbox.create(values.template, { timeoutMs: milliseconds('timeout') })
      )
      if (ok) report.step('create', { outcome: 'ok', sandbox_id: result.sandboxId })
      report.expect(!ok && isRefusal(result), 'create was not refused with a plain 4xx SandboxError')
    },

    async burst() {
      const count = Number(values.count)
      const outcomes = await Promise.all(
        Array.from({ length: count }, () =>
          Sandbox.create(values.template, { timeoutMs: milliseconds('timeout') }).then(
            (sandbox) => ({ outcome: 'ok', sandbox_id: sandbox.sandboxId }),
            errorOutcome
          )
        )
      )
      const created = outcomes.filter((o) => o.outcome === 'ok').map((o) => o.sandbox_id)
      const refused = {}
      for (const o of outcomes.filter((o) => o.outcome === 'raised')) {
        const label = `${o.exception} ${o.status}`
        refused[label] = (refused[label] ?? 0) + 1
        report.expect(
          o.exception === 'SandboxError' && ![null, 401, 404, 429].includes(o.status),
          `a create failed otherwise than refused: ${o.exception} ${o.message}`
        )
      }
      const messages = [...new Set(outcomes.filter((o) => o.outcome === 'raised').map((o) => o.message))]
      report.set({ created, refused, refusal_messages: messages.sort().slice(0, 3) })
      report.step('burst', { outcome: 'ok', created: created.length, refused })
      if (values.kill) {
        const killed = await Promise.all(created.map((id) => Sandbox.kill(id)))
        report.step('kill', { outcome: 'ok', killed: killed.filter(Boolean).length })
        report.expect(killed.every(Boolean), 'a kill of a created sandbox did not answer true')
      }
    },

    async connect() {
      const sandboxId = values['sandbox-id']
      let [ok, sandbox] = await attempt(report, 'connect', () =>
        Sandbox.connect(sandboxId, { timeoutMs: milliseconds('timeout') })
      )
      if (!report.expect(ok, 'connect failed')) return
      report.step('connect', { outcome: 'ok', sandbox_id: sandbox.sandboxId })
      report.expect(sandbox.sandboxId === sandboxId, 'connect answered another sandbox')
      let info
      ;[ok, info] = await attempt(report, 'get_info', () => sandbox.getInfo())
      if (report.expect(ok, 'get_info after connect failed')) {
        report.step('get_info', { outcome: 'ok', ...infoFields(info) })
      }
    },

    // A new timeout: accepted (endAt moves), or with --expect-refusal refused as a plain 4xx
    // (what a longer timeout the credits do not cover must give).
    async 'set-timeout'() {
      const sandboxId = values['sandbox-id']
      const timeout = seconds('timeout')
      let [ok, error] = await attempt(report, 'set_timeout', () => Sandbox.setTimeout(sandboxId, timeout * 1000))
      if (ok) report.step('set_timeout', { outcome: 'ok', timeout })
      if (values['expect-refusal']) {
        report.expect(!ok && isRefusal(error), 'set_timeout was not refused with a plain 4xx SandboxError')
      } else if (report.expect(ok, 'set_timeout failed')) {
        let info
        ;[ok, info] = await attempt(report, 'get_info', () => Sandbox.getInfo(sandboxId))
        if (report.expect(ok, 'get_info after set_timeout failed')) {
          report.step('get_info', { outcome: 'ok', ...infoFields(info) })
        }
      }
    },

    async list() {
      const limit = values.limit === undefined ? undefined : Number(values.limit)
      const state = values.state.length > 0 ? values.state : undefined
      const query = {
        ...(Object.keys(metadata).length > 0 && { metadata }),
        ...(state && { state }),
      }
      const [ok, listed] = await attempt(report, 'list', () => listAll({ query, limit }))
      if (!report.expect(ok, 'list failed')) return
      const ids = listed.infos.map((i) => i.sandboxId)
      report.set({ pages: listed.pages, sandbox_ids: ids, count: ids.length })
      if (limit) {
        report.expect(listed.pages.every((p) => p.length <= limit), 'a page is longer than the limit')
      }
      report.expect(new Set(ids).size === ids.length, 'a sandbox appears on two pages')
      if (state) {
        report.expect(listed.infos.every((i) => state.includes(i.state)), 'the state filter let another state through')
      }
    },

    async kill() {
      const [ok, killed] = await attempt(report, 'kill', () => Sandbox.kill(values['sandbox-id']))
      if (report.expect(ok, 'kill raised')) {
        report.step('kill', { outcome: 'ok', returned: killed })
        report.set({ killed })
      }
    },
  }

  for (const variable of ['E2B_API_URL', 'E2B_API_KEY']) {
    report.expect(process.env[variable], `${variable} is not set`)
  }
  const run = scenarios[scenario]
  report.expect(run, `unknown scenario ${scenario}: use ${Object.keys(scenarios).join(', ')}`)
  if (report.problems.length === 0) {
    try {
      await run()
    } catch (error) {
      // An unexpected failure still prints one JSON object.
      report.step('unexpected', errorOutcome(error))
      report.expect(false, `unexpected ${error?.name}: ${error?.message}`)
    }
  }
  return report.finish()
}

process.exitCode = await main()
