"""Fixtures of the console's browser tests (consolekit.py has the parts):
a node, a node without an admin token, a three-node cluster, Chromium, and
`browse`, which opens console pages and checks their hygiene at the end."""

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from consolekit import CHROMIUM, SINGLE, Browse, Node, start


@pytest.fixture
def workdir():
    d = Path(tempfile.mkdtemp(prefix="ringmq-console-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def node(workdir):
    n = start(workdir, "n1", SINGLE)
    yield n
    n.kill()


@pytest.fixture
def open_node(workdir):
    """A node without an admin token: the API (and so the console) answers loopback."""
    n = start(workdir, "n1", SINGLE, token=None)
    yield n
    n.kill()


@pytest.fixture
def cluster(workdir):
    """Three nodes on loopback, started one after the other, each knowing the earlier ones."""
    secret = workdir / "cluster-secret"
    secret.write_text("console-test-cluster-secret")
    nodes: list[Node] = []
    try:
        for i in range(1, 4):
            nodes.append(start(workdir, f"n{i}", SINGLE, peers=list(nodes), secret=secret))
        deadline = time.time() + 30
        while True:
            names = [[n["name"] for n in node.api("/instance")[1]["nodes"]] for node in nodes]
            if all(len(ns) == 3 for ns in names):
                break
            if time.time() > deadline:
                pytest.fail(f"the ring did not form: {names}")
            time.sleep(0.1)
        yield nodes
    finally:
        for n in nodes:
            n.kill()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's chromium (scripts/deps does) or set CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


@pytest.fixture
def browse(browser):
    b = Browse(browser)
    yield b
    b.close()
