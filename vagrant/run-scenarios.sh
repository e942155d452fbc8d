#!/usr/bin/env bash
# Run the lab scenarios on the Vagrant lab (after `vagrant up` in this directory).
# Usage: ./run-scenarios.sh [SCENARIO...]     default: all, in this order
#   cluster      every ftd active under systemd, bus connected, quorum held (3/3 voters)
#   protect      vm1 (a -> b) and vm2 (b -> a) reach state protected on both hosts
#   ftd-restart  `systemctl restart ftd` on a: the guests' QEMU pids do not change, VMs stay
#                protected (KillMode=process, re-attach)
#   ftd-kill     kill -9 of ftd on b: systemd restarts it (Restart=on-failure), guests survive
#   failover     kill -9 of vm1's primary QEMU on a while a client on w talks to the guest:
#                b takes over (same QEMU, now primary), the client's counter stays continuous,
#                a never runs a second primary
#   reprotect    vm1 gets a new secondary on a and is protected again (reprotect: auto)
# Prints PASS/FAIL per scenario with what was measured, then 'N passed, N failed'; exits 1 if
# any failed. Checks run on the machines through vagrant/probe.py (same ssh as `vagrant ssh`).
set -euo pipefail
cd "$(dirname "$0")"

all=(cluster protect ftd-restart ftd-kill failover reprotect)
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${all[@]}")
for s in "${scenarios[@]}"; do
    [[ " ${all[*]} " == *" $s "* ]] || { echo "run-scenarios: unknown scenario '$s' (one of: ${all[*]})" >&2; exit 2; }
done
command -v vagrant >/dev/null || { echo "run-scenarios: vagrant is not installed" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# One `vagrant ssh-config` instead of a `vagrant ssh` per call: each of those starts Ruby
# (about a second), which would blur the timings measured below.
vagrant ssh-config a b w > "$work/ssh.cfg" 2>"$work/ssh-config.err" || {
    echo "run-scenarios: vagrant ssh-config failed (is the lab up? vagrant up):" >&2
    cat "$work/ssh-config.err" >&2
    exit 2
}
on() { local host=$1; shift; ssh -F "$work/ssh.cfg" -o LogLevel=ERROR "$host" "$@"; }
probe() { local host=$1; shift; on "$host" sudo /opt/ftd/.venv/bin/python /opt/ftd/vagrant/probe.py "$@"; }
# jget KEY[.KEY...]: one value from the JSON document on stdin.
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin)
for k in sys.argv[1].split("."): d=d[k]
print(d)' "$1"; }

passed=0 failed=0
pass() { passed=$((passed + 1)); echo "PASS $current: $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $current: $*"; return 1; }

guest_addr() { on a "sed -n 's/.*ftd.ip=\([0-9.]*\)\/.*/\1/p' /etc/ftd/ftd.yaml" | sed -n "$1p"; }

scenario_cluster() {
    local h unit out
    for h in a b w; do
        unit=ftd; [ "$h" = w ] && unit=ftd-witness
        on "$h" systemctl is-active --quiet "$unit" || fail "$unit on $h is not active" || return
        out=$(probe "$h" cluster) || fail "$h: $out" || return
    done
    pass "3 daemons active; quorum on w: $(echo "$out" | jget quorum.reason)"
}

scenario_protect() {
    local vm p s out took=""
    for vm in vm1:a:b vm2:b:a; do
        IFS=: read -r vm p s <<< "$vm"
        out=$(probe "$p" wait-vm "$vm" --state protected --role primary --timeout 300) \
            || fail "$vm on $p: $out" || return
        took+="$vm ${p}->${s} in $(echo "$out" | jget elapsed_s)s; "
        out=$(probe "$s" wait-vm "$vm" --state protected --role secondary --timeout 60) \
            || fail "$vm on $s: $out" || return
    done
    pass "$took"
}

qemu_pids() { # host vm... -> "vm=pid ..."
    local host=$1 vm out; shift
    for vm in "$@"; do
        if out=$(probe "$host" qemu-pid "$vm"); then
            printf '%s=%s ' "$vm" "$(echo "$out" | jget pid)"
        else
            printf '%s=none ' "$vm"
        fi
    done
}

scenario_ftd_restart() {
    local before after out
    before=$(qemu_pids a vm1 vm2)
    [[ "$before" != *none* ]] || fail "QEMUs on a before the restart: $before" || return
    on a sudo systemctl restart ftd || fail "systemctl restart ftd failed on a" || return
    after=$(qemu_pids a vm1 vm2)
    [ "$before" = "$after" ] || fail "QEMU pids changed across the restart: $before -> $after" || return
    out=$(probe a wait-vm vm1 --state protected --role primary --timeout 30) \
        || fail "vm1 after the restart: $out" || return
    pass "QEMU pids kept ($after); vm1 protected again after $(echo "$out" | jget elapsed_s)s"
}

scenario_ftd_kill() {
    local before after pid newpid out
    before=$(qemu_pids b vm1 vm2)
    pid=$(on b systemctl show -p MainPID --value ftd)
    [ "${pid:-0}" -gt 0 ] || fail "ftd on b has no main pid" || return
    # The main process only: `systemctl kill` would signal the whole cgroup, QEMUs included.
    on b sudo kill -9 "$pid"
    out=$(probe b wait-vm vm1 --state protected --role secondary --timeout 60) \
        || fail "vm1 on b after ftd was killed: $out" || return
    newpid=$(on b systemctl show -p MainPID --value ftd)
    [ "$newpid" != "$pid" ] && [ "$newpid" -gt 0 ] || fail "systemd did not restart ftd (pid $pid -> $newpid)" || return
    after=$(qemu_pids b vm1 vm2)
    [ "$before" = "$after" ] || fail "QEMU pids changed: $before -> $after" || return
    pass "ftd $pid -> $newpid by systemd; QEMU pids kept ($after); back in $(echo "$out" | jget elapsed_s)s"
}

scenario_failover() {
    local addr svm pid out client took primaries
    addr=$(guest_addr 1)
    [ -n "$addr" ] || fail "no guest address for vm1 in a's /etc/ftd/ftd.yaml" || return
    svm=$(qemu_pids b vm1)
    [[ "$svm" != *none* ]] || fail "no secondary QEMU of vm1 on b" || return
    out=$(probe a qemu-pid vm1) || fail "no primary QEMU of vm1 on a: $out" || return
    pid=$(echo "$out" | jget pid)
    # A client on w uses the guest across the failover, over one TCP connection.
    probe w counter "$addr" --duration 40 > "$work/counter.json" 2>&1 &
    client=$!
    sleep 10
    probe b wait-vm vm1 --state running_unprotected,reprotecting,protected --role primary \
        --timeout 60 > "$work/takeover.json" &
    local waiter=$!
    on a sudo kill -9 "$pid"
    wait "$waiter" || fail "no takeover on b: $(cat "$work/takeover.json")" || { wait "$client" || true; return 1; }
    took=$(jget elapsed_s < "$work/takeover.json")
    [ "$(qemu_pids b vm1)" = "$svm" ] || fail "b restarted the guest instead of promoting its secondary ($svm)" || { wait "$client" || true; return 1; }
    # Never two primaries: a's view of vm1 must not be a running primary any more.
    primaries=$(probe a wait-vm vm1 --state protected,running_unprotected,starting,syncing --role primary --timeout 1 || true)
    [[ "$primaries" == *'"reason"'* ]] || fail "a still reports vm1 as a running primary: $primaries" || { wait "$client" || true; return 1; }
    wait "$client" || fail "guest client: $(cat "$work/counter.json")" || return
    pass "takeover seen on b after ${took}s (upper bound: includes ssh); client: $(jget reason < "$work/counter.json"), longest silence $(jget longest_silence_s < "$work/counter.json")s"
}

scenario_reprotect() {
    local out
    out=$(probe a wait-vm vm1 --state protected --role secondary --timeout 300) \
        || fail "vm1 has no new secondary on a: $out" || return
    pass "vm1 protected again, a now secondary, after $(echo "$out" | jget elapsed_s)s"
}

for current in "${scenarios[@]}"; do
    "scenario_${current//-/_}" || true
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
