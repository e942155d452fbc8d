"""A seeded, repeatable chaos campaign in the lab: ``python -m bench.chaos [--rounds N]
[--seed S] [--layout full|small] [--quick]``.

Layouts (witness w, the broker's host, and the outside client c in both):

- ``full`` (default): VM hosts a, b, d; four protected VMs (128 MiB TCG guests, eight QEMUs)
  in two groups: ``g1`` = vm1 (a->b) + vm2 (b->d), policy failover-all; ``g2`` = vm3 (d->a) +
  vm4 (a->d), policy rollback;
- ``small``: VM hosts a, b and one VM, vm1 (a->b): a quicker look.

``--quick`` runs 10 rounds (every fault once): make test runs it on the full layout.

Every VM runs the disk writer with its outside client. Each round waits until every VM is
protected, picks a VM, injects one fault around it at a random moment (its primary's or
secondary's QEMU or host, their link, the broker, the bus), heals it, waits until every VM
is protected again, and checks:

- never two running primaries of any VM (both QEMUs of each VM sampled every 50 ms through
  their observer QMP sockets, for the whole campaign);
- no acknowledged record lost (each guest checks the records acknowledged on it since the
  previous check; every 10th round and the last one check all of them again, since a record
  found once can still be lost later);
- every VM protected again within a bound after the heal (the recovery time is recorded:
  heal to every VM protected on both hosts with a checkpoint completed after the heal, which
  a pair that has not noticed the fault yet cannot show; so it includes up to one checkpoint
  interval even when nothing had to recover);
- no leaked QEMU processes or namespaces at the end.

Progress on stderr; a table, then one JSON object as the last stdout line: ``rounds``,
``layout``, ``violations`` (list), ``recovery_s`` ({p50, p99}), ``by_fault`` (rounds and
violations per fault), ``stopped`` (why the campaign ended early, else null). SIGINT or SIGTERM
ends it after the current round: every record is checked, then the report. Exit status 1 on any
violation.

Faults: kill -9 of the primary or the secondary QEMU, kill -9 of an ftd (restarted 1-4 s
later), a host's death (its ftd and all its QEMUs, ftd restarted 3 s later), a cut of the primary's
link (8-12 s), a partition between the VM hosts (6-10 s), the broker stopped (5-15 s), the
primary QEMU frozen with SIGSTOP (6-10 s), the secondary's disk full (its host's COLO overlay
directory, a tmpfs here, filled for 8-12 s: every secondary on that host), corrupt bus
messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ftctl.table import render
from ftd.errors import LabError
from lab.clients import DISK_PORT, DiskWriterClient
from lab.cluster import DISK_MIB, LabCluster, VmPlan, host_dirs
from lab.image import build_guest
from lab.invariants import PrimarySampler
from lab.netns import list_namespaces

PROTECT_BOUND_S = 150.0
#: The lab's disks (64 MiB: 131072 records of a sector). The main writers (10 records/s)
#: use the sectors below BURST_SECTOR (2.2 hours of writing); the burst writers of
#: fill_secondary_disk the sectors from there, BURST_SPAN per burst and VM (25 bursts a VM).
DISK_SECTORS = DISK_MIB * 2048
BURST_SECTOR = 80000
BURST_SPAN = 2000
#: Every this many rounds, and at the end, the check covers every record acknowledged so far.
FULL_CHECK_EVERY = 10


@dataclass(frozen=True)
class Layout:
    vm_hosts: tuple[str, ...]
    plans: tuple[VmPlan, ...]
    groups: tuple[dict[str, object], ...] = ()


_CKPT = {"policy": "fixed", "interval_ms": 3000}
LAYOUTS = {
    "small": Layout(("a", "b"), (VmPlan("vm1", "a", "b"),)),
    "full": Layout(
        ("a", "b", "d"),
        (
            VmPlan("vm1", "a", "b", workloads=("disk",), checkpoint=_CKPT),
            VmPlan("vm2", "b", "d", workloads=("disk",), checkpoint=_CKPT),
            VmPlan("vm3", "d", "a", workloads=("disk",), checkpoint=_CKPT),
            VmPlan("vm4", "a", "d", workloads=("disk",), checkpoint=_CKPT),
        ),
        (
            {"name": "g1", "members": ["vm1", "vm2"], "policy": "failover-all"},
            {"name": "g2", "members": ["vm3", "vm4"], "policy": "rollback"},
        ),
    ),
}


def say(msg: str) -> None:
    # Monotonic time, as the invariant samples carry it: a violation is placed in its round.
    print(f"chaos: [{time.monotonic():.1f}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Round:
    n: int
    fault: str
    target: str
    recovery_s: float | None = None
    violations: list[str] = field(default_factory=list)
    #: Whether this round checked every record acknowledged so far (else only newer ones).
    full_check: bool = False


@dataclass
class Writer:
    """One VM's outside disk writer, and the burst writers' ranges to check on it."""

    vm: str
    disk: DiskWriterClient | None = None
    task: asyncio.Task[None] | None = None
    first_sector: int = 1
    #: (first, last acknowledged) record of each burst writer, checked after each round.
    bursts: list[tuple[int, int]] = field(default_factory=list)
    #: Records up to here were found on the disk by an earlier check; bursts before this
    #: index too. A round checks what is newer; every FULL_CHECK_EVERY rounds and at the end
    #: everything is checked again (a record found once can still be lost later).
    checked_to: int = 0
    bursts_checked: int = 0

    @property
    def broken(self) -> bool:
        return (
            self.disk is None
            or self.disk.error is not None
            or self.task is None
            or (self.task.done())
        )


class Campaign:
    def __init__(self, c: LabCluster, rng: random.Random) -> None:
        self.c = c
        self.rng = rng
        self.vms = [p.name for p in c.plans]
        self.writers = {vm: Writer(vm) for vm in self.vms}

    # -- helpers ----------------------------------------------------------------------------
    async def protected(
        self, vm: str, bound: float = PROTECT_BOUND_S, since: float | None = None
    ) -> tuple[str, str]:
        """(primary, secondary) of ``vm`` once protected, with a checkpoint completed after
        ``since`` (a ``time.time()``) when given. Raises LabError after ``bound``."""
        return await asyncio.to_thread(self.c.wait_protected, vm, bound, since)

    async def all_protected(
        self, bound: float = PROTECT_BOUND_S, since: float | None = None
    ) -> dict[str, tuple[str, str]]:
        """Every VM protected (one shared bound), with a checkpoint after ``since`` (default:
        this call's start); its (primary, secondary). Raises LabError."""
        deadline = time.monotonic() + bound
        # One reference for all VMs: each VM's own call start would make them wait for their
        # next checkpoints one after another.
        since = time.time() if since is None else since
        out = {}
        for vm in self.vms:
            out[vm] = await self.protected(vm, max(1.0, deadline - time.monotonic()), since)
        return out

    async def writer(self, vm: str) -> None:
        """(Re)connect ``vm``'s disk writer from the client host, continuing the numbering."""
        w = self.writers[vm]
        if w.disk is not None:
            if w.task is not None:
                w.task.cancel()
                await asyncio.gather(w.task, return_exceptions=True)
            w.disk.abort()
        nxt = (w.disk.last_acked + 1) if w.disk and w.disk.last_acked else 1
        if nxt >= BURST_SECTOR:
            raise LabError(
                f"{vm}: its writer reached sector {BURST_SECTOR}, where the burst records "
                "start: the campaign ran longer than its disk has room for"
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                r, wr = await self.c.lab.open_connection(
                    self.c.client, self.c.vm_address(vm), DISK_PORT
                )
                break
            except OSError as err:
                # The guest's services come up a few seconds after boot, later with 4 guests
                # booting on 2 cores; a guest that never answers fails the round.
                if time.monotonic() > deadline:
                    raise LabError(f"{vm}: disk service unreachable for 60 s: {err}") from err
                await asyncio.sleep(1.0)
        w.disk = DiskWriterClient(r, wr, start=nxt, rate=10, answer_timeout=60)
        w.task = asyncio.create_task(
            w.disk.run(count=BURST_SECTOR - nxt), name=f"chaos-disk-writer-{vm}"
        )

    def ftd_restart(self, host: str) -> None:
        f = self.c.ftd[host]
        if f.proc is None or f.proc.poll() is not None:
            f.start()
            f.wait_ready()

    def kill_ftd(self, host: str) -> None:
        self.c.ftd[host].kill()

    async def burst(self, vms: list[str], seconds: float) -> None:
        """Write records as fast as the guests ack them, for ``seconds``, on a second
        connection per VM and a sector range of its own; what was acknowledged is checked
        once the VMs are protected again (``Writer.bursts``)."""
        started: list[tuple[str, int, DiskWriterClient, asyncio.Task[None]]] = []
        for vm in vms:
            start = BURST_SECTOR + BURST_SPAN * len(self.writers[vm].bursts)
            if start + BURST_SPAN > DISK_SECTORS:
                raise LabError(f"{vm}: no room left on its disk for another burst writer")
            addr = self.c.vm_address(vm)
            r, w = await self.c.lab.open_connection(self.c.client, addr, DISK_PORT)
            b = DiskWriterClient(r, w, start=start, rate=None, answer_timeout=60)
            started.append((vm, start, b, asyncio.create_task(b.run(count=BURST_SPAN))))
        await asyncio.sleep(seconds)
        for vm, start, b, task in started:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            b.abort()
            if b.last_acked is not None:
                self.writers[vm].bursts.append((start, b.last_acked))

    def qemu_pid(self, host: str, vm: str) -> int | None:
        try:
            pid = self.c.vm_status(host, vm).get("qemu_pid")
        except Exception:
            return None
        return pid if isinstance(pid, int) else None

    def qemu_pids(self, host: str) -> list[int]:
        """Every QEMU ftd on ``host`` runs (for a host's death)."""
        pids = [self.qemu_pid(host, vm) for vm in self.vms]
        return [p for p in pids if p]

    def secondaries_on(self, host: str, pairs: dict[str, tuple[str, str]]) -> list[str]:
        return [vm for vm, (_, s) in pairs.items() if s == host]

    # -- faults: each injects, waits, heals; returns the target --------------------------------
    async def fault(self, name: str, vm: str, pairs: dict[str, tuple[str, str]]) -> str:
        c = self.c
        p, s = pairs[vm]
        if name == "kill_primary_qemu":
            pid = self.qemu_pid(p, vm)
            if pid:
                os.kill(pid, signal.SIGKILL)
            return f"{vm}@{p}"
        if name == "kill_secondary_qemu":
            pid = self.qemu_pid(s, vm)
            if pid:
                os.kill(pid, signal.SIGKILL)
            return f"{vm}@{s}"
        if name == "kill_ftd":
            target = self.rng.choice([p, s])
            await asyncio.to_thread(self.kill_ftd, target)
            await asyncio.sleep(self.rng.uniform(1, 4))
            await asyncio.to_thread(self.ftd_restart, target)
            return target
        if name == "host_death":
            pids = self.qemu_pids(p)
            await asyncio.to_thread(self.kill_ftd, p)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(3)
            await asyncio.to_thread(self.ftd_restart, p)
            return p
        if name == "link_cut":
            c.lab.cut(p)
            await asyncio.sleep(self.rng.uniform(8, 12))
            c.lab.restore(p)
            return p
        if name == "partition":
            c.lab.partition(p, s)
            await asyncio.sleep(self.rng.uniform(6, 10))
            c.lab.heal(p, s)
            return f"{p}|{s}"
        if name == "broker_stop":
            c.lab.broker.stop()
            await asyncio.sleep(self.rng.uniform(5, 15))
            c.lab.broker.start()
            return "broker"
        if name == "sigstop_qemu":
            pid = self.qemu_pid(p, vm)
            if pid:
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(self.rng.uniform(6, 10))
                os.kill(pid, signal.SIGCONT)
            return f"{vm}@{p}"
        if name == "fill_secondary_disk":
            # Fill the tmpfs that holds the host's COLO overlays, as its QEMUs see it, while a
            # second client per VM with a secondary there makes its guest write new blocks (a
            # full disk matters when the overlays must grow; the steady writers alone reuse
            # their clusters). One process fills, waits and frees, inside a secondary QEMU's
            # mount namespace: the QEMU is killed meanwhile (its copy broken), and its
            # namespace would be out of reach afterwards.
            pid = self.qemu_pid(s, vm)
            if pid:
                fill = host_dirs(c.lab, s)[1] / "colo" / "fill"
                secs = self.rng.uniform(8, 12)
                script = 'dd if=/dev/zero of="$1" bs=1M 2>/dev/null; sleep "$2"; rm -f "$1"'
                argv = ["nsenter", "-t", str(pid), "-m", "sh", "-c", script, "sh", str(fill)]
                proc = await asyncio.create_subprocess_exec(*argv, f"{secs:.1f}")
                await self.burst(self.secondaries_on(s, pairs), secs)
                if await asyncio.wait_for(proc.wait(), 60) != 0:
                    raise LabError(f"filling {fill} failed (exit {proc.returncode})")
            return s
        if name == "corrupt_bus":
            prefix = f"ftd/lab{c.lab.id}"
            for topic, payload in (
                (f"{prefix}/vm/{vm}/state/{p}", '{"v":1,"kind":"vm_state","host":"zz"}'),
                (f"{prefix}/host/{s}", "garbage"),
                (f"{prefix}/hb/{p}", '{"v":1,"kind":"hb","host":"' + p + '","epoch":-1}'),
            ):
                c.lab.run(
                    c.client,
                    ["mosquitto_pub", "-h", c.lab.address("broker"), "-t", topic, "-m", payload],
                    check=False,
                    timeout=10,
                )
            return "bus"
        raise ValueError(f"unknown fault {name}")

    async def check(self, vm: str, acked_before: int | None, rnd: Round, full: bool) -> None:
        """The records acknowledged on ``vm`` before the fault, and the burst records, are on
        its disk now: those not found by an earlier check, or all of them when ``full`` (a
        guest reads every record it checks: checking all of them each round would make a
        round's check grow with the campaign)."""
        w = self.writers[vm]
        if w.broken:
            # A fault may break the client's TCP connection (e.g. a long partition): that is
            # not a loss; what was acknowledged must still be on the disk.
            say(f"round {rnd.n}: {vm} writer ended; reconnecting to check")
            await self.writer(vm)
        if acked_before is None:
            return
        first = w.first_sector if full else max(w.first_sector, w.checked_to + 1)
        if first > acked_before:
            return
        for _ in range(3):
            try:
                assert w.disk is not None
                check = await w.disk.verify(first, acked_before)
                break
            except Exception as err:
                say(f"round {rnd.n}: {vm} verify failed ({err}); reconnecting")
                await self.writer(vm)
        else:
            rnd.violations.append(f"{vm}: could not verify the disk")
            return
        if not check.ok:
            rnd.violations.append(f"{vm}: acknowledged records lost: {check}")
        w.checked_to = max(w.checked_to, acked_before)
        for b_first, b_last in w.bursts[0 if full else w.bursts_checked :]:
            burst = await w.disk.verify(b_first, b_last)
            if not burst.ok:
                rnd.violations.append(f"{vm}: acknowledged burst records lost: {burst}")
        w.bursts_checked = len(w.bursts)

    async def round(self, n: int, name: str, full_check: bool) -> Round:
        pairs = await self.all_protected()
        for vm in self.vms:
            if self.writers[vm].broken:
                await self.writer(vm)
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))
        acked_before = {vm: w.disk.last_acked if w.disk else None for vm, w in self.writers.items()}
        vm = self.rng.choice(self.vms)
        rnd = Round(n, name, "")
        say(f"round {n}: {name} around {vm} (primary {pairs[vm][0]})")
        rnd.target = await self.fault(name, vm, pairs)
        healed, healed_at = time.monotonic(), time.time()
        try:
            # A checkpoint after the heal on every VM: a status read right after a kill may
            # still say "protected" (ftd has not noticed yet); a completed checkpoint cannot.
            await self.all_protected(since=healed_at)
            rnd.recovery_s = round(time.monotonic() - healed, 2)
        except LabError as err:
            rnd.violations.append(f"not protected again: {str(err)[:300]}")
            return rnd
        rnd.full_check = full_check
        for v in self.vms:
            await self.check(v, acked_before[v], rnd, full_check)
        return rnd


FAULTS = (
    "kill_primary_qemu",
    "kill_secondary_qemu",
    "kill_ftd",
    "host_death",
    "link_cut",
    "partition",
    "broker_stop",
    "sigstop_qemu",
    "fill_secondary_disk",
    "corrupt_bus",
)
#: The lab gives each VM host's COLO overlay directory a tmpfs of this size, for
#: fill_secondary_disk (a secondary needs 64 MiB free there to be launched).
OVERLAY_TMPFS_MIB = 128


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


async def campaign(rounds: int, seed: int, layout_name: str) -> dict[str, object]:
    rng = random.Random(seed)
    layout = LAYOUTS[layout_name]
    results: list[Round] = []
    stopped: str | None = None
    leaks: list[str] = []
    c = LabCluster(
        layout.plans,
        vm_hosts=layout.vm_hosts,
        groups=layout.groups,
        guest=build_guest(),
        overlay_tmpfs_mib=OVERLAY_TMPFS_MIB * len(layout.plans),
    )
    with c:
        for plan in layout.plans:
            c.ftd[plan.primary].ctl("protect", plan.name)
        camp = Campaign(c, rng)
        await camp.all_protected(PROTECT_BOUND_S * 2)
        await asyncio.sleep(6)  # the guests' services come up a few seconds after boot
        for vm in camp.vms:
            await camp.writer(vm)
        order = [FAULTS[i % len(FAULTS)] for i in range(rounds)]
        rng.shuffle(order)
        samplers = [
            PrimarySampler(
                {h: c.observe_socket(h, plan.name) for h in (plan.primary, plan.secondary)}
            )
            for plan in layout.plans
        ]
        with contextlib.ExitStack() as stack:
            for smp in samplers:
                stack.enter_context(smp)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            for n, name in enumerate(order, 1):
                if stop.is_set():
                    stopped = f"stopped by a signal after round {n - 1} of {rounds}"
                    say(stopped)
                    break
                full = n % FULL_CHECK_EVERY == 0 or n == rounds
                try:
                    results.append(await camp.round(n, name, full))
                except Exception as err:
                    results.append(Round(n, name, "?", None, [f"round crashed: {err!r}"]))
                say(f"round {n}: {results[-1]}")
            if results and not results[-1].full_check:
                # Stopped early: check every record acknowledged so far all the same.
                final = Round(0, "final_check", "all VMs")
                try:
                    await camp.all_protected(since=time.time())
                    for vm in camp.vms:
                        w = camp.writers[vm]
                        last = w.disk.last_acked if w.disk else None
                        await camp.check(vm, last, final, True)
                except Exception as err:
                    final.violations.append(f"final check failed: {err!r}")
                results.append(final)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        for plan, smp in zip(layout.plans, samplers, strict=True):
            two = smp.violations()
            if two:
                results.append(
                    Round(
                        0,
                        "invariant",
                        plan.name,
                        None,
                        [f"{plan.name}: {len(two)} samples with two running primaries: {two[0]}"],
                    )
                )
        for w in camp.writers.values():
            if w.task is not None:
                w.task.cancel()
            if w.disk is not None:
                w.disk.abort()
        lab_id = c.lab.id
    if lab_id in list_namespaces():
        leaks.append(f"namespaces of lab {lab_id} left")
    ps = await asyncio.to_thread(
        subprocess.run, ["pgrep", "-f", f"ftdlab-{lab_id}"], capture_output=True, check=False
    )
    if ps.stdout.strip():
        leaks.append(f"processes of lab {lab_id} left: {ps.stdout.decode().split()}")
    violations = [f"round {r.n} {r.fault}: {v}" for r in results for v in r.violations] + leaks
    rec = [r.recovery_s for r in results if r.recovery_s is not None]
    by_fault: dict[str, dict[str, int]] = {}
    for r in results:
        if r.n == 0:
            continue
        f = by_fault.setdefault(r.fault, {"rounds": 0, "violations": 0})
        f["rounds"] += 1
        f["violations"] += len(r.violations)
    table = [
        [
            name,
            v["rounds"],
            v["violations"],
            pct([r.recovery_s for r in results if r.fault == name and r.recovery_s], 0.5),
            pct([r.recovery_s for r in results if r.fault == name and r.recovery_s], 0.99),
        ]
        for name, v in sorted(by_fault.items())
    ]
    print(render(["fault", "rounds", "violations", "recovery p50 s", "recovery p99 s"], table))
    return {
        "rounds": len([r for r in results if r.n]),
        "seed": seed,
        "layout": layout_name,
        "vms": len(layout.plans),
        "violations": violations,
        "recovery_s": {"p50": pct(rec, 0.5), "p99": pct(rec, 0.99)},
        "by_fault": by_fault,
        "stopped": stopped,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="full")
    ap.add_argument("--quick", action="store_true", help="10 rounds (every fault once)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    rounds = 10 if args.quick else args.rounds
    result = asyncio.run(campaign(rounds, args.seed, args.layout))
    print(json.dumps(result))
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
