"""{{name}}: a sandboxer backend extension in Python.

Build (componentize-py from PyPI):
    pip install -r requirements.txt
    componentize-py -d wit -w sandbox-extension componentize app -o {{name}}.wasm
    sandboxer-host ext check {{name}}.wasm

The contract is in wit/sandbox-extension.wit. Amounts are micro-credits
(1 credit = 1_000_000); errors are raised as Err(ExtError_...).
"""

import time

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    BackendKind,
    CostEstimate,
    ExtError_Internal,
    ExtError_NotFound,
    ExtensionInfo,
    SandboxHandle,
    SandboxSpec,
    Usage,
)

DEFAULT_RATE = 14  # micro-credits per second of one vCPU


def rate() -> int:
    text = host.config_get("rate_per_vcpu_second_micros")
    if text is None:
        return DEFAULT_RATE
    if not text.isdigit():
        raise Err(ExtError_Internal(f"rate_per_vcpu_second_micros: {text!r} is not a number"))
    return int(text)


def price(spec: SandboxSpec, seconds: int) -> int:
    return -(-(rate() * spec.cpu_millis * seconds) // 1000)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Backend(exports.Backend):
    def info(self) -> ExtensionInfo:
        return ExtensionInfo(id="{{name}}", version="0.1.0", kind=BackendKind.SAAS, description="{{name}}: describe your backend here")

    def estimate_cost(self, spec: SandboxSpec) -> CostEstimate:
        return CostEstimate(amount=price(spec, spec.ttl_secs), rate_per_hour=price(spec, 3600))

    def create(self, spec: SandboxSpec) -> SandboxHandle:
        backend_ref = f"{{name}}-{spec.sandbox_id}"
        host.kv_set(f"started/{backend_ref}", str(now_ms()).encode())
        return SandboxHandle(backend_ref=backend_ref, endpoint=None)

    def destroy(self, spec: SandboxSpec, handle: SandboxHandle) -> Usage:
        started = host.kv_get(f"started/{handle.backend_ref}")
        if started is None:
            raise Err(ExtError_NotFound(handle.backend_ref))
        host.kv_delete(f"started/{handle.backend_ref}")
        return Usage(wall_ms=max(0, now_ms() - int(started.decode())), cpu_ms=0, memory_mb_ms=0, egress_bytes=0)

    def meter_actual(self, spec: SandboxSpec, usage: Usage) -> int:
        return price(spec, -(-usage.wall_ms // 1000))
