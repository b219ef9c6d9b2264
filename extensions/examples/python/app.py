"""minute-meter: a metered SaaS backend written in Python.

Its pricing follows the CI providers that bill per started minute, plus a
flat fee per sandbox created:

    price = create_fee + minutes x (vCPUs x rate_per_vcpu_minute + GiB x rate_per_gib_minute)

where minutes is the wall time rounded up to whole minutes (at least one),
never beyond the ttl rounded up. The estimate is the same with the whole ttl.
Each per-minute product is rounded up to the next micro-credit.

Rates come from the sidecar's [config] as decimal credits:
  create_fee           (default 0.01)
  rate_per_vcpu_minute (default 0.0008)
  rate_per_gib_minute  (default 0.0002)

Like saas-stub it has no external API: create hands out a reference and
keeps the start time in the host's key-value store.
"""

import secrets
import time

from wit_world import exports
from componentize_py_types import Err
from wit_world.imports import host
from wit_world.imports.types import (
    BackendKind,
    CostEstimate,
    ExtError_Internal,
    ExtError_InvalidSpec,
    ExtError_NotFound,
    ExtensionInfo,
    SandboxHandle,
    SandboxSpec,
    Usage,
)

MICROS_PER_CREDIT = 1_000_000
DEFAULTS = {
    "create_fee": 10_000,  # 0.01 credits
    "rate_per_vcpu_minute": 800,  # 0.0008 credits
    "rate_per_gib_minute": 200,  # 0.0002 credits
}


def parse_credits(key: str, text: str) -> int:
    """Decimal credits (up to six places) to micro-credits, exactly."""
    whole, _, fraction = text.strip().partition(".")
    if not whole.isdigit() or (fraction and not fraction.isdigit()) or len(fraction.rstrip("0")) > 6:
        raise Err(ExtError_Internal(f"config key `{key}`: {text!r} is not an amount of credits"))
    return int(whole) * MICROS_PER_CREDIT + int((fraction + "000000")[:6])


def rate(key: str) -> int:
    text = host.config_get(key)
    return DEFAULTS[key] if text is None else parse_credits(key, text)


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def validate(spec: SandboxSpec) -> None:
    if spec.cpu_millis == 0 or spec.memory_mb == 0 or spec.ttl_secs == 0:
        raise Err(ExtError_InvalidSpec("cpu_millis, memory_mb and ttl_secs must be above zero"))


def price(spec: SandboxSpec, minutes: int) -> int:
    per_minute = ceil_div(rate("rate_per_vcpu_minute") * spec.cpu_millis, 1000) + ceil_div(
        rate("rate_per_gib_minute") * spec.memory_mb, 1024
    )
    return rate("create_fee") + minutes * per_minute


def ttl_minutes(spec: SandboxSpec) -> int:
    return max(1, ceil_div(spec.ttl_secs, 60))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Backend(exports.Backend):
    def info(self) -> ExtensionInfo:
        return ExtensionInfo(
            id="minute-meter",
            version="0.1.0",
            kind=BackendKind.SAAS,
            description="Python: a fee per sandbox plus per started minute",
        )

    def estimate_cost(self, spec: SandboxSpec) -> CostEstimate:
        validate(spec)
        hourly = price(spec, 60) - rate("create_fee")
        return CostEstimate(amount=price(spec, ttl_minutes(spec)), rate_per_hour=hourly)

    def create(self, spec: SandboxSpec) -> SandboxHandle:
        validate(spec)
        existing = host.kv_get(f"ref/{spec.sandbox_id}")
        if existing is not None:
            return SandboxHandle(backend_ref=existing.decode(), endpoint=None)
        backend_ref = f"py-{secrets.token_hex(8)}"
        host.kv_set(f"started/{backend_ref}", str(now_ms()).encode())
        host.kv_set(f"ref/{spec.sandbox_id}", backend_ref.encode())
        return SandboxHandle(backend_ref=backend_ref, endpoint=None)

    def destroy(self, spec: SandboxSpec, handle: SandboxHandle) -> Usage:
        started = host.kv_get(f"started/{handle.backend_ref}")
        if started is None:
            raise Err(ExtError_NotFound(f"no sandbox {handle.backend_ref}"))
        host.kv_delete(f"started/{handle.backend_ref}")
        host.kv_delete(f"ref/{spec.sandbox_id}")
        return Usage(wall_ms=max(0, now_ms() - int(started.decode())), cpu_ms=0, memory_mb_ms=0, egress_bytes=0)

    def meter_actual(self, spec: SandboxSpec, usage: Usage) -> int:
        minutes = min(max(1, ceil_div(usage.wall_ms, 60_000)), ttl_minutes(spec))
        return price(spec, minutes)
