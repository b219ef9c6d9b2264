#!/usr/bin/env python3
"""fake_server.py with faults, for the e2b extension's tests (tests/e2e/e2b_backend.rs).

    python3 tests/e2b/faulty_server.py [fake_server.py's options]
        [--fail-create STATUS] [--slow-create SECONDS]

--fail-create STATUS answers every create with STATUS and E2B's JSON error body, creating
nothing (429 and 503 stand for a throttled or overloaded provider). --slow-create SECONDS
creates the sandbox, then waits that long before answering: a create whose answer the client
gives up on, leaving a sandbox the client does not know about. Everything else is
fake_server.py's, unchanged. Standard library only.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_server  # noqa: E402

CREATE_PATHS = ("/sandboxes", "/v2/sandboxes")


class FaultyHandler(fake_server.Handler):
    def answer(self):
        faults = self.server.faults
        is_create = self.command == "POST" and self.path.split("?")[0] in CREATE_PATHS
        if is_create and faults.fail_create:
            self.read_body()
            status = faults.fail_create
            data = json.dumps({"code": status, "message": f"injected failure {status}"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if is_create and faults.slow_create:
            # Create now, answer late: wrap the socket's writes until the answer is out.
            original_write = self.wfile.write

            def late_write(data):
                time.sleep(faults.slow_create)
                self.wfile.write = original_write
                return original_write(data)

            self.wfile.write = late_write
        super().answer()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tenant", type=fake_server.tenant_argument, action="append", required=True)
    parser.add_argument("--template", type=fake_server.template_argument, action="append")
    parser.add_argument("--request-log", type=argparse.FileType("a"))
    parser.add_argument("--fail-create", type=int, default=0)
    parser.add_argument("--slow-create", type=float, default=0.0)
    args = parser.parse_args()
    plane = fake_server.FakeControlPlane(args.tenant, args.template or [("saas-stub", 1000)])
    server = fake_server.FakeServer(("127.0.0.1", args.port), plane, args.request_log)
    server.RequestHandlerClass = FaultyHandler
    server.faults = args
    print(json.dumps({"url": f"http://127.0.0.1:{server.server_address[1]}"}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
