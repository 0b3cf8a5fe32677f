"""The resource report's Kafka part against a real Kafka-protocol broker
(nisshi, started as the Kafka suite does, e2e/kafka/harness.py): a parent
topic's partitions, offsets and a consumer group's backlog, as the test
filled them through MQTT and committed them with confluent-kafka."""

import sys
from pathlib import Path

import paho.mqtt.client as mqtt
from confluent_kafka import Consumer, TopicPartition
from playwright.sync_api import expect

from consolekit import SINGLE, start
from mqttclient import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kafka"))
from harness import Kafka, kafka_yaml, wait_for  # noqa: E402


def test_report_shows_a_parent_topics_partitions_and_a_groups_backlog(workdir, browse):
    kafka = Kafka(workdir)
    node = None
    try:
        node = start(workdir, "n1", SINGLE + "kafka:\n" + kafka_yaml(kafka))
        wait_for("kafka topics", lambda: "sensors" in kafka.topics(), timeout=20)
        pub = Client(node.tcp, mqtt.MQTTv5, "GID_ktest@@@pub")
        for i in range(10):
            pub.publish(f"sensors/s{i}", b"x", qos=1)
        # A backend group that read the first record of each partition.
        records = kafka.read("sensors", 10)
        by_partition = {}
        for r in records:
            by_partition.setdefault(r.partition(), []).append(r.offset())
        committed = {p: min(offsets) + 1 for p, offsets in by_partition.items()}
        c = Consumer(kafka.client(**{"group.id": "backend", "enable.auto.commit": False}))
        c.commit(offsets=[TopicPartition("sensors", p, o) for p, o in committed.items()], asynchronous=False)
        c.close()
        wait_for("the report's counts", lambda: node.api("/report?range=1h")[1]["totals"]["produced"] >= 10)

        page = browse.page(node, "report")
        expect(page.get_by_role("heading", name="Parent topic in Kafka (", exact=False)).to_contain_text(
            kafka.bootstrap
        )
        page.get_by_role("button", name="Kafka state of sensors").first.click()
        expect(page.get_by_test_id("kafka-messages")).to_have_text("10")
        expect(page.get_by_test_id("partitions").locator("tbody tr")).to_have_count(3)

        page.get_by_label("Consumer group").fill("backend")
        page.get_by_role("button", name="Show").click()
        _, state = node.api("/topics/sensors?group=backend")
        assert state["backlog"] == 10 - len(committed)
        expect(page.get_by_test_id("kafka-backlog")).to_have_text(str(state["backlog"]))
        committed_cells = page.get_by_test_id("partitions").locator("tbody tr td:nth-child(6)")
        expect(committed_cells).to_have_text(
            [str(p["committed"]) if p["committed"] is not None else "—" for p in state["partitions"]]
        )
    finally:
        if node:
            node.kill()
        kafka.stop()
