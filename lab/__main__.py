"""``python -m lab``: build, inspect, fault and remove network-namespace labs by hand.

A lab made here has no reaper: it lives until ``python -m lab down ID`` (or ``--all``).
Errors print ``lab: error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ftd.errors import LabError
from ftd.log import setup_logging
from lab.netns import (
    SWITCH,
    Lab,
    list_namespaces,
    namespace_name,
    namespace_pids,
    process_name,
    read_lab,
    teardown,
    teardown_all,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create a lab and leave it running")
    up.add_argument("--hosts", required=True, help="comma-separated host names, e.g. a,b,w")
    up.add_argument("--broker", action="store_true", help="add host 'broker' running mosquitto")
    up.add_argument("--id", dest="lab_id", help="lab id (default: 6 random hex digits)")
    down = sub.add_parser("down", help="destroy a lab, or every lab with --all")
    which = down.add_mutually_exclusive_group(required=True)
    which.add_argument("lab_id", nargs="?", help="lab id")
    which.add_argument("--all", action="store_true", help="every ftdlab-* namespace")
    ex = sub.add_parser("exec", help="run a command inside a lab host")
    ex.add_argument("lab_id")
    ex.add_argument("host")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    for name, text in (("cut", "cut a host off the switch"), ("restore", "reconnect a host")):
        c = sub.add_parser(name, help=text)
        c.add_argument("lab_id")
        c.add_argument("host")
    for name, text in (("partition", "drop all traffic between two hosts"), ("heal", "undo it")):
        c = sub.add_parser(name, help=text)
        c.add_argument("lab_id")
        c.add_argument("a")
        c.add_argument("b")
    sub.add_parser("status", help="list labs, hosts, addresses and processes")
    return p


def _up(hosts: str, broker: bool, lab_id: str | None) -> int:
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    lab = Lab(names, lab_id, broker=broker, reaper=False).create()
    print(f"lab {lab.id} subnet {lab.subnet}")
    for host in lab.hosts:
        print(f"  {host:<10} {lab.address(host):<15} netns {lab.netns(host)}")
    if broker:
        print(f"  broker url {lab.broker.url}")
    return 0


def _down(lab_id: str | None) -> int:
    if lab_id is not None and lab_id not in list_namespaces():
        raise LabError(f"no lab {lab_id!r}")
    problems = teardown_all() if lab_id is None else teardown(lab_id)
    for problem in problems:
        print(f"lab: not removed: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _exec(lab_id: str, host: str, command: Sequence[str]) -> int:
    argv = list(command[1:] if command[:1] == ["--"] else command)
    if not argv:
        raise LabError("exec needs a command after --")
    ns = Lab.attach(lab_id).netns(host)
    os.execvp("ip", ["ip", "netns", "exec", ns, *argv])


def _status() -> int:
    labs = list_namespaces()
    if not labs:
        print("no labs")
    for lab_id, namespaces in sorted(labs.items()):
        try:
            info = read_lab(lab_id)
        except LabError as err:
            print(f"lab {lab_id} (broken: {err})")
            for ns in namespaces:
                print(f"  {ns}")
            continue
        print(f"lab {lab_id} subnet 10.88.{info.index}.0/24")
        pids = namespace_pids([namespace_name(lab_id, h) for h in (SWITCH, *info.hosts)])
        for i, host in enumerate(info.hosts):
            ns = namespace_name(lab_id, host)
            state = "" if ns in namespaces else " (namespace missing)"
            print(f"  {host:<10} 10.88.{info.index}.{10 + i:<6} {ns}{state}")
            for pid in pids.get(ns, []):
                print(f"      {pid:>7} {process_name(pid)[:100]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the lab CLI; returns the exit status (2 on LabError)."""
    args = _parser().parse_args(argv)
    setup_logging("warning")
    try:
        if args.cmd == "up":
            return _up(args.hosts, args.broker, args.lab_id)
        if args.cmd == "down":
            return _down(None if args.all else args.lab_id)
        if args.cmd == "exec":
            return _exec(args.lab_id, args.host, args.command)
        if args.cmd == "cut":
            Lab.attach(args.lab_id).cut(args.host)
            return 0
        if args.cmd == "restore":
            Lab.attach(args.lab_id).restore(args.host)
            return 0
        if args.cmd == "partition":
            Lab.attach(args.lab_id).partition(args.a, args.b)
            return 0
        if args.cmd == "heal":
            Lab.attach(args.lab_id).heal(args.a, args.b)
            return 0
        return _status()
    except LabError as err:
        print(f"lab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
