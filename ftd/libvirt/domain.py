"""One libvirt domain as ftd sees it: lifecycle through libvirt, COLO through an extra QMP socket.

libvirt keeps its own QMP monitor to itself; the domain XML adds a second one for ftd with
``<qemu:commandline>``.  The pure parsers here find that socket in a domain XML
(:func:`qmp_sockets`, :func:`qmp_socket_from_xml`) and QEMU's ``-name guest=...`` in a process
command line (:func:`guest_name_from_cmdline`); :class:`LibvirtDomain` runs every blocking
libvirt call in :func:`asyncio.to_thread`, bounded by a timeout, and turns every failure into a
:class:`~ftd.libvirt.LibvirtError` naming the domain, the URI and the action.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from ftd.aio import bounded
from ftd.errors import QmpError
from ftd.libvirt import LibvirtDisconnectedError, LibvirtError
from ftd.log import get_logger
from ftd.qemu.runtime import QemuVersion

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_TIMEOUT_S = 60.0

_T = TypeVar("_T")


class DomainState(enum.Enum):
    """libvirt's virDomainState, named as ``virsh domstate`` prints it."""

    NOSTATE = "no state"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutting down"
    SHUTOFF = "shut off"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @classmethod
    def from_libvirt(cls, code: int) -> DomainState:
        """The state for a virDomainState number; unknown numbers are NOSTATE."""
        return _STATE_BY_CODE.get(code, cls.NOSTATE)


_STATE_BY_CODE = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


@dataclass(frozen=True)
class QmpSocketSpec:
    """A QMP monitor on a unix socket found in ``<qemu:commandline>``."""

    path: Path
    server: bool
    wait: bool
    source: str

    @property
    def usable(self) -> bool:
        """QEMU listens (server) without blocking its start on a client (wait=off)."""
        return self.server and not self.wait


def parse_domain_xml(xml: str) -> ET.Element:
    """The root ``<domain>`` element of a domain XML.

    Raises LibvirtError if the text is not XML or its root is not ``<domain>``.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise LibvirtError(f"domain XML is not well-formed: {err}") from err
    if root.tag != "domain":
        raise LibvirtError(f"domain XML root is <{root.tag}>, expected <domain>")
    return root


def qemu_commandline_args(root: ET.Element) -> list[str]:
    """The ``<qemu:arg value=...>`` values of a domain, in order (empty without the block)."""
    return [
        arg.get("value", "")
        for block in root.findall(f"{{{QEMU_NS}}}commandline")
        for arg in block.findall(f"{{{QEMU_NS}}}arg")
    ]


def _split_opts(text: str, implied: str | None = None) -> tuple[str, dict[str, str]]:
    """QEMU's ``head,key=value,flag`` option syntax (``,,`` escapes a comma).

    With ``implied``, a first part written ``key=value`` is an option (``-name guest=X``) and
    a bare first part is the value of ``implied``.
    """
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    opts: dict[str, str] = {}
    rest = parts[1:]
    if implied is not None:
        if "=" in parts[0]:
            rest = parts
        else:
            opts[implied] = parts[0]
    for part in rest:
        key, eq, value = part.partition("=")
        if eq:
            opts[key] = value
        elif key.startswith("no"):
            # QEMU's legacy short booleans: "nowait" means wait=off, "server" means server=on.
            opts[key[2:]] = "off"
        else:
            opts[key] = "on"
    return parts[0], opts


def _on(opts: Mapping[str, str], key: str, default: bool) -> bool:
    value = opts.get(key)
    if value is None:
        return default
    return value in ("on", "yes", "true", "y")


def qmp_sockets(xml: str) -> list[QmpSocketSpec]:
    """Every QMP unix socket the domain XML's ``<qemu:commandline>`` opens.

    Recognised: ``-qmp unix:PATH[,opts]`` and ``-chardev socket,id=ID,path=PATH[,opts]`` with
    ``-mon chardev=ID,mode=control``.  QEMU's defaults apply to missing options (a ``-qmp``
    chardev given as ``unix:`` is a server that waits unless told ``wait=off``).
    Raises LibvirtError if the XML cannot be parsed.
    """
    args = qemu_commandline_args(parse_domain_xml(xml))
    found: list[QmpSocketSpec] = []
    chardevs: dict[str, QmpSocketSpec] = {}
    for flag, value in itertools.pairwise([*args, ""]):
        if flag == "-qmp" and value.startswith("unix:"):
            head, opts = _split_opts(value[len("unix:") :])
            found.append(
                QmpSocketSpec(
                    Path(head), _on(opts, "server", False), _on(opts, "wait", True), value
                )
            )
        elif flag == "-chardev":
            backend, opts = _split_opts(value)
            if backend == "socket" and "path" in opts and "id" in opts:
                chardevs[opts["id"]] = QmpSocketSpec(
                    Path(opts["path"]), _on(opts, "server", False), _on(opts, "wait", True), value
                )
        elif flag == "-mon":
            _, opts = _split_opts("mon," + value)
            spec = chardevs.get(opts.get("chardev", ""))
            if spec is not None and opts.get("mode", "readline") == "control":
                found.append(spec)
    return found


def qmp_socket_from_xml(xml: str) -> Path:
    """The path of the first usable (server, wait=off) QMP socket in the domain XML.

    Raises LibvirtError if there is none, saying what to add.
    """
    specs = qmp_sockets(xml)
    for spec in specs:
        if spec.usable:
            return spec.path
    if specs:
        raise LibvirtError(
            f"QMP socket {specs[0].path} in <qemu:commandline> is not server=on,wait=off"
        )
    raise LibvirtError(
        "the domain XML has no extra QMP socket for ftd: add <qemu:commandline> with "
        "-qmp unix:/var/lib/libvirt/qemu/ftd-NAME.qmp,server=on,wait=off (docs/libvirt.md)"
    )


def guest_name_from_cmdline(argv: list[str]) -> str | None:
    """The libvirt domain name in a QEMU argv (``-name guest=NAME,...``), or None."""
    for flag, value in itertools.pairwise([*argv, ""]):
        if flag == "-name":
            return _split_opts(value, implied="guest")[1].get("guest")
    return None


def pidfile_dir(uri: str) -> Path:
    """Where libvirt's QEMU driver writes ``NAME.pid`` for a local ``uri``.

    Raises LibvirtError for a remote URI or a driver other than QEMU.
    """
    parts = urlsplit(uri)
    driver = parts.scheme.split("+", 1)[0]
    if driver != "qemu":
        raise LibvirtError(f"{uri}: not a QEMU driver URI")
    if parts.hostname:
        raise LibvirtError(f"{uri}: QEMU's pid is only known for a local libvirtd")
    if parts.path == "/session":
        runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
        return Path(runtime) / "libvirt/qemu/run"
    return Path("/run/libvirt/qemu")


def log_path(uri: str, name: str) -> Path:
    """The file libvirt's QEMU driver sends domain ``name``'s QEMU stdout and stderr to, for a
    local ``uri`` (virtlogd or direct file handler, the same path).

    Raises LibvirtError for a remote URI or a driver other than QEMU.
    """
    run = pidfile_dir(uri)
    if run == Path("/run/libvirt/qemu"):
        return Path("/var/log/libvirt/qemu") / f"{name}.log"
    return Path.home() / ".cache/libvirt/qemu/log" / f"{name}.log"


def _read_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def find_qemu_pid(name: str, pid_dir: Path) -> int | None:
    """QEMU's pid for domain ``name``: from ``pid_dir/NAME.pid`` if that process is the
    domain's QEMU, else by scanning /proc for ``-name guest=NAME``; None if not found."""
    try:
        pid = int((pid_dir / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if pid > 0:
        argv = _read_cmdline(pid)
        if argv is not None and guest_name_from_cmdline(argv) == name:
            return pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _read_cmdline(int(entry.name))
            if argv and "-name" in argv and guest_name_from_cmdline(argv) == name:
                return int(entry.name)
    return None


def wrap_error(
    where: str, err: libvirt.libvirtError, conn: libvirt.virConnect | None
) -> LibvirtError:
    """libvirt's error as ftd's: LibvirtDisconnectedError when ``conn`` is dead, else
    LibvirtError, ``where`` leading the message ("no such domain" for a missing domain)."""
    if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
        return LibvirtError(f"{where}: no such domain")
    if conn is not None and not conn.isAlive():
        return LibvirtDisconnectedError(
            f"{where}: connection to libvirtd lost: {err.get_error_message()}"
        )
    return LibvirtError(f"{where}: {err.get_error_message()}")


class LibvirtDomain:
    """A handle on libvirt domain ``name`` at ``uri``.

    ``async with LibvirtDomain(uri, name) as dom:`` opens a connection of its own (closed on
    exit); the domain is looked up by name on every call, so a transient domain that is
    destroyed and created again stays reachable.  Every method raises LibvirtError (or
    LibvirtDisconnectedError when libvirtd went away) with the action and the domain named.
    """

    def __init__(self, uri: str, name: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.uri = uri
        self.name = name
        self.timeout_s = timeout_s
        self._conn: libvirt.virConnect | None = None
        self._log = get_logger(vm=name, part="libvirt")

    async def __aenter__(self) -> LibvirtDomain:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection to ``uri``. Raises LibvirtError if libvirtd cannot be reached."""
        if self._conn is None:
            self._conn = await self._run("connect", libvirt.open, self.uri)

    async def close(self) -> None:
        """Close the connection (idempotent). Raises LibvirtError if closing fails."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._run("close", conn.close)

    async def _run(
        self, action: str, fn: Callable[..., _T], *args: Any, timeout_s: float | None = None
    ) -> _T:
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            return await bounded(asyncio.to_thread(fn, *args), limit)
        except TimeoutError as err:
            raise LibvirtError(
                f"{self.uri} domain {self.name}: {action}: libvirtd did not answer in {limit:g} s"
            ) from err
        except libvirt.libvirtError as err:
            # The worker frame in libvirt's traceback holds the virDomain, and that keeps the
            # connection (and its event loop handles) alive as long as the error is kept.
            raise self._wrap(action, err) from err.with_traceback(None)

    def _wrap(self, action: str, err: libvirt.libvirtError) -> LibvirtError:
        return wrap_error(f"{self.uri} domain {self.name}: {action}", err, self._conn)

    def _domain(self) -> libvirt.virDomain:
        # Called inside worker threads; lookups are cheap and survive transient re-creation.
        if self._conn is None:
            raise LibvirtError(f"{self.uri} domain {self.name}: not connected")
        return self._conn.lookupByName(self.name)

    @classmethod
    async def create_transient(
        cls, uri: str, xml: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> LibvirtDomain:
        """Create and start a transient domain from ``xml``; return its connected handle.

        The caller closes the handle. Raises LibvirtError with libvirt's reason if it refuses.
        """
        return await cls._adopt(uri, xml, timeout_s, create=True)

    @classmethod
    async def define(
        cls, uri: str, xml: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> LibvirtDomain:
        """Define (not start) a persistent domain from ``xml``; return its connected handle.

        The caller closes the handle. Raises LibvirtError with libvirt's reason if it refuses.
        """
        return await cls._adopt(uri, xml, timeout_s, create=False)

    @classmethod
    async def _adopt(cls, uri: str, xml: str, timeout_s: float, *, create: bool) -> LibvirtDomain:
        name = parse_domain_xml(xml).findtext("name")
        if not name:
            raise LibvirtError("domain XML has no <name>")
        dom = cls(uri, name, timeout_s=timeout_s)
        await dom.connect()
        conn = dom._conn
        assert conn is not None
        try:
            if create:
                await dom._run("create from XML", conn.createXML, xml, 0)
            else:
                await dom._run("define from XML", conn.defineXML, xml)
        except BaseException:
            await dom.close()
            raise
        return dom

    async def create_live(self, xml: str) -> None:
        """Start this (shut off) domain with ``xml`` as its live definition: for a defined
        domain, libvirt keeps the persistent one and returns to it when the domain stops.

        Raises LibvirtError with libvirt's reason if it refuses (name or UUID mismatch, the
        domain already running, QEMU failing to start).
        """
        await self._run("create from live XML", lambda: self._conn_or_fail().createXML(xml, 0))
        self._log.info("libvirt_started_live", uri=self.uri)

    def _conn_or_fail(self) -> libvirt.virConnect:
        if self._conn is None:
            raise LibvirtError(f"{self.uri} domain {self.name}: not connected")
        return self._conn

    async def state(self) -> DomainState:
        """The domain's state (running, paused, shut off, ...)."""
        code, _reason = await self._run("state", lambda: self._domain().state())
        return DomainState.from_libvirt(code)

    async def is_persistent(self) -> bool:
        """Whether the domain is defined (survives being stopped) rather than transient."""
        return bool(await self._run("isPersistent", lambda: self._domain().isPersistent()))

    async def xml(self, *, inactive: bool = False) -> str:
        """The domain XML: live while running (or ``inactive``: the persistent definition)."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        xml: str = await self._run("XMLDesc", lambda: self._domain().XMLDesc(flags))
        return xml

    async def qmp_socket(self) -> Path:
        """The extra QMP socket ftd drives COLO through, from the live domain XML.

        Raises LibvirtError if the XML has none (docs/libvirt.md shows what to add).
        """
        try:
            return qmp_socket_from_xml(await self.xml())
        except LibvirtError as err:
            raise LibvirtError(f"{self.uri} domain {self.name}: {err}") from err

    async def pid(self) -> int:
        """The pid of the domain's QEMU (local libvirtd only).

        Raises LibvirtError if the domain is not running, the URI is remote, or no process
        of this domain is found.
        """
        state = await self.state()
        if state in (DomainState.SHUTOFF, DomainState.CRASHED):
            raise LibvirtError(f"{self.uri} domain {self.name}: no QEMU pid: it is {state.value}")
        pid_dir = pidfile_dir(self.uri)
        pid = await asyncio.to_thread(find_qemu_pid, self.name, pid_dir)
        if pid is None:
            raise LibvirtError(
                f"{self.uri} domain {self.name}: no QEMU process found "
                f"({pid_dir}/{self.name}.pid nor /proc -name guest={self.name})"
            )
        return pid

    async def start(self) -> None:
        """Start a defined (persistent) domain. Raises LibvirtError with libvirt's reason."""
        await self._run("start", lambda: self._domain().create())
        self._log.info("libvirt_started", uri=self.uri)

    async def destroy(self, *, graceful: bool = False) -> None:
        """Stop QEMU at once (SIGTERM, then SIGKILL unless ``graceful``): a power cut.

        A transient domain ceases to exist. Raises LibvirtError if libvirt refuses.
        """
        flags = libvirt.VIR_DOMAIN_DESTROY_GRACEFUL if graceful else 0
        await self._run("destroy", lambda: self._domain().destroyFlags(flags))
        self._log.info("libvirt_destroyed", uri=self.uri)

    async def suspend(self) -> None:
        """Pause the guest's vCPUs. Raises LibvirtError if libvirt refuses."""
        await self._run("suspend", lambda: self._domain().suspend())

    async def resume(self) -> None:
        """Resume the guest's vCPUs. Raises LibvirtError if libvirt refuses."""
        await self._run("resume", lambda: self._domain().resume())

    async def undefine(self) -> None:
        """Remove a persistent definition (a running domain becomes transient).

        Raises LibvirtError if libvirt refuses.
        """
        await self._run("undefine", lambda: self._domain().undefine())

    async def monitor_command(
        self, command: str, arguments: Mapping[str, object] | None = None
    ) -> Any:
        """Run a QMP command through libvirt's monitor (``qemu-monitor-command``).

        The fallback when the extra QMP socket is missing: libvirt marks the domain tainted
        (custom-monitor) and does not learn of state changes the command makes.
        Raises QmpError on an error reply from QEMU, LibvirtError if libvirt refuses.
        """
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        text = json.dumps(request)
        reply_text: str = await self._run(
            f"qemu-monitor-command {command}",
            lambda: libvirt_qemu.qemuMonitorCommand(self._domain(), text, 0),
        )
        try:
            reply = json.loads(reply_text)
        except ValueError as err:
            raise QmpError(
                f"{self.name}: {command} via libvirt: reply is not JSON: {reply_text[:200]!r}"
            ) from err
        if "error" in reply:
            error = reply["error"]
            raise QmpError(
                f"{self.name}: {command} via libvirt failed: "
                f"{error.get('class', '?')}: {error.get('desc', '?')}"
            )
        return reply.get("return")

    async def qemu_version(self) -> QemuVersion:
        """The running QEMU's version (query-version through libvirt's monitor).

        Raises QmpError / LibvirtError as :meth:`monitor_command` does.
        """
        qemu = (await self.monitor_command("query-version"))["qemu"]
        return QemuVersion(int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
