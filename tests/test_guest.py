"""The lab guest: image builder (lab/image.py), the guest's services, the outside clients.

Unit tests cover the pure parts.  The ``real`` tests build the image from the host's kernel and
busybox, boot it under the project's QEMU (TCG, 128 MiB) and talk to its services through
user-mode networking port forwards.  They fail, never skip, when a component is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from ftd.errors import LabError
from ftd.qemu.runtime import QemuRuntime
from lab.clients import (
    CounterClient,
    DiskWriterClient,
    counter_continuity,
    latency_stats,
    open_lines,
    parse_check,
    parse_counter_answer,
    parse_stats,
    read_stats,
)
from lab.image import GuestImage, build_guest, guest_append, resolve_modules, unpack_pvh

BOOT_BOUND_S = 30.0  # target is < 10 s on 2 cores; the bound leaves room for a loaded machine
DISK_MIB = 64
WORKLOADS = ("counter", "disk", "steady:2")


# ---------------------------------------------------------------- pure parts


def test_modules_come_after_their_dependencies() -> None:
    deps = {"a": ["b", "c"], "b": ["c"], "c": [], "d": ["c"]}
    assert resolve_modules(["a", "d"], lambda m: deps[m]) == ["c", "b", "a", "d"]


def test_module_cycle_is_an_error() -> None:
    deps = {"a": ["b"], "b": ["a"]}
    with pytest.raises(LabError, match="cycle: a -> b -> a"):
        resolve_modules(["a"], lambda m: deps[m])


def test_guest_append() -> None:
    assert guest_append("10.0.2.15/24", ["counter", "bursty:4:2:3"]) == (
        "console=ttyS0 quiet panic=-1 ftd.ip=10.0.2.15/24 ftd.workload=counter,bursty:4:2:3"
    )
    assert "ftd.ip" not in guest_append(None, ["idle"])
    for ip in ("10.0.2.15", "10.0.2.300/24", "10.0.2.1/33"):
        with pytest.raises(LabError, match="ip"):
            guest_append(ip, ["idle"])
    assert guest_append(None, ["bursty:16:3:5:48"]).endswith("ftd.workload=bursty:16:3:5:48")
    assert guest_append(None, ["steady:6:48"]).endswith("ftd.workload=steady:6:48")
    assert guest_append(None, ["bursty:16:3:17:48:4"]).endswith("=bursty:16:3:17:48:4")
    bad = (["steady:0"], ["steady:2:0"], ["bursty:1:1"], ["bursty:4:1:1:0"], ["spin"], [])
    jitter = (["bursty:4:1:1:4:0"], ["bursty:4:1:1:4:100"], ["steady:4:4:1"])
    for w in (*bad, *jitter):
        with pytest.raises(LabError, match="workload"):
            guest_append(None, w)
    with pytest.raises(LabError, match="REGION 3 is below N 4"):
        guest_append(None, ["bursty:4:1:1:3"])
    with pytest.raises(LabError, match="REGION 5 is below N 6"):
        guest_append(None, ["steady:6:5"])
    with pytest.raises(LabError, match="at most one"):
        guest_append(None, ["steady:1", "bursty:1:1:1"])


def test_counter_continuity() -> None:
    assert counter_continuity([4, 5, 6]).ok
    c = counter_continuity([1, 2, 2, 5, 6])
    assert (c.repeats, c.gaps) == (1, 2)
    assert "first at answer 2: 2 -> 2" in c.reason
    assert counter_continuity([]).reason == "no answers"


def test_latency_stats() -> None:
    s = latency_stats([float(i) for i in range(1, 101)])
    assert (s.count, s.min, s.median, s.p90, s.p99, s.max) == (100, 1, 50.5, 90, 99, 100)
    with pytest.raises(LabError):
        latency_stats([])


def test_answer_parsers() -> None:
    assert parse_counter_answer("7 req 3", "req 3") == 7
    with pytest.raises(LabError):
        parse_counter_answer("7 req 4", "req 3")
    chk = parse_check("checked 1 9 missing 2 first_missing 4", 1, 9)
    assert (chk.missing, chk.first_missing, chk.ok) == (2, 4, False)
    assert parse_check("checked 1 9 missing 0 first_missing -", 1, 9).ok
    with pytest.raises(LabError):
        parse_check("checked 1 8 missing 0 first_missing -", 1, 9)
    assert parse_stats("work 12 uptime 9.61").work_mib == 12
    with pytest.raises(LabError):
        parse_stats("work x uptime 1")


async def test_lost_connection_ends_the_client_with_the_error_kept() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for n in (1, 2, 3):  # answer three requests like the guest, then drop the connection
            line = await reader.readline()
            writer.write(f"{n} {line.decode().strip()}\n".encode())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = CounterClient(*await open_lines("127.0.0.1", port), interval=0.0)
        await asyncio.wait_for(client.run(count=10), 10)
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
    assert [s.counter for s in client.samples] == [1, 2, 3]
    assert client.error is not None
    assert "closed by the guest" in str(client.error)


# ---------------------------------------------------------------- builder


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.real
def test_builder_is_idempotent_and_rebuilds_on_changed_input(tmp_path: Path) -> None:
    out = tmp_path / "guest"
    first = build_guest(out)
    assert first.kernel.stat().st_size > 1_000_000
    listing = subprocess.run(
        f"zcat {first.initrd} | cpio -it", shell=True, capture_output=True, text=True, check=True
    ).stdout.split()
    for member in ("init", "bin/busybox", "bin/nc", "dev/console", "svc/disk.sh"):
        assert member in listing
    for module in ("e1000.ko", "virtio_pci.ko", "virtio_blk.ko"):
        assert f"lib/modules/{module}" in listing
    before = {p: (p.stat().st_ino, _digest(p)) for p in (first.kernel, first.initrd)}

    t = time.monotonic()
    second = build_guest(out)
    assert time.monotonic() - t < 2.0
    assert second == first
    assert {p: (p.stat().st_ino, _digest(p)) for p in (first.kernel, first.initrd)} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"

    # A changed input (a newer busybox) rebuilds: the initrd is replaced, not rewritten in place.
    busybox = tmp_path / "busybox"
    shutil.copy2("/bin/busybox", busybox)
    os.utime(busybox, ns=(time.time_ns(), time.time_ns()))
    third = build_guest(out, busybox=busybox)
    assert third.initrd.stat().st_ino != before[first.initrd][0]
    # The archive is reproducible: same content from the same bytes.
    assert _digest(third.initrd) == before[first.initrd][1]

    # The bzImage variant sits beside the PVH one, with its own stamp.
    bz = build_guest(out, pvh=False)
    assert bz.kernel.read_bytes() == Path(f"/boot/vmlinuz-{bz.kernel_version}").read_bytes()
    assert first.kernel.read_bytes().startswith(b"\x7fELF")
    t = time.monotonic()
    assert build_guest(out) == first
    assert time.monotonic() - t < 2.0


@pytest.mark.real
def test_missing_kernel_or_busybox_is_a_lab_error(tmp_path: Path) -> None:
    with pytest.raises(LabError, match=r"kernel /boot/vmlinuz-0\.0\.0-none not found"):
        build_guest(tmp_path, kernel_version="0.0.0-none")
    (tmp_path / "boot").mkdir()
    with pytest.raises(LabError, match=r"no kernel in .*linux-image-amd64"):
        build_guest(tmp_path, boot=tmp_path / "boot")
    with pytest.raises(LabError, match=r"busybox .* not found.*busybox-static"):
        build_guest(tmp_path, busybox=tmp_path / "no-busybox")
    not_a_kernel = tmp_path / "vmlinuz-bad"
    not_a_kernel.write_bytes(b"MZ" + bytes(4096))
    with pytest.raises(LabError, match=r"no xz or gzip kernel payload.*pvh=False"):
        unpack_pvh(not_a_kernel)
    assert not list(tmp_path.glob("initrd-*")), "a failed build must not leave an image"


# ---------------------------------------------------------------- booted guest


@dataclass(frozen=True)
class BootedGuest:
    image: GuestImage
    qmp: Path
    disk: Path
    console: Path
    counter_port: int
    stats_port: int
    disk_port: int
    boot_seconds: float


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def booted_guest(work: Path, workloads: Sequence[str]) -> Iterator[BootedGuest]:
    """A guest running ``workloads`` booted in ``work``, killed on exit whatever happens."""
    image = build_guest()
    rt = QemuRuntime()
    rt.check_present()
    disk, qmp, console = work / "disk.raw", work / "qmp.sock", work / "console.log"
    subprocess.run(
        rt.argv("qemu-img", "create", "-q", "-f", "raw", str(disk), f"{DISK_MIB}M"),
        env=rt.env(),
        check=True,
        timeout=30,
    )
    counter_port, stats_port, disk_port = _free_ports(3)
    fwd = ",".join(
        f"hostfwd=tcp:127.0.0.1:{host}-:{guest}"
        for host, guest in ((counter_port, 7000), (stats_port, 7002), (disk_port, 7100))
    )
    argv = rt.argv(
        "qemu-system-x86_64",
        *("-accel", "tcg", "-machine", "pc", "-m", "128", "-smp", "1"),
        *("-nographic", "-no-reboot"),
        *("-kernel", str(image.kernel), "-initrd", str(image.initrd)),
        *("-append", guest_append("10.0.2.15/24", workloads)),
        *("-drive", f"if=virtio,format=raw,file={disk}"),
        *("-netdev", f"user,id=n0,{fwd}", "-device", "e1000,netdev=n0"),
        *("-qmp", f"unix:{qmp},server=on,wait=off"),
    )
    with console.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            argv,
            env=rt.env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        while b"ftd-guest up" not in console.read_bytes():
            text = console.read_bytes().decode(errors="replace")
            assert proc.poll() is None, f"QEMU exited ({proc.returncode}) before boot:\n{text}"
            assert "ftd-guest failed" not in text, text
            assert time.monotonic() - started < BOOT_BOUND_S, (
                f"no 'ftd-guest up' within {BOOT_BOUND_S} s:\n{text[-3000:]}"
            )
            time.sleep(0.05)
        boot = time.monotonic() - started
        size = image.initrd.stat().st_size
        print(f"\nguest boot to 'ftd-guest up': {boot:.2f} s; initrd {size} B")
        yield BootedGuest(image, qmp, disk, console, counter_port, stats_port, disk_port, boot)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootedGuest]:
    """One guest booted for the module's tests."""
    with booted_guest(tmp_path_factory.mktemp("guest"), WORKLOADS) as g:
        yield g


@pytest.mark.real
async def test_guest_boots_and_qemu_runs_it(guest: BootedGuest) -> None:
    assert guest.boot_seconds < BOOT_BOUND_S
    lines = guest.console.read_bytes().decode(errors="replace").splitlines()
    assert any(line.strip().endswith("ftd-guest up") for line in lines)
    qmp = QMPClient("test-guest")
    await qmp.connect(str(guest.qmp))
    try:
        status = await asyncio.wait_for(qmp.execute("query-status"), 10)
        version = await asyncio.wait_for(qmp.execute("query-version"), 10)
    finally:
        await qmp.disconnect()
    assert isinstance(status, dict) and isinstance(version, dict)
    assert status["status"] == "running"
    q = version["qemu"]
    assert (q["major"], q["minor"]) >= (11, 1), q


@pytest.mark.real
async def test_counter_service_counts(guest: BootedGuest) -> None:
    client = CounterClient(*await open_lines("127.0.0.1", guest.counter_port), interval=0.05)
    try:
        await client.run(count=20)
    finally:
        await client.close()
    assert client.error is None
    counters = [s.counter for s in client.samples]
    assert len(counters) == 20
    assert counters == list(range(counters[0], counters[0] + 20))
    assert client.continuity().ok, client.continuity().reason
    lat = client.latency()
    assert 0 < lat.min <= lat.median <= lat.max < 5.0

    # A connected socket (as the lab makes inside a namespace) works too; the counter is the
    # guest's, so it goes on from where the first connection left it.
    sock = socket.create_connection(("127.0.0.1", guest.counter_port), timeout=10)
    again = CounterClient(*await open_lines(sock=sock))
    try:
        await again.run(count=3)
    finally:
        await again.close()
    assert again.error is None
    assert [s.counter for s in again.samples] == [counters[-1] + i for i in (1, 2, 3)]


@pytest.mark.real
async def test_disk_service_writes_reads_and_checks(guest: BootedGuest) -> None:
    client = DiskWriterClient(*await open_lines("127.0.0.1", guest.disk_port))
    try:
        await client.run(count=200)
        assert client.error is None
        assert client.last_acked == 200
        assert [a.sector for a in client.acked] == list(range(1, 201))
        assert await client.read(100)
        assert not await client.read(300)
        assert (await client.verify(1, 200)).ok
        partial = await client.verify(150, 250)
        assert (partial.missing, partial.first_missing) == (50, 201)
        t = time.monotonic()
        big = await client.verify(1, 4000)
        check_s = time.monotonic() - t
        assert (big.missing, big.first_missing) == (3800, 201)
        print(f"\ncheck of 4000 sectors: {check_s:.2f} s")
        assert check_s < 10.0
        with pytest.raises(LabError, match="sector 0"):
            await client.write(0)
    finally:
        await client.close()
    # The acked write reached the disk image QEMU serves, not only the guest's cache.
    with guest.disk.open("rb") as f:
        f.seek(123 * 512)
        assert f.read(512) == b"ftd-record 123".ljust(511) + b"\n"


@pytest.mark.real
async def test_stats_show_work_growing_under_steady_load(guest: BootedGuest) -> None:
    first = await read_stats(*await open_lines("127.0.0.1", guest.stats_port))
    await asyncio.sleep(3.0)
    second = await read_stats(*await open_lines("127.0.0.1", guest.stats_port))
    assert second.uptime - first.uptime >= 2.9
    grown = second.work_mib - first.work_mib
    # steady:2 dirties 2 MiB per step of at least 1 s: some steps in 3 s, never faster than 2 MiB/s.
    assert 2 <= grown <= 2 * (second.uptime - first.uptime) + 2, (first, second)
    assert second.work_mib <= 2 * second.uptime + 2


@pytest.mark.real
async def test_bursty_jitter_moves_each_burst_by_a_random_delay(tmp_path: Path) -> None:
    """``bursty:1:1:1:1:4``: one 1 MiB batch a burst, then 1 s idle plus 0..4 s at random.
    Burst starts (the work counter moving) are at least ON+OFF = 2 s apart, at most 2 s plus
    the jitter plus write time, and not evenly spaced: a periodic guest (no jitter) keeps one
    phase against a fixed checkpoint timer, which made the bench's fixed baseline meet the
    pause budget by luck (bench/checkpoint_policy.py)."""
    with booted_guest(tmp_path, ("bursty:1:1:1:1:4",)) as g:
        starts: list[float] = []
        last = (await read_stats(*await open_lines("127.0.0.1", g.stats_port))).work_mib
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            work = (await read_stats(*await open_lines("127.0.0.1", g.stats_port))).work_mib
            if work != last:
                starts.append(time.monotonic())
                last = work
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    print(f"\nbursty jitter: gaps between bursts {[round(x, 1) for x in gaps]} s")
    assert len(gaps) >= 5, gaps
    # Polled every 0.1 s plus a round trip: 0.5 s of slack either side.
    assert all(1.5 <= x <= 2 + 4 + 1.5 for x in gaps), gaps
    # Seven draws from 0..4 s all within 0.5 s of each other: probability ~1e-4.
    assert max(gaps) - min(gaps) >= 0.5, gaps
