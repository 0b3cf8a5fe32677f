"""The other half of benchmark scenario 6: what a Kafka-protocol broker
takes from a producer on its own, with the records ringmq wrote.

  kafka_ceiling.py count   --bootstrap B --topic T
      records in T (sum of its partitions' high watermarks)
  kafka_ceiling.py produce --bootstrap B --sample-topic T --topic U --seconds S
      copies of one record of T (value and headers) produced into U, a new
      topic with as many partitions, as fast as they are acknowledged, with
      ringmq's producer settings (acks=all, idempotence, linger 5 ms, at most
      10 000 records unacknowledged, as `kafka.buffer_records`)

Each prints one JSON line.
"""

import argparse
import json
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def partitions(bootstrap, topic):
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    return sorted(md.topics[topic].partitions)


def count(bootstrap, topic):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ringmq-bench-count"})
    try:
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions(bootstrap, topic))
    finally:
        c.close()


def sample(bootstrap, topic):
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "ringmq-bench-sample",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        c.assign([TopicPartition(topic, p, 0) for p in partitions(bootstrap, topic)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = c.poll(1)
            if m is not None and not m.error() and m.value():
                return m.value(), m.headers() or []
        sys.exit(f"no record in {topic}")
    finally:
        c.close()


def produce(bootstrap, sample_topic, topic, seconds):
    value, headers = sample(bootstrap, sample_topic)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    n = len(partitions(bootstrap, sample_topic))
    for f in admin.create_topics([NewTopic(topic, num_partitions=n, replication_factor=1)]).values():
        f.result(timeout=30)
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
        }
    )
    state = {"acked": 0, "failed": 0}

    def delivered(err, _msg):
        state["failed" if err else "acked"] += 1

    limit = 10_000
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        if sent - state["acked"] - state["failed"] >= limit:
            p.poll(0.001)
            continue
        try:
            p.produce(topic, value, headers=headers, on_delivery=delivered)
            sent += 1
        except BufferError:
            p.poll(0.001)
        p.poll(0)
    p.flush(60)
    secs = time.monotonic() - start
    return {
        "records": state["acked"],
        "failed": state["failed"],
        "seconds": round(secs, 3),
        "per_sec": round(state["acked"] / secs),
        "value_bytes": len(value),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["count", "produce"])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--sample-topic")
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    if a.mode == "count":
        print(json.dumps({"records": count(a.bootstrap, a.topic)}))
    else:
        print(json.dumps(produce(a.bootstrap, a.sample_topic, a.topic, a.seconds)))


if __name__ == "__main__":
    main()
