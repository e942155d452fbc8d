"""Where the QEMU programs are, and whether that QEMU can do COLO.

Two kinds of runtime:

* a private Debian tree made by ``make setup`` (``scripts/setup-qemu.sh``): its programs run
  through the tree's own dynamic loader with its libraries, ``QEMU_MODULE_DIR`` and ``-L``
  firmware paths, so nothing of a newer Debian touches the host;
* a host binary (a KVM host with a good distribution QEMU): the binaries are run as they are.

:func:`colo_verdict` is the pure rule deciding whether a QEMU version is usable for COLO
(facts in shared/COLO.md), returning a reason string either way.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ftd.errors import QemuVersionError

DEFAULT_TREE = Path("/var/cache/ftd/qemu")
_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class QemuVersion:
    major: int
    minor: int
    micro: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"

    @property
    def tuple(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.micro)


def parse_version(text: str) -> QemuVersion:
    """Parse ``qemu-system-x86_64 --version`` output.

    Raises QemuVersionError when no version line is found.
    """
    m = _VERSION_RE.search(text)
    if not m:
        raise QemuVersionError(f"cannot read a QEMU version from {text.strip()[:120]!r}")
    return QemuVersion(int(m.group(1)), int(m.group(2)), int(m.group(3)))


def colo_verdict(version: QemuVersion, accel: str) -> tuple[bool, str]:
    """Is this QEMU usable for COLO under ``accel`` ("kvm" or "tcg")? Returns (ok, reason)."""
    v = version.tuple
    if (10, 0, 0) <= v < (10, 0, 7) or (10, 1, 0) <= v < (10, 1, 3):
        return False, (
            f"QEMU {version} ends migration 'completed' instead of entering COLO "
            "(fixed in 10.0.7 / 10.1.3 by 'migration: Fix transition to COLO state from precopy')"
        )
    if accel == "tcg" and v < (11, 1, 0):
        return False, (
            f"QEMU {version} under TCG deadlocks the COLO primary after 1-2 checkpoints "
            "(ram_save_complete -> tcg_log_global_after_sync takes the big QEMU lock); "
            "use QEMU >= 11.1 (make setup installs one) or KVM"
        )
    if v < (4, 0, 0):
        return False, f"QEMU {version} predates the COLO QMP interface ftd drives; use >= 11.1"
    return True, f"QEMU {version} supports COLO under {accel}"


@dataclass(frozen=True)
class QemuRuntime:
    """How to run QEMU's programs: from a private tree (``tree``) or a host binary dir."""

    tree: Path | None = DEFAULT_TREE
    bindir: Path = field(default=Path("/usr/bin"))

    @classmethod
    def from_binary(cls, binary: str | Path) -> QemuRuntime:
        """A runtime using host binaries living beside ``binary``."""
        return cls(tree=None, bindir=Path(binary).parent)

    def argv(self, program: str, *args: str) -> list[str]:
        """The argv running ``program`` (qemu-system-x86_64, qemu-img, ...) with ``args``."""
        if self.tree is None:
            return [str(self.bindir / program), *args]
        t = self.tree
        extra: list[str] = []
        if program.startswith("qemu-system-"):
            extra = ["-L", str(t / "usr/share/qemu"), "-L", str(t / "usr/share/seabios")]
        libs = f"{t}/usr/lib/x86_64-linux-gnu:{t}/lib/x86_64-linux-gnu"
        return [
            str(t / "usr/lib64/ld-linux-x86-64.so.2"),
            "--library-path",
            libs,
            str(t / "usr/bin" / program),
            *extra,
            *args,
        ]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for running this runtime's programs."""
        e = dict(os.environ if base is None else base)
        if self.tree is not None:
            e["QEMU_MODULE_DIR"] = str(self.tree / "usr/lib/x86_64-linux-gnu/qemu")
        return e

    def check_present(self) -> None:
        """Raises QemuVersionError if the runtime's files are not there."""
        probe = (
            self.tree / "usr/bin/qemu-system-x86_64"
            if self.tree is not None
            else self.bindir / "qemu-system-x86_64"
        )
        if not probe.exists():
            where = f"tree {self.tree}" if self.tree is not None else f"directory {self.bindir}"
            raise QemuVersionError(
                f"no qemu-system-x86_64 in QEMU {where}; run `make setup` or set qemu.binary"
            )

    def version(self, timeout: float = 20.0) -> QemuVersion:
        """Run ``qemu-system-x86_64 --version``. Raises QemuVersionError if it cannot run."""
        self.check_present()
        try:
            out = subprocess.run(
                self.argv("qemu-system-x86_64", "--version"),
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError) as err:
            raise QemuVersionError(f"cannot run qemu-system-x86_64 --version: {err}") from err
        return parse_version(out)

    def require_colo(self, accel: str) -> QemuVersion:
        """The version, if COLO works with it under ``accel``; else QemuVersionError saying why."""
        v = self.version()
        ok, reason = colo_verdict(v, accel)
        if not ok:
            raise QemuVersionError(reason)
        return v


COLO_CAPABILITIES = ("x-colo", "return-path")


def probe_capabilities(runtime: QemuRuntime, timeout: float = 20.0) -> frozenset[str]:
    """The migration capabilities this QEMU offers, asked over QMP on stdio.

    Raises QemuVersionError if QEMU cannot run, does not answer, or lacks any of
    :data:`COLO_CAPABILITIES`.
    """
    script = (
        '{"execute": "qmp_capabilities"}\n'
        '{"execute": "query-migrate-capabilities", "id": "caps"}\n'
        '{"execute": "quit"}\n'
    )
    argv = runtime.argv(
        "qemu-system-x86_64",
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
        "stdio",
    )
    try:
        out = subprocess.run(
            argv,
            input=script,
            env=runtime.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise QemuVersionError(f"cannot probe QEMU capabilities: {err}") from err
    names: set[str] = set()
    for line in out.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("id") == "caps":
            names = {c["capability"] for c in msg.get("return", [])}
    if not names:
        raise QemuVersionError(f"QEMU did not answer query-migrate-capabilities: {out[-300:]!r}")
    missing = [c for c in COLO_CAPABILITIES if c not in names]
    if missing:
        raise QemuVersionError(f"QEMU lacks the migration capabilities COLO needs: {missing}")
    return frozenset(names)
