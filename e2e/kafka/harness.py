"""Processes and helpers of the Kafka end-to-end tests: a real Kafka-protocol
broker (nisshi, SQLite storage so that it can be killed and restarted), a TCP
proxy in front of it that a test can cut, the real ringmq-broker binary, and
an independent Kafka client (confluent-kafka)."""

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from procs import broker_binary, free_port
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

WAIT = 10.0


def kafka_binary() -> str:
    found = os.environ.get("NISSHI") or shutil.which("nisshi")
    home = Path.home() / ".cargo" / "bin" / "nisshi"
    if not found and home.exists():
        found = str(home)
    if not found:
        pytest.fail(
            "nisshi is not installed: cargo +nightly install nisshi --version 0.8.1 "
            "--no-default-features --features dynostore,libsql --locked (.ci/run does this)"
        )
    return found


def wait_for(what, predicate, timeout=WAIT, every=0.05):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class Proxy:
    """A TCP proxy the test can take down (every connection reset, new ones
    refused) and bring back on the same port: a Kafka outage as the broker
    sees it, without losing what the Kafka broker stored."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = free_port()
        self.lock = threading.Lock()
        self.conns = []
        self.listener = None
        self.up()

    def up(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self):
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.conns = self.conns, []
        if listener:
            listener.close()
        for c in conns:
            # shutdown() wakes the pump threads blocked in recv(); close()
            # alone would leave the connection open under them.
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:
                    client.close()
                    server.close()
                    return
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Kafka:
    """nisshi with SQLite storage, reached through a Proxy: every Kafka client
    (the broker and the test's own) uses the proxy's address, which is what
    nisshi advertises in its metadata. `tls` = (cert, key, ca) serves TLS
    only; `user` = (name, password) requires SASL SCRAM-SHA-512."""

    def __init__(self, tmp: Path, tls=None, user=None):
        self.tmp = tmp
        self.port = free_port()
        self.proxy = Proxy(self.port)
        self.bootstrap = f"127.0.0.1:{self.proxy.port}"
        # nisshi resolves the SQLite path against its working directory.
        self.storage = "sqlite://./kafka.db"
        self.tls, self.user = tls, user
        self.log = open(tmp / "kafka.log", "a")
        self.proc = None
        if user:
            # nisshi's `user create` speaks plaintext without authentication:
            # the user is created on the same storage before SASL is required.
            self.start(secure=False)
            subprocess.run(
                [kafka_binary(), "user", "create", "--broker", f"tcp://127.0.0.1:{self.port}", user[0], user[1]],
                check=True,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                timeout=30,
            )
            self.kill()
        self.start()

    def start(self, secure=True):
        """Starts (or restarts) the Kafka broker on its port and storage."""
        args = [
            kafka_binary(),
            "broker",
            "--storage-engine", self.storage,
            "--listener-url", f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{self.proxy.port}",
        ]
        if secure and self.tls:
            args += ["--cert", str(self.tls[0]), "--key", str(self.tls[1])]
        if secure and self.user:
            args += ["--authentication"]
        env = {k: v for k, v in os.environ.items() if k not in ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE")}
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp)
        wait_for("the Kafka broker to listen", self._listening, timeout=30)

    def kill(self):
        """SIGKILL: what is stored stays in its SQLite file."""
        self.proc.kill()
        self.proc.wait()

    def _listening(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"nisshi exited with {self.proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self):
        self.proxy.down()
        if self.proc.poll() is None:
            self.kill()
        self.log.close()

    def client(self, **extra):
        """Settings of the test's own Kafka clients."""
        conf = {"bootstrap.servers": self.bootstrap}
        if self.tls:
            conf.update({"security.protocol": "ssl", "ssl.ca.location": str(self.tls[2])})
        if self.user:
            conf.update(
                {
                    "security.protocol": "sasl_ssl" if self.tls else "sasl_plaintext",
                    "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": self.user[0],
                    "sasl.password": self.user[1],
                }
            )
        conf.update(extra)
        return conf

    def producer(self) -> Producer:
        return Producer(self.client(**{"linger.ms": 0}))

    def send(self, topic, value, headers=None, key=None):
        """Writes one record as a backend application would; waits for it and
        returns its (partition, offset)."""
        p = self.producer()
        errors, placed = [], []

        def done(e, m):
            if e:
                errors.append(e)
            else:
                placed.append((m.partition(), m.offset()))

        p.produce(topic, value=value, key=key, headers=headers or [], on_delivery=done)
        assert p.flush(WAIT) == 0, "record not delivered"
        assert not errors, errors
        return placed[0]

    def _consumer(self, topic):
        """A consumer assigned to every partition of `topic` from the start
        (no group: nothing to wait for, nothing committed)."""
        c = Consumer(self.client(**{"group.id": "ringmq-e2e-check", "enable.auto.commit": False}))
        partitions = wait_for(f"{topic} metadata", lambda: self.topics().get(topic), timeout=WAIT)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions.partitions])
        return c

    def read(self, topic, count, timeout=WAIT):
        """Exactly `count` records of a topic, read from the beginning as a
        backend consumer would (fails on fewer, and on more: a duplicate)."""
        out = self.read_at_least(topic, count, timeout)
        assert len(out) == count, f"{topic}: {len(out)} records, expected exactly {count}"
        return out

    def read_at_least(self, topic, count, timeout=WAIT, quiet=1.0):
        """The records of a topic: at least `count` of them, and whatever
        else arrives until none came for `quiet` seconds."""
        c = self._consumer(topic)
        out = []
        deadline, last = time.time() + timeout, time.time()
        try:
            while time.time() < deadline and (len(out) < count or time.time() - last < quiet):
                m = c.poll(0.2)
                if m is not None and not m.error():
                    out.append(m)
                    last = time.time()
        finally:
            c.close()
        assert len(out) >= count, f"{topic}: {len(out)} records, expected {count}"
        return out

    def read_all(self, topic, quiet=1.0):
        """Every record of a topic, read until none came for `quiet` seconds."""
        return self.read_at_least(topic, 0, quiet=quiet)

    def committed(self, group, topic, partition):
        """The offset `group` committed on one partition (without joining the
        group); negative when it committed none."""
        c = Consumer(self.client(**{"group.id": group, "enable.auto.commit": False}))
        try:
            return c.committed([TopicPartition(topic, partition)], timeout=WAIT)[0].offset
        finally:
            c.close()

    def topics(self):
        from confluent_kafka.admin import AdminClient

        md = AdminClient(self.client()).list_topics(timeout=WAIT)
        return md.topics


class Broker:
    """The real ringmq-broker binary on loopback ports chosen by the OS."""

    def __init__(self, tmp: Path, kafka_yaml: str, extra: str = "", node="n1", top=""):
        binary = broker_binary()
        if not binary.exists():
            pytest.fail(f"broker binary not built: {binary} (run cargo build first)")
        cfg = tmp / "broker.yaml"
        cfg.write_text(
            "listeners:\n"
            '  tcp: "127.0.0.1:0"\n'
            "  ws: null\n"
            '  admin: "127.0.0.1:0"\n'
            "workers: 2\n"
            f"node_id: {node}\n" + top + "kafka:\n" + kafka_yaml + extra
        )
        self.log_path = tmp / "broker.log"
        self.log = open(self.log_path, "w")
        # In its own directory: the default store (`data`) is per broker.
        self.proc = subprocess.Popen([str(binary), "--config", str(cfg)], stderr=self.log, cwd=tmp)
        try:
            self.port = wait_for("MQTT listener", lambda: self._port("mqtt-tcp"), timeout=20)
            self.admin = wait_for("admin listener", lambda: self._port("admin"), timeout=20)
            self.cluster = self._port("cluster")
            wait_for("readiness", self._ready, timeout=20)
        except BaseException:
            self.stop()
            raise

    def _ready(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def _port(self, name):
        text = self.log_path.read_text(errors="replace")
        m = re.search(rf"listening listener=\"?{name}\"? addr=[^ ]*:(\d+)\n", text)
        return int(m.group(1)) if m else None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name, **labels):
        """The value of one metric sample (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if metric == name and got == want:
                return float(value)
        return 0.0

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def kafka_yaml(kafka: Kafka, parents="[{name: sensors}, {name: orders, kind: ordered}]", extra=""):
    return (
        f'  bootstrap_servers: "{kafka.bootstrap}"\n'
        f"  parent_topics: {parents}\n"
        "  properties:\n"
        # Find Kafka again quickly after an outage.
        '    reconnect.backoff.max.ms: "500"\n'
        '    topic.metadata.refresh.interval.ms: "1000"\n' + extra
    )


def ring_hash(b: bytes) -> int:
    """The broker's ring hash (broker/src/ring.rs): FNV-1a 64, splitmix64 finaliser."""
    m = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for c in b:
        h ^= c
        h = (h * 0x100000001B3) & m
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & m
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & m
    return h ^ (h >> 31)


def ring_owner(nodes, key: str) -> str:
    """The node the broker's ring gives `key` to (128 points per node)."""
    points = sorted((ring_hash(f"{n}#{i}".encode()), n) for n in nodes for i in range(128))
    h = ring_hash(key.encode())
    for p, n in points:
        if p >= h:
            return n
    return points[0][1]


def owned_by(node, nodes, prefix):
    """A Client ID whose session lives on `node`."""
    i = 0
    while ring_owner(nodes, f"{prefix}-{i}") != node:
        i += 1
    return f"{prefix}-{i}"


def records_json(records):
    return [json.loads(m.value()) for m in records]


__all__ = [
    "Broker",
    "KafkaException",
    "Kafka",
    "Proxy",
    "TopicPartition",
    "WAIT",
    "free_port",
    "kafka_yaml",
    "records_json",
    "wait_for",
]
