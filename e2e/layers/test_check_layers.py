"""scripts/check-layers: passes on the tree, and fails on each kind of break
it exists to catch (a reference upward, a cycle, an unplaced module, an
adapter crate named in the core), each made in a copy of broker/src."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "scripts" / "check-layers"


def check(src: Path):
    return subprocess.run(
        [sys.executable, str(CHECK), "--tests", "--quiet", "--src", str(src)],
        capture_output=True, text=True, check=False,
    )


@pytest.fixture
def src(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "broker" / "src", copy)
    return copy


def append(path: Path, text: str):
    path.write_text(path.read_text() + text)


def test_the_tree_keeps_the_rule():
    out = check(ROOT / "broker" / "src")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no cycle" in out.stdout


def test_a_core_module_reaching_an_adapter_fails(src):
    append(src / "session.rs", "\nfn _leak(_: &crate::cluster::Cluster) {}\n")
    out = check(src)
    assert out.returncode == 1
    assert "upward reference session (L1) -> cluster (L5)" in out.stdout


def test_a_cycle_within_a_layer_fails(src):
    # router -> session is allowed (same layer); with session -> router it
    # closes a cycle.
    append(src / "router.rs", "\nfn _back(_: &crate::session::Session) {}\n")
    out = check(src)
    assert out.returncode == 1
    assert "dependency cycle" in out.stdout and "router" in out.stdout


def test_a_module_without_a_layer_fails(src):
    (src / "gadget.rs").write_text("pub fn g() {}\n")
    append(src / "lib.rs", "\npub mod gadget;\n")
    out = check(src)
    assert out.returncode == 1
    assert "module `gadget` has no layer" in out.stdout


def test_an_adapter_crate_in_the_core_fails(src):
    append(src / "retain.rs", "\nfn _io(_: &ntex::io::IoBoxed) {}\n")
    out = check(src)
    assert out.returncode == 1
    assert "core module retain (L1) names adapter crate ntex::io" in out.stdout
