#!/usr/bin/env python3
"""A fake E2B control plane: the subset of the E2B API that PROTOCOL.md describes, in memory.

It exists to develop and check the SDK-driven clients (python/scenario.py, js/scenario.mjs)
without the real `sandboxer-host serve`, and to state the protocol executably: every response
shape here is one the pinned SDKs accept. It is a test aid, not the product: there is no
extension, no ledger, no persistence. Standard library only.

    python3 tests/e2b/fake_server.py --tenant acme:e2b_<40 hex>:5000000 [--tenant ...]
        [--template saas-stub:1000] [--port 0] [--request-log FILE]

Each tenant has an API key and a credit balance in integer micro-credits; each template a price
in micro-credits per second. A create holds price x timeout; a create or a longer timeout that
the available credits (balance minus live holds) do not cover is refused with 402. A kill
charges price x whole seconds elapsed (at least one) and forgets the sandbox, so a later
get_info is a 404, as in E2B. A sandbox past its endAt is reaped (charged up to endAt) before
any request is answered.

The first line on stdout is a JSON object with the URL it listens on; `--request-log` appends
one JSON line per request (method, path, query, headers without the key, body, whether the
body came chunked) so tests can assert what the SDKs send.
"""

import argparse
import base64
import json
import re
import secrets
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# What the SDKs check in envdVersion: Python kills the sandbox and raises TemplateException
# below 0.1.0; both SDKs gate envd features on it. No envd runs here, so any valid version
# at or above the newest feature gate (0.6.4 in the pinned SDKs) is as good as another.
ENVD_VERSION = "0.6.4"
DEFAULT_TIMEOUT_SECS = 300
MAX_TIMEOUT_SECS = 86_400
MAX_PAGE_SIZE = 100
SANDBOX_ROUTE = re.compile(r"^/sandboxes/([^/]+)$")
TIMEOUT_ROUTE = re.compile(r"^/sandboxes/([^/]+)/timeout$")
CONNECT_ROUTE = re.compile(r"^(?:/v2)?/sandboxes/([^/]+)/connect$")


class ApiError(Exception):
    """An answer other than success: the status and the message of the JSON error body."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def format_credits(micro_credits):
    whole, fraction = divmod(micro_credits, 1_000_000)
    return f"{whole}.{fraction:06d}"


def rfc3339(moment):
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ceil_seconds(delta):
    micros = delta // timedelta(microseconds=1)
    return max(1, -(-micros // 1_000_000))


class FakeControlPlane:
    """Tenants, their credits and sandboxes, behind one lock (requests run on threads)."""

    def __init__(self, tenants, templates):
        self.lock = threading.Lock()
        self.tenant_by_key = {key: name for name, key, _ in tenants}
        self.balance = {name: credits for name, _, credits in tenants}
        self.price_per_second = dict(templates)
        self.sandboxes = {}

    def tenant_for(self, api_key):
        if not api_key:
            raise ApiError(401, "missing X-API-KEY header")
        tenant = self.tenant_by_key.get(api_key)
        if tenant is None:
            raise ApiError(401, "invalid API key")
        return tenant

    def available(self, tenant):
        held = sum(s["hold"] for s in self.sandboxes.values() if s["tenant"] == tenant)
        return self.balance[tenant] - held

    def settle(self, sandbox_id, until):
        sandbox = self.sandboxes.pop(sandbox_id)
        seconds = ceil_seconds(until - sandbox["started_at"])
        charge = min(sandbox["hold"], seconds * self.price_per_second[sandbox["template_id"]])
        self.balance[sandbox["tenant"]] -= charge

    def reap_expired(self, now):
        for sandbox_id in [i for i, s in self.sandboxes.items() if s["end_at"] <= now]:
            self.settle(sandbox_id, self.sandboxes[sandbox_id]["end_at"])

    def owned(self, tenant, sandbox_id):
        sandbox = self.sandboxes.get(sandbox_id)
        # Another tenant's sandbox is indistinguishable from a missing one.
        if sandbox is None or sandbox["tenant"] != tenant:
            raise ApiError(404, f"sandbox {sandbox_id} not found")
        return sandbox

    def hold_for(self, tenant, template_id, started_at, end_at, current_hold=0):
        needed = ceil_seconds(end_at - started_at) * self.price_per_second[template_id]
        available = self.available(tenant) + current_hold
        if needed > available:
            raise ApiError(
                402,
                f"not enough credits: this needs a hold of {format_credits(needed)} credits "
                f"and tenant {tenant} has {format_credits(available)} available",
            )
        return needed

    def create(self, tenant, body, now):
        template_id = body.get("templateID")
        if not isinstance(template_id, str) or not template_id:
            raise ApiError(400, "templateID must be a non-empty string")
        if template_id not in self.price_per_second:
            raise ApiError(404, f"template {template_id} not found")
        timeout = parse_timeout(body.get("timeout", DEFAULT_TIMEOUT_SECS))
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise ApiError(400, "metadata must be an object of strings")
        end_at = now + timedelta(seconds=timeout)
        hold = self.hold_for(tenant, template_id, now, end_at)
        sandbox_id = f"sbx-{secrets.token_hex(8)}"
        self.sandboxes[sandbox_id] = {
            "tenant": tenant,
            "sandbox_id": sandbox_id,
            "template_id": template_id,
            "metadata": dict(metadata),
            "started_at": now,
            "end_at": end_at,
            "hold": hold,
        }
        return self.sandboxes[sandbox_id]

    def set_timeout(self, tenant, sandbox_id, body, now, only_extend=False):
        sandbox = self.owned(tenant, sandbox_id)
        if "timeout" not in body and only_extend:
            return sandbox
        end_at = now + timedelta(seconds=parse_timeout(body.get("timeout")))
        if only_extend and end_at <= sandbox["end_at"]:
            return sandbox
        sandbox["hold"] = self.hold_for(
            tenant, sandbox["template_id"], sandbox["started_at"], end_at, sandbox["hold"]
        )
        sandbox["end_at"] = end_at
        return sandbox

    def listed(self, tenant, query):
        metadata_filter = parse_metadata_filter(query.get("metadata", [""])[0])
        states = parse_states(query.get("state", [""])[0])
        limit = parse_limit(query.get("limit", [str(MAX_PAGE_SIZE)])[0])
        matching = sorted(
            (
                s
                for s in self.sandboxes.values()
                if s["tenant"] == tenant
                and "running" in states
                and all(s["metadata"].get(k) == v for k, v in metadata_filter.items())
            ),
            key=lambda s: (rfc3339(s["started_at"]), s["sandbox_id"]),
        )
        start = 0
        token = query.get("nextToken", [""])[0]
        if token:
            after = decode_token(token)
            start = next(
                (i for i, s in enumerate(matching) if (rfc3339(s["started_at"]), s["sandbox_id"]) > after),
                len(matching),
            )
        page = matching[start : start + limit]
        next_token = None
        if start + limit < len(matching):
            last = page[-1]
            next_token = encode_token(rfc3339(last["started_at"]), last["sandbox_id"])
        return page, next_token


def parse_timeout(value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_TIMEOUT_SECS:
        raise ApiError(400, f"timeout must be a whole number of seconds from 1 to {MAX_TIMEOUT_SECS}")
    return value


def parse_metadata_filter(text):
    # The SDKs percent-encode each key and value, then form-encode the pairs into one query
    # parameter: undo the form encoding, then the per-pair encoding.
    pairs = parse_qs(text, keep_blank_values=True)
    return {unquote(k): unquote(v[-1]) for k, v in pairs.items()}


def parse_states(text):
    states = {s for s in text.split(",") if s} or {"running", "paused"}
    unknown = states - {"running", "paused"}
    if unknown:
        raise ApiError(400, f"unknown state {sorted(unknown)[0]}: use running or paused")
    return states


def parse_limit(text):
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE_SIZE:
        raise ApiError(400, f"limit must be from 1 to {MAX_PAGE_SIZE}")
    return int(text)


def encode_token(started_at, sandbox_id):
    return base64.urlsafe_b64encode(f"{started_at}|{sandbox_id}".encode()).decode()


def decode_token(token):
    try:
        started_at, sandbox_id = base64.urlsafe_b64decode(token.encode()).decode().split("|")
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, "nextToken is not one this server gave") from error
    return started_at, sandbox_id


def created_body(sandbox):
    """The `Sandbox` schema: answer of create (201) and connect (200)."""
    return {
        "sandboxID": sandbox["sandbox_id"],
        "templateID": sandbox["template_id"],
        "alias": sandbox["template_id"],
        "clientID": "sandboxer",
        "envdVersion": ENVD_VERSION,
        "domain": None,
    }


def listed_body(sandbox):
    """The `ListedSandbox` schema; `SandboxDetail` adds to it (see detail_body)."""
    return {
        "sandboxID": sandbox["sandbox_id"],
        "templateID": sandbox["template_id"],
        "alias": sandbox["template_id"],
        "clientID": "sandboxer",
        "startedAt": rfc3339(sandbox["started_at"]),
        "endAt": rfc3339(sandbox["end_at"]),
        "cpuCount": 1,
        "memoryMB": 1024,
        "diskSizeMB": 0,
        "state": "running",
        "envdVersion": ENVD_VERSION,
        "metadata": sandbox["metadata"],
    }


def detail_body(sandbox):
    return {**listed_body(sandbox), "domain": None}


class Handler(BaseHTTPRequestHandler):
    # Keep-alive, as both SDKs pool connections; every answer then needs a Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "fake-e2b"

    def do_GET(self):
        self.answer()

    def do_POST(self):
        self.answer()

    def do_DELETE(self):
        self.answer()

    def do_PUT(self):
        self.answer()

    def log_message(self, format, *args):
        pass

    def read_body(self):
        """The request body and whether it came chunked (the JS SDK streams every body)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks), True
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length), False

    def answer(self):
        body, chunked = self.read_body()
        url = urlsplit(self.path)
        self.server.log_request_line(self, url, body, chunked)
        extra_headers = {}
        try:
            status, payload = self.route(url, body, extra_headers)
        except ApiError as error:
            status, payload = error.status, {"code": error.status, "message": error.message}
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def route(self, url, raw_body, extra_headers):
        plane = self.server.plane
        with plane.lock:
            now = datetime.now(timezone.utc)
            plane.reap_expired(now)
            tenant = plane.tenant_for(self.headers.get("X-API-KEY"))
            body = {}
            if raw_body:
                try:
                    body = json.loads(raw_body)
                except ValueError as error:
                    raise ApiError(400, f"request body is not JSON: {error}") from error
                if not isinstance(body, dict):
                    raise ApiError(400, "request body must be a JSON object")
            method, path = self.command, url.path
            query = parse_qs(url.query, keep_blank_values=True)

            if method == "POST" and path in ("/sandboxes", "/v2/sandboxes"):
                return 201, created_body(plane.create(tenant, body, now))
            if method == "GET" and path in ("/sandboxes", "/v2/sandboxes"):
                if path == "/sandboxes":
                    # The pre-2.0 SDKs: no paging, running sandboxes only.
                    query = {"metadata": query.get("metadata", [""]), "state": ["running"]}
                page, next_token = plane.listed(tenant, query)
                if next_token:
                    extra_headers["X-Next-Token"] = next_token
                return 200, [listed_body(s) for s in page]
            if match := SANDBOX_ROUTE.match(path):
                if method == "GET":
                    return 200, detail_body(plane.owned(tenant, match[1]))
                if method == "DELETE":
                    plane.owned(tenant, match[1])
                    plane.settle(match[1], now)
                    return 204, None
            if (match := TIMEOUT_ROUTE.match(path)) and method == "POST":
                plane.set_timeout(tenant, match[1], body, now)
                return 204, None
            if (match := CONNECT_ROUTE.match(path)) and method == "POST":
                return 200, created_body(plane.set_timeout(tenant, match[1], body, now, only_extend=True))
            # Not a 404: the SDKs would report an unsupported call (pause, metrics, ...) on a
            # live sandbox as a missing sandbox.
            raise ApiError(501, f"{method} {path} is not supported by this server")


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    # The JS SDK opens one connection per concurrent request and does not retry a reset one;
    # socketserver's default backlog of 5 resets some of a 64-way burst.
    request_queue_size = 256

    def __init__(self, address, plane, request_log):
        super().__init__(address, Handler)
        self.plane = plane
        self.request_log = request_log
        self.log_lock = threading.Lock()

    def log_request_line(self, handler, url, body, chunked):
        if self.request_log is None:
            return
        headers = {k.lower(): v for k, v in handler.headers.items()}
        if "x-api-key" in headers:
            headers["x-api-key"] = "<redacted>"
        record = {
            "method": handler.command,
            "path": url.path,
            "query": url.query,
            "headers": headers,
            "chunked": chunked,
            "body": body.decode(errors="replace"),
        }
        with self.log_lock:
            self.request_log.write(json.dumps(record) + "\n")
            self.request_log.flush()


def tenant_argument(text):
    try:
        name, key, credits = text.split(":")
        return name, key, int(credits)
    except ValueError as error:
        raise argparse.ArgumentTypeError("expected NAME:KEY:MICRO_CREDITS") from error


def template_argument(text):
    try:
        name, price = text.split(":")
        return name, int(price)
    except ValueError as error:
        raise argparse.ArgumentTypeError("expected NAME:MICRO_CREDITS_PER_SECOND") from error


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tenant", type=tenant_argument, action="append", required=True)
    parser.add_argument("--template", type=template_argument, action="append")
    parser.add_argument("--request-log", type=argparse.FileType("a"))
    args = parser.parse_args()
    plane = FakeControlPlane(args.tenant, args.template or [("saas-stub", 1000)])
    server = FakeServer(("127.0.0.1", args.port), plane, args.request_log)
    print(json.dumps({"url": f"http://127.0.0.1:{server.server_address[1]}"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
