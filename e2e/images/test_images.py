"""The broker and operator images, built here by `scripts/images` (buildah,
local Debian bases where no registry answers) from the release binaries,
and run the way the operator's StatefulSet runs them: the pod's user, no
capabilities, the configuration the operator renders mounted where the pod
mounts it, the data directory a volume owned by the pod's fsGroup, the
probes on the ports the pod spec names, a real MQTT client through it, and
SIGTERM answered by a clean exit within the grace period."""

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TAG = "0.1.0"
BROKER = f"ghcr.io/ringmq/ringmq-broker:{TAG}"
OPERATOR = f"ghcr.io/ringmq/ringmq-operator:{TAG}"
ENV = {**os.environ, "BUILDAH_ISOLATION": "chroot"}

pytestmark = pytest.mark.skipif(
    shutil.which("buildah") is None or shutil.which("debootstrap") is None,
    reason="buildah and debootstrap are not installed (scripts/deps installs them on Debian)",
)


def golden():
    """The objects the operator renders for manifests/examples/small.yaml."""
    docs = list(yaml.safe_load_all((ROOT / "operator/tests/golden/small.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs if d}
    return by_kind["ConfigMap"], by_kind["StatefulSet"]


@pytest.fixture(scope="module")
def images():
    subprocess.run(
        ["cargo", f"+{os.environ.get('RINGMQ_TOOLCHAIN', 'nightly')}", "build", "--release",
         "--locked", "-p", "ringmq-broker", "-p", "ringmqctl", "-p", "ringmq-operator"],
        cwd=ROOT, check=True,
    )
    out = subprocess.run([str(ROOT / "scripts/images")], cwd=ROOT, env=ENV, check=True,
                         capture_output=True, text=True)
    print(out.stderr[-2000:])
    print(out.stdout)
    return out.stdout


def image_config(image):
    """The image's ENTRYPOINT and USER."""
    out = subprocess.run(["buildah", "inspect", "--type", "image", image],
                         check=True, capture_output=True, text=True, env=ENV).stdout
    config = json.loads(out)["OCIv1"]["config"]
    return config["Entrypoint"], config.get("User", "")


def port_free(port):
    with socket.socket(socket.AF_INET6) as s:
        # As the broker binds: connections of an earlier run in TIME_WAIT
        # do not make the port taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("::", port))
            return True
        except OSError:
            return False


def http_status(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except OSError:
        return None


class Pod:
    """The broker container of the StatefulSet's pod template, run by buildah
    on the host network (the pod's ports are the host's here)."""

    def __init__(self, tmp: Path):
        cm, sts = golden()
        self.spec = sts["spec"]["template"]["spec"]
        self.container = self.spec["containers"][0]
        assert self.container["image"].startswith("ghcr.io/ringmq/ringmq-broker:")
        self.tmp = tmp
        self.volumes = {}
        # The ConfigMap and the Secrets, as files where the pod mounts them.
        for m in self.container["volumeMounts"]:
            host = tmp / m["name"]
            host.mkdir(exist_ok=True)
            self.volumes[m["name"]] = (host, m["mountPath"], m.get("readOnly", False))
        (tmp / "config" / "broker.yaml").write_text(cm["data"]["broker.yaml"])
        (tmp / "cluster" / "secret").write_text(base64.b64encode(os.urandom(32)).decode())
        (tmp / "admin" / "token").write_text(base64.b64encode(os.urandom(32)).decode())
        # The data volume as the kubelet leaves it for an fsGroup: the group
        # owns it, setgid, group-writable; the owner is not the pod's user.
        fs_group = self.spec["securityContext"]["fsGroup"]
        data = self.volumes["data"][0]
        os.chown(data, 0, fs_group)
        os.chmod(data, 0o2775)
        self.user = self.spec["securityContext"]["runAsUser"]
        self.grace = self.spec["terminationGracePeriodSeconds"]
        self.proc = None
        self.ctr = None

    def port(self, probe):
        p = self.container[probe]["httpGet"]
        port = p["port"]
        if isinstance(port, str):
            port = next(c["containerPort"] for c in self.container["ports"] if c["name"] == port)
        return port, p["path"]

    def start(self):
        for c in self.container["ports"]:
            assert port_free(c["containerPort"]), f"port {c['containerPort']} is taken on this host"
        entrypoint, user = image_config(BROKER)
        assert user.split(":")[0] == str(self.user), f"image USER {user} is not the pod's {self.user}"
        self.ctr = subprocess.run(["buildah", "from", BROKER], check=True, capture_output=True,
                                  text=True, env=ENV).stdout.strip()
        mounts = []
        for host, path, ro in self.volumes.values():
            mounts += ["-v", f"{host}:{path}{':ro' if ro else ''}"]
        self.log = open(self.tmp / "broker.log", "a")
        self.proc = subprocess.Popen(
            ["buildah", "run", "--user", f"{self.user}:{self.user}", "--cap-drop", "ALL",
             "--hostname", "small-0", "--network", "host", *mounts, self.ctr, "--",
             *entrypoint, *self.container["args"]],
            stdout=self.log, stderr=subprocess.STDOUT, env=ENV,
        )
        ready_port, ready_path = self.port("readinessProbe")
        deadline = time.time() + 30
        while http_status(ready_port, ready_path) != 200:
            assert self.proc.poll() is None, f"broker exited:\n{self.logs()}"
            assert time.time() < deadline, f"not ready:\n{self.logs()}"
            time.sleep(0.1)
        live_port, live_path = self.port("livenessProbe")
        assert http_status(live_port, live_path) == 200

    def broker_pid(self):
        out = subprocess.run(["pgrep", "-f", f"^{image_config(BROKER)[0][0]} "],
                             capture_output=True, text=True).stdout.split()
        assert len(out) == 1, f"broker processes: {out}"
        return int(out[0])

    def stop(self):
        """SIGTERM, as the kubelet sends it; returns (exit code, seconds)."""
        pid = self.broker_pid()
        started = time.time()
        os.kill(pid, signal.SIGTERM)
        code = self.proc.wait(timeout=self.grace)
        took = time.time() - started
        subprocess.run(["buildah", "rm", self.ctr], capture_output=True, env=ENV)
        return code, took

    def logs(self):
        return (self.tmp / "broker.log").read_text()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            subprocess.run(["pkill", "-KILL", "-f", f"^{image_config(BROKER)[0][0]} "])
            self.proc.wait(timeout=10)
        if self.ctr:
            subprocess.run(["buildah", "rm", self.ctr], capture_output=True, env=ENV)


def mqtt_client(client_id, clean, got=None):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    if got is not None:
        # Before CONNECT: a resumed session's messages arrive right after it.
        c.on_message = lambda c, u, m: got.append(m.payload)
    c.connect("127.0.0.1", 1883)
    c.loop_start()
    return c


def test_images_are_small_and_hold_no_build_tools(images):
    sizes = dict(line.split()[:2] for line in images.splitlines() if line.startswith("ghcr.io/"))
    print("image sizes:", sizes)
    assert set(sizes) == {BROKER, OPERATOR}
    ctr = subprocess.run(["buildah", "from", BROKER], check=True, capture_output=True,
                         text=True, env=ENV).stdout.strip()
    try:
        mnt = Path(subprocess.run(["buildah", "mount", ctr], check=True, capture_output=True,
                                  text=True, env=ENV).stdout.strip())
        files = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.is_file())
        print("broker image files:", files)
        for absent in ["bin/sh", "usr/bin/apt", "usr/bin/cc", "usr/bin/dpkg"]:
            assert absent not in files, absent
        binary = mnt / "usr/local/bin/ringmq-broker"
        sections = subprocess.run(["objdump", "-h", str(binary)], capture_output=True, text=True).stdout
        assert ".debug_info" not in sections, "the broker binary is not stripped"
    finally:
        subprocess.run(["buildah", "umount", ctr], capture_output=True, env=ENV)
        subprocess.run(["buildah", "rm", ctr], capture_output=True, env=ENV)


def test_the_broker_image_serves_mqtt_as_the_pod_runs_it(images, tmp_path):
    pod = Pod(tmp_path)
    try:
        pod.start()
        got = []
        sub = mqtt_client("image-sub", clean=False, got=got)
        assert sub.subscribe("img/#", qos=1)[0] == mqtt.MQTT_ERR_SUCCESS
        time.sleep(0.5)
        sub.disconnect()
        sub.loop_stop()
        pub = mqtt_client("image-pub", clean=True)
        pub.publish("img/x", b"kept on the volume", qos=1).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()
        code, took = pod.stop()
        assert code == 0, pod.logs()
        assert took < pod.grace, f"SIGTERM took {took:.1f} s"
        # The store is on the volume, written by the pod's user through the group.
        store = pod.volumes["data"][0] / "store"
        assert store.is_dir() and store.stat().st_uid == pod.user, pod.logs()
        pod.start()
        sub = mqtt_client("image-sub", clean=False, got=got)
        deadline = time.time() + 10
        while not got and time.time() < deadline:
            time.sleep(0.1)
        sub.disconnect()
        sub.loop_stop()
        assert got == [b"kept on the volume"], pod.logs()
        code, _ = pod.stop()
        assert code == 0, pod.logs()
    finally:
        pod.kill()


def test_the_operator_image_without_an_api_server_exits_with_a_clear_message(images):
    entrypoint, user = image_config(OPERATOR)
    assert user.startswith("65532")
    ctr = subprocess.run(["buildah", "from", OPERATOR], check=True, capture_output=True,
                         text=True, env=ENV).stdout.strip()
    try:
        out = subprocess.run(
            ["buildah", "run", "--user", "65532:65532", "--cap-drop", "ALL", "--network", "host",
             ctr, "--", *entrypoint],
            capture_output=True, text=True, timeout=60, env=ENV,
        )
        assert out.returncode != 0
        assert "no Kubernetes API (in-cluster service account or kubeconfig)" in out.stderr, out.stderr
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, env=ENV)
