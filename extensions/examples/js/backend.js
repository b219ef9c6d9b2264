// reserved-meter: a metered SaaS backend written in JavaScript.
//
// Its pricing follows the cloud providers that bill per second with a
// minimum charge per instance (60 seconds, as EC2 does for Linux): a sandbox
// pays for the higher of what it used and the minimum.
//
//   billed seconds = max(used seconds rounded up, minimum_secs)
//   price = vCPUs x rate_per_vcpu_hour + GiB x rate_per_gib_hour, for that time
//
// each resource rounded up to the next micro-credit. The estimate is the
// same with the ttl as the time used.
//
// Rates from the sidecar's [config] (decimal credits): rate_per_vcpu_hour
// (default 0.02), rate_per_gib_hour (default 0.005); minimum_secs (default
// 60). All arithmetic is on BigInt micro-credits: no float touches money.
//
// Like saas-stub it has no external API: create hands out a reference and
// keeps the start time in the host's key-value store.

import { configGet, kvGet, kvSet, kvDelete } from 'sandboxer:extension/host@0.1.0';

const MICROS = 1_000_000n;
const MS_PER_HOUR = 3_600_000n;
const DEFAULTS = { rate_per_vcpu_hour: 20_000n, rate_per_gib_hour: 5_000n };

function fail(tag, message) {
  // A result's error is thrown as the variant: { tag, val }.
  throw { tag, val: message };
}

function parseCredits(key, text) {
  const match = /^\s*(\d+)(?:\.(\d{1,6})0*)?\s*$/.exec(text);
  if (!match) fail('internal', `config key \`${key}\`: ${JSON.stringify(text)} is not an amount of credits`);
  return BigInt(match[1]) * MICROS + BigInt((match[2] ?? '').padEnd(6, '0'));
}

// An instance's config never changes (a changed sidecar is a new instance),
// so each value is read and parsed once per instance: with instance reuse
// that spares every later call four host calls and four regex matches.
const parsed = new Map();

function once(key, parse) {
  if (!parsed.has(key)) parsed.set(key, parse(configGet(key)));
  return parsed.get(key);
}

function rate(key) {
  return once(key, (text) => (text === undefined || text === null ? DEFAULTS[key] : parseCredits(key, text)));
}

function minimumSecs() {
  return once('minimum_secs', (text) => {
    if (text === undefined || text === null) return 60n;
    if (!/^\d+$/.test(text)) fail('internal', `config key \`minimum_secs\`: ${JSON.stringify(text)} is not a number`);
    return BigInt(text);
  });
}

const ceilDiv = (numerator, denominator) => (numerator + denominator - 1n) / denominator;

function price(spec, milliseconds) {
  const cpu = ceilDiv(rate('rate_per_vcpu_hour') * BigInt(spec.cpuMillis) * milliseconds, 1000n * MS_PER_HOUR);
  const memory = ceilDiv(rate('rate_per_gib_hour') * BigInt(spec.memoryMb) * milliseconds, 1024n * MS_PER_HOUR);
  return cpu + memory;
}

function billedMs(usedMs) {
  const usedSecs = ceilDiv(usedMs, 1000n);
  const minimum = minimumSecs();
  return (usedSecs > minimum ? usedSecs : minimum) * 1000n;
}

function validate(spec) {
  if (spec.cpuMillis === 0 || spec.memoryMb === 0 || spec.ttlSecs === 0) {
    fail('invalid-spec', 'cpu_millis, memory_mb and ttl_secs must be above zero');
  }
}

const encode = (text) => new TextEncoder().encode(text);
const decode = (bytes) => new TextDecoder().decode(bytes);

function newReference() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return 'js-' + Array.from(bytes, (byte) => byte.toString(16).padStart(2, '0')).join('');
}

export const backend = {
  info() {
    return {
      id: 'reserved-meter',
      version: '0.1.0',
      kind: 'saas',
      description: 'JavaScript: per second, with a minimum charge per sandbox',
    };
  },

  estimateCost(spec) {
    validate(spec);
    return {
      amount: price(spec, billedMs(BigInt(spec.ttlSecs) * 1000n)),
      ratePerHour: price(spec, MS_PER_HOUR),
    };
  },

  create(spec) {
    validate(spec);
    const existing = kvGet(`ref/${spec.sandboxId}`);
    if (existing !== undefined && existing !== null) {
      return { backendRef: decode(existing), endpoint: undefined };
    }
    const backendRef = newReference();
    kvSet(`started/${backendRef}`, encode(String(Date.now())));
    kvSet(`ref/${spec.sandboxId}`, encode(backendRef));
    return { backendRef, endpoint: undefined };
  },

  destroy(spec, handle) {
    const started = kvGet(`started/${handle.backendRef}`);
    if (started === undefined || started === null) fail('not-found', `no sandbox ${handle.backendRef}`);
    kvDelete(`started/${handle.backendRef}`);
    kvDelete(`ref/${spec.sandboxId}`);
    const wallMs = BigInt(Math.max(0, Date.now() - Number(decode(started))));
    return { wallMs, cpuMs: 0n, memoryMbMs: 0n, egressBytes: 0n };
  },

  meterActual(spec, usage) {
    return price(spec, billedMs(usage.wallMs));
  },
};
