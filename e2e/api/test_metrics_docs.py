"""Metric names are documented: every `ringmq_*` metric a broker exports is
in README.md's metrics table, and the Grafana dashboard uses only documented
names."""

import json
import re
import time
import urllib.request

from mqttclient import probe
from procs import ROOT, free_port, start_broker


def documented():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(ringmq_[a-z_]+)`", section, re.M))


def test_exported_metrics_and_the_dashboard_use_documented_names():
    docs = documented()
    assert len(docs) > 20
    admin = free_port()
    # Kafka configured but unreachable: its metrics are registered as well.
    extra = (
        "capacity:\n  connections: 1\n"
        "kafka:\n  bootstrap_servers: \"127.0.0.1:1\"\n  create_topics: false\n"
    )
    gen = start_broker(extra, admin=admin)
    port = next(gen)
    try:
        c = probe(port, "metrics-probe")
        time.sleep(1.2)  # the rates are exported once a second
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
            body = r.read().decode()
        c.close()
    finally:
        gen.close()
    exported = set(re.findall(r"^# TYPE (ringmq_[a-z_]+) ", body, re.M))
    assert {"ringmq_connections", "ringmq_tps", "ringmq_kafka_buffer_records"} <= exported, exported
    assert exported - docs == set(), "exported but not documented in README.md"
    dashboard = json.loads((ROOT / "manifests/grafana/ringmq-dashboard.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"ringmq_[a-z_]+", target["expr"]))
    assert used, "the dashboard has queries"
    assert used - docs == set(), "the dashboard uses undocumented metrics"
