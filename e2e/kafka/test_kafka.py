"""Kafka data flows (K1–K7) end to end: Paho MQTT clients on one side, the
real ringmq-broker in the middle, a real Kafka-protocol broker (nisshi) and an
independent Kafka client (confluent-kafka) on the other side."""

import base64
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import Consumer, TopicPartition

from procs import broker_binary
from harness import WAIT, Broker, Kafka, kafka_yaml, owned_by, records_json, wait_for
from mqttclient import Client

V3, V5 = mqtt.MQTTv311, mqtt.MQTTv5


@pytest.fixture
def kafka(tmp_path):
    k = Kafka(tmp_path)
    yield k
    k.stop()


@pytest.fixture
def broker(tmp_path, kafka):
    b = Broker(tmp_path, kafka_yaml(kafka))
    wait_for("kafka topics", lambda: {"sensors", "orders", "mq2mqtt"} <= set(kafka.topics()), timeout=20)
    yield b
    b.stop()


def downlink_ready(kafka, broker, sub, topic="cmd/warmup"):
    """Waits until the broker's downlink consumer has its partitions: the
    group starts at the latest offset, so records sent before are not read."""
    sub.subscribe(topic, 1)

    def probe():
        kafka.send("mq2mqtt", b"probe", headers=[("mqttTopic", topic)])
        try:
            sub.messages.get(timeout=1.0)
            return True
        except Exception:
            return False

    wait_for("the downlink consumer", probe, timeout=30, every=0)
    while not sub.messages.empty():
        sub.messages.get()
    sub.c.unsubscribe(topic)


def test_topics_are_created_with_three_partitions(broker, kafka):
    topics = kafka.topics()
    for name in ("sensors", "orders", "mq2mqtt", "mqtt-device-connect", "mqtt-device-disconnect"):
        assert name in topics, name
        assert len(topics[name].partitions) == 3, name


@pytest.mark.parametrize("version", [V3, V5])
def test_uplink_records_read_by_a_kafka_consumer(broker, kafka, version):
    pub = Client(broker.port, version, client_id=f"GID_atest@@@dev-{version}")
    pub.publish("sensors/room1/temp", b"21.5", qos=1)
    pub.publish("sensors/room1/raw", bytes([0xFF, 0x00, 0x10]), qos=1)
    pub.publish("sensors/room1/q2", b"exactly once", qos=2)
    records = kafka.read("sensors", 3)
    values = sorted(records_json(records), key=lambda v: v["topic"])
    q2, raw, temp = values
    assert (q2["payload"], q2["qos"]) == ("exactly once", 2)
    assert temp["clientId"] == f"GID_atest@@@dev-{version}"
    assert (temp["payload"], temp["payloadEncoding"], temp["qos"]) == ("21.5", "utf8", 1)
    assert temp["ts"] > 1_600_000_000_000 and re.fullmatch("[0-9a-f]{16}", temp["msgId"])
    assert raw["payloadEncoding"] == "base64"
    assert base64.b64decode(raw["payload"]) == bytes([0xFF, 0x00, 0x10])
    headers = dict(records[0].headers())
    assert headers["clientId"] == f"GID_atest@@@dev-{version}".encode()
    # A normal parent topic is not keyed: Kafka spreads the records.
    assert all(r.key() is None for r in records)
    assert broker.metric("ringmq_kafka_records_total", topic="sensors", result="ok") == 3
    assert broker.metric("ringmq_kafka_produce_seconds_count") >= 3


def test_undeclared_parent_topics_are_routed_but_not_stored(broker, kafka):
    sub = Client(broker.port, V5)
    sub.subscribe("chat/#", 1)
    pub = Client(broker.port, V5)
    pub.publish("chat/room", b"hello", qos=1)
    assert sub.message().payload == b"hello"
    assert "chat" not in kafka.topics()
    assert broker.metric("ringmq_kafka_records_total", topic="chat", result="ok") == 0


def test_stored_messages_still_reach_mqtt_subscribers(broker, kafka):
    sub = Client(broker.port, V3)
    sub.subscribe("sensors/#", 1)
    pub = Client(broker.port, V3)
    pub.publish("sensors/x", b"both", qos=1)
    assert sub.message().payload == b"both"
    assert records_json(kafka.read("sensors", 1))[0]["payload"] == "both"


def test_ordered_topic_keeps_1000_messages_in_send_order(broker, kafka):
    cid = "GID_otest@@@ordered-dev"
    pub = Client(broker.port, V5, client_id=cid)
    infos = [pub.c.publish("orders/line", str(i).encode(), qos=1) for i in range(1000)]
    for info in infos:
        info.wait_for_publish(timeout=30)
    records = kafka.read("orders", 1000, timeout=30)
    assert {r.key() for r in records} == {cid.encode()}
    assert len({r.partition() for r in records}) == 1
    records.sort(key=lambda r: r.offset())
    assert [int(v["payload"]) for v in records_json(records)] == list(range(1000))


def test_enable_order_msg_keys_a_clients_records(broker, kafka):
    cid = "GID_otest@@@asks-order"
    pub = Client(broker.port, V3, client_id=cid)
    pub.publish("$SYS/enableOrderMsg", b'{"order":"true"}', qos=1)
    pub.publish("sensors/a", b"keyed", qos=1)
    other = Client(broker.port, V3, client_id="GID_otest@@@no-order")
    other.publish("sensors/b", b"unkeyed", qos=1)
    by_payload = {json.loads(r.value())["payload"]: r.key() for r in kafka.read("sensors", 2)}
    assert by_payload == {"keyed": cid.encode(), "unkeyed": None}


@pytest.mark.parametrize("version", [V3, V5])
def test_downlink_records_reach_subscribers(broker, kafka, version):
    sub = Client(broker.port, version)
    downlink_ready(kafka, broker, sub)
    sub.subscribe("cmd/+/set", 1)
    kafka.send("mq2mqtt", b"on", headers=[("mqttTopic", "cmd/lamp/set"), ("qoslevel", "1")])
    m = sub.message()
    assert (m.topic, m.payload, m.qos) == ("cmd/lamp/set", b"on", 1)
    kafka.send("mq2mqtt", b"q0", headers=[("mqttTopic", "cmd/lamp/set"), ("qoslevel", "0")])
    assert sub.message().qos == 0
    # A record without mqttTopic is skipped and counted; the next one flows.
    kafka.send("mq2mqtt", b"bad", headers=[("qoslevel", "1")])
    kafka.send("mq2mqtt", b"bad qos", headers=[("mqttTopic", "cmd/lamp/set"), ("qoslevel", "7")])
    partition, offset = kafka.send("mq2mqtt", b"after", headers=[("mqttTopic", "cmd/lamp/set")])
    m = sub.message()
    assert (m.payload, m.qos) == (b"after", 1)
    assert broker.metric("ringmq_kafka_downlink_records_total", result="invalid") == 2
    # The offset is committed (every second) once the record is delivered.
    wait_for("the committed offset", lambda: kafka.committed("ringmq-n1", "mq2mqtt", partition) > offset)


def test_downlink_clean_session_header_decides_offline_queueing(broker, kafka):
    probe = Client(broker.port, V3)
    downlink_ready(kafka, broker, probe)
    cid = "GID_dtest@@@sleeper"
    dev = Client(broker.port, V3, client_id=cid, clean=False)
    dev.subscribe("cmd/sleeper", 1)
    dev.close()
    delivered = broker.metric("ringmq_kafka_downlink_records_total", result="delivered")
    kafka.send("mq2mqtt", b"kept", headers=[("mqttTopic", "cmd/sleeper"), ("cleanSession", "false")])
    kafka.send("mq2mqtt", b"online only", headers=[("mqttTopic", "cmd/sleeper"), ("cleanSession", "true")])
    # Both records are read before the device returns.
    metric = broker.metric
    wait_for(
        "both downlink records",
        lambda: metric("ringmq_kafka_downlink_records_total", result="delivered") == delivered + 1
        and metric("ringmq_kafka_downlink_records_total", result="no_subscriber") == 1,
    )
    dev = Client(broker.port, V3, client_id=cid, clean=False)
    assert dev.message().payload == b"kept"
    dev.nothing()


def test_p2p_through_kafka_reaches_only_its_target(broker, kafka):
    target = Client(broker.port, V5, client_id="GID_ptest@@@target")
    other = Client(broker.port, V5, client_id="GID_ptest@@@other")
    other.subscribe("app/#", 1)
    downlink_ready(kafka, broker, target)
    kafka.send("mq2mqtt", b"just you", headers=[("mqttTopic", "app/p2p/GID_ptest@@@target"), ("qoslevel", "1")])
    m = target.message()
    assert (m.topic, m.payload) == ("app/p2p/GID_ptest@@@target", b"just you")
    other.nothing()


def events_of(kafka, topic, client_id, count):
    def got():
        recs = [v for v in records_json(kafka.read_all(topic)) if v["clientId"] == client_id]
        return recs if len(recs) >= count else None

    return wait_for(f"{count} {topic} events of {client_id}", got, timeout=20, every=0.2)


def test_device_events_for_clean_disconnect_and_killed_client(broker, kafka):
    clean = Client(broker.port, V3, client_id="GID_etest@@@polite")
    clean.close()
    # A client process killed with SIGKILL: the TCP connection just goes away.
    script = (
        "import paho.mqtt.client as m, time\n"
        "c = m.Client(m.CallbackAPIVersion.VERSION2, client_id='GID_etest@@@killed')\n"
        f"c.connect('127.0.0.1', {broker.port}, keepalive=60)\n"
        "c.loop_start()\n"
        "print('connected', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"connected"
    wait_for("the killed client's session", lambda: broker.metric("ringmq_connections") >= 1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    polite_up = events_of(kafka, "mqtt-device-connect", "GID_etest@@@polite", 1)
    polite_down = events_of(kafka, "mqtt-device-disconnect", "GID_etest@@@polite", 2)
    assert [e["eventType"] for e in polite_up] == ["connect"]
    assert sorted(e["eventType"] for e in polite_down) == ["disconnect", "tcpclean"]
    every = polite_up + polite_down
    assert {e["channelId"] for e in every} == {polite_up[0]["channelId"]}
    assert all(e["clientIp"] == "127.0.0.1" for e in every)
    order = [e["eventType"] for e in sorted(every, key=lambda e: e["eventIndex"])]
    assert order == ["connect", "disconnect", "tcpclean"]
    assert all(e["ts"] > 1_600_000_000_000 for e in every)

    killed_up = events_of(kafka, "mqtt-device-connect", "GID_etest@@@killed", 1)
    killed_down = events_of(kafka, "mqtt-device-disconnect", "GID_etest@@@killed", 1)
    assert [e["eventType"] for e in killed_down] == ["tcpclean"]
    assert killed_down[0]["eventIndex"] > killed_up[0]["eventIndex"]
    assert killed_up[0]["channelId"] != polite_up[0]["channelId"]


class Stream:
    """A QoS 1 publisher that records which messages were acknowledged."""

    def __init__(self, port, version, topic, client_id):
        self.acked, self.refused = [], []
        self.lock = threading.Lock()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=version,
        )
        self.c.max_inflight_messages_set(100)
        self.c.max_queued_messages_set(0)
        self.mids = {}
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        self.topic = topic

    def _on_publish(self, c, u, mid, rc, props):
        with self.lock:
            n = self.mids.pop(mid, None)
            if n is None:
                return
            (self.refused if rc.is_failure else self.acked).append((n, rc.value))

    def send(self, n):
        with self.lock:
            info = self.c.publish(self.topic, str(n).encode(), qos=1)
            self.mids[info.mid] = n

    def outstanding(self):
        with self.lock:
            return len(self.mids)


@pytest.mark.parametrize("outage", ["network", "frozen", "restart"])
def test_kafka_outage_loses_no_acknowledged_message(tmp_path, kafka, outage):
    """K7: cut Kafka off (network cut, frozen process, or killed with SIGKILL
    and restarted on its storage) in the middle of a QoS 1 stream, bring it back:
    every PUBACKed message is in Kafka exactly once; while Kafka is away QoS 0
    messages to stored topics are dropped and counted, MQTT 5 publishers get
    0x97 once the buffer is full, and MQTT-to-MQTT traffic keeps flowing."""
    broker = Broker(tmp_path, kafka_yaml(kafka, extra="  buffer_records: 100\n"))
    try:
        wait_for("kafka topics", lambda: "sensors" in kafka.topics(), timeout=20)
        # MQTT 3.1.1 publishes to an ordered topic: they wait for buffer slots
        # through the outage and must still land in send order.
        v3 = Stream(broker.port, V3, "orders/v3", "GID_stest@@@v3")
        v5 = Stream(broker.port, V5, "sensors/v5", "GID_stest@@@v5")
        # Fewer than buffer_records at a time: all acknowledged.
        for n in range(40):
            v3.send(n)
            v5.send(n)
        wait_for("the first acknowledgements", lambda: len(v3.acked) == 40 and len(v5.acked) == 40, timeout=20)

        if outage == "network":
            kafka.proxy.down()
        elif outage == "frozen":
            kafka.proc.send_signal(signal.SIGSTOP)
        else:
            kafka.kill()
        for n in range(40, 400):
            v3.send(n)
            v5.send(n)
            if n % 50 == 0:
                time.sleep(0.05)
        wait_for("a full buffer", lambda: broker.metric("ringmq_kafka_buffer_records") == 100)
        qos0 = Client(broker.port, V3)
        for _ in range(50):
            qos0.publish("sensors/qos0", b"dropped", qos=0)
        # MQTT-to-MQTT traffic does not depend on Kafka.
        sub = Client(broker.port, V5)
        sub.subscribe("chat/#", 1)
        Client(broker.port, V5).publish("chat/x", b"still routed", qos=1)
        assert sub.message().payload == b"still routed"
        # The buffer is full: a new MQTT 5 publisher is refused at once.
        # (Publishers whose earlier messages wait for Kafka get their
        # refusals after those: PUBACKs go out in the order of the PUBLISHes.)
        late = Client(broker.port, V5)
        late.c.publish("sensors/late", b"refused", qos=1)
        _, rc = late.acks.get(timeout=WAIT)
        assert rc.value == 0x97, rc
        wait_for("QoS 0 drops counted", lambda: broker.metric("ringmq_kafka_records_total", topic="sensors", result="dropped") == 50)
        acked_during = len(v3.acked) + len(v5.acked)

        if outage == "network":
            kafka.proxy.up()
        elif outage == "frozen":
            kafka.proc.send_signal(signal.SIGCONT)
        else:
            kafka.start()
        wait_for("every message answered", lambda: v3.outstanding() == 0 and v5.outstanding() == 0, timeout=60)
        assert len(v3.acked) == 400, "MQTT 3.1.1 publishes wait for Kafka, none is refused"
        assert len(v3.acked) + len(v5.acked) > acked_during

        ordered = sorted(kafka.read("orders", 400, timeout=30), key=lambda r: r.offset())
        assert len({r.partition() for r in ordered}) == 1
        got = [int(v["payload"]) for v in records_json(ordered)]
        assert got == list(range(400)), [(i, n) for i, n in enumerate(got) if i != n][:20]

        acked = {n for n, _ in v5.acked}
        refused = {n for n, _ in v5.refused}
        assert {rc for _, rc in v5.refused} <= {0x97}
        stored = kafka.read_at_least("sensors", len(acked), timeout=30)
        numbers = [int(v["payload"]) for v in records_json(stored) if v["topic"] == "sensors/v5"]
        assert len(numbers) == len(set(numbers)), "a record was written twice"
        assert acked <= set(numbers), f"acknowledged but not in Kafka: {sorted(acked - set(numbers))[:10]}"
        assert not refused & set(numbers), "a refused message was stored"

    finally:
        if outage == "frozen":
            kafka.proc.send_signal(signal.SIGCONT)
        broker.stop()


def test_broker_serves_mqtt_while_kafka_is_unreachable_and_catches_up(tmp_path, kafka):
    kafka.proxy.down()
    broker = Broker(tmp_path, kafka_yaml(kafka))
    try:
        sub = Client(broker.port, V3)
        sub.subscribe("chat/#", 1)
        pub = Client(broker.port, V3, client_id="GID_wtest@@@early")
        pub.publish("chat/a", b"routed", qos=1)
        assert sub.message().payload == b"routed"
        info = pub.c.publish("sensors/a", b"waits for kafka", qos=1)
        time.sleep(1.0)
        assert not info.is_published(), "PUBACK before Kafka had the record"
        kafka.proxy.up()
        info.wait_for_publish(timeout=60)
        assert info.is_published()
        assert records_json(kafka.read("sensors", 1, timeout=30))[0]["payload"] == "waits for kafka"
    finally:
        broker.stop()


def test_bad_kafka_config_is_refused_at_start(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kafka:\n  parent_topics: [{name: \"a/b\"}]\n")
    from harness import broker_binary

    r = subprocess.run([str(broker_binary()), "--config", str(cfg)], capture_output=True, timeout=20)
    assert r.returncode == 64
    assert b"a/b" in r.stderr and b"Kafka topic name" in r.stderr



def make_tls(tmp):
    """A CA and a server certificate for 127.0.0.1, made with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=ringmq-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (tmp / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext")
    return tmp / "server.crt", tmp / "server.key", tmp / "ca.crt"


@pytest.mark.parametrize("security", ["ssl", "sasl_plaintext", "sasl_ssl"])
def test_kafka_credentials_from_files(tmp_path, security):
    """K1: the broker reaches a Kafka cluster that requires TLS and/or SASL
    SCRAM, with the CA and the password read from mounted files; a wrong
    password stores nothing and the broker says why."""
    tls = make_tls(tmp_path) if "ssl" in security else None
    user = ("ringmq", "kafka-pass-123") if "sasl" in security else None
    kafka = Kafka(tmp_path, tls=tls, user=user)
    try:
        sec = f"    protocol: {security}\n"
        if tls:
            sec += f"    ca_file: {tls[2]}\n"
        if user:
            (tmp_path / "password").write_text(user[1] + "\n")
            sec += f"    sasl_mechanism: SCRAM-SHA-512\n    username: {user[0]}\n    password_file: {tmp_path / 'password'}\n"
        broker = Broker(tmp_path, kafka_yaml(kafka, extra="  security:\n" + sec))
        try:
            wait_for("kafka topics", lambda: "sensors" in kafka.topics(), timeout=20)
            pub = Client(broker.port, V5)
            pub.publish("sensors/secure", b"over " + security.encode(), qos=1)
            assert records_json(kafka.read("sensors", 1))[0]["payload"] == "over " + security
        finally:
            broker.stop()
        if user:
            (tmp_path / "password").write_text("wrong\n")
            wrong = tmp_path / "wrong"
            wrong.mkdir()
            broker = Broker(wrong, kafka_yaml(kafka, extra="  security:\n" + sec))
            try:
                pub = Client(broker.port, V5)
                info = pub.c.publish("sensors/secure", b"never stored", qos=1)
                time.sleep(1.0)
                assert not info.is_published(), "acknowledged without Kafka"
                wait_for("the authentication error", lambda: broker.metric("ringmq_kafka_client_errors_total") >= 1)
                assert "Authentication" in broker.logs() or "authentication" in broker.logs()
            finally:
                broker.stop()
    finally:
        kafka.stop()


def test_downlink_in_a_cluster_reaches_each_subscriber_once(tmp_path, kafka):
    """K4 with several nodes: each node reads every mq2mqtt record with its
    own consumer group and delivers it to the sessions it holds, so a
    subscriber gets a record once whichever node its client came through; a
    shared group gets it once (one node is designated for the group); P2P
    once, from the target's owner."""
    secret = tmp_path / "cluster-secret"
    secret.write_text("kafka-cluster-test-secret")
    nodes = []
    try:
        for name in ("n1", "n2"):
            d = tmp_path / name
            d.mkdir()
            peers = ", ".join(f'"127.0.0.1:{n.cluster}"' for n in nodes)
            top = (
                "cluster:\n"
                '  listen: "127.0.0.1:0"\n'
                f"  peers: [{peers}]\n"
                f"  secret_file: {secret}\n"
                "  heartbeat_ms: 100\n"
                "  failure_timeout_ms: 1000\n"
            )
            nodes.append(Broker(d, kafka_yaml(kafka), node=name, top=top))
        wait_for("a ring of two", lambda: all(n.metric("ringmq_cluster_nodes") == 2 for n in nodes), timeout=20)
        names = ["n1", "n2"]
        # One subscriber's session on each node (they connect through the other).
        subs = [
            Client(nodes[1 - i].port, V5, client_id=owned_by(name, names, "GID_ctest@@@sub"))
            for i, name in enumerate(names)
        ]
        members = [Client(n.port, V3, client_id=f"GID_ctest@@@worker-{i}") for i, n in enumerate(nodes)]
        for s in subs:
            s.subscribe("cmd/#", 1)
        for m in members:
            m.subscribe("$share/workers/jobs/#", 1)
        target = Client(nodes[1].port, V5, client_id="GID_ctest@@@target")
        # Both nodes' consumers must be positioned before the records.
        for i, s in enumerate(subs):
            downlink_ready(kafka, None, s, topic=f"warm/{i}")
        for n in range(10):
            kafka.send("mq2mqtt", f"cmd {n}".encode(), headers=[("mqttTopic", f"cmd/{n}")])
            kafka.send("mq2mqtt", f"job {n}".encode(), headers=[("mqttTopic", f"jobs/{n}")])
        kafka.send("mq2mqtt", b"only you", headers=[("mqttTopic", "app/p2p/GID_ctest@@@target")])
        for s in subs:
            got = sorted(s.message().payload for _ in range(10))
            assert got == sorted(f"cmd {n}".encode() for n in range(10))
            s.nothing()
        jobs = []
        for m in members:
            while True:
                try:
                    jobs.append(m.messages.get(timeout=1.5).payload)
                except Exception:
                    break
        assert sorted(jobs) == sorted(f"job {n}".encode() for n in range(10)), jobs
        assert target.message().payload == b"only you"
        target.nothing()
    finally:
        for n in nodes:
            n.stop()


def api(broker, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{broker.admin}/api/v1/{path}", timeout=10) as r:
        return json.loads(r.read())


def test_parent_topic_state_and_a_groups_backlog_from_the_api(broker, kafka):
    pub = Client(broker.port, V5, client_id="GID_atest@@@state")
    for i in range(10):
        pub.publish(f"sensors/s{i}/v", b"x", qos=1)
    # A backend group commits the offsets of what it read, partition by
    # partition: its backlog is what Kafka holds beyond those offsets.
    records = kafka.read("sensors", 10)
    by_partition = {}
    for r in records:
        by_partition.setdefault(r.partition(), []).append(r.offset())
    committed = {p: min(offs) + 1 for p, offs in by_partition.items()}
    c = Consumer(kafka.client(**{"group.id": "backend", "enable.auto.commit": False}))
    c.commit(offsets=[TopicPartition("sensors", p, o) for p, o in committed.items()], asynchronous=False)
    c.close()
    state = api(broker, "topics/sensors?group=backend")
    assert state["topic"] == "sensors" and state["group"] == "backend"
    assert [b["port"] for b in state["brokers"]] == [kafka.proxy.port]
    assert len(state["partitions"]) == 3
    assert state["messages"] == 10
    for p in state["partitions"]:
        assert p["messages"] == p["high"] - p["low"]
        assert p["committed"] == committed.get(p["partition"]), p
    assert state["backlog"] == 10 - len(committed)
    # Without a group: counts and offsets only.
    plain = api(broker, "topics/sensors")
    assert plain["backlog"] is None and plain["messages"] == 10
    with pytest.raises(urllib.error.HTTPError) as missing:
        api(broker, "topics/nothing-here")
    assert missing.value.code == 404
    # The record's msgId is the Message ID the message trace knows.
    msg_id = json.loads(records[0].value())["msgId"]
    trace = api(broker, f"trace/message?messageId={msg_id}")
    assert [e["action"] for e in trace["events"]] == ["published"]
    assert trace["events"][0]["clientId"] == "GID_atest@@@state"
    # The same at a terminal.
    ctl = broker_binary().parent / "ringmqctl"
    out = subprocess.run(
        [str(ctl), "--server", f"http://127.0.0.1:{broker.admin}", "topic", "sensors", "--group", "backend"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert f"backlog:       {10 - len(committed)}" in out, out
    assert len([line for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]) == 3, out


# The node is killed 2.5 s after the last record (longer than the
# consumer's commit interval, 1 s: an offset it should not have stored
# would be committed by then) or 0.3 s after it (before that interval: the
# refused records' partitions must already say where to resume; before
# they were committed at once, 69 of 70 records were lost so).
@pytest.mark.parametrize("wait", [2.5, 0.3])
def test_downlink_records_the_store_refused_are_read_again_after_a_crash(tmp_path, kafka, wait):
    """Downlink records for an offline persistent session while the node's
    disk is full: the store refuses them, so their offsets are not
    committed; the node is killed, the disk gets room, and after the restart
    the records are read again from Kafka and reach the session."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk downlink test did not run")
    store = (
        f"persistence:\n  dir: {mnt / 'data'}\n"
        "limits:\n  offline_queue_len: 100000\n  offline_batch: 100000\n"
    )
    broker = None
    try:
        broker = Broker(tmp_path, kafka_yaml(kafka), top=store)
        wait_for("kafka topics", lambda: "mq2mqtt" in set(kafka.topics()), timeout=20)
        probe = Client(broker.port, V3)
        downlink_ready(kafka, broker, probe)
        probe.close()
        cid = "GID_dtest@@@offline"
        dev = Client(broker.port, V3, client_id=cid, clean=False)
        dev.subscribe("cmd/offline", 1)
        dev.close()
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(os.urandom(64 * 1024))
                    f.flush()
            except OSError:
                pass
        # Records until the store refuses one (fjall's journal has some
        # room of its own), then a few more.
        sent = set()
        refused = lambda: broker.metric("ringmq_kafka_downlink_records_total", result="store_unavailable")
        deadline = time.monotonic() + 30
        extra = None
        while extra is None or extra > 0:
            body = f"r{len(sent)} ".encode() + os.urandom(4096)
            kafka.send("mq2mqtt", body, headers=[("mqttTopic", "cmd/offline"), ("cleanSession", "false")])
            sent.add(body)
            if extra is not None:
                extra -= 1
            elif len(sent) % 20 == 0 and refused() >= 1:
                extra = 10
            assert time.monotonic() < deadline, f"the store refused nothing after {len(sent)} records"
        time.sleep(wait)
        broker.stop()
        first = broker.logs()
        (mnt / "filler").unlink()
        broker = Broker(tmp_path, kafka_yaml(kafka), top=store)
        # The killed node's consumer must leave the group before this one
        # gets the partitions.
        probe = Client(broker.port, V3)
        downlink_ready(kafka, broker, probe)
        probe.close()
        dev = Client(broker.port, V3, client_id=cid, clean=False)
        got = set()
        deadline = time.monotonic() + 60
        while not sent <= got and time.monotonic() < deadline:
            try:
                got.add(dev.messages.get(timeout=10).payload)
            except queue.Empty:
                break
        lost = sorted(b.split(b" ")[0].decode() for b in sent - got)
        assert not lost, f"{len(lost)} of {len(sent)} lost: {lost[:20]}\n{first[-3000:]}\n{broker.logs()[-3000:]}"
        dev.close()
    finally:
        if broker is not None:
            broker.stop()
        subprocess.run(["umount", "-l", str(mnt)])
