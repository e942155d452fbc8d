"""Loading the configuration: YAML text -> checked :class:`~ftd.config.schema.Config`.

The walk is driven by the schema's dataclasses: each key is converted by its annotated type and
checked against its :class:`~ftd.config.schema.FieldSpec`; then the cross-field rules below run.
Every problem becomes a :class:`~ftd.errors.ConfigIssue` located by its key path
(``vms[2].memory_mib``) and all of them are reported together in one
:class:`~ftd.errors.ConfigError`.  A value that failed stays in the tree as :data:`_BAD` (and a
record with a failed field as a :class:`_Partial`), so rules about the other values still run.

The host identity is taken from the file's ``host``, overridden by env ``FTD_HOST``, overridden by
the ``host`` argument (the command line's ``--host``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from ftd.config.schema import (
    DEFAULT_RUN_DIR,
    ENV_HOST,
    PORT_SPAN,
    Broker,
    Bus,
    Checkpoint,
    Cluster,
    Config,
    Fence,
    FieldSpec,
    Group,
    Qemu,
    Vm,
    describe_type,
    field_types,
    optional_inner,
    spec_of,
)
from ftd.errors import ConfigError, ConfigIssue

#: A cluster file is a few KiB; anything much larger is a mistake (or an attack on the parser).
MAX_CONFIG_BYTES = 1 << 20
#: Past this many issues the rest are counted, not listed: one root mistake can cascade.
MAX_ISSUES = 100
#: The path of issues about the document as a whole (syntax, root type).
ROOT = "(root)"

_SIMPLE_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")
_HUGE = 10**15


class _Bad:
    """A value that failed conversion; every attribute of it is bad too and it iterates empty."""

    def __getattr__(self, name: str) -> _Bad:
        return self

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "<invalid>"


_BAD = _Bad()


class _Partial:
    """A record with a failed field: its good fields stay readable for the cross-field rules."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        return self._values.get(name, _BAD)


def _ok(*values: Any) -> bool:
    return not any(isinstance(v, (_Bad, _Partial)) for v in values)


class _Issues:
    def __init__(self) -> None:
        self.items: list[ConfigIssue] = []
        self.total = 0
        #: Set when the walk stopped early because the list was full.
        self.truncated = False

    def add(self, path: str, message: str) -> None:
        self.total += 1
        if len(self.items) < MAX_ISSUES:
            self.items.append(ConfigIssue(path or ROOT, message))

    @property
    def full(self) -> bool:
        return self.total >= MAX_ISSUES

    def result(self) -> list[ConfigIssue]:
        if self.truncated or self.total > len(self.items):
            return [*self.items, ConfigIssue(ROOT, "more issues not shown")]
        return list(self.items)


def _at(path: str, *parts: str | int) -> str:
    for part in parts:
        if isinstance(part, int):
            path = f"{path}[{part}]"
        elif path:
            path = f"{path}.{part}"
        else:
            path = part
    return path


def _show_int(value: int) -> str:
    # str() of an int beyond 4300 digits raises ValueError; huge values are not worth printing.
    if abs(value) >= _HUGE:
        return f"a {value.bit_length()}-bit integer"
    return str(value)


def _quote(text: str) -> str:
    return repr(text[:60] + "...") if len(text) > 60 else repr(text)


def _describe(value: object) -> str:
    """What a YAML value is, in YAML's words, for 'expected X, got Y' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {_show_int(value)}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, bytes):
        return "binary"
    return type(value).__name__


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys (plain YAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                shown = _quote(key) if isinstance(key, str) else _describe(key)
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {shown}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: bytes | str, out: _Issues) -> object:
    if len(text) > MAX_CONFIG_BYTES:
        out.add(ROOT, f"file is larger than {MAX_CONFIG_BYTES} bytes; not a configuration")
        return _BAD
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = ": ".join(p for p in (err.context, err.problem) if p)
        out.add(ROOT, f"YAML error{where}: {what}")
    except yaml.YAMLError as err:
        out.add(ROOT, "YAML error: " + " ".join(str(err).split()))
    except (ValueError, OverflowError, LookupError, TypeError, AttributeError) as err:
        # PyYAML's constructors let Python errors of odd scalars through: a 5000-digit number,
        # "!!int ''" (IndexError), "!!bool x" (KeyError), "!!timestamp x" (AttributeError).
        reason = "a number with too many digits" if "digits" in str(err) else repr(err)
        out.add(ROOT, f"unreadable YAML value: {reason[:200]}")
    except RecursionError:
        out.add(ROOT, "YAML nested too deeply")
    return _BAD


class _Converter:
    """Walks raw YAML data along the schema; collects issues, returns values (or _BAD)."""

    def __init__(self, out: _Issues) -> None:
        self.out = out
        self.ctx: dict[str, Any] = {"run_dir": DEFAULT_RUN_DIR}

    def record(self, cls: type, raw: object, path: str) -> Any:
        if not isinstance(raw, dict):
            self.out.add(path, f"expected a mapping, got {_describe(raw)}")
            return _BAD
        before = self.out.total
        fields = dataclasses.fields(cls)
        known = [f.name for f in fields]
        for key in raw:
            if not isinstance(key, str):
                self.out.add(path, f"keys must be strings, got {_describe(key)}")
            elif key not in known:
                hint = _suggest(key, known) or f" (known keys: {', '.join(known)})"
                where = _at(path, key) if _SIMPLE_KEY_RE.fullmatch(key) else path
                self.out.add(where, f"unknown key {_quote(key)}{hint}")
        hints = field_types(cls)
        values: dict[str, Any] = {}
        derived: list[tuple[str, FieldSpec]] = []
        for field in fields:
            spec = spec_of(field)
            tp = hints[field.name]
            fpath = _at(path, field.name)
            if field.name in raw:
                value = self.convert(tp, spec, raw[field.name], fpath)
            elif spec.derive is not None:
                derived.append((field.name, spec))
                continue
            elif dataclasses.is_dataclass(tp) and field.default_factory is not dataclasses.MISSING:
                # An absent section is built from {} rather than taken from its default, so its
                # derived keys follow the context (control.socket follows paths.run_dir).
                value = self.record(typing.cast(type, tp), {}, fpath)
            elif field.default is not dataclasses.MISSING:
                value = field.default
            else:
                self.out.add(fpath, "required key missing")
                value = _BAD
            values[field.name] = value
            if spec.context is not None and _ok(value):
                self.ctx[spec.context] = value
        for name, spec in derived:
            assert spec.derive is not None
            values[name] = spec.derive(values, self.ctx)
        obj: Any = _Partial(values) if self.out.total != before else cls(**values)
        for rule in _RULES.get(cls, ()):
            rule(obj, path, self.out)
        return obj

    def convert(self, tp: Any, spec: FieldSpec, raw: object, path: str) -> Any:
        inner = optional_inner(tp)
        if inner is not None:
            return None if raw is None else self.convert(inner, spec, raw, path)
        origin = typing.get_origin(tp)
        if origin is tuple:
            return self._sequence(typing.get_args(tp)[0], spec, raw, path)
        if dataclasses.is_dataclass(tp) and tp is not Broker:
            return self.record(typing.cast(type, tp), raw, path)
        value = self._scalar(tp, spec, raw, path)
        if value is _BAD:
            return _BAD
        if spec.normalize is not None:
            value = spec.normalize(value)
        if spec.check is not None:
            problem = spec.check(value)
            if problem is not None:
                self.out.add(path, problem)
                return _BAD
        return value

    def _sequence(self, item_tp: Any, spec: FieldSpec, raw: object, path: str) -> Any:
        if not isinstance(raw, list):
            hint = f"; {spec.hint}" if spec.hint else ""
            self.out.add(
                path, f"expected a list of {describe_type(item_tp)}, got {_describe(raw)}{hint}"
            )
            return _BAD
        if len(raw) < spec.min_items:
            # Bad rather than short: rules that look the items up would only add noise.
            self.out.add(path, f"needs at least {spec.min_items} item(s), got {len(raw)}")
            return _BAD
        items: list[Any] = []
        # The item keeps the list's constraints (pattern, bounds) but not its check or
        # minimum length, which are about the whole list.
        item_spec = dataclasses.replace(spec, min_items=0, check=None, hint=None)
        for i, item in enumerate(raw):
            if self.out.full:
                self.out.truncated = True
                items.append(_BAD)
                continue
            items.append(self.convert(item_tp, item_spec, item, _at(path, i)))
        value = tuple(items)
        if spec.check is not None and all(_ok(v) for v in value):
            problem = spec.check(value)
            if problem is not None:
                self.out.add(path, problem)
        return value

    def _scalar(self, tp: Any, spec: FieldSpec, raw: object, path: str) -> Any:
        expected = describe_type(tp, spec)
        got = _describe(raw)
        if typing.get_origin(tp) is Literal:
            choices = [str(a) for a in typing.get_args(tp)]
            if isinstance(raw, str) and raw in choices:
                return raw
            hint = _suggest(raw, choices) if isinstance(raw, str) else ""
            self.out.add(path, f"expected {expected}, got {got}{hint}")
            return _BAD
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            self.out.add(path, f"expected boolean (true or false), got {got}")
            return _BAD
        if tp is int:
            return self._int(spec, raw, path)
        if tp not in (str, Path, Broker):
            raise TypeError(f"schema type {tp!r} at {path} has no converter")
        if not isinstance(raw, str):
            quote = " (quote it to make it a string)" if isinstance(raw, (bool, int, float)) else ""
            self.out.add(path, f"expected {expected}, got {got}{quote}")
            return _BAD
        if not raw:
            self.out.add(path, "must not be empty")
            return _BAD
        if _CONTROL_CHARS_RE.search(raw):
            self.out.add(path, f"{_quote(raw)} contains control characters")
            return _BAD
        if spec.pattern is not None and not re.fullmatch(spec.pattern, raw):
            self.out.add(path, f"{_quote(raw)} does not match {spec.pattern}")
            return _BAD
        if tp is Broker:
            try:
                return Broker.parse(raw)
            except ValueError as err:
                self.out.add(path, str(err))
                return _BAD
        if tp is Path:
            if not raw.startswith("/"):
                self.out.add(path, f"{_quote(raw)} must be an absolute path")
                return _BAD
            if "," in raw:
                # QEMU splits its option strings at commas; refusing them beats escaping them.
                self.out.add(path, f"{_quote(raw)} must not contain ','")
                return _BAD
            return Path(raw)
        return raw

    def _int(self, spec: FieldSpec, raw: object, path: str) -> Any:
        if isinstance(raw, bool):
            self.out.add(
                path,
                f"expected integer, got {_describe(raw)} (YAML reads yes/no/on/off as booleans)",
            )
            return _BAD
        if not isinstance(raw, int):
            self.out.add(path, f"expected integer, got {_describe(raw)}")
            return _BAD
        if spec.lo is not None and raw < spec.lo:
            self.out.add(path, f"must be >= {spec.lo}, got {_show_int(raw)}")
            return _BAD
        if spec.hi is not None and raw > spec.hi:
            self.out.add(path, f"must be <= {spec.hi}, got {_show_int(raw)}")
            return _BAD
        return raw


# Cross-field rules.  Each receives a record (or a _Partial of it) and its path; a rule skips
# what it cannot judge because a value it needs already failed.


def _fence_rules(fence: Any, path: str, out: _Issues) -> None:
    agent = fence.agent
    if not _ok(agent):
        return
    for key, owner in (("command", "command"), ("uri", "libvirt")):
        value = getattr(fence, key)
        if agent == owner and value is None:
            out.add(_at(path, key), f"required when agent is {owner!r}")
        elif agent != owner and value is not None and _ok(value):
            out.add(_at(path, key), f"only used with agent {owner!r} (agent is {agent!r})")


def _cluster_rules(cluster: Any, path: str, out: _Issues) -> None:
    hb, peer = cluster.heartbeat_interval_ms, cluster.peer_timeout_ms
    lease = cluster.self_fence_lease_ms
    if _ok(hb, peer) and peer <= 2 * hb:
        out.add(
            _at(path, "peer_timeout_ms"),
            f"must be greater than 2 x heartbeat_interval_ms ({2 * hb}), got {peer}",
        )
    if _ok(peer, lease) and lease < peer:
        out.add(
            _at(path, "self_fence_lease_ms"),
            f"must be at least peer_timeout_ms ({peer}), got {lease}: a host would fence itself "
            "over a silence its peers do not yet count as a failure",
        )
    names: dict[str, int] = {}
    addresses: dict[str, int] = {}
    voters = 0
    for i, host in enumerate(cluster.hosts):
        if _ok(host.name):
            if host.name in names:
                out.add(
                    _at(path, "hosts", i, "name"),
                    f"duplicate host name {host.name!r} (also cluster.hosts[{names[host.name]}])",
                )
            names.setdefault(host.name, i)
        if _ok(host.address):
            key = host.address.lower()
            if key in addresses:
                out.add(
                    _at(path, "hosts", i, "address"),
                    f"{host.address!r} is also the address of cluster.hosts[{addresses[key]}]",
                )
            addresses.setdefault(key, i)
        if host.voter is True:
            voters += 1
    if _ok(cluster.hosts, cluster.allow_two_node) and all(_ok(h) for h in cluster.hosts):
        if voters == 0:
            out.add(_at(path, "hosts"), "no host is a voter; quorum needs at least one")
        elif voters == 2 and not cluster.allow_two_node:
            out.add(
                _at(path, "hosts"),
                "2 voters cannot keep a majority when one fails: add a witness host "
                "(role: witness) or set cluster.allow_two_node: true",
            )


def _bus_rules(bus: Any, path: str, out: _Issues) -> None:
    tls = bus.tls
    if _ok(bus.username, bus.password_file) and bus.password_file is not None and not bus.username:
        out.add(_at(path, "password_file"), "needs username")
    if tls is not None and _ok(tls):
        if (tls.cert_file is None) != (tls.key_file is None):
            out.add(_at(path, "tls"), "cert_file and key_file go together")
        if _ok(bus.brokers) and not any(_ok(b) and b.tls for b in bus.brokers):
            out.add(_at(path, "tls"), "TLS files given but no broker uses mqtts://")
    if not _ok(bus.insecure, bus.username, bus.password_file, tls) or bus.insecure:
        return
    password = bus.username is not None and bus.password_file is not None
    client_cert = tls is not None and tls.cert_file is not None and tls.key_file is not None
    for i, broker in enumerate(bus.brokers):
        if not _ok(broker) or broker.loopback:
            continue
        if not broker.tls or not (password or client_cert):
            out.add(
                _at(path, "brokers", i),
                f"remote broker {broker} refused without TLS (mqtts://) and credentials "
                "(username + password_file, or tls.cert_file + tls.key_file); set "
                "bus.insecure: true to allow it on a trusted lab network",
            )


def _qemu_rules(qemu: Any, path: str, out: _Issues) -> None:
    if _ok(qemu.runtime_tree, qemu.binary) and None not in (qemu.runtime_tree, qemu.binary):
        out.add(_at(path, "binary"), "runtime_tree and binary are mutually exclusive")


def _checkpoint_rules(cp: Any, path: str, out: _Issues) -> None:
    lo, mid, hi = cp.min_interval_ms, cp.interval_ms, cp.max_interval_ms
    if _ok(lo, hi) and lo > hi:
        out.add(
            _at(path, "min_interval_ms"),
            f"must not exceed max_interval_ms ({hi}), got {lo}",
        )
    elif _ok(lo, mid, hi) and not lo <= mid <= hi:
        out.add(
            _at(path, "interval_ms"),
            f"must be between min_interval_ms ({lo}) and max_interval_ms ({hi}), got {mid}",
        )
    if not _ok(cp.policy):
        return
    for key, owner, required in (
        ("dirty_pages", "dirty-threshold", True),
        ("pause_budget_ms", "pause-budget", True),
        ("link_bandwidth_mbps", "pause-budget", False),
        ("safety_margin_pct", "pause-budget", False),
    ):
        value = getattr(cp, key)
        if cp.policy == owner and value is None and required:
            out.add(_at(path, key), f"required when policy is {owner!r}")
        elif cp.policy != owner and value is not None and _ok(value):
            out.add(_at(path, key), f"only used with policy {owner!r} (policy is {cp.policy!r})")


def _vm_rules(vm: Any, path: str, out: _Issues) -> None:
    if _ok(vm.boot, vm.libvirt):
        if vm.boot is None and vm.libvirt is None:
            out.add(
                path,
                "needs boot (ftd launches QEMU) or libvirt (libvirt owns the domain)",
            )
        elif vm.boot is not None and vm.libvirt is not None:
            out.add(_at(path, "libvirt"), "boot and libvirt are mutually exclusive")
    if _ok(vm.libvirt) and vm.libvirt is not None:
        _libvirt_rules(vm.libvirt, _at(path, "libvirt"), out)
    if _ok(vm.primary, vm.secondary) and vm.primary == vm.secondary:
        out.add(_at(path, "secondary"), f"must differ from primary ({vm.primary!r})")


_LOCAL_QEMU_URIS = ("qemu:///system", "qemu:///session")


def _libvirt_rules(lv: Any, path: str, out: _Issues) -> None:
    if _ok(lv.uri) and lv.uri.replace("{host}", "") != lv.uri:
        out.add(_at(path, "uri"), "{host} is only expanded in domain")
    elif _ok(lv.uri) and lv.uri.split("?", 1)[0] not in _LOCAL_QEMU_URIS:
        out.add(
            _at(path, "uri"),
            f"{lv.uri!r} is not a local QEMU driver URI ({' or '.join(_LOCAL_QEMU_URIS)}, "
            "optionally with ?socket=...): ftd drives the QEMU of its own host",
        )
    if _ok(lv.domain):
        rest = lv.domain.replace("{host}", "")
        if "{" in rest or "}" in rest or "/" in lv.domain:
            out.add(
                _at(path, "domain"),
                f"{lv.domain!r}: a domain name, where only {{host}} is expanded (no / nor other "
                "braces)",
            )


def _group_rules(group: Any, path: str, out: _Issues) -> None:
    interval, timeout = group.epoch_interval_ms, group.epoch_timeout_ms
    if _ok(interval, timeout) and timeout >= interval:
        out.add(
            _at(path, "epoch_timeout_ms"),
            f"must be less than epoch_interval_ms ({interval}), got {timeout}",
        )
    seen: set[str] = set()
    for i, member in enumerate(group.members):
        if _ok(member) and member in seen:
            out.add(_at(path, "members", i), f"{member!r} is listed twice")
        seen.add(member)


def _host_refs(cfg: Any, out: _Issues) -> None:
    roles = {h.name: h.role for h in cfg.cluster.hosts if _ok(h.name, h.role)}
    complete = _ok(cfg.cluster.hosts) and all(_ok(h.name) for h in cfg.cluster.hosts)
    for i, vm in enumerate(cfg.vms):
        for key in ("primary", "secondary"):
            name = getattr(vm, key)
            if not _ok(name):
                continue
            if name not in roles:
                if complete:
                    known = ", ".join(sorted(roles))
                    out.add(
                        _at("vms", i, key),
                        f"unknown host {name!r}{_suggest(name, roles)} (cluster.hosts: {known})",
                    )
            elif roles[name] != "vm-host":
                out.add(
                    _at("vms", i, key),
                    f"host {name!r} is a {roles[name]}; VMs run only on role vm-host",
                )


def _vm_uniqueness(cfg: Any, out: _Issues) -> None:
    names: dict[str, int] = {}
    macs: dict[str, str] = {}
    # Per host: (first port, VM index, VM name) and (disk path -> VM index).
    ports: dict[str, list[tuple[int, int, str]]] = {}
    disks: dict[tuple[str, Path], int] = {}
    for i, vm in enumerate(cfg.vms):
        if _ok(vm.standby, vm.libvirt) and vm.standby == "cold" and vm.libvirt is not None:
            out.add(
                _at("vms", i, "standby"),
                "cold standby needs a VM ftd launches (boot), not a libvirt domain: this "
                "release pairs libvirt domains as hot (COLO) standbys only",
            )
        if _ok(vm.name):
            if vm.name in names:
                out.add(
                    _at("vms", i, "name"),
                    f"duplicate VM name {vm.name!r} (also vms[{names[vm.name]}])",
                )
            names.setdefault(vm.name, i)
        for j, nic in enumerate(vm.nics):
            if _ok(nic.mac):
                where = _at("vms", i, "nics", j)
                if nic.mac in macs:
                    out.add(_at(where, "mac"), f"{nic.mac} is already used by {macs[nic.mac]}")
                macs.setdefault(nic.mac, where)
        hosts = {h for h in (vm.primary, vm.secondary) if _ok(h)}
        base = vm.ports.base
        if _ok(base):
            reported = False
            for host in sorted(hosts):
                for other_base, k, other in ports.get(host, []):
                    if not reported and abs(base - other_base) < PORT_SPAN:
                        out.add(
                            _at("vms", i, "ports", "base"),
                            f"ports {base}-{base + PORT_SPAN - 1} overlap those of vms[{k}] "
                            f"{other!r} ({other_base}-{other_base + PORT_SPAN - 1}) on host "
                            f"{host!r}; each VM uses {PORT_SPAN} ports from its base",
                        )
                        reported = True
                ports.setdefault(host, []).append((base, i, vm.name if _ok(vm.name) else "?"))
        disk = vm.disk.path
        if _ok(disk):
            for host in sorted(hosts):
                if (host, disk) in disks:
                    out.add(
                        _at("vms", i, "disk", "path"),
                        f"{disk} is also the disk of vms[{disks[(host, disk)]}] on host {host!r}",
                    )
                    break
            for host in hosts:
                disks.setdefault((host, disk), i)


def _group_refs(cfg: Any, out: _Issues) -> None:
    vms = {vm.name: vm for vm in cfg.vms if _ok(vm.name)}
    complete = _ok(cfg.vms) and all(_ok(vm.name) for vm in cfg.vms)
    names: dict[str, int] = {}
    owner: dict[str, str] = {}
    for i, group in enumerate(cfg.groups):
        if _ok(group.name):
            if group.name in names:
                out.add(
                    _at("groups", i, "name"),
                    f"duplicate group name {group.name!r} (also groups[{names[group.name]}])",
                )
            names.setdefault(group.name, i)
        label = group.name if _ok(group.name) else f"groups[{i}]"
        for j, member in enumerate(group.members):
            if not _ok(member):
                continue
            if member not in vms:
                if complete:
                    out.add(
                        _at("groups", i, "members", j),
                        f"unknown VM {member!r}{_suggest(member, vms)}",
                    )
                continue
            if member in owner and owner[member] != label:
                out.add(
                    _at("groups", i, "members", j),
                    f"VM {member!r} is already in group {owner[member]!r}",
                )
            owner.setdefault(member, label)
            standby = vms[member].standby
            if group.policy == "rollback" and _ok(standby) and standby != "hot":
                out.add(
                    _at("groups", i, "members", j),
                    f"VM {member!r} is {standby} standby; policy rollback needs every member "
                    "hot (a COLO checkpoint to return to)",
                )


def _config_rules(cfg: Any, path: str, out: _Issues) -> None:
    _host_refs(cfg, out)
    _vm_uniqueness(cfg, out)
    _group_refs(cfg, out)


_RULES: dict[type, tuple[Callable[[Any, str, _Issues], None], ...]] = {
    Fence: (_fence_rules,),
    Cluster: (_cluster_rules,),
    Bus: (_bus_rules,),
    Checkpoint: (_checkpoint_rules,),
    Qemu: (_qemu_rules,),
    Vm: (_vm_rules,),
    Group: (_group_rules,),
    Config: (_config_rules,),
}


def _this_host(cfg: Any, origin: str, out: _Issues) -> None:
    if not _ok(cfg.host, cfg.cluster.hosts):
        return
    names = list(dict.fromkeys(h.name for h in cfg.cluster.hosts if _ok(h.name)))
    complete = all(_ok(h.name) for h in cfg.cluster.hosts)
    if cfg.host not in names and complete:
        out.add(
            "host",
            f"{cfg.host!r}{origin} is not one of cluster.hosts ({', '.join(names)})"
            f"{_suggest(cfg.host, names)}",
        )


def _build(
    data: object,
    out: _Issues,
    host: str | None,
    env: Mapping[str, str] | None,
) -> Config | None:
    if data is _BAD:
        return None
    if data is None:
        out.add(ROOT, "the file is empty; expected a mapping with cluster, bus, ...")
        return None
    if not isinstance(data, dict):
        out.add(ROOT, f"expected a mapping at the top level, got {_describe(data)}")
        return None
    environ = os.environ if env is None else env
    origin = ""
    if environ.get(ENV_HOST):
        data = {**data, "host": environ[ENV_HOST]}
        origin = f" (from env {ENV_HOST})"
    if host is not None:
        data = {**data, "host": host}
        origin = " (from --host)"
    cfg = _Converter(out).record(Config, data, "")
    _this_host(cfg, origin, out)
    return cfg if isinstance(cfg, Config) and out.total == 0 else None


def config_from_data(
    data: object,
    host: str | None = None,
    env: Mapping[str, str] | None = None,
    source: str = "",
) -> Config:
    """Check already parsed YAML data (a mapping) and return the Config.

    ``host`` (the command line) overrides env ``FTD_HOST``, which overrides the data's ``host``.
    ``env`` defaults to ``os.environ``.  Raises ConfigError listing every issue.
    """
    out = _Issues()
    cfg = _build(data, out, host, env)
    if cfg is None:
        raise ConfigError(out.result(), source=source)
    return cfg


def loads_config(
    text: str | bytes,
    host: str | None = None,
    env: Mapping[str, str] | None = None,
    source: str = "<string>",
) -> Config:
    """Parse YAML ``text`` and return the checked Config (host precedence as in load_config).

    Raises ConfigError listing every issue (YAML syntax errors give line and column).
    """
    out = _Issues()
    cfg = _build(_parse_yaml(text, out), out, host, env)
    if cfg is None:
        raise ConfigError(out.result(), source=source)
    return cfg


def _read(path: Path, out: _Issues) -> bytes | None:
    try:
        with path.open("rb") as f:
            # One byte past the limit is enough to know the file is too large.
            return f.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        out.add(ROOT, f"cannot read the file: {err.strerror or err}")
        return None


def load_config(
    path: Path,
    host: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load and check the configuration file at ``path``.

    This daemon's host is the file's ``host``, overridden by env ``FTD_HOST`` (from ``env``,
    default ``os.environ``), overridden by ``host`` (the ``--host`` option).
    Raises ConfigError (``source`` = the path) listing every issue, each with its key path;
    an unreadable file is a ConfigError too.
    """
    out = _Issues()
    text = _read(path, out)
    cfg = None if text is None else _build(_parse_yaml(text, out), out, host, env)
    if cfg is None:
        raise ConfigError(out.result(), source=str(path))
    return cfg


def validate_file(
    path: Path,
    host: str | None = None,
    env: Mapping[str, str] | None = None,
) -> list[ConfigIssue]:
    """Every issue of the file at ``path`` (empty when valid), for ``ftctl``/``ftd --check``.

    A cluster file need not name ``host``: when neither the file, env ``FTD_HOST`` nor ``host``
    gives one, its absence is not an issue.  Never raises ConfigError.
    """
    out = _Issues()
    text = _read(path, out)
    if text is not None:
        _build(_parse_yaml(text, out), out, host, env)
    return [
        issue
        for issue in out.result()
        if not (issue.path == "host" and issue.message == "required key missing")
    ]
