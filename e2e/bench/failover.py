"""Failover time of replicated sessions (issue 19): three nodes with the
default timing (heartbeat 500 ms, failure timeout 3 s) and replication
factor 2. Each round a persistent QoS 1 subscriber is connected, a
publisher sends a message every 20 ms through another node, and the node
that owns the subscriber's session is SIGKILLed. The time measured runs
from the kill to the first message the subscriber receives after it
(through the session's new owner: the client reconnects through a
surviving node at once). The node is then started again on its data
directory and the next round begins once every node is ready.

    python3 e2e/bench/failover.py --bin target/release/ringmq-broker [--kills 20]

Prints one line per round, then the median and the maximum.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from procs import free_port  # noqa: E402


class Node:
    def __init__(self, binary, name, root, cluster_ports):
        self.binary, self.name = binary, name
        self.dir = Path(root) / name
        self.dir.mkdir()
        self.tcp, self.admin = free_port(), free_port()
        self.cluster = cluster_ports[name]
        peers = ", ".join(f'"127.0.0.1:{p}"' for n, p in cluster_ports.items() if n != name)
        secret = Path(root) / "secret"
        (self.dir / "broker.yaml").write_text(
            f'node_id: {name}\nlisteners:\n  tcp: "127.0.0.1:{self.tcp}"\n  ws: null\n'
            f'  admin: "127.0.0.1:{self.admin}"\nworkers: 2\n'
            f'cluster:\n  listen: "127.0.0.1:{self.cluster}"\n  peers: [{peers}]\n'
            f"  secret_file: {secret}\n"
        )
        self.proc = None

    def start(self):
        log = open(self.dir / "broker.log", "a")
        self.proc = subprocess.Popen(
            [self.binary, "--config", "broker.yaml"], cwd=self.dir, stderr=log,
            env={**os.environ, "RUST_LOG": "warn"},
        )

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=2) as r:
            return r.read().decode()

    def ready(self):
        try:
            return self.get("/readyz") is not None
        except OSError:
            return False

    def ring(self):
        try:
            for line in self.get("/metrics").splitlines():
                if line.startswith("ringmq_cluster_nodes "):
                    return int(float(line.split()[1]))
        except OSError:
            pass
        return 0


def wait(what, check, timeout=60):
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


class Subscriber:
    """A persistent QoS 1 session that reconnects through the nodes it is
    given, at once, whenever its connection drops."""

    def __init__(self, client_id):
        self.client_id = client_id
        self.last = 0.0
        self.present = []
        self.c = None

    def connect(self, port):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        clean_session=False)
        got = threading.Event()

        def on_connect(c, u, flags, rc, p):
            if not rc.is_failure:
                self.present.append(flags.session_present)
                got.set()

        def on_message(c, u, m):
            self.last = time.time()

        c.on_connect, c.on_message = on_connect, on_message
        try:
            c.connect("127.0.0.1", port, keepalive=30)
        except OSError:
            return False
        c.loop_start()
        if not got.wait(2):
            c.loop_stop()
            return False
        self.c = c
        return True

    def drop(self):
        if self.c:
            self.c.loop_stop()
            try:
                self.c.disconnect()
            except OSError:
                pass
            self.c = None

    def connected(self):
        return self.c is not None and self.c.is_connected()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--kills", type=int, default=20)
    args = ap.parse_args()
    root = tempfile.mkdtemp()
    (Path(root) / "secret").write_text("failover-bench-secret")
    names = ["n0", "n1", "n2"]
    cluster_ports = {n: free_port() for n in names}
    nodes = [Node(args.bin, n, root, cluster_ports) for n in names]
    for n in nodes:
        n.start()
    wait("the ring", lambda: all(n.ready() and n.ring() == 3 for n in nodes))
    times, lost = [], 0
    try:
        for r in range(args.kills):
            sub = Subscriber(f"GID_bench@@@failover-{r}")
            wait("a first connection", lambda: sub.connect(nodes[r % 3].tcp))
            sub.c.subscribe("fo/#", 1)
            time.sleep(0.3)
            info = json.loads(nodes[0].get(f"/api/v1/clients/{sub.client_id}"))
            victim = next(n for n in nodes if n.name == info["node"])
            others = [n for n in nodes if n is not victim]
            stop = threading.Event()
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fo-pub-{r}")
            # A publish that reaches the lost owner's sessions before their
            # new owner serves them is refused (the connection closes, 3.1.1)
            # and sent again: paho's default first retry after 1 s would be
            # measured as failover time.
            pub.reconnect_delay_set(min_delay=0.05, max_delay=1)
            pub.connect("127.0.0.1", others[0].tcp, keepalive=30)
            pub.loop_start()

            def publish():
                while not stop.is_set():
                    pub.publish("fo/x", b"x", qos=1)
                    time.sleep(0.02)

            t = threading.Thread(target=publish)
            t.start()
            wait("messages before the kill", lambda: time.time() - sub.last < 0.1, 10)
            killed = time.time()
            victim.kill()
            # Reconnect through the survivors until a message arrives.
            i = 0
            while sub.last < killed:
                if not sub.connected():
                    sub.drop()
                    sub.connect(others[i % 2].tcp)
                    i += 1
                time.sleep(0.005)
                if time.time() - killed > 60:
                    sys.exit(f"round {r}: no message within 60 s of the kill")
            took = sub.last - killed
            present = sub.present[-1]
            lost += 0 if present else 1
            times.append(took)
            print(f"round {r + 1}: killed {victim.name}, first message after {took * 1000:.0f} ms"
                  f" (session present: {present})", flush=True)
            stop.set()
            t.join()
            pub.loop_stop()
            sub.drop()
            victim.start()
            wait("the node back", lambda: all(n.ready() and n.ring() == 3 for n in nodes))
    finally:
        for n in nodes:
            if n.proc and n.proc.poll() is None:
                n.kill()
    print(f"failover over {len(times)} kills: p50 {statistics.median(times) * 1000:.0f} ms,"
          f" max {max(times) * 1000:.0f} ms, sessions not present {lost}")


if __name__ == "__main__":
    main()
