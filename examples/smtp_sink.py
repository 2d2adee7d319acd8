#!/usr/bin/env python3
"""A throwaway SMTP server for trying the email worker's failure paths by hand.

It prints every email it accepts. ``--reject CODE`` answers RCPT TO with that code
instead (550: a permanent failure, the job dead-letters at once; 451: a transient one, the
job retries with backoff), and ``--stall SECONDS`` holds each RCPT TO that long before
answering, long enough to kill a worker in the middle of a send. ``--only TEXT`` limits
both to recipients containing TEXT, so other emails go through.

    python3 examples/smtp_sink.py                          # accept and print everything
    python3 examples/smtp_sink.py --reject 550 --only nobody
    python3 examples/smtp_sink.py --stall 30

Needs aiosmtpd (``pip install aiosmtpd``; ``scripts/install-test-deps.sh`` installs it).
Plain SMTP, no TLS or auth: point the worker at it with SMTP_URL=smtp://127.0.0.1:2525.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from email import message_from_bytes, policy

from aiosmtpd.controller import Controller

# What each code says: the enhanced status code and text a real server would send.
REPLIES = {
    4: "4.3.0 Mailbox busy, try again later",
    5: "5.1.1 <{address}>: Recipient address rejected: User unknown",
}


class Sink:
    """aiosmtpd handler: accepts, rejects or stalls each recipient per the flags."""

    def __init__(self, reject: int | None, stall: float, only: str | None):
        self.reject = reject
        self.stall = stall
        self.only = only

    def _applies(self, address: str) -> bool:
        return self.only is None or self.only in address

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self._applies(address):
            if self.stall:
                say(f"stalling RCPT TO:<{address}> for {self.stall:g} s")
                await asyncio.sleep(self.stall)
            if self.reject:
                text = REPLIES[self.reject // 100].format(address=address)
                say(f"rejected RCPT TO:<{address}> with {self.reject}")
                return f"{self.reject} {text}"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        msg = message_from_bytes(envelope.content, policy=policy.default)
        body = msg.get_body(preferencelist=("plain",))
        text = body.get_content() if body is not None else ""
        say(
            f"--- email from {envelope.mail_from} to {', '.join(envelope.rcpt_tos)}\n"
            f"Subject: {msg['subject']}\n\n{text.rstrip()}\n---"
        )
        return "250 Message accepted for delivery"


def say(line: str) -> None:
    print(line, flush=True)


def reply_code(text: str) -> int:
    code = int(text)
    if not 400 <= code <= 599:
        raise argparse.ArgumentTypeError(f"{code}: an SMTP failure code is 4xx or 5xx")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--reject", type=reply_code, metavar="CODE", help="answer RCPT TO with this 4xx or 5xx code")
    parser.add_argument("--stall", type=float, default=0, metavar="SECONDS", help="hold each RCPT TO this long first")
    parser.add_argument("--only", metavar="TEXT", help="apply --reject and --stall only to recipients containing TEXT")
    args = parser.parse_args()

    controller = Controller(Sink(args.reject, args.stall, args.only), hostname=args.host, port=args.port)
    controller.start()
    mode = []
    if args.stall:
        mode.append(f"stalling {args.stall:g} s")
    if args.reject:
        mode.append(f"rejecting with {args.reject}")
    scope = f" for recipients containing {args.only!r}" if args.only else ""
    say(f"SMTP sink on {args.host}:{args.port}: {', then '.join(mode) or 'accepting every email'}{scope}")
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
