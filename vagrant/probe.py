"""Checks run inside the Vagrant lab's machines by ``run-scenarios.sh`` (through ssh).

Run with the project's venv on a lab machine::

    /opt/ftd/.venv/bin/python /opt/ftd/vagrant/probe.py COMMAND ...

Commands print one JSON document on stdout and exit 0 when the check holds, 1 when it does not
(the JSON says why), 2 on bad arguments:

* ``cluster`` -- this host's ftd answers, its bus is connected and it holds quorum;
* ``wait-vm NAME --state S[,S] --role R --timeout T`` -- poll ``ftctl status`` every 0.1 s until
  VM NAME is in one of the states with that role; ``elapsed_s`` is measured here, on the host;
* ``qemu-pid NAME`` -- the pid of this host's QEMU running VM NAME (``-name NAME,...``);
* ``counter ADDR --duration D`` -- ask the guest's counter service once every 0.1 s for D
  seconds over one TCP connection; judge continuity and the longest silence.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ftctl.client import ControlClient
from ftd.errors import FtError, LabError
from lab.clients import COUNTER_PORT, CounterClient, open_lines

SOCKET = os.environ.get("FTD_SOCKET", "/run/ftd/ftd.sock")


def status() -> dict[str, Any]:
    """``ftctl status --json`` of this host. Raises FtError when ftd cannot be reached."""
    st = ControlClient(SOCKET, timeout=5).call("status")
    if not isinstance(st, dict):
        raise FtError(f"ftd status is not a mapping: {st!r}")
    return st


def vm_view(st: dict[str, Any], name: str) -> dict[str, Any] | None:
    """VM ``name``'s entry in a status document (keys name, state, role, reason), or None."""
    for vm in st.get("vms") or []:
        if isinstance(vm, dict) and vm.get("name") == name:
            return vm
    return None


def cmd_cluster() -> tuple[bool, dict[str, Any]]:
    st = status()
    quorum = st.get("quorum") or {}
    ok = bool(st.get("bus", {}).get("connected")) and bool(quorum.get("has"))
    return ok, {
        "host": st.get("host"),
        "role": st.get("role"),
        "bus_connected": st.get("bus", {}).get("connected"),
        "quorum": quorum,
        "peers": st.get("peers"),
        "qemu": st.get("qemu"),
    }


def cmd_wait_vm(name: str, states: set[str], role: str, timeout: float) -> tuple[bool, Any]:
    start = time.monotonic()
    last: Any = None
    while True:
        try:
            view = vm_view(status(), name)
        except FtError as err:
            # ftd restarting (the scenarios restart it): keep polling until the timeout.
            view, last = None, {"error": str(err)}
        if view is not None:
            last = view
            if view.get("state") in states and view.get("role") == role:
                return True, {"vm": view, "elapsed_s": round(time.monotonic() - start, 3)}
        if time.monotonic() - start > timeout:
            why = f"VM {name} not {'/'.join(sorted(states))} as {role} within {timeout}s"
            return False, {"reason": why, "last": last if last is not None else "absent"}
        time.sleep(0.1)


def cmd_qemu_pid(name: str) -> tuple[bool, dict[str, Any]]:
    needle = f"{name},debug-threads=on".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-name" in argv and needle in argv:
            pids.append(int(proc.name))
    if len(pids) != 1:
        return False, {"reason": f"expected one QEMU for {name}, found pids {pids}"}
    return True, {"pid": pids[0]}


async def _counter(addr: str, duration: float) -> dict[str, Any]:
    reader, writer = await open_lines(addr, COUNTER_PORT)
    client = CounterClient(reader, writer, interval=0.1, answer_timeout=30.0)
    try:
        await client.run(duration=duration)
    finally:
        await client.close()
    cont = client.continuity()
    return {
        "answers": len(client.samples),
        "continuous": cont.ok,
        "reason": cont.reason,
        "longest_silence_s": round(client.longest_silence(), 3),
        "error": None if client.error is None else str(client.error),
    }


def cmd_counter(addr: str, duration: float) -> tuple[bool, dict[str, Any]]:
    out = asyncio.run(_counter(addr, duration))
    return bool(out["continuous"] and out["error"] is None and out["answers"] > 0), out


def main(argv: list[str] | None = None) -> int:
    """Run one probe; prints its JSON result. Returns 0 (holds), 1 (does not), 2 (bad use)."""
    p = argparse.ArgumentParser(prog="probe.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cluster")
    w = sub.add_parser("wait-vm")
    w.add_argument("name")
    w.add_argument("--state", required=True, help="comma-separated states")
    w.add_argument("--role", required=True)
    w.add_argument("--timeout", type=float, default=120.0)
    q = sub.add_parser("qemu-pid")
    q.add_argument("name")
    c = sub.add_parser("counter")
    c.add_argument("addr")
    c.add_argument("--duration", type=float, default=30.0)
    args = p.parse_args(argv)
    try:
        if args.cmd == "cluster":
            ok, out = cmd_cluster()
        elif args.cmd == "wait-vm":
            ok, out = cmd_wait_vm(args.name, set(args.state.split(",")), args.role, args.timeout)
        elif args.cmd == "qemu-pid":
            ok, out = cmd_qemu_pid(args.name)
        else:
            ok, out = cmd_counter(args.addr, args.duration)
    except (FtError, LabError) as err:
        ok, out = False, {"reason": str(err)}
    print(json.dumps(out, sort_keys=True, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
