"""Drives Sluice from Python: a work queue round trip and a publish/subscribe round trip.

    python3 examples/python/example.py 127.0.0.1:50051
"""

import json
import sys

from sluice_client import SluiceClient, pb


def main(target: str) -> None:
    with SluiceClient(target) as sluice:
        sluice.wait_ready()

        # Work queue: enqueue, lease with a long poll, ack with a result.
        job_id = sluice.enqueue(
            "py.demo", json.dumps({"to": "ann@example.com"}).encode(), kind="welcome"
        )
        print(f"enqueued job {job_id}")
        for job in sluice.lease("py.demo", max_jobs=10, wait_ms=2000, consumer="python-example"):
            print(f"leased {job.job_id} kind={job.kind} attempt={job.attempt} payload={job.payload!r}")
            sluice.ack(job.lease_id, result=b"sent")
        job = sluice.get_job(job_id)
        print(f"job {job.id} is {pb.JobState.Name(job.state)} with result {job.result!r}")

        # Topics: subscribe (registered when the call returns), then publish.
        with sluice.subscribe("py.events.>", timeout=5) as subscription:
            sequence = sluice.publish("py.events.hello", b"hi from python", headers={"lang": "py"})
            received = []
            for message in subscription:
                received.append(message)
                break
        for m in received:
            print(f"received {m.topic}#{m.sequence} {m.payload!r} (published as #{sequence})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
