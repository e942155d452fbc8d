"""``ftctl``: the operator's command line for ftd.

Every command prints a table a person can read, or with ``--json`` one JSON document a script
can. Exit codes: 0 success, 1 the operation failed or ftd could not be reached, 2 bad input
(invalid config file, bad arguments, request refused by ftd).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ftctl.client import ControlClient
from ftctl.table import render
from ftd.config import validate_file
from ftd.errors import FtError, RequestError

DEFAULT_SOCKET = "/run/ftd/ftd.sock"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftctl", description="Operate ftd fault tolerance")
    p.add_argument(
        "--socket",
        "-s",
        default=os.environ.get("FTD_SOCKET", DEFAULT_SOCKET),
        help=f"ftd control socket (env FTD_SOCKET, default {DEFAULT_SOCKET})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    st = sub.add_parser("status", help="host, QEMU, bus and protected VMs")
    st.add_argument("--json", action="store_true", dest="json_sub")

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="cfg_cmd", required=True, metavar="ACTION")
    v = cfg_sub.add_parser("validate", help="validate a configuration file")
    v.add_argument("file", type=Path)
    v.add_argument("--json", action="store_true", dest="json_sub")

    ev = sub.add_parser("events", help="recent events and decisions, with their reasons")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ev.add_argument("--limit", "-n", type=int, default=50)
    ev.add_argument("--json", action="store_true", dest="json_sub")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    as_json = bool(args.json or getattr(args, "json_sub", False))
    try:
        if args.cmd == "config":
            return cmd_config_validate(args.file, as_json)
        client = ControlClient(args.socket)
        if args.cmd == "status":
            return cmd_status(client, as_json)
        if args.cmd == "events":
            return cmd_events(client, args.limit, args.follow, as_json)
    except RequestError as err:
        print(f"ftctl: refused: {err}", file=sys.stderr)
        return 2
    except FtError as err:
        print(f"ftctl: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    raise AssertionError(f"unhandled command {args.cmd}")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def cmd_config_validate(path: Path, as_json: bool) -> int:
    issues = validate_file(path)
    if as_json:
        _print_json({"file": str(path), "ok": not issues, "errors": [str(i) for i in issues]})
    elif issues:
        print(f"{path}: {len(issues)} error(s)")
        for i in issues:
            print(f"  {i}")
    else:
        print(f"{path}: OK")
    return 2 if issues else 0


def cmd_status(client: ControlClient, as_json: bool) -> int:
    st = client.call("status")
    if as_json:
        _print_json(st)
        return 0
    q = st["qemu"]
    bus = st["bus"]
    print(
        render(
            ["host", "cluster", "role", "epoch", "qemu", "bus", "uptime"],
            [
                [
                    st["host"],
                    st["cluster"],
                    st["role"],
                    st["boot_epoch"],
                    f"{q['version'] or '-'} ({q['accel']})",
                    "connected" if bus["connected"] else "disconnected",
                    f"{st['uptime_s']:.0f}s",
                ]
            ],
        )
    )
    vms = st.get("vms") or []
    print()
    if not vms:
        print("no VMs configured on this host")
    return 0


def cmd_events(client: ControlClient, limit: int, follow: bool, as_json: bool) -> int:
    if follow:
        for ev in client.stream("events-follow", {"limit": limit}):
            print(json.dumps(ev, default=str) if as_json else _event_line(ev), flush=True)
        return 0
    evs = client.call("events", {"limit": limit})
    if as_json:
        _print_json(evs)
    else:
        for ev in evs:
            print(_event_line(ev))
    return 0


def _event_line(ev: dict[str, Any]) -> str:
    t = time.strftime("%H:%M:%S", time.localtime(float(ev.get("ts", 0))))
    extra = " ".join(
        f"{k}={ev[k]}" for k in ("vm", "group", "epoch") if k in ev and ev[k] is not None
    )
    head = f"{t} {ev.get('host', '-')} {ev.get('severity', 'info'):7} {ev.get('kind', '-'):10}"
    return f"{head} {ev.get('message', '')} {extra}".rstrip()


if __name__ == "__main__":
    sys.exit(main())
