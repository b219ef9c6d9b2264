#!/usr/bin/env python3
"""Run both SDK clients against fake_server.py and check what they print and what they send.

    python3 tests/e2b/selftest.py        (after `cargo xtask install-e2b-sdks`)

This keeps the clients, the fake server and PROTOCOL.md honest with each other while the real
server is being built: every scenario must end as the SDK allows (exit 0, or exit 1 for the
wrong-key run), and the recorded requests must show what PROTOCOL.md says the SDKs send (v2
create, chunked JS bodies, no route outside the documented set). The requests are kept in
target/e2b-selftest/requests.jsonl for reading. Exit 0 when every check holds.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
OUTPUT = REPOSITORY / "target" / "e2b-selftest"
PRICE_PER_SECOND = 1000
KEYS = {name: "e2b_" + digit * 40 for name, digit in [
    ("rich", "1"), ("other", "2"), ("poor", "3"), ("exact-python", "4"), ("exact-js", "5"),
]}
UNKNOWN_KEY = "e2b_" + "f" * 40
# Ten 30-second holds exactly.
CREDITS = {"rich": 10**9, "other": 10**9, "poor": 1000,
           "exact-python": 10 * 30 * PRICE_PER_SECOND, "exact-js": 10 * 30 * PRICE_PER_SECOND}
DOCUMENTED_ROUTES = [
    ("POST", r"/v2/sandboxes"),
    ("GET", r"/v2/sandboxes"),
    ("GET", r"/sandboxes/sbx-[0-9a-f]+"),
    ("DELETE", r"/sandboxes/sbx-[0-9a-f]+"),
    ("POST", r"/sandboxes/sbx-[0-9a-f]+/timeout"),
    ("POST", r"/v2/sandboxes/sbx-[0-9a-f]+/connect"),
]
SDKS = {
    "python": {
        "command": [sys.executable, str(HERE / "python" / "scenario.py")],
        "not_found": "SandboxNotFoundException",
        "refused": "SandboxException",
        "unauthorized": "AuthenticationException",
        "user_agent": "e2b-python-sdk/",
    },
    "js": {
        "command": ["node", str(HERE / "js" / "scenario.mjs")],
        "not_found": "SandboxNotFoundError",
        "refused": "SandboxError",
        "unauthorized": "AuthenticationError",
        "user_agent": "e2b-js-sdk/",
    },
}


class Checks:
    def __init__(self):
        self.failures = []

    def that(self, condition, description):
        print(("ok    " if condition else "FAIL  ") + description)
        if not condition:
            self.failures.append(description)


def scenario(sdk, url, tenant, *arguments, expect_exit=0):
    """Run one scenario as `tenant` (or with a key no tenant has) and parse its JSON report."""
    # Only what a user would set: the clients must not need anything else.
    environment = {
        "PATH": os.environ["PATH"],
        "E2B_API_URL": url,
        "E2B_API_KEY": KEYS.get(tenant, UNKNOWN_KEY),
    }
    for override in ("SANDBOXER_E2B_PYTHON_SDK", "SANDBOXER_E2B_JS_SDK"):
        if override in os.environ:
            environment[override] = os.environ[override]
    done = subprocess.run(
        SDKS[sdk]["command"] + list(arguments), env=environment, capture_output=True, text=True, timeout=300
    )
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {"unparsed_stdout": done.stdout, "stderr": done.stderr[-2000:]}
    if done.returncode != expect_exit:
        print(json.dumps(report, indent=1), file=sys.stderr)
    return done.returncode, report


def outcome(report, step):
    return next((s for s in report.get("steps", []) if s["step"] == step and s["outcome"] == "raised"), {})


def check_sdk(checks, sdk, url):
    names = SDKS[sdk]
    run_tag = f"selftest-{sdk}"

    code, report = scenario(sdk, url, "rich", "lifecycle", "--template", "saas-stub",
                            "--metadata", f"run={run_tag}", "--metadata", "note=a b/c=d&e",
                            "--timeout", "30")
    checks.that(code == 0 and report.get("ok"), f"{sdk}: lifecycle create -> info -> list -> set_timeout -> kill")
    checks.that(outcome(report, "get_info_after_kill").get("exception") == names["not_found"],
                f"{sdk}: get_info after kill raises {names['not_found']}")

    code, report = scenario(sdk, url, "rich", "create", "--template", "saas-stub")
    sandbox_id = report.get("sandbox_id")
    checks.that(code == 0 and sandbox_id, f"{sdk}: create without timeout or metadata")

    code, report = scenario(sdk, url, "other", "foreign", "--sandbox-id", str(sandbox_id))
    checks.that(code == 0 and {s["exception"] for s in report.get("steps", []) if s["outcome"] == "raised"}
                == {names["not_found"]}, f"{sdk}: another tenant's key sees {names['not_found']}, kill answers false")

    code, report = scenario(sdk, url, "rich", "connect", "--sandbox-id", str(sandbox_id), "--timeout", "600")
    checks.that(code == 0 and report.get("ok"), f"{sdk}: connect to a running sandbox")

    code, report = scenario(sdk, url, "rich", "kill", "--sandbox-id", str(sandbox_id))
    checks.that(code == 0 and report.get("killed") is True, f"{sdk}: kill by id answers true")

    code, report = scenario(sdk, url, "poor", "insufficient", "--template", "saas-stub", "--timeout", "30")
    refusal = outcome(report, "create")
    checks.that(code == 0 and refusal.get("exception") == names["refused"] and refusal.get("status") == 402
                and "not enough credits" in refusal.get("message", ""),
                f"{sdk}: create beyond the credits raises {names['refused']} 402 with the amounts")

    code, report = scenario(sdk, url, f"exact-{sdk}", "burst", "--template", "saas-stub",
                            "--count", "64", "--timeout", "30")
    checks.that(code == 0 and len(report.get("created", [])) == 10
                and report.get("refused") == {f"{names['refused']} 402": 54},
                f"{sdk}: 64 concurrent creates on credits for 10: 10 created, 54 refused with 402")

    created = report.get("created") or ["sbx-0"]
    code, report = scenario(sdk, url, f"exact-{sdk}", "set-timeout", "--sandbox-id", created[0],
                            "--timeout", "600", "--expect-refusal")
    refusal = outcome(report, "set_timeout")
    checks.that(code == 0 and refusal.get("status") == 402,
                f"{sdk}: a longer timeout the credits do not cover raises {names['refused']} 402")
    code, report = scenario(sdk, url, f"exact-{sdk}", "set-timeout", "--sandbox-id", created[0],
                            "--timeout", "5")
    checks.that(code == 0 and report.get("ok"), f"{sdk}: a shorter timeout is accepted")

    page_tag = f"pages-{sdk}"
    for _ in range(3):
        scenario(sdk, url, "rich", "create", "--template", "saas-stub", "--metadata", f"page={page_tag}")
    code, report = scenario(sdk, url, "rich", "list", "--state", "running", "--limit", "2",
                            "--metadata", f"page={page_tag}")
    checks.that(code == 0 and [len(p) for p in report.get("pages", [])] == [2, 1],
                f"{sdk}: list --limit 2 pages through X-Next-Token: pages of 2 and 1")

    code, report = scenario(sdk, url, "nobody", "list", expect_exit=1)
    checks.that(code == 1 and outcome(report, "list").get("exception") == names["unauthorized"],
                f"{sdk}: an unknown key raises {names['unauthorized']}")


def check_requests(checks, requests):
    for sdk, names in SDKS.items():
        sent = [r for r in requests if r["headers"].get("user-agent", "").startswith(names["user_agent"])]
        checks.that(sent, f"{sdk}: requests recorded")
        creates = [r for r in sent if r["method"] == "POST" and r["path"].endswith("sandboxes")]
        checks.that(creates and all(r["path"] == "/v2/sandboxes" for r in creates),
                    f"{sdk}: create is POST /v2/sandboxes")
        bodies = [r for r in sent if r["body"]]
        chunked = {r["chunked"] for r in bodies}
        checks.that(chunked == ({True} if sdk == "js" else {False}),
                    f"{sdk}: request bodies are {'chunked' if sdk == 'js' else 'sent with Content-Length'}")
        outside = [f"{r['method']} {r['path']}" for r in sent
                   if not any(r["method"] == m and re.fullmatch(p, r["path"]) for m, p in DOCUMENTED_ROUTES)]
        checks.that(not outside, f"{sdk}: every request is on a documented route {outside[:3]}")


def main():
    OUTPUT.mkdir(parents=True, exist_ok=True)
    log_path = OUTPUT / "requests.jsonl"
    log_path.write_text("")
    tenants = [f"--tenant={name}:{key}:{CREDITS[name]}" for name, key in KEYS.items()]
    server = subprocess.Popen(
        [sys.executable, str(HERE / "fake_server.py"), *tenants,
         f"--template=saas-stub:{PRICE_PER_SECOND}", "--request-log", str(log_path)],
        stdout=subprocess.PIPE, text=True,
    )
    checks = Checks()
    try:
        url = json.loads(server.stdout.readline())["url"]
        for sdk in SDKS:
            check_sdk(checks, sdk, url)
    finally:
        server.terminate()
        server.wait()
    check_requests(checks, [json.loads(line) for line in log_path.read_text().splitlines()])
    if checks.failures:
        print(f"{len(checks.failures)} check(s) failed; requests in {log_path}", file=sys.stderr)
        return 1
    print(f"all checks hold; requests in {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
