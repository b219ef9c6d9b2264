#!/usr/bin/env python3
"""Drive an E2B-compatible control plane with the official E2B Python SDK, unchanged.

The SDK is configured only by the environment, as a user would: E2B_API_URL (the server) and
E2B_API_KEY (the tenant's key). The SDK is imported from the pinned install `cargo xtask test`
puts in target/tools/e2b-python (override with SANDBOXER_E2B_PYTHON_SDK).

    scenario.py lifecycle --template saas-stub --metadata run=ID [--metadata k=v] --timeout 30
    scenario.py create --template saas-stub [--metadata k=v] [--timeout N]
    scenario.py foreign --sandbox-id ID
    scenario.py insufficient --template saas-stub [--timeout N]
    scenario.py burst --template saas-stub --count 64 [--timeout N] [--kill]
    scenario.py connect --sandbox-id ID [--timeout N]
    scenario.py set-timeout --sandbox-id ID --timeout N [--expect-refusal]
    scenario.py list [--state running] [--limit 2] [--metadata k=v]
    scenario.py kill --sandbox-id ID

Each prints one JSON object on stdout: {"sdk", "sdk_version", "scenario", "ok", "steps", ...},
where each step records its outcome or the exception class the SDK raised. The exit code is 0
when every step behaved as the SDK allows, 1 otherwise (with "problems" naming each). The
command set and the output fields are the same as js/scenario.mjs, so one Rust test can run
both; exception names differ by SDK (SandboxNotFoundException here, SandboxNotFoundError in JS).
"""

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[3]
SDK_DIRECTORY = os.environ.get("SANDBOXER_E2B_PYTHON_SDK") or str(
    REPOSITORY / "target" / "tools" / "e2b-python"
)
sys.path.insert(0, SDK_DIRECTORY)

try:
    from e2b import (
        NotFoundException,
        Sandbox,
        SandboxException,
        SandboxQuery,
        SandboxState,
    )
except ImportError as error:
    print(
        json.dumps(
            {
                "sdk": "python",
                "ok": False,
                "problems": [f"cannot import the E2B SDK from {SDK_DIRECTORY}: {error}; "
                             "run `cargo xtask test` (or install-e2b-sdks) first"],
            }
        )
    )
    sys.exit(1)

from e2b.api.metadata import package_version


class Report:
    """The one JSON object a run prints: its steps, and what went wrong if anything did."""

    def __init__(self, scenario):
        self.fields = {
            "sdk": "python",
            "sdk_version": package_version,
            "scenario": scenario,
            "ok": True,
            "steps": [],
        }
        self.problems = []

    def step(self, name, /, **outcome):
        self.fields["steps"].append({"step": name, **outcome})
        return outcome

    def expect(self, condition, problem):
        if not condition:
            self.problems.append(problem)
        return condition

    def set(self, **fields):
        self.fields.update(fields)

    def finish(self):
        if self.problems:
            self.fields["ok"] = False
            self.fields["problems"] = self.problems
        print(json.dumps(self.fields, default=str))
        return 0 if self.fields["ok"] else 1


def exception_outcome(error):
    return {
        "outcome": "raised",
        "exception": type(error).__name__,
        "status": getattr(error, "status_code", None),
        "message": str(error),
    }


def attempt(report, name, call):
    """Run one SDK call as a step; an exception is recorded, not raised."""
    try:
        return True, call()
    except Exception as error:  # the step records whatever the SDK raised
        report.step(name, **exception_outcome(error))
        return False, error


def info_fields(info):
    return {
        "sandbox_id": info.sandbox_id,
        "template_id": info.template_id,
        "name": info.name,
        "metadata": info.metadata,
        "state": str(info.state),
        "started_at": info.started_at.isoformat(),
        "end_at": info.end_at.isoformat(),
        "cpu_count": info.cpu_count,
        "memory_mb": info.memory_mb,
        "envd_version": info.envd_version,
    }


def is_not_found(error):
    return isinstance(error, NotFoundException)


def is_refusal(error):
    """A refusal the SDK surfaces as its generic error: a 4xx other than 401, 404 and 429
    (those have their own classes, and the SDK retries 429 on its own)."""
    status = getattr(error, "status_code", None)
    return (
        type(error) is SandboxException
        and status is not None
        and 400 <= status < 500
        and status not in (401, 404, 429)
    )


def list_all(report, query, limit=None):
    """Every page of Sandbox.list, as (pages of ids, the infos); records the step."""
    paginator = Sandbox.list(query=query, limit=limit)
    pages, infos, tokens = [], [], []
    while paginator.has_next:
        items = paginator.next_items()
        pages.append([i.sandbox_id for i in items])
        infos.extend(items)
        tokens.append(paginator.next_token)
    report.step("list", outcome="ok", pages=pages, next_tokens=tokens)
    return pages, infos


def lifecycle(report, args):
    metadata = dict(args.metadata)
    ok, sandbox = attempt(
        report,
        "create",
        lambda: Sandbox.create(template=args.template, timeout=args.timeout, metadata=metadata),
    )
    if not report.expect(ok, "create failed"):
        return
    sandbox_id = sandbox.sandbox_id
    report.set(sandbox_id=sandbox_id)
    report.step("create", outcome="ok", sandbox_id=sandbox_id)

    ok, info = attempt(report, "get_info", sandbox.get_info)
    if not report.expect(ok, "get_info after create failed"):
        return
    report.step("get_info", outcome="ok", **info_fields(info))
    first_end_at = info.end_at
    report.expect(info.sandbox_id == sandbox_id, "get_info answered another sandbox")
    report.expect(info.template_id == args.template, "templateID differs from the one asked for")
    report.expect(info.metadata == metadata, "metadata did not come back as given")
    report.expect(info.state == SandboxState.RUNNING, "a new sandbox is not running")
    report.expect(info.end_at > info.started_at, "endAt is not after startedAt")

    ok, listed = attempt(
        report,
        "list",
        lambda: list_all(report, SandboxQuery(metadata=metadata, state=[SandboxState.RUNNING])),
    )
    if report.expect(ok, "list with the metadata filter failed"):
        _, infos = listed
        report.expect(
            sandbox_id in [i.sandbox_id for i in infos], "the metadata filter left the sandbox out"
        )
        report.expect(
            all(all(i.metadata.get(k) == v for k, v in metadata.items()) for i in infos),
            "the metadata filter let another sandbox through",
        )

    ok, _ = attempt(report, "set_timeout", lambda: sandbox.set_timeout(args.new_timeout))
    if report.expect(ok, "set_timeout failed"):
        report.step("set_timeout", outcome="ok", timeout=args.new_timeout)

    ok, info = attempt(report, "get_info_after_set_timeout", sandbox.get_info)
    if report.expect(ok, "get_info after set_timeout failed"):
        report.step("get_info_after_set_timeout", outcome="ok", **info_fields(info))
        report.expect(
            info.end_at > first_end_at, "set_timeout did not move endAt later"
        )

    ok, killed = attempt(report, "kill", sandbox.kill)
    if report.expect(ok, "kill failed"):
        report.step("kill", outcome="ok", returned=killed)
        report.expect(killed is True, "kill of a live sandbox did not answer True")

    ok, error = attempt(report, "get_info_after_kill", sandbox.get_info)
    report.expect(not ok and is_not_found(error), "get_info after kill did not raise not-found")

    ok, killed = attempt(report, "kill_again", lambda: Sandbox.kill(sandbox_id))
    if report.expect(ok, "a second kill raised instead of answering False"):
        report.step("kill_again", outcome="ok", returned=killed)
        report.expect(killed is False, "a second kill did not answer False")


def create(report, args):
    ok, sandbox = attempt(
        report,
        "create",
        lambda: Sandbox.create(
            template=args.template, timeout=args.timeout, metadata=dict(args.metadata)
        ),
    )
    if report.expect(ok, "create failed"):
        report.set(sandbox_id=sandbox.sandbox_id)
        report.step("create", outcome="ok", sandbox_id=sandbox.sandbox_id)


def foreign(report, args):
    """Every call on a sandbox this key does not own must look like a missing sandbox."""
    sandbox_id = args.sandbox_id
    for name, call in [
        ("get_info", lambda: Sandbox.get_info(sandbox_id)),
        ("set_timeout", lambda: Sandbox.set_timeout(sandbox_id, 60)),
        ("connect", lambda: Sandbox.connect(sandbox_id)),
    ]:
        ok, error = attempt(report, name, call)
        if ok:
            report.step(name, outcome="ok")
        report.expect(not ok and is_not_found(error), f"{name} of a foreign sandbox did not raise not-found")

    ok, killed = attempt(report, "kill", lambda: Sandbox.kill(sandbox_id))
    if report.expect(ok, "kill of a foreign sandbox raised instead of answering False"):
        report.step("kill", outcome="ok", returned=killed)
        report.expect(killed is False, "kill of a foreign sandbox did not answer False")

    ok, listed = attempt(report, "list", lambda: list_all(report, None))
    if report.expect(ok, "list failed"):
        _, infos = listed
        report.expect(
            sandbox_id not in [i.sandbox_id for i in infos], "list shows a foreign sandbox"
        )


def insufficient(report, args):
    ok, result = attempt(
        report, "create", lambda: Sandbox.create(template=args.template, timeout=args.timeout)
    )
    if ok:
        report.step("create", outcome="ok", sandbox_id=result.sandbox_id)
    report.expect(not ok and is_refusal(result), "create was not refused with a plain 4xx SandboxException")


def burst(report, args):
    def create_one(_):
        try:
            sandbox = Sandbox.create(template=args.template, timeout=args.timeout)
            return {"outcome": "ok", "sandbox_id": sandbox.sandbox_id}
        except Exception as error:  # each create's outcome is recorded
            return exception_outcome(error)

    with ThreadPoolExecutor(max_workers=args.count) as pool:
        outcomes = list(pool.map(create_one, range(args.count)))
    created = [o["sandbox_id"] for o in outcomes if o["outcome"] == "ok"]
    refused = {}
    for outcome in outcomes:
        if outcome["outcome"] == "raised":
            label = f"{outcome['exception']} {outcome['status']}"
            refused[label] = refused.get(label, 0) + 1
    report.set(created=created, refused=refused)
    report.step("burst", outcome="ok", created=len(created), refused=refused)
    messages = sorted({o["message"] for o in outcomes if o["outcome"] == "raised"})
    report.set(refusal_messages=messages[:3])
    for outcome in outcomes:
        if outcome["outcome"] == "raised":
            report.expect(
                outcome["exception"] == "SandboxException"
                and outcome["status"] not in (None, 401, 404, 429),
                f"a create failed otherwise than refused: {outcome['exception']} {outcome['message']}",
            )
    if args.kill:
        killed = [Sandbox.kill(sandbox_id) for sandbox_id in created]
        report.step("kill", outcome="ok", killed=sum(killed))
        report.expect(all(killed), "a kill of a created sandbox did not answer True")


def connect(report, args):
    ok, sandbox = attempt(
        report, "connect", lambda: Sandbox.connect(args.sandbox_id, timeout=args.timeout)
    )
    if not report.expect(ok, "connect failed"):
        return
    report.step("connect", outcome="ok", sandbox_id=sandbox.sandbox_id)
    report.expect(sandbox.sandbox_id == args.sandbox_id, "connect answered another sandbox")
    ok, info = attempt(report, "get_info", sandbox.get_info)
    if report.expect(ok, "get_info after connect failed"):
        report.step("get_info", outcome="ok", **info_fields(info))


def set_timeout(report, args):
    """A new timeout: accepted (endAt moves), or with --expect-refusal refused as a plain 4xx
    (what a longer timeout the credits do not cover must give)."""
    ok, error = attempt(report, "set_timeout", lambda: Sandbox.set_timeout(args.sandbox_id, args.timeout))
    if ok:
        report.step("set_timeout", outcome="ok", timeout=args.timeout)
    if args.expect_refusal:
        report.expect(not ok and is_refusal(error), "set_timeout was not refused with a plain 4xx SandboxException")
    elif report.expect(ok, "set_timeout failed"):
        ok, info = attempt(report, "get_info", lambda: Sandbox.get_info(args.sandbox_id))
        if report.expect(ok, "get_info after set_timeout failed"):
            report.step("get_info", outcome="ok", **info_fields(info))


def list_scenario(report, args):
    states = [SandboxState(s) for s in args.state] or None
    query = SandboxQuery(metadata=dict(args.metadata) or None, state=states)
    ok, listed = attempt(report, "list", lambda: list_all(report, query, args.limit))
    if not report.expect(ok, "list failed"):
        return
    pages, infos = listed
    ids = [i.sandbox_id for i in infos]
    report.set(pages=pages, sandbox_ids=ids, count=len(ids))
    if args.limit:
        report.expect(all(len(p) <= args.limit for p in pages), "a page is longer than the limit")
    report.expect(len(ids) == len(set(ids)), "a sandbox appears on two pages")
    if states:
        report.expect(all(i.state in states for i in infos), "the state filter let another state through")


def kill(report, args):
    ok, killed = attempt(report, "kill", lambda: Sandbox.kill(args.sandbox_id))
    if report.expect(ok, "kill raised"):
        report.step("kill", outcome="ok", returned=killed)
        report.set(killed=killed)


def metadata_argument(text):
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE")
    return key, value


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="scenario", required=True)

    def command(name, *options):
        sub = commands.add_parser(name)
        for option in options:
            option(sub)
        return sub

    def template(sub):
        sub.add_argument("--template", required=True)

    def metadata(sub):
        sub.add_argument("--metadata", type=metadata_argument, action="append", default=[])

    def timeout(sub):
        sub.add_argument("--timeout", type=int, help="seconds")

    def sandbox_id(sub):
        sub.add_argument("--sandbox-id", required=True)

    lifecycle_command = command("lifecycle", template, metadata, timeout)
    lifecycle_command.add_argument("--new-timeout", type=int, default=60, help="seconds")
    command("create", template, metadata, timeout)
    command("foreign", sandbox_id)
    command("insufficient", template, timeout)
    burst_command = command("burst", template, timeout)
    burst_command.add_argument("--count", type=int, default=64)
    burst_command.add_argument("--kill", action="store_true")
    command("connect", sandbox_id, timeout)
    set_timeout_command = command("set-timeout", sandbox_id)
    set_timeout_command.add_argument("--timeout", type=int, required=True, help="seconds")
    set_timeout_command.add_argument("--expect-refusal", action="store_true")
    list_command = command("list", metadata)
    list_command.add_argument("--state", action="append", default=[], choices=["running", "paused"])
    list_command.add_argument("--limit", type=int)
    command("kill", sandbox_id)
    return parser.parse_args()


SCENARIOS = {
    "lifecycle": lifecycle,
    "create": create,
    "foreign": foreign,
    "insufficient": insufficient,
    "burst": burst,
    "connect": connect,
    "set-timeout": set_timeout,
    "list": list_scenario,
    "kill": kill,
}


def main():
    args = parse_arguments()
    report = Report(args.scenario)
    for variable in ("E2B_API_URL", "E2B_API_KEY"):
        report.expect(os.environ.get(variable), f"{variable} is not set")
    if not report.problems:
        try:
            SCENARIOS[args.scenario](report, args)
        except Exception as error:  # an unexpected failure still prints one JSON object
            report.step("unexpected", **exception_outcome(error))
            report.expect(False, f"unexpected {type(error).__name__}: {error}")
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
