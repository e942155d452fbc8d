"""The Vagrant nested-KVM lab's files, checked without booting it: the Vagrantfile through
``vagrant validate`` with the libvirt provider (Debian packages vagrant and vagrant-libvirt),
the per-host configurations through ftd's own validation, the scripts' syntax and probes.

Nothing here starts a VM; ``vagrant/run-scenarios.sh`` does that on a machine with KVM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ftd.config import validate_file

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "vagrant"
SCRIPTS = ("provision.sh", "run-scenarios.sh", "lab-config.sh")


def vagrant() -> str:
    path = shutil.which("vagrant")
    if path is None:
        pytest.fail("vagrant is not installed (Debian packages vagrant vagrant-libvirt)")
    return path


def vagrant_env(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment keeping every file vagrant writes in ``tmp``, and vagrant offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAGRANT_", "FTD_LAB_"))}
    (tmp / "home").mkdir(exist_ok=True)
    return {
        **env,
        "VAGRANT_HOME": str(tmp / "home"),
        "VAGRANT_DOTFILE_PATH": str(tmp / "dot"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        **extra,
    }


def validate(cwd: Path, tmp: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [vagrant(), "validate"],
        cwd=cwd,
        env=vagrant_env(tmp, **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def lab_addresses() -> dict[str, str]:
    """The hosts' private addresses, read from the Vagrantfile (its one source)."""
    text = (LAB / "Vagrantfile").read_text()
    m = re.search(r'^NET = "([\d.]+)"', text, re.M)
    assert m, 'NET = "A.B.C" not found in the Vagrantfile'
    hosts = re.findall(r'^\s+"([abw])" => \{ ip: "#\{NET\}\.(\d+)"', text, re.M)
    assert sorted(h for h, _ in hosts) == ["a", "b", "w"], hosts
    return {h: f"{m.group(1)}.{octet}" for h, octet in hosts}


@pytest.mark.real
def test_libvirt_provider_plugin_is_installed(tmp_path: Path) -> None:
    r = subprocess.run(
        [vagrant(), "plugin", "list"],
        env=vagrant_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "vagrant-libvirt" in r.stdout, (
        f"the vagrant-libvirt plugin is missing (Debian package vagrant-libvirt): {r.stdout}"
    )


@pytest.mark.real
def test_vagrant_validate_passes(tmp_path: Path) -> None:
    r = validate(LAB, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout
    assert not (LAB / ".vagrant").exists(), "vagrant wrote into the work tree"


@pytest.mark.real
def test_vagrant_validate_checks_the_libvirt_settings(tmp_path: Path) -> None:
    """A typo in the provider block fails: the provider's config really is validated."""
    lab = tmp_path / "lab"
    shutil.copytree(LAB, lab)
    vf = lab / "Vagrantfile"
    vf.write_text(vf.read_text().replace("lv.nested = true", "lv.nestd = true"))
    r = validate(lab, tmp_path)
    assert r.returncode != 0
    assert "nestd" in r.stdout + r.stderr


@pytest.mark.real
def test_vagrant_validate_refuses_a_bad_accel(tmp_path: Path) -> None:
    r = validate(LAB, tmp_path, FTD_LAB_ACCEL="xen")
    assert r.returncode != 0
    assert "FTD_LAB_ACCEL must be kvm or tcg" in r.stdout + r.stderr


def test_vagrantfile_asks_for_nested_kvm_on_the_vm_hosts() -> None:
    text = (LAB / "Vagrantfile").read_text()
    assert 'lv.cpu_mode = "host-passthrough"' in text
    assert "lv.nested = true" in text
    memory = dict(re.findall(r'"([abw])" => \{.*memory: (\d+)', text))
    # Two 128 MiB guests, each with a COLO copy, plus the host's own ftd and QEMUs.
    assert int(memory["a"]) >= 2048 and int(memory["b"]) >= 2048, memory


def lab_config(host: str, accel: str = "kvm") -> subprocess.CompletedProcess[str]:
    addrs = lab_addresses()
    env = {
        **os.environ,
        "FTD_LAB_ADDR_A": addrs["a"],
        "FTD_LAB_ADDR_B": addrs["b"],
        "FTD_LAB_ADDR_W": addrs["w"],
        "FTD_LAB_ACCEL": accel,
    }
    return subprocess.run(
        [str(LAB / "lab-config.sh"), host],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("host", ["a", "b", "w"])
def test_each_host_gets_a_valid_configuration(host: str, tmp_path: Path) -> None:
    r = lab_config(host)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "ftd.yaml"
    path.write_text(r.stdout)
    issues = validate_file(path)
    assert not issues, [str(i) for i in issues]
    doc = yaml.safe_load(r.stdout)
    addrs = lab_addresses()
    assert doc["host"] == host
    assert doc["qemu"]["accel"] == "kvm"
    assert doc["bus"]["brokers"] == [f"mqtt://{addrs['w']}:1883"]
    assert {h["name"]: h["address"] for h in doc["cluster"]["hosts"]} == addrs
    # One primary on each VM host, so both failover directions are exercised.
    assert sorted((v["primary"], v["secondary"]) for v in doc["vms"]) == [("a", "b"), ("b", "a")]


@pytest.mark.parametrize(
    ("host", "accel", "complaint"),
    [("x", "kvm", "HOST is a, b or w"), ("a", "hvf", "FTD_LAB_ACCEL must be kvm or tcg")],
)
def test_lab_config_names_bad_input(host: str, accel: str, complaint: str) -> None:
    r = lab_config(host, accel)
    assert r.returncode == 2
    assert complaint in r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script: str) -> None:
    path = LAB / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    r = subprocess.run(
        ["bash", "-n", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 0, r.stderr


def test_run_scenarios_names_an_unknown_scenario() -> None:
    r = subprocess.run(
        [str(LAB / "run-scenarios.sh"), "cluster", "meltdown"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert "unknown scenario 'meltdown'" in r.stderr


def probe(*args: str) -> tuple[int, dict[str, object]]:
    r = subprocess.run(
        [sys.executable, str(LAB / "probe.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "FTD_SOCKET": "/nonexistent/ftd.sock"},
    )
    return r.returncode, json.loads(r.stdout)


@pytest.fixture
def fake_qemu() -> Iterator[int]:
    """A process whose argv carries QEMU's ``-name vmz,debug-threads=on``, as ftd starts it."""
    code = "import time; time.sleep(60)"
    # Popen returns once the exec succeeded, so /proc already shows the argv.
    proc = subprocess.Popen([sys.executable, "-c", code, "-name", "vmz,debug-threads=on"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_probe_finds_the_qemu_of_a_vm(fake_qemu: int) -> None:
    assert probe("qemu-pid", "vmz") == (0, {"pid": fake_qemu})
    code, out = probe("qemu-pid", "vmy")
    assert code == 1 and "expected one QEMU for vmy" in str(out["reason"])


def test_probe_says_why_ftd_is_unreachable() -> None:
    code, out = probe("cluster")
    assert code == 1
    assert "cannot reach ftd at /nonexistent/ftd.sock" in str(out["reason"])
