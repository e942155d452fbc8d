"""A multi-host lab on one machine: Linux network namespaces on one L2 switch, faults on demand.

Topology of lab ``ID`` with hosts ``h0..hn`` on subnet ``10.88.K.0/24``::

    ftdlab-ID-sw   bridge sw0 ── p-h0 ── p-h1 ── ...        (switch ends of the veth pairs)
                               │        │
    ftdlab-ID-h0   up0 ── br0 10.88.K.10/24 ── taps added later by ftd (QEMU)
    ftdlab-ID-h1   up0 ── br0 10.88.K.11/24 ── ...

Every host, and every VM bridged onto a host's ``br0``, shares one L2 segment.  Nothing is
created in the root namespace.  IPv6 is off in every lab namespace so no neighbour discovery
or router solicitation noise reaches the wire.

Faults:

- ``cut(host)`` takes the switch port of the host down: the host and its VMs lose everyone.
- ``partition(a, b)`` drops every frame between the switch ports of ``a`` and ``b`` (ebtables
  in the switch namespace), so VMs behind ``a`` and ``b`` are separated too; each of them still
  reaches every other host.

The lab's description (subnet index and host order) is kept on the switch bridge's alias, so
a lab created by one process can be attached to by another (the CLI) with nothing on disk but
the lab's work directory ``/tmp/ftdlab-ID``.

A lab created with ``reaper=True`` (the default) starts ``python -m lab.reaper`` which destroys
the lab when the creating process dies, however it dies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import fcntl
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ftd.errors import LabError
from ftd.log import get_logger
from lab.broker import Broker

PREFIX = "ftdlab-"
NETNS_DIR = Path("/run/netns")
LOCK_FILE = Path("/run/lock/ftdlab.lock")
WORK_ROOT = Path(tempfile.gettempdir())
SWITCH = "sw"
UPLINK = "up0"
HOST_BRIDGE = "br0"
SWITCH_BRIDGE = "sw0"
BROKER_HOST = "broker"
_ALIAS_TAG = "ftdlab v1"
_ALIAS_MAX = 255
_FIRST_HOST_OCTET = 10
_LAST_HOST_OCTET = 254
_MAX_SUBNETS = 256
_CLONE_NEWNET = 0x40000000
_ID_RE = re.compile(r"^[0-9a-z]{1,8}$")
_HOST_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_KILL_GRACE_S = 2.0
_VANISH_S = 5.0

_libc = ctypes.CDLL(None, use_errno=True)


def namespace_name(lab_id: str, name: str) -> str:
    """The network namespace name of ``name`` (a host, or ``sw``) in lab ``lab_id``."""
    return f"{PREFIX}{lab_id}-{name}"


def workdir_of(lab_id: str) -> Path:
    """The work directory of lab ``lab_id`` (removed with the lab)."""
    return WORK_ROOT / f"{PREFIX}{lab_id}"


def list_namespaces() -> dict[str, list[str]]:
    """Every lab namespace present, grouped by lab id: ``{id: [namespace, ...]}``."""
    labs: dict[str, list[str]] = {}
    if not NETNS_DIR.is_dir():
        return labs
    for entry in sorted(os.listdir(NETNS_DIR)):
        if not entry.startswith(PREFIX):
            continue
        lab_id, sep, _ = entry[len(PREFIX) :].partition("-")
        if sep:
            labs.setdefault(lab_id, []).append(entry)
    return labs


def namespace_pids(namespaces: Sequence[str]) -> dict[str, list[int]]:
    """The processes living in each named namespace (what ``ip netns pids`` reports)."""
    wanted: dict[tuple[int, int], str] = {}
    for name in namespaces:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(NETNS_DIR / name)
            wanted[(st.st_dev, st.st_ino)] = name
    found: dict[str, list[int]] = {name: [] for name in namespaces}
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        # A process may exit between listdir and stat; that is not an error.
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{entry}/ns/net")
            owner = wanted.get((st.st_dev, st.st_ino))
            if owner is not None:
                found[owner].append(int(entry))
    return found


def process_name(pid: int) -> str:
    """The command line of ``pid`` for display, or ``?`` when it has gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"


def _kill_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def teardown(lab_id: str) -> list[str]:
    """Kill every process in lab ``lab_id``'s namespaces, delete them and its work directory.

    Idempotent: parts already gone are not problems.  Returns what could not be removed (empty
    when everything went); never raises.
    """
    problems: list[str] = []
    names = list_namespaces().get(lab_id, [])
    deadline = time.monotonic() + _VANISH_S
    survivors: dict[str, list[int]] = {}
    while names:
        survivors = {ns: p for ns, p in namespace_pids(names).items() if p}
        if not survivors or time.monotonic() > deadline:
            break
        _kill_pids([pid for pids in survivors.values() for pid in pids], signal.SIGKILL)
        time.sleep(0.02)
    for ns, pids in survivors.items():
        problems.append(f"{ns}: processes still alive after SIGKILL: {pids}")
    if names:
        batch = "".join(f"netns delete {ns}\n" for ns in names)
        # -force keeps going past a namespace that vanished meanwhile; failures are rechecked.
        subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input=batch,
            capture_output=True,
            text=True,
            check=False,
        )
    for ns in list_namespaces().get(lab_id, []):
        problems.append(f"{ns}: namespace could not be deleted")
    work = workdir_of(lab_id)
    try:
        shutil.rmtree(work)
    except FileNotFoundError:
        pass
    except OSError as err:
        problems.append(f"{work}: {err}")
    return problems


def teardown_all() -> list[str]:
    """Tear down every lab found (namespaces ``ftdlab-*`` and work dirs ``/tmp/ftdlab-*``).

    Returns what could not be removed; never raises.
    """
    ids = set(list_namespaces())
    ids.update(p.name[len(PREFIX) :] for p in WORK_ROOT.glob(f"{PREFIX}*") if p.is_dir())
    problems: list[str] = []
    for lab_id in sorted(ids):
        problems.extend(teardown(lab_id))
    return problems


def _ip(args: Sequence[str], *, netns: str | None = None, batch: str | None = None) -> str:
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    argv += ["-batch", "-"] if batch is not None else list(args)
    try:
        res = subprocess.run(argv, input=batch, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise LabError("the 'ip' command (iproute2) is not installed") from err
    if res.returncode != 0:
        what = " ".join(argv) if batch is None else f"{' '.join(argv)} <<{batch!r}"
        raise LabError(f"{what} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def _open_netns(name: str) -> int:
    try:
        return os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise LabError(f"network namespace {name} does not exist") from err


@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``name``, then switch back.

    Sockets created in the body stay in ``name``.  Raises LabError when the namespace does not
    exist or the switch fails.
    """
    target = _open_netns(name)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def _write_sysctl(path: str, value: str) -> None:
    # /proc/sys/net is resolved in the opener's current network namespace.
    with open(path, "w") as f:
        f.write(value)


@dataclass(frozen=True)
class LabInfo:
    """What the kernel tells about an existing lab (read from its switch bridge alias)."""

    lab_id: str
    index: int
    hosts: tuple[str, ...]


def _parse_alias(lab_id: str, alias: str) -> LabInfo:
    fields = dict(f.split("=", 1) for f in alias[len(_ALIAS_TAG) :].split() if "=" in f)
    try:
        return LabInfo(lab_id, int(fields["k"]), tuple(fields["hosts"].split(",")))
    except (KeyError, ValueError) as err:
        raise LabError(
            f"lab {lab_id}: unreadable description {alias!r} on {SWITCH_BRIDGE}"
        ) from err


def read_lab(lab_id: str) -> LabInfo:
    """Describe existing lab ``lab_id``.  Raises LabError when it does not exist or is broken."""
    ns = namespace_name(lab_id, SWITCH)
    if not (NETNS_DIR / ns).exists():
        raise LabError(f"no lab {lab_id!r} (namespace {ns} does not exist)")
    out = _ip(["-o", "link", "show", SWITCH_BRIDGE], netns=ns)
    match = re.search(r"\balias (.*)$", out.strip())
    if match is None or not match.group(1).startswith(_ALIAS_TAG):
        raise LabError(f"lab {lab_id}: {SWITCH_BRIDGE} carries no lab description")
    return _parse_alias(lab_id, match.group(1))


def _used_indexes() -> set[int]:
    used: set[int] = set()
    for lab_id in list_namespaces():
        # A lab half-built or half-destroyed has no readable description: its index is free.
        with contextlib.suppress(LabError):
            used.add(read_lab(lab_id).index)
    return used


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    # Serialises index choice and switch creation between processes creating labs at once.
    # Not a lock on /run/netns itself: `ip netns add` flocks that directory and would deadlock.
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _validate_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    if isinstance(hosts, str):
        raise LabError(f"hosts must be a list of names, not the string {hosts!r}")
    if not hosts:
        raise LabError("a lab needs at least one host")
    for h in hosts:
        if not isinstance(h, str) or not _HOST_RE.match(h):
            raise LabError(
                f"bad host name {h!r}: use 1-10 lowercase letters/digits starting with a letter"
            )
        if h == SWITCH:
            raise LabError(f"host name {SWITCH!r} is reserved for the switch")
    dupes = sorted({h for h in hosts if list(hosts).count(h) > 1})
    if dupes:
        raise LabError(f"duplicate host names: {', '.join(dupes)}")
    if len(hosts) > _LAST_HOST_OCTET - _FIRST_HOST_OCTET + 1:
        raise LabError(f"too many hosts ({len(hosts)})")
    return tuple(hosts)


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


class Lab:
    """A set of hosts (network namespaces) on one switch; see the module docstring.

    ``Lab(hosts, lab_id=None, broker=False, reaper=True)``: ``broker=True`` adds a host named
    ``broker`` running mosquitto (``lab.broker``).  Use as a context manager or call
    ``create()`` / ``destroy()``.
    """

    def __init__(
        self,
        hosts: Sequence[str],
        lab_id: str | None = None,
        *,
        broker: bool = False,
        reaper: bool = True,
    ) -> None:
        """Describe a lab; nothing is built until ``create()``.

        Raises LabError for a bad host list or lab id.
        """
        names = list(_validate_hosts(hosts))
        if broker and BROKER_HOST not in names:
            names.append(BROKER_HOST)
        if lab_id is None:
            lab_id = secrets.token_hex(3)
        elif not _ID_RE.match(lab_id):
            raise LabError(f"bad lab id {lab_id!r}: use 1-8 lowercase letters/digits")
        self.id = lab_id
        self.hosts: tuple[str, ...] = tuple(names)
        self.index = -1
        self.workdir = workdir_of(lab_id)
        self._want_broker = broker
        self._want_reaper = reaper
        self._broker: Broker | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._procs: list[tuple[subprocess.Popen[Any], bool]] = []
        self._executors: list[concurrent.futures.ThreadPoolExecutor] = []
        self._log = get_logger(lab=lab_id)

    @classmethod
    def attach(cls, lab_id: str) -> Lab:
        """A handle on an existing lab (created by another process).

        Destroying it tears the lab down.  Raises LabError when the lab does not exist.
        """
        info = read_lab(lab_id)
        lab = cls(info.hosts, lab_id, reaper=False)
        lab.index = info.index
        return lab

    def __enter__(self) -> Lab:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- building -------------------------------------------------------------------------

    def create(self) -> Lab:
        """Build the namespaces, switch and links; start the reaper and the broker if asked.

        Raises LabError (after removing whatever was built) when any step fails, including when
        a lab with this id already exists.
        """
        if self.index >= 0:
            raise LabError(f"lab {self.id} is already created")
        if self.id in list_namespaces() or self.workdir.exists():
            raise LabError(
                f"lab {self.id} already exists (remove it first: python -m lab down {self.id})"
            )
        started = time.monotonic()
        try:
            if self._want_reaper:
                self._start_reaper()
            self.workdir.mkdir(mode=0o755)
            with _allocation_lock():
                self.index = self._free_index()
                self._build()
            if self._want_broker:
                self._broker = Broker(self, BROKER_HOST)
                self._broker.start()
        except BaseException:
            self.destroy()
            raise
        self._log.info(
            "lab created", hosts=list(self.hosts), seconds=round(time.monotonic() - started, 3)
        )
        return self

    def _free_index(self) -> int:
        used = _used_indexes()
        for k in range(_MAX_SUBNETS):
            if k not in used:
                return k
        raise LabError(f"no free lab subnet: {_MAX_SUBNETS} labs exist")

    def _start_reaper(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self._reaper = subprocess.Popen(
            [sys.executable, "-m", "lab.reaper", str(os.getpid()), self.id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        assert self._reaper.stdout is not None
        # The reaper holds a pidfd on us once it says so: no pid-reuse window after that.
        line = self._reaper.stdout.readline()
        self._reaper.stdout.close()
        if line.strip() != b"ready":
            raise LabError(f"lab reaper failed to start (exit {self._reaper.wait()})")

    def _build(self) -> None:
        sw = namespace_name(self.id, SWITCH)
        all_ns = [sw] + [self.netns(h) for h in self.hosts]
        _ip([], batch="".join(f"netns add {ns}\n" for ns in all_ns))
        for ns in all_ns:
            with inside_netns(ns):
                for conf in ("all", "default"):
                    _write_sysctl(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "1")
        alias = f"{_ALIAS_TAG} k={self.index} hosts={','.join(self.hosts)}"
        if len(alias) > _ALIAS_MAX:
            raise LabError(f"too many hosts for one lab description ({len(alias)} chars)")
        sw_cmds = [
            f"link add {SWITCH_BRIDGE} type bridge",
            f'link set {SWITCH_BRIDGE} alias "{alias}"',
            f"link set {SWITCH_BRIDGE} up",
            "link set lo up",
        ]
        for h in self.hosts:
            sw_cmds += [
                f"link add {self._port(h)} type veth peer name {UPLINK} netns {self.netns(h)}",
                f"link set {self._port(h)} master {SWITCH_BRIDGE}",
                f"link set {self._port(h)} up",
            ]
        _ip([], netns=sw, batch="\n".join(sw_cmds) + "\n")
        for i, h in enumerate(self.hosts):
            # A fixed bridge MAC: otherwise br0 takes the lowest port MAC and changes it (and
            # stales every neighbour's ARP cache) when ftd adds a QEMU tap.
            mac = f"02:88:{self.index:02x}:00:{i >> 8:02x}:{i & 0xFF:02x}"
            host_cmds = [
                "link set lo up",
                f"link add {HOST_BRIDGE} address {mac} type bridge",
                f"link set {UPLINK} master {HOST_BRIDGE}",
                f"link set {UPLINK} up",
                f"link set {HOST_BRIDGE} up",
                f"addr add {self.address(h)}/24 dev {HOST_BRIDGE}",
            ]
            _ip([], netns=self.netns(h), batch="\n".join(host_cmds) + "\n")

    # -- naming ---------------------------------------------------------------------------

    def _check_host(self, host: str) -> None:
        if host not in self.hosts:
            raise LabError(f"lab {self.id} has no host {host!r} (hosts: {', '.join(self.hosts)})")

    def _check_created(self) -> None:
        if self.index < 0:
            raise LabError(f"lab {self.id} is not created")

    @staticmethod
    def _port(host: str) -> str:
        return f"p-{host}"

    @property
    def subnet(self) -> str:
        """The lab subnet, ``10.88.K.0/24``.  Raises LabError before ``create()``."""
        self._check_created()
        return f"10.88.{self.index}.0/24"

    def address(self, host: str) -> str:
        """The IPv4 address of ``host`` (on its ``br0``).  Raises LabError for an unknown host."""
        self._check_host(host)
        self._check_created()
        return f"10.88.{self.index}.{_FIRST_HOST_OCTET + self.hosts.index(host)}"

    def netns(self, host: str) -> str:
        """The network namespace name of ``host``.  Raises LabError for an unknown host."""
        self._check_host(host)
        return namespace_name(self.id, host)

    @property
    def broker(self) -> Broker:
        """The lab's mosquitto broker.  Raises LabError when the lab was made without one."""
        if self._broker is None:
            raise LabError(f"lab {self.id} has no broker (create it with broker=True)")
        return self._broker

    # -- running things in hosts ----------------------------------------------------------

    def _exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str) or not argv:
            raise LabError(f"argv must be a non-empty list of strings, got {argv!r}")
        return ["ip", "netns", "exec", self.netns(host), *argv]

    def run(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run(argv, **kw)`` inside ``host``.

        Raises LabError for an unknown host; ``subprocess`` errors as ``subprocess.run`` does.
        """
        check = bool(kw.pop("check", False))
        return subprocess.run(self._exec_argv(host, argv), check=check, **kw)

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen(argv, **kw)`` inside ``host``, in a new session by default.

        The process and its process group are killed at ``destroy()``.  Raises LabError for an
        unknown host.
        """
        kw.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self._exec_argv(host, argv), **kw)
        self._procs.append((proc, bool(kw["start_new_session"])))
        return proc

    def socket(
        self,
        host: str,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        """A socket created inside ``host``'s namespace (usable from any thread).

        Raises LabError for an unknown host or a failed namespace switch; OSError from
        ``socket.socket``.
        """
        with inside_netns(self.netns(host)):
            return socket.socket(family, type, proto)

    async def open_connection(
        self, host: str, addr: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """asyncio streams for a TCP connection from ``host`` to ``addr:port``.

        Bound it with ``asyncio.timeout``.  Raises LabError for an unknown host, OSError when
        the connection fails.
        """
        sock = self.socket(host, socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (addr, port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    def executor(self, host: str) -> concurrent.futures.ThreadPoolExecutor:
        """A thread pool whose threads live in ``host``'s namespace; shut down at ``destroy()``.

        Install it with ``loop.set_default_executor`` to make libraries that connect from the
        default executor (aiomqtt) connect from ``host``.  Raises LabError for an unknown host.
        """
        target = self.netns(host)

        def enter() -> None:
            fd = _open_netns(target)
            try:
                _setns(fd)
            finally:
                os.close(fd)

        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix=f"lab-{host}", initializer=enter
        )
        self._executors.append(pool)
        return pool

    def ping(self, host: str, addr: str, *, timeout: float = 1.0) -> bool:
        """Whether ``addr`` answers one ICMP echo sent from ``host`` within ``timeout`` seconds.

        Raises LabError for an unknown host.
        """
        ident = secrets.randbits(16)
        payload = b"ftdlab"
        header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
        packet = struct.pack("!BBHHH", 8, 0, _icmp_checksum(header + payload), ident, 1) + payload
        deadline = time.monotonic() + timeout
        with self.socket(host, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
            try:
                sock.sendto(packet, (addr, 0))
            except OSError:
                # Unreachable (no route, link down) is an answer: no reply.
                return False
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                data, (src, _) = sock.recvfrom(2048)
                ihl = (data[0] & 0x0F) * 4
                kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl : ihl + 8])
                if src == addr and kind == 0 and rid == ident:
                    return True
        return False

    # -- faults ---------------------------------------------------------------------------

    def _switch_ip(self, args: Sequence[str]) -> None:
        _ip(args, netns=namespace_name(self.id, SWITCH))

    def cut(self, host: str) -> None:
        """Take ``host``'s switch port down: it and its VMs lose every other host.

        Raises LabError for an unknown host or when the link cannot be changed.
        """
        self._check_host(host)
        self._switch_ip(["link", "set", self._port(host), "down"])

    def restore(self, host: str) -> None:
        """Bring ``host``'s switch port back up (undo ``cut``).  Raises LabError as ``cut``."""
        self._check_host(host)
        self._switch_ip(["link", "set", self._port(host), "up"])

    def shape(self, host: str, mbit: int) -> None:
        """Limit what ``host`` sends to ``mbit`` Mbit/s (a token bucket on its uplink): a
        replication link of a real speed instead of a veth at memory speed.

        Raises LabError for an unknown host, a rate below 1 or when tc fails.
        """
        self._check_host(host)
        if mbit < 1:
            raise LabError(f"link rate {mbit} Mbit/s: must be >= 1")
        tbf = ["tbf", "rate", f"{mbit}mbit", "burst", "256kb", "latency", "50ms"]
        res = self.run(
            host,
            ["tc", "qdisc", "replace", "dev", UPLINK, "root", *tbf],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            raise LabError(f"shaping {host} to {mbit} Mbit/s failed: {res.stderr.strip()}")

    def _ebtables(self, args: Sequence[str]) -> str:
        argv = ["ip", "netns", "exec", namespace_name(self.id, SWITCH), "ebtables", *args]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError as err:
            raise LabError("the 'ip' command (iproute2) is not installed") from err
        if res.returncode != 0:
            raise LabError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
        return res.stdout

    def _drop_rules(self) -> set[tuple[str, str]]:
        # Read from the kernel, not remembered: another process (the CLI) may have set them.
        ports = {self._port(h): h for h in self.hosts}
        found: set[tuple[str, str]] = set()
        for line in self._ebtables(["-L", "FORWARD"]).splitlines():
            m = re.fullmatch(r"-i (\S+) -o (\S+) -j DROP", line.strip())
            if m and m.group(1) in ports and m.group(2) in ports:
                found.add((ports[m.group(1)], ports[m.group(2)]))
        return found

    def partitions(self) -> set[tuple[str, str]]:
        """The partitioned host pairs, each as a sorted ``(a, b)``.

        Raises LabError when the switch filter cannot be read.
        """
        return {self._pair(a, b) for a, b in self._drop_rules()}

    def partition(self, a: str, b: str) -> None:
        """Drop every frame between ``a`` and ``b`` (both directions, VMs behind them included).

        Each still reaches every other host.  Partitioning a partitioned pair is a no-op.
        Raises LabError for unknown or equal hosts, or when the filter cannot be installed.
        """
        a, b = self._pair(a, b)
        present = self._drop_rules()
        for src, dst in ((a, b), (b, a)):
            if (src, dst) not in present:
                rule = ["FORWARD", "-i", self._port(src), "-o", self._port(dst), "-j", "DROP"]
                self._ebtables(["-A", *rule])

    def heal(self, a: str, b: str) -> None:
        """Undo ``partition(a, b)``; healing a pair that is not partitioned is a no-op.

        Raises LabError as ``partition``.
        """
        a, b = self._pair(a, b)
        present = self._drop_rules()
        for src, dst in ((a, b), (b, a)):
            if (src, dst) in present:
                rule = ["FORWARD", "-i", self._port(src), "-o", self._port(dst), "-j", "DROP"]
                self._ebtables(["-D", *rule])

    def _pair(self, a: str, b: str) -> tuple[str, str]:
        self._check_host(a)
        self._check_host(b)
        if a == b:
            raise LabError(f"cannot partition host {a!r} from itself")
        lo, hi = sorted((a, b))
        return (lo, hi)

    # -- teardown -------------------------------------------------------------------------

    def processes(self) -> dict[str, list[int]]:
        """The pids living in each host's namespace (and ``sw``), keyed by host name."""
        names = {namespace_name(self.id, h): h for h in (SWITCH, *self.hosts)}
        return {names[ns]: pids for ns, pids in namespace_pids(list(names)).items()}

    def destroy(self) -> list[str]:
        """Stop the broker and every ``popen``'d process group, delete the namespaces and the
        work directory, stop the reaper.

        Idempotent; never raises for parts already gone.  Returns (and logs) what could not be
        removed: an empty list means the lab is entirely gone.
        """
        started = time.monotonic()
        if self._broker is not None:
            self._broker.close()
        for pool in self._executors:
            pool.shutdown(wait=False, cancel_futures=True)
        self._executors.clear()
        self._stop_processes()
        problems = teardown(self.id)
        if self._reaper is not None:
            with contextlib.suppress(ProcessLookupError):
                self._reaper.terminate()
            self._reaper.wait()
            self._reaper = None
        self.index = -1
        for problem in problems:
            self._log.warning("lab teardown incomplete", problem=problem)
        self._log.info("lab destroyed", seconds=round(time.monotonic() - started, 3))
        return problems

    def _stop_processes(self) -> None:
        live = [(p, group) for p, group in self._procs if p.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc, group in live:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if group:
                        # A session leader's pid is its group id; members may outlive it.
                        os.killpg(proc.pid, sig)
                    else:
                        proc.send_signal(sig)
            deadline = time.monotonic() + _KILL_GRACE_S
            while live and time.monotonic() < deadline:
                live = [(p, g) for p, g in live if p.poll() is None]
                if live:
                    time.sleep(0.02)
            if not live:
                break
        for proc, _ in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_KILL_GRACE_S)
        self._procs.clear()
