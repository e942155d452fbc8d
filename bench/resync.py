"""``python -m bench.resync [--quick] [--disk-mib N] [--link-mbit M] [--seed S]``: reprotect's
disk resync, incremental (:mod:`ftd.qemu.resync`) against full (``drive-mirror sync=full``),
side by side.

Two lab hosts (network namespaces on one bridge): ``pa`` runs a primary QEMU (TCG, the lab
guest booting), ``sb`` a secondary waiting for its resync, the QEMU command lines ftd uses;
the primary's uplink is shaped to ``--link-mbit`` (default 1000: a 1 GbE replication link;
unshaped veth runs at memory speed, which no real link does).
Both disks start as the same random image ("the disk as it was when the old primary
failed"); then a fraction of its 64 KiB chunks, picked at random (seeded), is rewritten on the
primary's copy. For each fraction (1 %, 10 %, 50 %):

- incremental: the secondary's ftd-side digest of its disk, then the primary's resync
  (digest, bitmap, backup rounds, last round paused);
- full: the secondary's disk put back to the old image, then the full mirror.

The incremental copy runs at every fraction, also where it loses: ftd itself copies the whole
disk when more than ``resync.INCREMENTAL_MAX_FRACTION`` (30 %) of the chunks differ, a bound
this bench's crossing lines gave.

Figures: wall seconds from the start of the resync (the secondary's digest included for the
incremental one) to both disks identical with the primary paused, and the bytes the copy sent
(QEMU's job lengths; a full mirror sends the whole disk). After each copy the two disk files
are compared chunk by chunk: a difference fails the run.

Progress goes to stderr; the last stdout line is one JSON object::

    {"0.01": {"changed_chunks": K, "incremental": {"seconds", "bytes"},
              "full": {"seconds", "bytes"}, "bytes_ratio": i/f, "seconds_ratio": i/f},
     "0.1": {...}, "0.5": {...}, "disk_mib": N, "link_mbit": M, "chunk_bytes": C, "seed": S}

Exit 0 when every copy left identical disks; 1 otherwise, with ``error`` in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftd.errors import FtError, LabError
from ftd.log import setup_logging
from ftd.qemu import colo, resync
from ftd.qemu.process import QemuProcess, prepare_disks
from ftd.qemu.qmp import QmpSession
from ftd.qemu.runtime import QemuRuntime
from ftd.qemu.spec import QemuVmSpec
from lab.image import GuestImage, build_guest, guest_append
from lab.netns import Lab

FRACTIONS = (0.01, 0.10, 0.50)
PRIMARY, SECONDARY = "pa", "sb"


def progress(msg: str) -> None:
    print(f"[bench.resync] {msg}", file=sys.stderr, flush=True)


def make_spec(
    lab: Lab, host: str, peer: str, *, base: Path, guest: GuestImage, mib: int
) -> QemuVmSpec:
    d = base / host
    return QemuVmSpec(
        name="vm1",
        memory_mib=128,
        vcpus=1,
        accel="tcg",
        machine="pc",
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest_append(f"{lab.subnet.rsplit('.', 1)[0]}.100/24", ("idle",)),
        disk_path=d / "disk.raw",
        disk_size_mib=mib,
        overlay_dir=d,
        nics=(),
        run_dir=d / "run",
        local_address=lab.address(host),
        peer_address=lab.address(peer),
        port_base=23000,
    )


def write_random(path: Path, size: int, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n


def rewrite_chunks(path: Path, chunks: Sequence[int], chunk: int, rng: random.Random) -> None:
    with path.open("r+b") as f:
        for c in chunks:
            f.seek(c * chunk)
            f.write(rng.randbytes(chunk))


class Qemu:
    """One QEMU of the pair, launched in its lab host's namespace."""

    def __init__(self, lab: Lab, spec: QemuVmSpec, role: str, runtime: QemuRuntime) -> None:
        self.lab, self.spec, self.role, self.runtime = lab, spec, role, runtime
        self.proc: QemuProcess | None = None
        self.qmp: QmpSession | None = None

    async def start(self) -> QmpSession:
        await prepare_disks(self.spec, self.role, self.runtime)
        prefix = ("ip", "netns", "exec", self.lab.netns(self.host))
        self.proc = await QemuProcess.launch(self.spec, self.role, self.runtime, exec_prefix=prefix)
        self.qmp = QmpSession(f"{self.role}@{self.host}", self.spec.qmp_socket)
        await self.qmp.connect(retry_until=10.0)
        if self.role == "secondary":
            await colo.prepare_secondary(self.qmp, self.spec)
        return self.qmp

    @property
    def host(self) -> str:
        return PRIMARY if self.role == "primary" else SECONDARY

    async def stop(self) -> None:
        if self.qmp is not None:
            await self.qmp.close()
        if self.proc is not None:
            await self.proc.stop(grace_s=1.0)
        self.proc = self.qmp = None


def differing(a: Path, b: Path) -> list[int]:
    return resync.changed_chunks(
        resync.disk_digest(a, resync.GRANULARITY), resync.disk_digest(b, resync.GRANULARITY)
    )


async def one_fraction(
    lab: Lab,
    *,
    pri: QemuVmSpec,
    sec: QemuVmSpec,
    runtime: QemuRuntime,
    old: Path,
    fraction: float,
    rng: random.Random,
) -> dict[str, Any]:
    size = pri.disk_size_mib << 20
    n_chunks = size // resync.GRANULARITY
    picked = sorted(rng.sample(range(n_chunks), max(1, round(fraction * n_chunks))))
    shutil.copyfile(old, pri.disk_path)
    rewrite_chunks(pri.disk_path, picked, resync.GRANULARITY, rng)
    out: dict[str, Any] = {"changed_chunks": len(picked)}
    primary = Qemu(lab, pri, "primary", runtime)
    try:
        p = await primary.start()
        for mode in ("incremental", "full"):
            shutil.copyfile(old, sec.disk_path)
            secondary = Qemu(lab, sec, "secondary", runtime)
            try:
                await secondary.start()
                started = time.monotonic()
                if mode == "incremental":
                    theirs = await asyncio.to_thread(resync.disk_digest, sec.disk_path)
                    r = await resync.copy_changed(
                        p,
                        disk_path=pri.disk_path,
                        peer=pri.peer_address,
                        nbd_port=pri.nbd_port,
                        theirs=theirs,
                    )
                    sent = r.copied_bytes
                else:
                    await colo.mirror_disk(p, pri)
                    sent = size
                took = time.monotonic() - started
                diff = await asyncio.to_thread(differing, pri.disk_path, sec.disk_path)
                if diff:
                    raise LabError(f"{mode} resync at {fraction:.0%}: disks differ in {diff[:8]}")
                await p.execute("cont")
                out[mode] = {"seconds": round(took, 3), "bytes": sent}
                progress(f"{fraction:.0%} {mode}: {sent >> 20} MiB in {took:.2f} s")
            finally:
                await secondary.stop()
    finally:
        await primary.stop()
    out["bytes_ratio"] = round(out["incremental"]["bytes"] / out["full"]["bytes"], 4)
    out["seconds_ratio"] = round(out["incremental"]["seconds"] / out["full"]["seconds"], 3)
    return out


async def bench(lab: Lab, mib: int, seed: int, guest: GuestImage) -> dict[str, Any]:
    runtime = QemuRuntime()
    runtime.require_colo("tcg")
    base = lab.workdir / "resync"
    pri = make_spec(lab, PRIMARY, SECONDARY, base=base, guest=guest, mib=mib)
    sec = make_spec(lab, SECONDARY, PRIMARY, base=base, guest=guest, mib=mib)
    for spec in (pri, sec):
        spec.disk_path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    old = base / "old.raw"
    write_random(old, mib << 20, rng)
    res: dict[str, Any] = {}
    for f in FRACTIONS:
        res[str(f)] = await one_fraction(
            lab, pri=pri, sec=sec, runtime=runtime, old=old, fraction=f, rng=rng
        )
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.resync", description=__doc__)
    p.add_argument("--disk-mib", type=int, default=256, help="disk size (default 256 MiB)")
    p.add_argument("--quick", action="store_true", help="a 32 MiB disk")
    p.add_argument("--link-mbit", type=int, default=1000, help="link rate (0: unshaped)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    mib = 32 if args.quick else args.disk_mib
    if not 8 <= mib <= 4096:
        p.error(f"--disk-mib {mib}: between 8 and 4096")
    setup_logging("warning", json=False)
    if args.link_mbit < 0:
        p.error(f"--link-mbit {args.link_mbit}: must be >= 0")
    out: dict[str, Any] = {
        "disk_mib": mib,
        "link_mbit": args.link_mbit,
        "chunk_bytes": resync.GRANULARITY,
        "seed": args.seed,
    }
    started = time.monotonic()
    try:
        with Lab([PRIMARY, SECONDARY]) as lab:
            if args.link_mbit:
                lab.shape(PRIMARY, args.link_mbit)
            out |= asyncio.run(bench(lab, mib, args.seed, build_guest()))
    except (FtError, OSError) as err:
        out["error"] = str(err).splitlines()[0]
        progress(f"FAILED: {err}")
    progress(f"done in {time.monotonic() - started:.0f} s")
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
