"""The lab guest: the host's Debian kernel plus a busybox initramfs running the lab workloads.

:func:`build_guest` writes a kernel and ``initrd-KVER.img`` into a cache directory and returns
their paths.  The kernel is by default ``vmlinux-KVER``, the ELF image unpacked from the Debian
bzImage: QEMU boots it through its PVH entry point, which skips the in-guest decompression of
the xz payload (measured under TCG on 2 cores: 'ftd-guest up' after about 4.5 s instead of
7.5 s).  ``pvh=False`` gives the bzImage itself (``vmlinuz-KVER``).

The initramfs holds busybox (one symlink per applet in /bin), the scripts of ``lab/guest/``
(``/init`` and the services under ``/svc``), and the kernel modules for the lab's virtual
hardware with everything they depend on, listed in load order in ``/etc/ftd-modules``.
:func:`guest_append` builds the kernel command line the guest's /init reads (``ftd.ip=``,
``ftd.workload=``).

The build is skipped when the stamp in the cache matches a hash of every input; otherwise each
file is written under a temporary name and renamed, so a reader never sees half a file and two
concurrent builders agree (the archive is byte-for-byte reproducible).

``python -m lab.image [--out DIR] [--kernel-version KVER] [--bzimage]`` prints the two paths.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ftd.errors import LabError

DEFAULT_OUT = Path("/var/cache/ftd/guest")
GUEST_SCRIPTS = Path(__file__).with_name("guest")
#: Drivers for the lab's virtual hardware: the e1000 NIC and virtio-blk over PCI (the COLO
#: quorum disk is ``-drive if=virtio``: /dev/vda). IDE was dropped: under COLO the secondary's
#: guest kernel faulted in libata's BMDMA path after checkpoints (seen in the lab).
GUEST_MODULES = ("e1000", "virtio_pci", "virtio_blk")
#: Bumped when the archive layout changes, so old stamps stop matching.
_LAYOUT = 1
_SERVICES = ("counter.sh", "disk.sh", "dirty.sh", "stats.sh")
_WORKLOAD_RE = re.compile(
    r"idle|counter|disk|steady:([1-9]\d*)(?::([1-9]\d*))?"
    r"|bursty:([1-9]\d*):[1-9]\d*:\d+(?::([1-9]\d*)(?::[1-9]\d?)?)?"
)
_IP_RE = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})/(\d{1,2})")


@dataclass(frozen=True)
class GuestImage:
    """A bootable lab guest: ``-kernel kernel -initrd initrd``."""

    kernel: Path
    initrd: Path
    kernel_version: str


def newest_kernel_version(boot: Path = Path("/boot")) -> str:
    """The version of the newest ``vmlinuz-*`` in ``boot``.

    Raises LabError when there is none.
    """
    versions = [p.name.removeprefix("vmlinuz-") for p in boot.glob("vmlinuz-*")]
    if not versions:
        raise LabError(
            f"no kernel in {boot} (no vmlinuz-*): install the Debian package linux-image-amd64"
        )
    return max(versions, key=_version_key)


def _version_key(version: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", version)]


def resolve_modules(wanted: Iterable[str], depends: Callable[[str], Sequence[str]]) -> list[str]:
    """``wanted`` and, recursively, what they depend on, each after all of its dependencies.

    ``depends(name)`` lists a module's direct dependencies.  Raises LabError on a cycle.
    """
    order: list[str] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise LabError(f"kernel module dependency cycle: {cycle}")
        visiting.append(name)
        for dep in depends(name):
            visit(dep)
        visiting.pop()
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def guest_append(
    ip: str | None = None, workloads: Sequence[str] = ("idle",), console: str = "ttyS0"
) -> str:
    """The kernel command line for the lab guest.

    ``ip`` is ``A.B.C.D/P`` (None: no network); ``workloads`` items are ``idle``, ``counter``,
    ``disk``, ``steady:N[:REGION]`` or ``bursty:N:ON:OFF[:REGION[:JITTER]]`` (at most one of the
    last two; N MiB a second, to the next N MiB of a REGION-MiB buffer, REGION >= N, default N;
    each quiet spell JITTER s longer at random, 1..99, default none).
    Raises LabError naming the bad value.
    """
    parts = [f"console={console}", "quiet", "panic=-1"]
    if ip is not None:
        m = _IP_RE.fullmatch(ip)
        if not m or any(int(o) > 255 for o in m.groups()[:4]) or int(m.group(5)) > 32:
            raise LabError(f"guest ip {ip!r} is not A.B.C.D/P")
        parts.append(f"ftd.ip={ip}")
    if not workloads:
        raise LabError("guest workloads: give at least one (e.g. 'idle')")
    for w in workloads:
        m = _WORKLOAD_RE.fullmatch(w)
        if not m:
            raise LabError(
                f"guest workload {w!r} is not one of idle, counter, disk, steady:N[:REGION], "
                "bursty:N:ON:OFF[:REGION[:JITTER]] (N, ON >= 1; JITTER 1..99)"
            )
        n, region = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if region is not None and int(region) < int(n):
            raise LabError(f"guest workload {w!r}: REGION {region} is below N {n}")
    if sum(w.startswith(("steady:", "bursty:")) for w in workloads) > 1:
        raise LabError(f"guest workloads {list(workloads)}: at most one steady:/bursty:")
    parts.append("ftd.workload=" + ",".join(workloads))
    return " ".join(parts)


def build_guest(
    out_dir: Path = DEFAULT_OUT,
    kernel_version: str | None = None,
    *,
    busybox: Path = Path("/bin/busybox"),
    boot: Path = Path("/boot"),
    pvh: bool = True,
    progress: Callable[[str], None] | None = None,
) -> GuestImage:
    """Build (or reuse) the lab guest in ``out_dir``; ``kernel_version`` defaults to the newest.

    ``pvh`` unpacks the kernel for QEMU's PVH boot (see the module docstring).
    Raises LabError when the kernel, its modules or busybox are missing, the kernel cannot be
    unpacked for PVH, or ``out_dir`` cannot be written.
    """
    say = progress or (lambda _msg: None)
    kver = kernel_version or newest_kernel_version(boot)
    vmlinuz = boot / f"vmlinuz-{kver}"
    if not vmlinuz.is_file():
        raise LabError(
            f"kernel {vmlinuz} not found: install linux-image-amd64 or pick a version in {boot}"
        )
    if not busybox.is_file():
        raise LabError(f"busybox {busybox} not found: install the Debian package busybox-static")
    modules = _module_paths(kver)
    scripts = {name: (GUEST_SCRIPTS / name).read_bytes() for name in ("init", *_SERVICES)}

    digest = _inputs_digest(kver, vmlinuz, busybox, modules, scripts, pvh=pvh)
    kernel_out = out_dir / (f"vmlinux-{kver}" if pvh else f"vmlinuz-{kver}")
    initrd_out = out_dir / f"initrd-{kver}.img"
    # One stamp per kernel variant: users of both do not rebuild each other's (the initrd is
    # the same bytes for both).
    stamp = out_dir / f"stamp-{kernel_out.name}.json"
    image = GuestImage(kernel=kernel_out, initrd=initrd_out, kernel_version=kver)
    if _stamp_matches(stamp, digest) and kernel_out.is_file() and initrd_out.is_file():
        say(f"guest image for {kver} is up to date in {out_dir}")
        _link_stable_names(image)
        return image

    say(f"building guest image for {kver} in {out_dir} ({len(modules)} modules)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(kernel_out, unpack_pvh(vmlinuz) if pvh else vmlinuz.read_bytes())
        _write_atomic(initrd_out, _initramfs(busybox, modules, scripts))
        _write_atomic(stamp, json.dumps({"inputs": digest, "kernel_version": kver}).encode())
    except OSError as err:
        raise LabError(f"cannot write the guest image into {out_dir}: {err}") from err
    say(f"initrd {initrd_out.stat().st_size} bytes")
    _link_stable_names(image)
    return image


def _link_stable_names(image: GuestImage) -> None:
    """``kernel`` and ``initrd.img`` beside the versioned files: the names configs use, so a
    kernel upgrade on the host does not invalidate them. Raises LabError if they cannot be set.
    """
    for name, target in (("kernel", image.kernel), ("initrd.img", image.initrd)):
        link = target.parent / name
        tmp = target.parent / f".{name}.tmp"
        try:
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target.name)
            tmp.replace(link)
        except OSError as err:
            raise LabError(f"cannot link {link} -> {target.name}: {err}") from err


def unpack_pvh(bzimage: Path) -> bytes:
    """The ELF kernel inside ``bzimage`` (xz or gzip payload), checked to have a PVH entry.

    Raises LabError when no payload is found, it does not unpack, or it has no PVH entry note.
    """
    data = bzimage.read_bytes()
    for magic, unpack in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip)):
        at = data.find(magic)
        if at < 0:
            continue
        try:
            elf = unpack(data[at:])
        except (lzma.LZMAError, OSError, EOFError) as err:
            raise LabError(f"cannot unpack the kernel payload of {bzimage}: {err}") from err
        if not elf.startswith(b"\x7fELF\x02"):
            raise LabError(f"the payload of {bzimage} is not a 64-bit ELF kernel")
        if not _has_pvh_note(elf):
            raise LabError(f"kernel {bzimage} has no PVH entry (CONFIG_PVH); use pvh=False")
        return elf
    raise LabError(f"no xz or gzip kernel payload in {bzimage}; use pvh=False")


def _unxz(data: bytes) -> bytes:
    # The decompressor stops at the end of the stream; what follows in the bzImage is ignored.
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data)


_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def _has_pvh_note(elf: bytes) -> bool:
    """Does the ELF64 image carry the "Xen" PHYS32_ENTRY note QEMU's PVH loader looks for?"""
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    for i in range(phnum):
        ph = elf[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        if int.from_bytes(ph[0:4], "little") != _PT_NOTE:
            continue
        pos = int.from_bytes(ph[8:16], "little")
        end = pos + int.from_bytes(ph[32:40], "little")
        while pos + 12 <= end:
            namesz, descsz, kind = (
                int.from_bytes(elf[pos + k : pos + k + 4], "little") for k in (0, 4, 8)
            )
            name = elf[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\x00" and kind == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _module_paths(kver: str) -> dict[str, Path]:
    """Module name -> .ko path for GUEST_MODULES and their dependencies, in load order."""
    if not Path(f"/lib/modules/{kver}").is_dir():
        raise LabError(f"no /lib/modules/{kver}: the modules of kernel {kver} are not installed")

    def field(name: str, flag: str) -> str:
        try:
            out = subprocess.run(
                ["modinfo", "-k", kver, *flag.split(), name],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError) as err:
            raise LabError(f"modinfo cannot find module {name} of kernel {kver}: {err}") from err
        return out.stdout.strip()

    def depends(name: str) -> list[str]:
        return [d for d in field(name, "-F depends").split(",") if d]

    paths: dict[str, Path] = {}
    for name in resolve_modules(GUEST_MODULES, depends):
        path = Path(field(name, "-n"))
        if path.suffix != ".ko":
            raise LabError(f"module {name} is {path}: the guest's insmod needs an uncompressed .ko")
        paths[name] = path
    return paths


def _inputs_digest(
    kver: str,
    vmlinuz: Path,
    busybox: Path,
    modules: dict[str, Path],
    scripts: dict[str, bytes],
    *,
    pvh: bool,
) -> str:
    h = hashlib.sha256(f"layout {_LAYOUT}\nkernel {kver} pvh {pvh}\n".encode())
    for path in (vmlinuz, busybox, *modules.values()):
        st = path.stat()
        h.update(f"{path} {st.st_size} {st.st_mtime_ns}\n".encode())
    h.update(busybox.read_bytes())
    for name, body in sorted(scripts.items()):
        h.update(f"script {name} {len(body)}\n".encode())
        h.update(body)
    h.update(("modules " + " ".join(modules)).encode())
    return h.hexdigest()


def _stamp_matches(stamp: Path, digest: str) -> bool:
    try:
        return bool(json.loads(stamp.read_text()).get("inputs") == digest)
    except (OSError, ValueError, AttributeError):
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise LabError(f"cannot list the applets of {busybox}: {err}") from err
    return sorted({a for a in out.split() if a != "busybox" and "/" not in a})


def _initramfs(busybox: Path, modules: dict[str, Path], scripts: dict[str, bytes]) -> bytes:
    archive = _Cpio()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "run", "svc", "sys", "tmp"):
        archive.directory(d)
    # The kernel opens /dev/console for /init before /init can mount devtmpfs.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    # Links packed at build time spare /init a `busybox --install` on every boot.
    for applet in _applets(busybox):
        archive.symlink(f"bin/{applet}", "busybox")
    archive.file("init", scripts["init"], 0o755)
    for name in _SERVICES:
        archive.file(f"svc/{name}", scripts[name], 0o755)
    for name, path in modules.items():
        archive.file(f"lib/modules/{name}.ko", path.read_bytes(), 0o644)
    archive.file("etc/ftd-modules", "".join(f"{n}.ko\n" for n in modules).encode(), 0o644)
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


class _Cpio:
    """A newc ("070701") cpio archive, as the kernel unpacks an initramfs; owner root, mtime 0."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", ino=0)
        return b"".join(self._parts)

    def _entry(
        self, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0), ino: int = -1
    ) -> None:
        if ino < 0:
            ino = self._ino
            self._ino += 1
        raw_name = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts.append(header + raw_name + _pad4(len(header) + len(raw_name)))
        self._parts.append(data + _pad4(len(data)))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lab.image``: build the guest and print its kernel and initrd paths."""
    parser = argparse.ArgumentParser(prog="python -m lab.image", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--kernel-version", default=None, help="default: newest in /boot")
    parser.add_argument(
        "--bzimage", action="store_true", help="boot the bzImage instead of the PVH vmlinux"
    )
    args = parser.parse_args(argv)
    try:
        image = build_guest(
            args.out,
            args.kernel_version,
            pvh=not args.bzimage,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except LabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"kernel {image.kernel}")
    print(f"initrd {image.initrd}")
    print(f"kernel_version {image.kernel_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
