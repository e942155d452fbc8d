"""The systemd units, tmpfiles and sysusers files: what they promise, and systemd's own verdict.

``systemd-analyze verify``, ``systemd-tmpfiles --root`` and ``systemd-sysusers --root`` work
without systemd running as PID 1, so the real tools check the real files here. verify reports
unit errors (unknown keys, unparsable values, missing programs) on stderr with exit status 0,
so any output at all counts as a failure.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
FTD = Path(sys.executable).parent / "ftd"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value assigned (systemd allows repeats), comments dropped."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        if section is None or "=" not in line:
            raise AssertionError(f"not a unit-file line: {raw!r}")
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is not set"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times: {values}"
    return values[0]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min)?", value)
    assert m, f"not a simple time span: {value!r}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[m.group(2)]


def load(name: str) -> Unit:
    return parse_unit((UNITS / name).read_text())


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (Debian package systemd; make setup installs it)")
    return path


# --- what the units promise ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["ftd.service", "ftd-witness.service"])
def test_both_units_are_notify_services_with_a_watchdog(name: str) -> None:
    u = load(name)
    assert one(u, "Service", "Type") == "notify"
    assert one(u, "Service", "NotifyAccess") == "main"
    assert seconds(one(u, "Service", "WatchdogSec")) >= 2
    assert one(u, "Service", "Restart") == "on-failure"
    assert one(u, "Install", "WantedBy") == "multi-user.target"
    argv = one(u, "Service", "ExecStart").split()
    assert argv[0] == "/usr/local/bin/ftd"
    assert argv[argv.index("--config") + 1] == "/etc/ftd/ftd.yaml"
    assert ("--witness" in argv) == (name == "ftd-witness.service")


def test_ftd_restarts_never_touch_the_guests() -> None:
    u = load("ftd.service")
    # Only ftd's own process is signalled on stop, restart and watchdog timeout.
    assert one(u, "Service", "KillMode") == "process"
    # QMP sockets and COLO overlays of running guests must outlive the daemon.
    assert one(u, "Service", "RuntimeDirectory") == "ftd"
    assert one(u, "Service", "RuntimeDirectoryPreserve") == "yes"


# Settings that would break the QEMUs ftd starts (they inherit the unit's sandbox), with why.
QEMU_BREAKERS = {
    "PrivateDevices": "hides /dev/kvm and /dev/net/tun",
    "DeviceAllow": "a device allow-list closes /dev/kvm and /dev/net/tun",
    "DevicePolicy": "closes /dev/kvm and /dev/net/tun",
    "ProtectClock": "implies a DeviceAllow= list",
    "MemoryDenyWriteExecute": "TCG writes and runs generated code",
    "PrivateTmp": "a restarted ftd would not share /tmp with QEMUs that outlived it",
    "SystemCallFilter": "QEMU filters its own system calls (-sandbox)",
    "CapabilityBoundingSet": "QEMU needs CAP_NET_ADMIN, CAP_IPC_LOCK, ...",
    "PrivateNetwork": "replication traffic and taps need the host network",
    "DynamicUser": "QEMU needs root for taps and /dev/kvm",
}


@pytest.mark.parametrize("key", sorted(QEMU_BREAKERS))
def test_ftd_sandbox_leaves_qemu_what_it_needs(key: str) -> None:
    u = load("ftd.service")
    assert key not in u["Service"], f"{key}= in ftd.service: {QEMU_BREAKERS[key]}"


def test_ftd_sandbox_keeps_the_families_qemu_uses() -> None:
    families = set(one(load("ftd.service"), "Service", "RestrictAddressFamilies").split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= families


@pytest.mark.real
def test_restart_prevent_codes_are_what_ftd_exits_with_for_a_bad_config(tmp_path: Path) -> None:
    if not FTD.exists():
        pytest.fail(f"{FTD} is missing: run make setup")
    bad = tmp_path / "ftd.yaml"
    bad.write_text("cluster: {name: x}\n")
    r = subprocess.run(
        [str(FTD), "--config", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 2, r.stderr
    for name in ("ftd.service", "ftd-witness.service"):
        codes = one(load(name), "Service", "RestartPreventExitStatus").split()
        assert str(r.returncode) in codes, f"{name} restarts ftd forever on a bad config"


# --- systemd's own verdict ----------------------------------------------------------------


def verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    tool = need("systemd-analyze")
    return subprocess.run(
        [tool, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def installable_copy(dest: Path, name: str, extra: str = "") -> Path:
    """``name`` with ExecStart pointing at this venv's ftd (verify checks the program exists)."""
    if not FTD.exists():
        pytest.fail(f"{FTD} is missing: run make setup")
    text = (UNITS / name).read_text().replace("/usr/local/bin/ftd", str(FTD))
    if extra:
        text = text.replace("[Service]\n", f"[Service]\n{extra}\n", 1)
    path = dest / name
    path.write_text(text)
    return path


@pytest.mark.real
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    units = [installable_copy(tmp_path, n) for n in ("ftd.service", "ftd-witness.service")]
    r = verify(units)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (
        f"systemd-analyze verify (exit {r.returncode}):\n{r.stdout}{r.stderr}"
    )


@pytest.mark.real
@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        ("KillMode=procces", "kill mode"),
        ("WatchdogSec=ten", "sec value"),
        ("ProtectSytem=full", "Unknown key"),
    ],
)
def test_systemd_analyze_verify_catches_a_broken_unit(
    tmp_path: Path, extra: str, complaint: str
) -> None:
    r = verify([installable_copy(tmp_path, "ftd.service", extra)])
    assert complaint in r.stdout + r.stderr, (r.returncode, r.stdout, r.stderr)


@pytest.mark.real
def test_systemd_analyze_verify_catches_a_missing_program(tmp_path: Path) -> None:
    unit = tmp_path / "ftd.service"
    unit.write_text((UNITS / "ftd.service").read_text().replace("/usr/local/bin/ftd", "/nope/ftd"))
    r = verify([unit])
    assert "/nope/ftd" in r.stdout + r.stderr and r.returncode != 0


# --- tmpfiles and sysusers ----------------------------------------------------------------


@pytest.mark.real
def test_sysusers_and_tmpfiles_build_the_directories(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    users = subprocess.run(
        [need("systemd-sysusers"), f"--root={tmp_path}", "-"],
        input=(UNITS / "ftd.sysusers.conf").read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert users.returncode == 0, users.stderr
    assert re.search(r"^ftd:x:\d+:", (tmp_path / "etc/group").read_text(), re.M)
    files = subprocess.run(
        [need("systemd-tmpfiles"), "--create", f"--root={tmp_path}", "-"],
        input=(UNITS / "ftd.tmpfiles.conf").read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert files.returncode == 0, files.stderr
    modes = {
        p: stat.S_IMODE((tmp_path / p).stat().st_mode)
        for p in ("run/ftd", "run/ftd/colo", "var/lib/ftd")
    }
    assert modes == {"run/ftd": 0o755, "run/ftd/colo": 0o700, "var/lib/ftd": 0o750}
    # The units create the same directories on start: they must not fight over the modes.
    for name in ("ftd.service", "ftd-witness.service"):
        u = load(name)
        assert int(one(u, "Service", "RuntimeDirectoryMode"), 8) == modes["run/ftd"]
        assert int(one(u, "Service", "StateDirectoryMode"), 8) == modes["var/lib/ftd"]
