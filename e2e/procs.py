"""Broker processes for the Python suites: where the binary is, free ports,
and a broker started on loopback until the test ends."""

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def broker_binary() -> Path:
    if os.environ.get("RINGMQ_BROKER"):
        return Path(os.environ["RINGMQ_BROKER"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "ringmq-broker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(admin_url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Waits until the broker at `admin_url` answers /readyz with 200; False
    if it exits or `timeout` seconds pass first."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{admin_url}/readyz", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.05)


def start_broker(extra="", admin=None):
    """Starts a broker process on free loopback ports; yields its MQTT port."""
    binary = broker_binary()
    if not binary.exists():
        pytest.fail(f"broker binary not built: {binary} (run cargo build first)")
    tcp, admin = free_port(), admin or free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "broker.yaml"
        cfg.write_text(
            "listeners:\n"
            f'  tcp: "127.0.0.1:{tcp}"\n'
            "  ws: null\n"
            f'  admin: "127.0.0.1:{admin}"\n'
            "workers: 2\n" + extra
        )
        log = open(Path(d) / "broker.log", "w")
        # Its working directory is the test's: the default store (`data`) too.
        proc = subprocess.Popen([str(binary), "--config", str(cfg)], stderr=log, cwd=d)
        if not wait_ready(f"http://127.0.0.1:{admin}", proc, 20):
            proc.kill()
            pytest.fail("broker did not become ready")
        # Ended on `close()` of the generator too (GeneratorExit at the
        # yield): a broker must never outlive its test.
        try:
            yield tcp
        finally:
            proc.kill()
            proc.wait()
            log.close()
