"""``ftctl``: the operator's command line for ftd.

Every command prints a table a person can read, or with ``--json`` one JSON document a script
can. Exit codes: 0 success, 1 the operation failed or ftd could not be reached, 2 bad input
(invalid config file, bad arguments, request refused by ftd).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftctl.client import ControlClient
from ftctl.table import render
from ftd.checkpoint.model import PAGES_PER_MIB
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

    hs = sub.add_parser("hosts", help="cluster membership: hosts, epochs, quorum, VMs")
    hs.add_argument("--json", action="store_true", dest="json_sub")

    st = sub.add_parser("status", help="host, QEMU, bus and protected VMs")
    st.add_argument("--json", action="store_true", dest="json_sub")

    tp = sub.add_parser("top", help="live view of this host and its VMs, refreshed (like top)")
    tp.add_argument(
        "--interval",
        type=_positive(float),
        default=2.0,
        metavar="S",
        help="seconds between refreshes (default 2)",
    )
    tp.add_argument(
        "--iterations",
        type=_positive(int),
        metavar="N",
        help="stop after N refreshes (default: until Ctrl-C)",
    )
    tp.add_argument(
        "--json", action="store_true", dest="json_sub", help="one JSON object per refresh per line"
    )

    cfg = sub.add_parser("config", help="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="cfg_cmd", required=True, metavar="ACTION")
    v = cfg_sub.add_parser("validate", help="validate a configuration file")
    v.add_argument("file", type=Path)
    v.add_argument("--json", action="store_true", dest="json_sub")

    for name, help_ in (
        ("protect", "start the VM protected (launch primary, then a COLO secondary)"),
        ("failover", "hand the VM over to its secondary (pauses the primary first)"),
        ("reprotect", "give a running, unprotected VM a new secondary"),
        ("stop", "stop the VM (both copies)"),
    ):
        op = sub.add_parser(name, help=help_)
        if name == "failover":
            op.add_argument("vm", nargs="?")
            op.add_argument("--group", "-g", help="fail over every member of this group instead")
        else:
            op.add_argument("vm")
        op.add_argument("--json", action="store_true", dest="json_sub")
        op.add_argument(
            "--wait",
            type=float,
            default=0.0,
            metavar="S",
            help="wait up to S seconds for the VM to settle (protected or running)",
        )

    sw = sub.add_parser(
        "switchover",
        help="planned switchover: move the primary to its secondary's host (no failure; "
        "the old primary becomes the new secondary)",
    )
    sw.add_argument("vm", nargs="?")
    sw.add_argument("--group", "-g", help="switch every member of this group over instead")
    sw.add_argument("--to", help="the host to move to (must be the one holding the secondary)")
    sw.add_argument(
        "--wait-protected",
        action="store_true",
        help="also wait until protection returns in the reverse direction",
    )
    sw.add_argument("--json", action="store_true", dest="json_sub")

    pol = sub.add_parser("policy", help="checkpoint policy of a VM")
    pol_sub = pol.add_subparsers(dest="pol_cmd", required=True, metavar="ACTION")
    ps = pol_sub.add_parser(
        "set",
        help="change the policy live (unset options keep the interval bounds, and the policy's "
        "own values when the policy stays)",
    )
    ps.add_argument("vm")
    ps.add_argument("--policy", choices=["fixed", "dirty-threshold", "pause-budget"])
    for opt, type_, help_ in POLICY_OPTIONS:
        ps.add_argument(opt, type=type_, help=help_)
    ps.add_argument("--json", action="store_true", dest="json_sub")

    lv = sub.add_parser("libvirt", help="libvirt-managed VMs")
    lv_sub = lv.add_subparsers(dest="lv_cmd", required=True, metavar="ACTION")
    chk = lv_sub.add_parser(
        "check", help="what a libvirt domain needs for ftd, and what is missing"
    )
    chk.add_argument("domain")
    chk.add_argument("--uri", default="qemu:///system", help="libvirt URI (default qemu:///system)")
    chk.add_argument("--json", action="store_true", dest="json_sub")

    gr = sub.add_parser("groups", help="VM groups: policy, members, last committed epoch")
    gr.add_argument("--json", action="store_true", dest="json_sub")

    ev = sub.add_parser("events", help="recent events and decisions, with their reasons")
    ev.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ev.add_argument("--limit", "-n", type=int, default=50)
    ev.add_argument("--json", action="store_true", dest="json_sub")
    return p


POLICY_OPTIONS: list[tuple[str, type, str]] = [
    ("--interval-ms", float, "period of policy fixed"),
    ("--min-interval-ms", float, "never checkpoint more often"),
    ("--max-interval-ms", float, "never checkpoint less often"),
    ("--dirty-pages", int, "dirty pages that trigger a checkpoint (dirty-threshold)"),
    ("--pause-budget-ms", float, "predicted pause that triggers a checkpoint (pause-budget)"),
    ("--link-bandwidth-mbps", float, "replication link speed in Mbit/s (pause-budget)"),
    ("--safety-margin", float, "fraction of the budget kept spare, in [0, 1) (pause-budget)"),
]


def _positive(kind: type[float] | type[int]) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 of ``kind``. argparse names the option in its
    error and exits 2, before any request reaches ftd."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    as_json = bool(args.json or getattr(args, "json_sub", False))
    try:
        if args.cmd == "config":
            return cmd_config_validate(args.file, as_json)
        if args.cmd == "libvirt":
            return cmd_libvirt_check(args.uri, args.domain, as_json)
        client = ControlClient(args.socket)
        if args.cmd == "status":
            return cmd_status(client, as_json)
        if args.cmd == "hosts":
            return cmd_hosts(client, as_json)
        if args.cmd == "top":
            return cmd_top(client, args.interval, args.iterations, as_json)
        if args.cmd == "events":
            return cmd_events(client, args.limit, args.follow, as_json)
        if args.cmd == "policy":
            return cmd_policy_set(client, args, as_json)
        if args.cmd == "groups":
            return cmd_groups(client, as_json)
        if args.cmd == "failover" and (args.group is None) == (args.vm is None):
            print("ftctl: failover needs exactly one of VM and --group", file=sys.stderr)
            return 2
        if args.cmd == "failover" and args.group is not None:
            return cmd_group_failover(client, args.group, as_json)
        if args.cmd == "switchover":
            return cmd_switchover(args, as_json)
        if args.cmd in ("protect", "failover", "reprotect", "stop"):
            return cmd_vm_op(client, args.cmd, args.vm, as_json, args.wait)
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


def cmd_libvirt_check(uri: str, domain: str, as_json: bool) -> int:
    # Imported here: libvirt is only needed by this command, not by every ftctl call.
    from ftd.libvirt.check import check_domain, render_json, render_table, verdict  # noqa: PLC0415

    findings = check_domain(uri, domain)
    ok, reason = verdict(findings)
    if as_json:
        print(render_json(findings))
    else:
        print(render_table(findings))
        print(f"\n{domain}: {'usable by ftd' if ok else 'NOT usable by ftd'} ({reason})")
    return 0 if ok else 2


def cmd_hosts(client: ControlClient, as_json: bool) -> int:
    res = client.call("hosts")
    if as_json:
        _print_json(res)
        return 0
    q = res["quorum"]
    rows = [
        [
            h["host"],
            h["online"],
            h["epoch"],
            h["role"],
            h["voter"],
            " ".join(f"{n}:{r}" for n, r in sorted(h["vms"].items())) or None,
            h["reason"],
        ]
        for h in res["hosts"]
    ]
    print(render(["host", "online", "epoch", "role", "voter", "vms", "reason"], rows))
    print(
        f"\nseen from {res['from']}: {q['votes']}/{q['voters']} voters, "
        f"quorum {'yes' if q['has'] else 'NO'} ({q['reason']})"
    )
    return 0


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
    print(f"quorum: {'yes' if st['quorum']['has'] else 'NO'} ({st['quorum']['reason']})")
    print(direct_line(st.get("direct_heartbeats")))
    guard = (st.get("fencing") or {}).get("guard")
    if guard is not None:
        print(guard_line(guard))
    vms = st.get("vms") or []
    print()
    if not vms:
        print("no VMs configured on this host")
        return 0
    print(render(VM_HEADERS, [vm_row(vm) for vm in vms]))
    for vm in vms:
        print(cold_line(vm) if vm.get("standby") == "cold" else policy_line(vm))
        if vm.get("sync"):
            print(f"{vm['name']}: {sync_line(vm['sync'])}")
        if vm.get("last_resync"):
            print(f"{vm['name']}: {resync_line(vm['last_resync'])}")
        if vm.get("recovery"):
            print(f"{vm['name']}: {recovery_line(vm['recovery'])}")
        if vm.get("libvirt"):
            print(f"{vm['name']}: {libvirt_line(vm['libvirt'], st.get('libvirt_events') or {})}")
    return 0


def libvirt_line(lv: dict[str, Any], events: dict[str, str]) -> str:
    """The libvirt domain a VM runs as on this host, and ftd's event connection to libvirtd."""
    state = events.get(lv["uri"], "not watched")
    return f"libvirt domain {lv['domain']} ({lv['uri']}), events {state}"


def recovery_line(r: dict[str, Any]) -> str:
    """The expected downtime if the primary fails (ftd.vm.recovery), in one line."""
    host = r.get("host_loss_s")
    lost = "no bound (no fence agent)" if host is None else f"~{host:.1f}s"
    return (
        f"{r.get('standby', '-')} standby, expected recovery: QEMU crash "
        f"~{r['qemu_exit_s']:.1f}s, host loss {lost} ({r.get('reason', '')})"
    )


def resync_line(r: dict[str, Any]) -> str:
    """The last disk resync this host ran as primary, in one line."""
    mib = r["copied_bytes"] / (1 << 20)
    if r.get("mode") == "incremental":
        return (
            f"last resync: incremental, {r['changed_chunks']} chunks of "
            f"{r['chunk_bytes'] // 1024} KiB differed, {mib:.1f} MiB copied in {r['seconds']}s"
        )
    return f"last resync: full, {mib:.1f} MiB in {r['seconds']}s ({r.get('reason')})"


def guard_line(g: dict[str, Any]) -> str:
    """The self-fencing guard in one line (ftd.cluster.guard)."""
    if not g.get("connected"):
        return f"guard: NOT connected ({g.get('last_error') or 'not yet'})"
    left = g.get("lease_left_s")
    lease = "no lease yet" if left is None else f"lease ends in {left:.1f}s"
    armed = ", ".join(f"{vm} (pid {pid})" for vm, pid in sorted(g["armed"].items())) or "nothing"
    return f"guard: connected, {lease}, stops {armed} if ftd stops renewing it"


def direct_line(d: dict[str, Any] | None) -> str:
    """The direct-heartbeat channel in one line."""
    if d is None:
        return "direct heartbeats: off"
    line = (
        f"direct heartbeats: UDP {d['port']}, {'signed' if d['signed'] else 'UNSIGNED'}, "
        f"{d['dropped']} dropped"
    )
    return line + (f" (last: {d['last_drop']})" if d.get("last_drop") else "")


VM_HEADERS = [
    "vm",
    "state",
    "role",
    "peer",
    "peer state",
    "epoch",
    "ckpts",
    "last pause",
    "ckpt age",
    "reason",
]


def vm_row(vm: dict[str, Any]) -> list[object]:
    cp = vm.get("checkpoints") or {}
    peer = vm.get("peer_state") or {}
    last = cp.get("last_pause_ms")
    age = cp.get("age_s")
    return [
        vm["name"],
        vm["state"],
        vm["role"],
        vm.get("peer"),
        f"{peer.get('role', '-')}/{peer.get('state', '-')}" if peer else None,
        vm.get("epoch"),
        cp.get("count", 0),
        f"{last:.0f}ms" if last is not None else None,
        f"{age:.1f}s" if age is not None else None,
        vm.get("reason", ""),
    ]


def cold_line(vm: dict[str, Any]) -> str:
    """A cold standby's replication (no checkpoints, no policy) in one line."""
    rep = vm.get("replication")
    if rep is None:
        held = "the replica of its disk" if vm.get("role") == "secondary" else "no primary"
        return f"{vm['name']}: cold standby, no checkpoints: this host holds {held}"
    state = "in step" if rep.get("in_step") else "NOT in step"
    return f"{vm['name']}: cold standby, no checkpoints: replication {state} ({rep['reason']})"


def policy_line(vm: dict[str, Any]) -> str:
    cp = vm.get("checkpoints") or {}
    pol = vm.get("checkpoint_policy") or {}
    text = (pol.get("policy") or {}).get("text", vm.get("policy", "-"))
    rate = pol.get("dirty_rate_mbps")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}ms"

    parts = [
        f"{vm['name']}: policy {text} ({vm.get('policy_origin', 'config')})",
        f"dirty rate {'-' if rate is None else f'{rate:g} MiB/s'}"
        + (" (sampler blind: estimating from exact counts)" if pol.get("sampler_blind") else ""),
        f"pause last/avg/p99 {ms(cp.get('last_pause_ms'))}/{ms(cp.get('avg_pause_ms'))}/"
        f"{ms(cp.get('p99_pause_ms'))}",
        f"{cp.get('per_min', 0)} checkpoints/min",
    ]
    if pol.get("requests") is not None:
        parts.append(f"{pol.get('on_demand', 0)}/{pol['requests']} on demand")
    if pol.get("decision"):
        parts.append(f"last decision: {pol['decision']}")
    return ", ".join(parts)


def cmd_policy_set(client: ControlClient, args: argparse.Namespace, as_json: bool) -> int:
    req: dict[str, Any] = {"vm": args.vm}
    if args.policy is not None:
        req["policy"] = args.policy
    for opt, _, _ in POLICY_OPTIONS:
        key = opt.lstrip("-").replace("-", "_")
        value = getattr(args, key)
        if value is not None:
            req[key] = value
    res = client.call("policy-set", req)
    if as_json:
        _print_json(res)
    else:
        pol = res["checkpoint_policy"]
        print(f"{args.vm}: checkpoint policy now {pol['policy']['text']} on {res['host']}")
    return 0


def sync_line(sync: dict[str, Any]) -> str:
    pct = sync.get("percent")
    done, total = sync.get("done", 0), sync.get("total", 0)
    if pct is None:
        return f"resync {sync.get('step')}"
    return f"resync {sync.get('step')}: {pct:.1f}% ({done >> 20}/{total >> 20} MiB)"


# --- ftctl top: a live view of this host -------------------------------------------------
#
# Pure parts first: top_sample() turns one `status` answer (and the previous sample) into what
# a refresh shows, render_top() turns a sample into text. cmd_top() is the thin I/O loop. The
# text view and --json print the same sample, so a script sees exactly what the operator sees.

CLEAR_SCREEN = "\033[H\033[2J"

TOP_HEADERS = [
    "vm",
    "state",
    "role",
    "peer state",
    "ckpts",
    "+ckpts",
    "/min",
    "last pause",
    "avg/p99",
    "dirty pg/s",
    "ckpt age",
    "sync",
]


def top_sample(st: dict[str, Any], prev: dict[str, Any] | None, at: float) -> dict[str, Any]:
    """One refresh of ``ftctl top`` from a ``status`` answer taken at wall time ``at``.

    ``prev`` is the previous sample (None on the first refresh): it gives the checkpoints taken
    since then and the changes (VM state or role, quorum, bus) an operator could otherwise miss
    between two refreshes. Missing fields become None, never an error: the view must keep
    working against an ftd that reports less.
    """
    q = st.get("quorum") or {}
    bus = st.get("bus") or {}
    prev_vms = {v["name"]: v for v in (prev or {}).get("vms", [])}
    restarted = prev is not None and prev.get("pid") != st.get("pid")
    vms = [
        _top_vm(vm, None if restarted else prev_vms.get(vm["name"])) for vm in st.get("vms") or []
    ]
    sample: dict[str, Any] = {
        "ts": round(at, 3),
        "refresh": 1 if prev is None else int(prev["refresh"]) + 1,
        "elapsed_s": None if prev is None else round(at - float(prev["ts"]), 3),
        "host": st.get("host"),
        "cluster": st.get("cluster"),
        "role": st.get("role"),
        "pid": st.get("pid"),
        "uptime_s": st.get("uptime_s"),
        "bus_connected": bool(bus.get("connected")),
        "quorum": {k: q.get(k) for k in ("has", "votes", "voters", "reason")},
        "vms": vms,
    }
    sample["changes"] = _top_changes(sample, prev, restarted)
    return sample


def _top_vm(vm: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
    """One VM's row data; ``checkpoints_delta`` is None without a comparable previous row."""
    cp = vm.get("checkpoints") or {}
    rate = cp.get("dirty_rate_mbps")
    if rate is None:
        rate = (vm.get("checkpoint_policy") or {}).get("dirty_rate_mbps")
    count = int(cp.get("count") or 0)
    delta = None
    if prev is not None and count >= prev["checkpoints"]:
        delta = count - int(prev["checkpoints"])
    peer = vm.get("peer_state") or None
    return {
        "name": vm["name"],
        "state": vm.get("state"),
        "role": vm.get("role"),
        "peer": vm.get("peer"),
        "peer_state": {"role": peer.get("role"), "state": peer.get("state")} if peer else None,
        "reason": vm.get("reason"),
        "checkpoints": count,
        "checkpoints_delta": delta,
        "per_min": cp.get("per_min"),
        "last_pause_ms": cp.get("last_pause_ms"),
        "avg_pause_ms": cp.get("avg_pause_ms"),
        "p99_pause_ms": cp.get("p99_pause_ms"),
        "dirty_pages_per_s": None if rate is None else round(float(rate) * PAGES_PER_MIB),
        "checkpoint_age_s": cp.get("age_s"),
        "sync": vm.get("sync") or None,
    }


def _top_changes(cur: dict[str, Any], prev: dict[str, Any] | None, restarted: bool) -> list[str]:
    """What changed since the previous refresh, one short phrase each."""
    if prev is None:
        return []
    out = []
    if restarted:
        out.append(f"ftd restarted (pid {prev.get('pid')} -> {cur.get('pid')})")
    if prev["bus_connected"] != cur["bus_connected"]:
        out.append("bus " + ("connected" if cur["bus_connected"] else "DISCONNECTED"))
    if prev["quorum"]["has"] != cur["quorum"]["has"]:
        out.append(f"quorum {_yes(prev['quorum']['has'])} -> {_yes(cur['quorum']['has'])}")
    before = {v["name"]: v for v in prev["vms"]}
    for vm in cur["vms"]:
        old = before.get(vm["name"])
        if old is None:
            out.append(f"{vm['name']} appeared ({vm['state']})")
        elif (old["state"], old["role"]) != (vm["state"], vm["role"]):
            out.append(
                f"{vm['name']} {old['state']}/{old['role']} -> {vm['state']}/{vm['role']}"
                + (f" ({vm['reason']})" if vm.get("reason") else "")
            )
    now = {v["name"] for v in cur["vms"]}
    out.extend(f"{name} gone" for name in before if name not in now)
    return out


def render_top(sample: dict[str, Any], interval: float) -> str:
    """The text of one refresh: a time line, the host line, one row per VM, then what changed
    since the previous refresh."""
    q = sample["quorum"]
    clock = time.strftime("%H:%M:%S", time.localtime(sample["ts"]))
    up = sample.get("uptime_s")
    lines = [
        f"ftctl top  {clock}  refresh {sample['refresh']} every {interval:g}s"
        + (f"  ftd up {up:.0f}s" if up is not None else ""),
        f"host {sample['host']}  cluster {sample['cluster']}  role {sample['role']}  "
        f"bus {'connected' if sample['bus_connected'] else 'DISCONNECTED'}  "
        f"quorum {_yes(q['has'])} ({q['votes']}/{q['voters']} votes: {q['reason']})",
        "",
    ]
    if sample["vms"]:
        lines.append(render(TOP_HEADERS, [_top_row(vm) for vm in sample["vms"]]))
    else:
        lines.append("no VMs configured on this host")
    if sample["changes"]:
        lines += ["", "since last refresh: " + "; ".join(sample["changes"])]
    return "\n".join(lines)


def _top_row(vm: dict[str, Any]) -> list[object]:
    peer = vm["peer_state"]
    delta = vm["checkpoints_delta"]
    age = vm["checkpoint_age_s"]
    avg, p99 = vm["avg_pause_ms"], vm["p99_pause_ms"]
    return [
        vm["name"],
        vm["state"],
        vm["role"],
        f"{peer['role'] or '-'}/{peer['state'] or '-'}" if peer else None,
        vm["checkpoints"],
        None if delta is None else f"+{delta}",
        vm["per_min"],
        _ms(vm["last_pause_ms"]),
        None if avg is None and p99 is None else f"{_ms(avg) or '-'}/{_ms(p99) or '-'}",
        _si(vm["dirty_pages_per_s"]),
        None if age is None else f"{age:.1f}s",
        _sync_cell(vm["sync"]),
    ]


def _yes(has: object) -> str:
    return "yes" if has else "NO"


def _ms(v: float | None) -> str | None:
    return None if v is None else f"{v:.0f}ms"


def _si(v: float | None) -> str | None:
    """A count in at most five characters: 950, 12.3k, 4.5M."""
    if v is None:
        return None
    if v < 10_000:
        return f"{v:.0f}"
    if v < 10_000_000:
        return f"{v / 1000:.1f}k"
    return f"{v / 1_000_000:.1f}M"


def _sync_cell(sync: dict[str, Any] | None) -> str | None:
    if not sync:
        return None
    pct = sync.get("percent")
    if pct is None:
        return str(sync.get("step"))
    done, total = int(sync.get("done") or 0), int(sync.get("total") or 0)
    return f"{sync.get('step')} {pct:.1f}% ({done >> 20}/{total >> 20} MiB)"


def cmd_top(client: ControlClient, interval: float, iterations: int | None, as_json: bool) -> int:
    """Refresh the view every ``interval`` s until ``iterations`` refreshes or Ctrl-C (exit 0).

    On a terminal each refresh redraws the screen; into a pipe or file refreshes follow one
    another after a blank line, without escape codes; with ``as_json`` one JSON line each.
    """
    clear = not as_json and sys.stdout.isatty()
    prev: dict[str, Any] | None = None
    next_at = time.monotonic()
    try:
        while True:
            sample = top_sample(_top_status(client, prev), prev, time.time())
            if as_json:
                print(json.dumps(sample, sort_keys=True, default=str), flush=True)
            else:
                head = CLEAR_SCREEN if clear else ("\n" if prev is not None else "")
                print(head + render_top(sample, interval), flush=True)
            prev = sample
            if iterations is not None and sample["refresh"] >= iterations:
                return 0
            next_at = max(next_at + interval, time.monotonic())
            time.sleep(next_at - time.monotonic())
    except KeyboardInterrupt:
        return 0


def _top_status(client: ControlClient, prev: dict[str, Any] | None) -> dict[str, Any]:
    """ftd's ``status``; a daemon lost mid-run becomes one FtError line (exit 1), whatever the
    socket said (refused, reset, closed)."""
    try:
        return dict(client.call("status"))
    except RequestError:
        raise
    except (FtError, OSError) as err:
        what = str(err)
        if not isinstance(err, FtError):
            what = f"lost ftd at {client.path}: {err.strerror or err}"
        if prev is not None:
            what = f"ftd went away after {prev['refresh']} refreshes: {what}"
        raise FtError(what) from err


SETTLED = {"protected", "running_unprotected", "stopped", "failed"}


def cmd_vm_op(client: ControlClient, op: str, vm: str, as_json: bool, wait: float) -> int:
    res = client.call(op, {"vm": vm})
    if wait > 0:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            st = client.call("status")
            cur = next((v for v in st["vms"] if v["name"] == vm), None)
            if cur is not None:
                res["vm_status"] = cur
                if (cur["state"] in SETTLED and cur["state"] != "stopped") or op == "stop":
                    break
                if cur.get("sync"):
                    print(sync_line(cur["sync"]), file=sys.stderr)
            time.sleep(0.5)
    if as_json:
        _print_json(res)
    else:
        v = res["vm_status"]
        print(f"{vm}: {res['reason']}")
        print(f"{vm} is now {v['state']} ({v['role']} on {v['host']})")
    return 0


def cmd_groups(client: ControlClient, as_json: bool) -> int:
    groups = client.call("groups")
    if as_json:
        _print_json(groups)
        return 0
    if not groups:
        print("no groups on this host")
        return 0
    rows = []
    for g in groups:
        age = g.get("committed_age_s")
        rows.append(
            [
                g["group"],
                g["policy"],
                ",".join(g["members"]),
                g["committed_epoch"] or None,
                f"{age:.1f}s" if age is not None else None,
                g.get("synchronizer"),
            ]
        )
    print(render(["group", "policy", "members", "epoch", "age", "synchronizer"], rows))
    for g in groups:
        if g.get("last_failure"):
            print(f"{g['group']}: last failed epoch: {g['last_failure']}")
    return 0


def cmd_group_failover(client: ControlClient, group: str, as_json: bool) -> int:
    res = client.call("group-failover", {"group": group})
    if as_json:
        _print_json(res)
    else:
        print(f"group {group}: {res['reason']} (members: {', '.join(res['members'])})")
    return 0


def cmd_switchover(args: argparse.Namespace, as_json: bool) -> int:
    if (args.group is None) == (args.vm is None):
        print("ftctl: switchover needs exactly one of VM and --group", file=sys.stderr)
        return 2
    if args.group is not None and (args.to is not None or args.wait_protected):
        print("ftctl: --to and --wait-protected apply to one VM, not to --group", file=sys.stderr)
        return 2
    # A switchover waits for the takeover (seconds); with --wait-protected for the reverse
    # resync too (minutes): the socket timeout covers what ftd itself waits at most.
    client = ControlClient(args.socket, timeout=700.0 if args.wait_protected else 90.0)
    if args.group is not None:
        res = client.call("group-switchover", {"group": args.group})
        if as_json:
            _print_json(res)
            return 0
        took = res.get("took_over_after_s", {})
        print(f"group {args.group}: {res['reason']}")
        print(render(["member", "took over after"], [[m, f"{took[m]:.2f}s"] for m in took]))
        print("downtime per member and reprotect: ftctl events")
        return 0
    call: dict[str, Any] = {"vm": args.vm, "wait_protected": bool(args.wait_protected)}
    if args.to is not None:
        call["to"] = args.to
    res = client.call("switchover", call)
    if as_json:
        _print_json(res)
        return 0
    print(
        f"{res['vm']}: switched over {res['from']} -> {res['to']} ({res['method']}): guest still "
        f"{res['downtime_ms']:.0f} ms (takeover seen here after {res['takeover_seen_ms']:.0f} ms; "
        f"checkpoint before it {res['checkpoint_ms']:.0f} ms)"
    )
    if res["protected_again_s"] is not None:
        print(
            f"protected again ({res['to']} primary, {res['from']} secondary) after "
            f"{res['protected_again_s']:.1f} s"
        )
    else:
        print(
            f"reprotect under way ({res['to']} primary, {res['from']} to hold the secondary): "
            "ftctl status shows its progress"
        )
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
