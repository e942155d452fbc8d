"""The one root error of ftd and its family.

Every error ftd raises on purpose derives from :class:`FtError`; causes are chained with
``raise ... from err``.  The hierarchy::

    FtError
     ├── ConfigError        a configuration file or value is invalid (carries every issue)
     ├── RequestError       a control-socket (ftctl) request is malformed or not allowed
     ├── BusError           the message bus (MQTT) failed or sent something unusable
     │    └── MessageError  one inbound bus message is malformed, stale or forged
     ├── QemuError          launching or driving QEMU failed
     │    ├── QemuVersionError  the QEMU binary is missing, too old or known-broken for COLO
     │    └── QmpError          a QMP command failed, timed out or the monitor went away
     ├── StateError         local persisted state cannot be read or written
     ├── FenceError         a fencing agent could not fence a peer
     └── LabError           the network-namespace lab could not be built or torn down
"""

from __future__ import annotations

from dataclasses import dataclass


class FtError(Exception):
    """Root of every error ftd raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a configuration, located by its key path (e.g. ``vms[2].memory_mib``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(FtError):
    """A configuration is invalid; ``issues`` lists every problem found, each with its key path."""

    def __init__(self, issues: list[ConfigIssue], source: str = "") -> None:
        self.issues = list(issues)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(str(i) for i in self.issues))


class RequestError(FtError):
    """A control request is malformed, unknown or not allowed in the current state."""


class BusError(FtError):
    """The message bus failed (connection, publish) or cannot be used."""


class MessageError(BusError):
    """One inbound bus message is malformed, stale, replayed or forged; it is dropped."""


class QemuError(FtError):
    """Launching or driving a QEMU process failed."""


class QemuVersionError(QemuError):
    """The QEMU binary is missing, too old, or in a range known to break COLO."""


class QmpError(QemuError):
    """A QMP command failed, timed out, or the monitor connection was lost."""


class StateError(FtError):
    """ftd's persisted local state cannot be read or written."""


class FenceError(FtError):
    """A fencing agent failed to fence (or prove dead) a peer."""


class LabError(FtError):
    """The network-namespace lab could not be created, used or torn down."""
