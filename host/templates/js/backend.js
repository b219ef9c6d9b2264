// {{name}}: a sandboxer backend extension in JavaScript.
//
// Build (jco from npm):  npm install && npm run build
// then:                  sandboxer-host ext check {{name}}.wasm
//
// The contract is in wit/sandbox-extension.wit. Amounts are micro-credits
// (BigInt; 1 credit = 1_000_000n). Errors are thrown as { tag, val }.

import { configGet, kvGet, kvSet, kvDelete } from 'sandboxer:extension/host@0.1.0';

const DEFAULT_RATE = 14n; // micro-credits per second of one vCPU

function rate() {
  const text = configGet('rate_per_vcpu_second_micros');
  if (text === undefined || text === null) return DEFAULT_RATE;
  if (!/^\d+$/.test(text)) throw { tag: 'internal', val: `rate_per_vcpu_second_micros: ${text} is not a number` };
  return BigInt(text);
}

const price = (spec, seconds) => (rate() * BigInt(spec.cpuMillis) * seconds + 999n) / 1000n;

export const backend = {
  info() {
    return { id: '{{name}}', version: '0.1.0', kind: 'saas', description: '{{name}}: describe your backend here' };
  },
  estimateCost(spec) {
    return { amount: price(spec, BigInt(spec.ttlSecs)), ratePerHour: price(spec, 3600n) };
  },
  create(spec) {
    const backendRef = `{{name}}-${spec.sandboxId}`;
    kvSet(`started/${backendRef}`, new TextEncoder().encode(String(Date.now())));
    return { backendRef, endpoint: undefined };
  },
  destroy(spec, handle) {
    const started = kvGet(`started/${handle.backendRef}`);
    if (started === undefined || started === null) throw { tag: 'not-found', val: handle.backendRef };
    kvDelete(`started/${handle.backendRef}`);
    const wallMs = BigInt(Math.max(0, Date.now() - Number(new TextDecoder().decode(started))));
    return { wallMs, cpuMs: 0n, memoryMbMs: 0n, egressBytes: 0n };
  },
  meterActual(spec, usage) {
    return price(spec, (usage.wallMs + 999n) / 1000n);
  },
};
