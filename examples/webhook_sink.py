#!/usr/bin/env python3
"""A throwaway webhook receiver for the notification worker: prints each POST and answers
200 (``--status 503`` answers that instead, to watch retries; 410 dead-letters).

    python3 examples/webhook_sink.py                 # listens on 127.0.0.1:8080
    WEBHOOK_URL=http://127.0.0.1:8080/hook cargo run --release --example notification_worker

Standard library only.
"""

from __future__ import annotations

import argparse
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--status", type=int, default=200, help="the HTTP status to answer")
    args = parser.parse_args()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            key = self.headers.get("Idempotency-Key", "-")
            print(f"POST {self.path} (Idempotency-Key {key}) -> {args.status}: {body.decode(errors='replace')}", flush=True)
            self.send_response(args.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer((args.host, args.port), Receiver)
    print(f"webhook sink on http://{args.host}:{args.port}/ answering {args.status}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
