"""VMs that libvirt owns: lifecycle and events through libvirt, COLO through an extra QMP socket.

libvirt (9.0 on Debian 12) knows nothing of COLO.  ftd therefore lets libvirt start, stop and
watch the domain, and drives COLO over a second QMP monitor the domain XML adds with
``<qemu:commandline>`` (``-qmp unix:PATH,server=on,wait=off``); libvirt's own monitor stays
libvirt's.  ``qemu-monitor-command`` passthrough is the fallback when that socket is missing.

* :mod:`ftd.libvirt.domain`: :class:`~ftd.libvirt.domain.LibvirtDomain`, one domain's handle
  (state, QEMU pid, QMP socket path, start/destroy/suspend/resume, monitor passthrough);
* :mod:`ftd.libvirt.events`: lifecycle events as an asyncio stream, over libvirtaio;
* :mod:`ftd.libvirt.check`: what a domain XML lacks for ftd, with the XML that fixes it.

Errors (all :class:`~ftd.errors.QemuError`, since a libvirt domain is a QEMU ftd drives)::

    QemuError
     └── LibvirtError            a libvirt call failed (connection, lookup, lifecycle, XML)
          └── LibvirtDisconnectedError  the connection to libvirtd closed (EOF, keepalive, error)

Every blocking libvirt call runs in :func:`asyncio.to_thread`; the event loop integration is
libvirt's process-wide one, bound to the first asyncio loop that registers it.
"""

from __future__ import annotations

import libvirt

from ftd.errors import QemuError


def _no_print(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error to stderr; ftd raises them instead."""


libvirt.registerErrorHandler(_no_print, None)


class LibvirtError(QemuError):
    """A libvirt call failed: connection, domain lookup, lifecycle action or domain XML."""


class LibvirtDisconnectedError(LibvirtError):
    """The connection to libvirtd closed (daemon gone, keepalive timeout, client closed)."""
