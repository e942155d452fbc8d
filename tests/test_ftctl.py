"""ftctl as a user runs it: exit codes, tables and JSON, without a daemon where none is needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def ftctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validate_examples_ok(path: Path) -> None:
    r = ftctl("config", "validate", str(path))
    assert r.returncode == 0 and r.stdout.strip() == f"{path}: OK"


def test_config_validate_broken_lists_every_error_with_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "cluster:\n  name: x\n  hosts: [{name: a, address: 10.0.0.1}]\n"
        "vms:\n  - name: 'x,id=evil'\n    memory_mib: 12\n"
    )
    r = ftctl("config", "validate", str(bad))
    assert r.returncode == 2
    assert "bus: required key missing" in r.stdout
    assert "vms[0].name:" in r.stdout and "vms[0].memory_mib:" in r.stdout
    j = json.loads(ftctl("--json", "config", "validate", str(bad)).stdout)
    assert j["ok"] is False and len(j["errors"]) >= 3


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    r = ftctl("--socket", str(tmp_path / "none.sock"), "status")
    assert r.returncode == 1 and "cannot reach ftd" in r.stderr


def test_libvirt_check_against_libvirt_test_driver() -> None:
    # libvirt's built-in test driver (in-process, no daemon): its sample domain lacks
    # everything ftd needs, and ftctl says which parts, with the fix, exit 2.
    r = ftctl("libvirt", "check", "test", "--uri", "test:///default")
    assert r.returncode == 2, r.stderr
    assert "NOT usable by ftd" in r.stdout and "qmp-socket" in r.stdout
    j = json.loads(ftctl("libvirt", "check", "test", "--uri", "test:///default", "--json").stdout)
    assert j["ok"] is False and any(f["check"] == "acpi" for f in j["findings"])
    r = ftctl("libvirt", "check", "nosuch", "--uri", "test:///default")
    assert r.returncode == 1 and "nosuch" in r.stderr


def test_configuration_reference_doc_is_generated_from_the_schema() -> None:
    doc = Path(__file__).parent.parent / "docs" / "configuration.md"
    r = subprocess.run(
        [sys.executable, "-m", "ftd.config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert doc.read_text() == r.stdout, "docs/configuration.md is stale: python -m ftd.config"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["switchover"], "exactly one of VM and --group"),
        (["switchover", "vm1", "--group", "g"], "exactly one of VM and --group"),
        (["switchover", "--group", "g", "--to", "b"], "apply to one VM, not to --group"),
        (["switchover", "--group", "g", "--wait-protected"], "apply to one VM, not to --group"),
    ],
)
def test_switchover_arguments_checked_before_asking_ftd(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    r = ftctl("--socket", str(tmp_path / "none.sock"), *args)
    assert r.returncode == 2 and expected in r.stderr, r.stderr
