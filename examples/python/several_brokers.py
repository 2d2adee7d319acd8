"""Talks to several Sluice nodes serving the same queues and topics (e.g. the cluster of
scripts/cluster-up.sh) through one gRPC channel, with gRPC's own round-robin balancing:
the target names every address (``ipv4:host:port,host:port,...``) and the channel option
``grpc.lb_policy_name=round_robin`` spreads calls over the nodes that are up, leaving out
one that stops and taking it back when it returns. Every call may go to another node
(an ack to another than the lease's), so the nodes must share their state, as Sluice
nodes over one Redis do; separate in-memory brokers would refuse acks for leases they
never gave.

    python3 examples/python/several_brokers.py 127.0.0.1:50051 127.0.0.1:50052
    python3 examples/python/several_brokers.py   # the nodes in $SLUICE_CLUSTER_DIR/grpc-addrs
"""

import os
import sys
from pathlib import Path

from sluice_client import SluiceClient


def addresses(argv: list[str]) -> list[str]:
    """The addresses on the command line, else those scripts/cluster-up.sh recorded."""
    if argv:
        return argv
    recorded = Path(os.environ.get("SLUICE_CLUSTER_DIR", "./sluice-cluster")) / "grpc-addrs"
    return recorded.read_text().split()


def main(addrs: list[str]) -> None:
    # One channel over every node: `ipv4:` takes a comma-separated list of IPv4 addresses
    # (`ipv6:[::1]:50051,...` for IPv6; `dns:` names resolving to several addresses work too).
    target = "ipv4:" + ",".join(addrs)
    options = [
        ("grpc.lb_policy_name", "round_robin"),
        # gRPC would send the whole target as the HTTP/2 :authority; a comma-separated list
        # is no valid authority and the broker's HTTP/2 server resets the stream. Any one
        # valid host:port does (the broker does not route on it).
        ("grpc.default_authority", addrs[0]),
    ]
    with SluiceClient(target, options=options) as sluice:
        sluice.wait_ready()
        for i in range(10):
            job_id = sluice.enqueue("py.balanced", f"job {i}".encode())
            print(f"enqueued {job_id}")
        # Leases, too, go to any node: they all serve the same queue.
        leased = sluice.lease("py.balanced", max_jobs=10, wait_ms=1000, consumer="py-balanced")
        for job in leased:
            sluice.ack(job.lease_id)
        print(f"leased and acked {len(leased)} job(s) over {len(addrs)} node(s)")


if __name__ == "__main__":
    main(addresses(sys.argv[1:]))
