"""When does RabbitMQ confirm a persistent message without writing it to disk?

A probe beside the harness (not part of it): publishes N persistent 128 B messages to a
fresh durable queue on the local RabbitMQ (127.0.0.1:5672, guest/guest), one at a time
with publisher confirms, while the queue has no consumer, a consumer acking each message
(prefetch 100, as S2's workers), or a no-ack consumer (as S1's and S3's subscribers).
Prints the publish rate. Run it under `perf stat` on the broker to count its syncs:

    pip install pika
    echo noack | perf stat -e syscalls:sys_enter_fsync -p "$(pgrep -f beam.smp | head -1)" \
        -- python3 benches/compare/rabbit_confirms.py

with `none`, `manual` or `noack` on standard input. On the 2-core VM (2026-12-07, RabbitMQ
of the machine): none 1,603-1,944 msg/s with 3,002 fsyncs for 3,000 messages; manual
1,589-1,612 msg/s, 3,003 fsyncs; noack 2,756-3,362 msg/s, 2 fsyncs. RabbitMQ confirms a
persistent message once it is on disk or once every queue it reached has delivered it to
a no-ack consumer, whichever comes first: S1's and S3's durable RabbitMQ rows then
promise what a memory broker does (BENCHMARKS.md, "RabbitMQ's durable topic rows").
"""

import sys
import threading
import time

import pika

PARAMS = pika.ConnectionParameters(
    "127.0.0.1", 5672, credentials=pika.PlainCredentials("guest", "guest")
)


def run(mode: str, n: int = 3000) -> float:
    """Publish rate (msg/s) of `n` confirmed persistent messages with consumer `mode`."""
    queue = "probe.confirms.%s.%d" % (mode, time.time_ns())
    conn = pika.BlockingConnection(PARAMS)
    ch = conn.channel()
    ch.queue_declare(queue, durable=True)
    stop = threading.Event()
    consumer = None
    if mode != "none":
        manual = mode == "manual"

        def consume() -> None:
            cconn = pika.BlockingConnection(PARAMS)
            cch = cconn.channel()
            cch.basic_qos(prefetch_count=100)
            for method, _, _ in cch.consume(queue, auto_ack=not manual, inactivity_timeout=0.2):
                if manual and method is not None:
                    cch.basic_ack(method.delivery_tag)
                if stop.is_set():
                    break
            cconn.close()

        consumer = threading.Thread(target=consume)
        consumer.start()
        time.sleep(0.5)
    ch.confirm_delivery()
    body = b"x" * 128
    props = pika.BasicProperties(delivery_mode=2)
    start = time.time()
    for _ in range(n):
        ch.basic_publish("", queue, body, props)
    elapsed = time.time() - start
    stop.set()
    if consumer is not None:
        consumer.join()
    ch.queue_delete(queue)
    conn.close()
    return n / elapsed


if __name__ == "__main__":
    mode = sys.stdin.readline().strip() or "none"
    if mode not in ("none", "manual", "noack"):
        sys.exit("mode: none, manual or noack")
    print("%s %.0f msg/s" % (mode, run(mode)), flush=True)
