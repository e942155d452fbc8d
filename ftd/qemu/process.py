"""Launching, attaching to, watching and stopping one QEMU process; its taps and images.

QEMU runs in its own session (``start_new_session``) so that ftd stopping or crashing never
takes the guest with it; a restarted ftd finds it again with :meth:`QemuProcess.attach` from
the run directory (QEMU's pidfile plus ``launch.json`` written here).

``exec_prefix`` (e.g. ``("ip", "netns", "exec", NS)``) runs QEMU and the ``ip`` commands for
its taps somewhere else; it must exec its argument in place so the pid stays QEMU's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ftd.aio import bounded
from ftd.errors import QemuError
from ftd.libvirt import LibvirtError
from ftd.libvirt.domain import DomainState, LibvirtDomain
from ftd.libvirt.render import render_live_xml
from ftd.log import get_logger
from ftd.qemu.cmdline import (
    Embedding,
    primary_args,
    primary_argv,
    secondary_args,
    secondary_argv,
)
from ftd.qemu.runtime import QemuRuntime
from ftd.qemu.spec import QemuVmSpec

LAUNCH_FILE = "launch.json"
ROLES = ("primary", "secondary")
_STDERR_TAIL = 2000


async def _run(argv: Sequence[str], what: str, *, env: dict[str, str] | None = None) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as err:
        raise QemuError(f"{what}: cannot run {argv[0]}: {err}") from err
    out, err_text = await proc.communicate()
    if proc.returncode != 0:
        raise QemuError(f"{what} failed ({proc.returncode}): {err_text.decode(errors='replace')}")
    return out.decode(errors="replace")


async def create_image(runtime: QemuRuntime, path: Path, size_mib: int, fmt: str) -> None:
    """Create an empty ``fmt`` (raw, qcow2) image of ``size_mib`` at ``path`` (replacing it).

    Raises QemuError if qemu-img fails.
    """
    if fmt not in ("raw", "qcow2"):
        raise QemuError(f"image format {fmt!r} is not raw or qcow2")
    argv = runtime.argv("qemu-img", "create", "-q", "-f", fmt, str(path), f"{size_mib}M")
    await _run(argv, f"qemu-img create {path}", env=runtime.env())


async def prepare_disks(spec: QemuVmSpec, role: str, runtime: QemuRuntime) -> None:
    """Make the images a launch in ``role`` needs.

    The base image is created (raw, ``disk_size_mib``) only if missing; a COLO secondary always
    gets fresh, empty active/hidden overlays of the same size (stale ones would replay an old
    COLO epoch); a cold standby's replica needs none. Raises QemuError if the base has another
    size or qemu-img fails.
    """
    _check_role(role)
    size = spec.disk_size_mib * 1024 * 1024
    if not spec.disk_path.exists():
        spec.disk_path.parent.mkdir(parents=True, exist_ok=True)
        await create_image(runtime, spec.disk_path, spec.disk_size_mib, "raw")
    elif spec.disk_path.stat().st_size != size:
        raise QemuError(
            f"vm {spec.name}: disk {spec.disk_path} is {spec.disk_path.stat().st_size} bytes, "
            f"the spec says {size} (COLO needs the same size on both sides)"
        )
    if role == "secondary" and not spec.cold:
        spec.overlay_dir.mkdir(parents=True, exist_ok=True)
        for overlay in (spec.active_overlay, spec.hidden_overlay):
            await create_image(runtime, overlay, spec.disk_size_mib, "qcow2")


def _spawn(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    # A new session: QEMU must outlive ftd (and not get its terminal's signals).
    with log.open("ab") as err_file:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=err_file,
            stderr=err_file,
            env=env,
            start_new_session=True,
            cwd=cwd,
        )


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise QemuError(f"unknown QEMU role {role!r} (primary or secondary)")


async def create_taps(spec: QemuVmSpec, role: str, exec_prefix: Sequence[str] = ()) -> list[str]:
    """Create one tap per NIC, enslaved to its bridge and up; returns their names.

    A leftover tap of the same name (from a crash) is replaced. Raises QemuError.
    """
    taps: list[str] = []
    try:
        for i, nic in enumerate(spec.nics):
            tap = spec.tap(i, role)
            await remove_taps([tap], exec_prefix)
            taps.append(tap)
            await _run([*exec_prefix, "ip", "tuntap", "add", "dev", tap, "mode", "tap"], tap)
            await _run([*exec_prefix, "ip", "link", "set", tap, "master", nic.bridge], tap)
            await _run([*exec_prefix, "ip", "link", "set", tap, "up"], tap)
    except QemuError:
        await remove_taps(taps, exec_prefix)
        raise
    return taps


async def remove_taps(taps: Sequence[str], exec_prefix: Sequence[str] = ()) -> None:
    """Delete taps; ones already gone are fine (never raises for them)."""
    for tap in taps:
        with contextlib.suppress(QemuError):
            await _run([*exec_prefix, "ip", "link", "del", tap], f"delete tap {tap}")


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` from /proc/PID/stat (``R``, ``S``, ``T`` when
    stopped by a signal, ``Z`` a zombie ...); None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


async def _start_domain(spec: QemuVmSpec, role: str) -> int:
    """Start ``spec``'s libvirt domain in ``role`` with ftd's devices; return QEMU's pid.

    The domain must be defined and shut off on this host (ftd starts it; an operator's running
    copy would be a second guest). Raises QemuError (LibvirtError) naming what is wrong.
    """
    assert spec.libvirt is not None
    if spec.cold:
        raise QemuError(f"vm {spec.name}: a cold standby is not run by libvirt")
    uri, domain = spec.libvirt

    def args_for(embed: Embedding) -> list[str]:
        return (primary_args if role == "primary" else secondary_args)(spec, embed)

    async with LibvirtDomain(uri, domain) as dom:
        try:
            state = await dom.state()
        except LibvirtError as err:
            raise LibvirtError(
                f"vm {spec.name}: {err} (ftd starts the domain from its definition, which must "
                "exist, shut off, on this host: virsh define)"
            ) from err
        if state not in (DomainState.SHUTOFF, DomainState.CRASHED):
            raise QemuError(
                f"vm {spec.name}: libvirt domain {domain} is {state.value} on this host; ftd "
                "starts it itself with its COLO devices (stop it first: virsh destroy)"
            )
        live = render_live_xml(
            await dom.xml(inactive=True),
            disk_path=spec.disk_path,
            macs=[n.mac for n in spec.nics],
            args_for=args_for,
        )
        await dom.create_live(live)
    # Our -pidfile: QEMU writes it before libvirt's create returns.
    try:
        return int(spec.pidfile.read_text().strip())
    except (OSError, ValueError) as err:
        raise QemuError(
            f"vm {spec.name}: libvirt started domain {domain} but QEMU wrote no pidfile "
            f"{spec.pidfile}: {err}"
        ) from err


@dataclass
class QemuProcess:
    """A running (or exited) QEMU of one VM in one role."""

    run_dir: Path
    pid: int
    role: str
    taps: list[str] = field(default_factory=list)
    exec_prefix: tuple[str, ...] = ()
    popen: subprocess.Popen[bytes] | None = None
    #: QEMU's stderr (libvirt's domain log for a domain libvirt started), None: qemu.err.
    log_path: Path | None = None

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @classmethod
    async def launch(
        cls,
        spec: QemuVmSpec,
        role: str,
        runtime: QemuRuntime,
        *,
        exec_prefix: Sequence[str] = (),
        ready_timeout_s: float = 30.0,
    ) -> QemuProcess:
        """Create taps, start QEMU in ``role`` and wait until its QMP socket exists.

        Images must exist (:func:`prepare_disks`). Raises QemuError, with QEMU's stderr, if
        QEMU exits or makes no QMP socket within ``ready_timeout_s``; the taps are removed then.
        """
        _check_role(role)
        log = get_logger(vm=spec.name, role=role)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (spec.qmp_socket, spec.pidfile):
            stale.unlink(missing_ok=True)
        # A cold standby's replica runs no guest: it has no NICs to connect.
        replica = role == "secondary" and spec.cold
        taps = [] if replica else await create_taps(spec, role, exec_prefix)
        if spec.libvirt is not None:
            try:
                pid = await _start_domain(spec, role)
            except BaseException:
                await remove_taps(taps, exec_prefix)
                raise
            proc = cls(spec.run_dir, pid, role, taps, tuple(exec_prefix), log_path=spec.stderr_log)
            proc._write_launch_file()
            log.info("qemu_started", pid=pid, taps=taps, libvirt=spec.libvirt[1])
            return proc
        argv = [
            *exec_prefix,
            *(primary_argv if role == "primary" else secondary_argv)(spec, runtime),
        ]
        try:
            popen = _spawn(argv, runtime.env(), spec.stderr_log, spec.run_dir)
        except OSError as err:
            await remove_taps(taps, exec_prefix)
            raise QemuError(f"vm {spec.name}: cannot start QEMU: {err}") from err
        proc = cls(spec.run_dir, popen.pid, role, taps, tuple(exec_prefix), popen)
        proc._write_launch_file()
        deadline = time.monotonic() + ready_timeout_s
        while not spec.qmp_socket.exists():
            if popen.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with {popen.returncode}"
                    if popen.returncode is not None
                    else f"made no QMP socket in {ready_timeout_s:g} s"
                )
                await proc.stop()
                raise QemuError(f"vm {spec.name}: QEMU ({role}) {why}: {proc.stderr_tail()}")
            await asyncio.sleep(0.05)
        log.info("qemu_started", pid=popen.pid, taps=taps)
        return proc

    def _write_launch_file(self) -> None:
        data = {
            "pid": self.pid,
            "role": self.role,
            "taps": self.taps,
            "exec_prefix": list(self.exec_prefix),
            "log": None if self.log_path is None else str(self.log_path),
        }
        tmp = self.run_dir / f"{LAUNCH_FILE}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.run_dir / LAUNCH_FILE)

    @classmethod
    def attach(cls, run_dir: Path) -> QemuProcess:
        """Find the QEMU launched into ``run_dir`` (after an ftd restart).

        Raises QemuError if there is no launch record, or its process is gone or is not that
        QEMU (its command line must name this run directory's pidfile).
        """
        try:
            data = json.loads((run_dir / LAUNCH_FILE).read_text())
            pid = int((run_dir / "qemu.pid").read_text().strip())
        except (OSError, ValueError) as err:
            raise QemuError(f"no QEMU to attach to in {run_dir}: {err}") from err
        if pid != data.get("pid"):
            raise QemuError(f"{run_dir}: pidfile says {pid}, launch record {data.get('pid')}")
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError as err:
            raise QemuError(f"{run_dir}: QEMU pid {pid} is not running") from err
        if str(run_dir / "qemu.pid").encode() not in cmdline:
            raise QemuError(f"{run_dir}: pid {pid} is not this VM's QEMU (pid reused?)")
        proc = cls(
            run_dir,
            pid,
            str(data["role"]),
            [str(t) for t in data.get("taps", [])],
            tuple(str(a) for a in data.get("exec_prefix", [])),
            log_path=None if data.get("log") is None else Path(str(data["log"])),
        )
        if not proc.alive():
            raise QemuError(f"{run_dir}: QEMU pid {pid} has exited")
        return proc

    def alive(self) -> bool:
        """Whether the QEMU process still runs (a zombie counts as exited)."""
        if self.popen is not None:
            return self.popen.poll() is None
        return process_state(self.pid) not in (None, "Z", "X")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to QEMU (no error if it is already gone)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def exiting(self) -> bool:
        """Whether QEMU has exited or is exiting: a killed QEMU's main thread is a zombie at
        once, while its other threads still finish and before it can be reaped (so before
        :meth:`alive` says so)."""
        return not self.alive() or process_state(self.pid) in (None, "Z", "X")

    def frozen(self) -> bool:
        """Whether the QEMU process is stopped by a signal (SIGSTOP: /proc state ``T``)."""
        return process_state(self.pid) == "T"

    async def wait_exit(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for QEMU to exit; True if it did (and it is reaped)."""
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._reap()
            return True
        exited = asyncio.Event()
        loop.add_reader(pidfd, exited.set)
        try:
            if self.alive():
                with contextlib.suppress(TimeoutError):
                    await bounded(exited.wait(), timeout_s)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        done = not self.alive()
        if done:
            self._reap()
        return done

    def _reap(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=0)

    async def stop(self, *, grace_s: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; then remove the taps. Never raises."""
        if self.alive():
            self.kill(signal.SIGTERM)
            if not await self.wait_exit(grace_s):
                self.kill(signal.SIGKILL)
                await self.wait_exit(10.0)
        await self.cleanup()

    async def cleanup(self) -> None:
        """Remove what the launch created outside QEMU (taps); call once QEMU has exited."""
        await remove_taps(self.taps, self.exec_prefix)

    def stderr_tail(self) -> str:
        """The end of QEMU's stderr log (empty if none)."""
        try:
            text = (self.log_path or self.run_dir / "qemu.err").read_text(errors="replace")
        except OSError:
            return ""
        return text[-_STDERR_TAIL:].strip()
