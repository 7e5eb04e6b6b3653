"""An outside NATS client reading the kernel's events from JetStream.

Usage: nats_consumer.py URL STREAM SUBJECT_FILTER EXPECTED_COUNT TIMEOUT_SECONDS

Creates a pull consumer of its own on STREAM filtered to SUBJECT_FILTER (for example
`nops.ev.acme.>`), reads every stored message from the start of the stream, acks it and prints
one JSON line per message:

    {"seq": 1, "subject": "...", "msg_id": "...", "event_id": "...", "source": "...",
     "time_ms": 0, "payload": "<payload as UTF-8 text>"}

It stops after EXPECTED_COUNT messages or TIMEOUT_SECONDS, whichever comes first, deletes its
consumer, and exits 0 when it read exactly EXPECTED_COUNT messages (1 otherwise). Only the
`nats-py` client is used: no kernel code, the layout is the one in docs/events-nats.md.
"""

import asyncio
import json
import os
import sys
import time

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

# Most messages one pull asks for.
FETCH_BATCH_MAX = 256


async def consume(url: str, stream: str, subject_filter: str, expected: int, timeout_s: float) -> int:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    js = nc.jetstream()
    durable = f"outside-reader-{os.getpid()}-{int(time.time() * 1000)}"
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        filter_subject=subject_filter,
    )
    sub = await js.pull_subscribe(subject_filter, durable=durable, stream=stream, config=config)
    read = 0
    deadline = time.monotonic() + timeout_s
    try:
        while read < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch = min(FETCH_BATCH_MAX, expected - read)
                messages = await sub.fetch(batch, timeout=min(left, 1.0))
            except NatsTimeout:
                continue
            for msg in messages:
                headers = msg.headers or {}
                line = {
                    "seq": msg.metadata.sequence.stream,
                    "subject": msg.subject,
                    "msg_id": headers.get("Nats-Msg-Id"),
                    "event_id": headers.get("Nops-Event-Id"),
                    "source": headers.get("Nops-Source"),
                    "time_ms": int(headers.get("Nops-Time-Ms", "0")),
                    "payload": msg.data.decode("utf-8", errors="replace"),
                }
                print(json.dumps(line), flush=True)
                await msg.ack()
                read += 1
        # Anything past the expected count is an error the caller must see.
        try:
            extra = await sub.fetch(1, timeout=0.3)
        except NatsTimeout:
            extra = []
        for msg in extra:
            print(json.dumps({"unexpected": msg.subject}), flush=True)
            read += 1
    finally:
        await sub.unsubscribe()
        try:
            await js.delete_consumer(stream, durable)
        finally:
            await nc.close()
    return 0 if read == expected else 1


def main() -> int:
    if len(sys.argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    url, stream, subject_filter, expected, timeout_s = sys.argv[1:]
    return asyncio.run(consume(url, stream, subject_filter, int(expected), float(timeout_s)))


if __name__ == "__main__":
    sys.exit(main())
