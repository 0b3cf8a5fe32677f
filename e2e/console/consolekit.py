"""What the console's browser tests are made of: real broker processes (one
node, or three in a cluster), pages of the console in headless Chromium with
the checks every test gets (no console error, no request leaving the node),
axe-core's verdict on a page, and the README's screenshots."""

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from procs import ROOT, broker_binary, free_port, wait_ready

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
AXE = ROOT / "console" / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = ROOT / "docs" / "console"
TOKEN = "console-test-admin-token"
READ_TOKEN = "console-test-read-token"
# How long the page may take to show what a test waits for: the overview
# polls every 2 s, the nodes exchange their counts every second.
WAIT_MS = 15_000


@dataclass
class Node:
    """A broker process with its ports, working directory and log."""

    name: str
    tcp: int
    ws: int
    admin: int
    cluster: int
    dir: Path
    proc: subprocess.Popen | None = None
    token: str | None = TOKEN

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def console(self, route: str = "overview") -> str:
        return f"{self.url}/console/#/{route}"

    def api(self, path: str, method: str = "GET", body=None, token: str | None = "default"):
        """(status, JSON answer) of an operations API call."""
        token = self.token if token == "default" else token
        req = urllib.request.Request(
            f"{self.url}/api/v1{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
        )
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, text

    def log(self) -> str:
        return (self.dir / "broker.log").read_text(errors="replace")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _write_config(
    node: Node, extra: str, peers: list[Node], secret: Path | None, failure_timeout_ms: int
) -> Path:
    cfg = node.dir / "broker.yaml"
    text = (
        f"node_id: {node.name}\n"
        "listeners:\n"
        f'  tcp: "127.0.0.1:{node.tcp}"\n'
        f'  ws: "127.0.0.1:{node.ws}"\n'
        f'  admin: "127.0.0.1:{node.admin}"\n'
        "workers: 2\n"
    )
    if node.token:
        (node.dir / "admin-token").write_text(node.token)
        (node.dir / "read-token").write_text(READ_TOKEN)
        text += (
            "auth:\n"
            f"  admin_token_file: {node.dir / 'admin-token'}\n"
            f"  admin_read_token_file: {node.dir / 'read-token'}\n"
        )
    if secret is not None:
        known = ", ".join(f'"127.0.0.1:{p.cluster}"' for p in peers)
        text += (
            "cluster:\n"
            f'  listen: "127.0.0.1:{node.cluster}"\n'
            f"  peers: [{known}]\n"
            f"  secret_file: {secret}\n"
            "  heartbeat_ms: 100\n"
            f"  failure_timeout_ms: {failure_timeout_ms}\n"
        )
    cfg.write_text(text + extra)
    return cfg


def _wait_ready(node: Node):
    if not wait_ready(node.url, node.proc, 30):
        node.kill()
        pytest.fail(f"broker {node.name} did not become ready:\n{node.log()[-3000:]}")


def start(
    base: Path, name: str, extra: str = "", peers=(), secret=None, token=TOKEN, failure_timeout_ms=1000
) -> Node:
    """A broker process in its own working directory (its store is ./data);
    with `secret`, a member of the cluster of `peers`."""
    binary = broker_binary()
    if not binary.exists():
        pytest.fail(f"broker binary not built: {binary} (run cargo build first)")
    d = base / name
    d.mkdir()
    node = Node(name, free_port(), free_port(), free_port(), free_port(), d, token=token)
    cfg = _write_config(node, extra, list(peers), secret, failure_timeout_ms)
    log = open(d / "broker.log", "w")
    node.proc = subprocess.Popen([str(binary), "--config", str(cfg)], stderr=log, stdout=log, cwd=d)
    _wait_ready(node)
    return node


# The single node: a tiny declared capacity (so that three real clients fire
# the connections alarm), alarms held for one second instead of thirty, and
# Group ID samples every second instead of every minute.
SINGLE = """
instance:
  name: console-test
  endpoints: { tcp: "mqtt.example.com:1883", ws: "ws://mqtt.example.com:8083/mqtt" }
capacity: { connections: 3, subscriptions: 20, topics: 10, tps: 1000, mode: alarm_only }
alarms: { hold_secs: 1 }
trace: { group_sample_secs: 1 }
"""


@dataclass
class Hygiene:
    """What the page did that it should not: console errors, uncaught
    exceptions, requests to anywhere but the node."""

    origins: list[str]
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    allowed: list[re.Pattern] = field(default_factory=list)

    def allow(self, pattern: str):
        """A console error the test causes on purpose (a refused token, a node it stopped)."""
        self.allowed.append(re.compile(pattern))

    def allow_status(self, *codes: int):
        # Chromium logs every failed fetch; a test that expects a refusal says which.
        for c in codes:
            self.allow(rf"Failed to load resource: the server responded with a status of {c}")

    def check(self):
        errors = [e for e in self.errors if not any(a.search(e) for a in self.allowed)]
        assert not errors, f"console errors: {errors}"
        assert not self.foreign, f"requests that left the node: {self.foreign}"


def _watch(page, hygiene: Hygiene):
    page.on("console", lambda m: m.type == "error" and hygiene.errors.append(m.text))
    page.on("pageerror", lambda e: hygiene.errors.append(f"uncaught: {e}"))

    def request(r):
        if not any(r.url.startswith(o) for o in hygiene.origins):
            hygiene.foreign.append(r.url)

    page.on("request", request)
    page.on("websocket", lambda ws: request(ws))


class Browse:
    """Opens pages of the console against a node (or nodes), signed in
    unless asked not to, and checks their hygiene when the test ends."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts = []
        self.hygiene: list[Hygiene] = []

    def page(self, node: Node, route="overview", signed_in=True, viewport=(1280, 800), scheme="light"):
        # The page may talk to its node: the admin port and the WebSocket listener.
        origins = [f"{node.url}/", f"ws://127.0.0.1:{node.ws}/"]
        ctx = self.browser.new_context(
            viewport={"width": viewport[0], "height": viewport[1]}, color_scheme=scheme
        )
        self.contexts.append(ctx)
        if signed_in and node.token:
            # The same as signing in through the form (test_sign_in does that).
            ctx.add_init_script(
                f"if (!sessionStorage.getItem('ringmq-console-token-set')) {{"
                f" sessionStorage.setItem('ringmq-console-token', {json.dumps(node.token)});"
                f" sessionStorage.setItem('ringmq-console-token-set', '1'); }}"
            )
        page = ctx.new_page()
        page.set_default_timeout(WAIT_MS)
        h = Hygiene(origins)
        self.hygiene.append(h)
        _watch(page, h)
        page.goto(node.console(route))
        page.hygiene = h
        return page

    def close(self):
        for c in self.contexts:
            c.close()
        for h in self.hygiene:
            h.check()


def axe(page) -> list[dict]:
    """Serious and critical findings of axe-core on the page as it is now."""
    if not AXE.exists():
        pytest.fail(f"{AXE} is missing: run scripts/console (npm ci) first")
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        # Evaluated through the DevTools protocol: the page's CSP (script-src
        # 'self') would refuse an injected <script>, and the console's own
        # policy must stay as it is served.
        page.evaluate(AXE.read_text() + "\n;0")
    found = page.evaluate(
        """async () => {
            const r = await axe.run(document, { resultTypes: ['violations'] });
            return r.violations.map(v => ({ id: v.id, impact: v.impact, help: v.help,
                nodes: v.nodes.slice(0, 5).map(n => n.target.join(' ')) }));
        }"""
    )
    return [v for v in found if v["impact"] in ("serious", "critical")]


def screenshot(page, name: str):
    """docs/console/NAME.png, only with CONSOLE_SCREENSHOTS=1 (CI leaves the tree clean)."""
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
