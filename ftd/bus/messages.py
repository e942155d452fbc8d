"""Wire messages of the ftd bus: versioned JSON, validated at the edge.

Every message is one JSON object::

    {"v": 1, "kind": "hb", "host": "a", "epoch": 7, "seq": 42, "ts": 1700000000.5, ...body}

``v`` is the protocol version, ``kind`` selects the message class, ``host`` is the sender,
``epoch`` the sender's boot generation (a counter ftd persists and bumps at every start) and
``seq`` the sender's sequence number within that epoch; ``ts`` is the sender's wall clock.
The bus stamps the header; callers build bodies with the header left at its defaults.

Topics live under ``{prefix}/{cluster}/`` (see :class:`Namespace`); the part after it is the
*suffix* the bus API speaks:

========================  =============================  ======================  ========
suffix                    kinds                          sender rule             default
========================  =============================  ======================  ========
``host/{host}``           HostRecord                     host == topic host      retained QoS 1
``hb/{host}``             Heartbeat                      host == topic host      QoS 0
``vm/{vm}/state/{host}``  VmState (vm == topic vm)       host == topic host      retained QoS 1
``cmd/{host}``            Command, CommandResult         any (topic = mailbox)   QoS 1
``group/{group}/...``     kinds registered with TOPIC    any; group == topic     QoS 1
                          ``"group"`` (the synchronizer)
``events``                Event                          any                     QoS 0
========================  =============================  ======================  ========

:func:`parse` refuses anything else with a :class:`~ftd.errors.MessageError` naming the
problem; :func:`encode` refuses to send what :func:`parse` would refuse to receive.  Unknown
fields are refused too: a change to the wire format bumps ``v``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ftd.errors import MessageError

PROTOCOL_VERSION = 1
#: Largest accepted payload; a host record of a few hundred VMs is well under it.
MAX_PAYLOAD = 64 * 1024
#: Deepest accepted JSON nesting (the deepest legitimate message is 3: object, args, list).
MAX_DEPTH = 4
#: Longest free-text field (reasons, event messages).
MAX_TEXT = 1024
#: Most entries in one JSON object or list inside a message.
MAX_ENTRIES = 1024
#: Integers travel as JSON numbers, so they stay where every JSON reader is exact.
MAX_INT = 2**53 - 1

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
STATE_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
POLICY_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")

HOST_ROLES = ("vm-host", "witness")
VM_ROLES = ("primary", "secondary", "standby", "none")
COMMAND_OPS = (
    "protect",
    "unprotect",
    "failover",
    "reprotect",
    "rollback",
    "checkpoint",
    "start",
    "stop",
)
SEVERITIES = ("debug", "info", "warning", "error", "critical")

TOPIC_CATEGORIES = ("host", "hb", "vm_state", "cmd", "group", "events")


class _InvalidError(Exception):
    """One value failed validation; ``reason`` says why (wrapped into MessageError)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- field constraints -----------------------------------------------------------------------

Check = Callable[[Any], str | None]


def _matches(regex: re.Pattern[str], what: str) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and not regex.fullmatch(value):
            return f"{value[:80]!r} is not a valid {what} (must match {regex.pattern})"
        return None

    return check


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, str) and value not in choices:
            return f"{value[:80]!r} is not one of {', '.join(choices)}"
        return None

    return check


def _non_negative(value: Any) -> str | None:
    if isinstance(value, int | float) and value < 0:
        return f"{value} is negative"
    return None


def _name_keys(value: Any) -> str | None:
    if isinstance(value, dict):
        for key in value:
            if not NAME_RE.fullmatch(key):
                return f"key {key[:80]!r} is not a valid name (must match {NAME_RE.pattern})"
    return None


def _policy_keys(value: Any) -> str | None:
    if isinstance(value, dict):
        for key, v in value.items():
            if not POLICY_KEY_RE.fullmatch(key):
                return f"policy key {key[:80]!r} is not a checkpoint setting name"
            if isinstance(v, list | dict):
                return f"policy key {key!r}: value must be a number, a string, true/false or null"
    return None


def _vm_roles(value: Any) -> str | None:
    if isinstance(value, dict):
        for key, role in value.items():
            if role not in VM_ROLES:
                return f"role {role!r} of {key!r} is not one of {', '.join(VM_ROLES)}"
    return _name_keys(value)


_is_name = _matches(NAME_RE, "name")


def _f(default: Any = dataclasses.MISSING, *, check: Check | None = None) -> Any:
    """A dataclass field with an extra wire check (the type check comes from the annotation)."""
    return field(default=default, metadata={"check": check} if check else {})


# --- messages ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Message:
    """The header every message carries; subclasses add a body and set KIND and TOPIC.

    The header fields default to "unstamped"; :meth:`stamped` (called by the bus) fills them.
    """

    KIND: ClassVar[str] = ""
    #: The topic category (one of TOPIC_CATEGORIES) the kind may be published on.
    TOPIC: ClassVar[str] = ""

    host: str = _f("", check=_is_name)
    epoch: int = _f(0, check=_non_negative)
    seq: int = _f(0, check=_non_negative)
    ts: float = _f(0.0, check=_non_negative)

    def stamped(self, *, host: str, epoch: int, seq: int, ts: float) -> typing.Self:
        """This message with its header set."""
        return dataclasses.replace(self, host=host, epoch=epoch, seq=seq, ts=ts)

    def problem(self) -> str | None:
        """A rule spanning several fields that this message breaks, or None."""
        return None


@dataclass(frozen=True, kw_only=True)
class HostRecord(Message):
    """A host's membership record (retained); ``online=False`` is its epitaph (the last will)."""

    KIND: ClassVar[str] = "host"
    TOPIC: ClassVar[str] = "host"

    online: bool
    role: str = _f("vm-host", check=_one_of(HOST_ROLES))
    voter: bool = True
    vms: dict[str, str] = field(default_factory=dict, metadata={"check": _vm_roles})
    qemu_version: str = ""
    started_at: float = _f(0.0, check=_non_negative)


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """I am alive; the next one comes within ``interval_ms``."""

    KIND: ClassVar[str] = "hb"
    TOPIC: ClassVar[str] = "hb"

    interval_ms: int = _f(1000, check=_non_negative)


Scalar = str | int | float | bool | None
ArgValue = Scalar | list[Scalar]


@dataclass(frozen=True, kw_only=True)
class VmState(Message):
    """The sender's view of one VM it runs (retained per VM and host)."""

    KIND: ClassVar[str] = "vm_state"
    TOPIC: ClassVar[str] = "vm_state"

    vm: str = _f(check=_is_name)
    state: str = _f(check=_matches(STATE_RE, "state"))
    role: str = _f(check=_one_of(VM_ROLES))
    generation: int = _f(0, check=_non_negative)
    pairing: int = _f(0, check=_non_negative)
    reason: str = ""
    checkpoints: int = _f(0, check=_non_negative)
    last_pause_ms: float | None = _f(None, check=_non_negative)
    last_checkpoint_at: float | None = _f(None, check=_non_negative)
    #: The live checkpoint policy (make_policy keys) when an operator changed it, and the
    #: revision (wall-clock time of the change) that orders changes across hosts.
    policy: dict[str, Scalar] | None = field(default=None, metadata={"check": _policy_keys})
    policy_rev: float = _f(0.0, check=_non_negative)
    #: A secondary waiting for its resync: the digest of its disk (see ftd.qemu.resync), as
    #: the disk size, chunk size and encoded sums, for an incremental resync.
    digest_size: int = _f(0, check=_non_negative)
    digest_chunk: int = _f(0, check=_non_negative)
    disk_digest: list[str] | None = None

    def problem(self) -> str | None:
        if self.disk_digest is not None and (self.digest_size <= 0 or self.digest_chunk <= 0):
            return "a disk_digest needs a positive digest_size and digest_chunk"
        return None


@dataclass(frozen=True, kw_only=True)
class Command(Message):
    """Do ``op`` on exactly one of ``vm`` or ``group``; answered by a CommandResult."""

    KIND: ClassVar[str] = "command"
    TOPIC: ClassVar[str] = "cmd"

    id: str = _f(check=_matches(TOKEN_RE, "command id"))
    op: str = _f(check=_one_of(COMMAND_OPS))
    vm: str | None = _f(None, check=_is_name)
    group: str | None = _f(None, check=_is_name)
    args: dict[str, ArgValue] = field(default_factory=dict, metadata={"check": _name_keys})

    def problem(self) -> str | None:
        if (self.vm is None) == (self.group is None):
            return "exactly one of 'vm' and 'group' must be set"
        return None


@dataclass(frozen=True, kw_only=True)
class CommandResult(Message):
    """The outcome of Command ``id``, sent to the requester's ``cmd/{host}`` mailbox."""

    KIND: ClassVar[str] = "command_result"
    TOPIC: ClassVar[str] = "cmd"

    id: str = _f(check=_matches(TOKEN_RE, "command id"))
    op: str = _f(check=_one_of(COMMAND_OPS))
    ok: bool
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class Event(Message):
    """Something an operator should see in ``ftctl events``."""

    KIND: ClassVar[str] = "event"
    TOPIC: ClassVar[str] = "events"

    name: str = _f(check=_matches(STATE_RE, "event name"))
    severity: str = _f("info", check=_one_of(SEVERITIES))
    message: str = ""
    vm: str | None = _f(None, check=_is_name)
    group: str | None = _f(None, check=_is_name)


# --- kind registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _FieldSpec:
    name: str
    tp: Any
    check: Check | None


_KINDS: dict[str, type[Message]] = {}
_SPECS: dict[type[Message], tuple[_FieldSpec, ...]] = {}

M = TypeVar("M", bound=type[Message])


def register_kind(cls: M) -> M:
    """Make ``cls`` (a frozen kw_only dataclass subclass of Message) parseable by its KIND.

    Other packages (the group synchronizer) register their own kinds with ``TOPIC="group"``;
    those need a ``group: str`` field, checked against the topic.  Raises MessageError when the
    kind is taken, the topic category unknown, or a field's type is not one the wire supports.
    """
    if not cls.KIND or cls.KIND in _KINDS:
        raise MessageError(f"message kind {cls.KIND!r} is empty or already registered")
    if cls.TOPIC not in TOPIC_CATEGORIES:
        raise MessageError(f"kind {cls.KIND!r}: unknown topic category {cls.TOPIC!r}")
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        _describe(hints[f.name])  # refuses unsupported types now, not on the first message
        specs.append(_FieldSpec(f.name, hints[f.name], f.metadata.get("check")))
    names = {s.name for s in specs}
    if cls.TOPIC == "group" and "group" not in names:
        raise MessageError(f"kind {cls.KIND!r} on group topics needs a 'group' field")
    _KINDS[cls.KIND] = cls
    _SPECS[cls] = tuple(specs)
    return cls


def kinds() -> dict[str, type[Message]]:
    """Every registered kind, by its wire name."""
    return dict(_KINDS)


# --- value validation (driven by the dataclass annotations) -------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is dict:
        key, value = typing.get_args(tp)
        if key is not str:
            raise MessageError(f"unsupported key type {key!r}")
        return f"an object of {_describe(value)}"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    simple = {
        str: "a string",
        bool: "true or false",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    if tp in simple:
        return simple[tp]
    raise MessageError(f"unsupported field type {tp!r}")


def _value(value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp``; raises _InvalidError naming what was expected."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for member in typing.get_args(tp):
            try:
                return _value(value, member)
            except _InvalidError:
                continue
        raise _InvalidError(f"expected {_describe(tp)}, got {_json_type(value)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise _InvalidError(f"expected {_describe(tp)}, got {_json_type(value)}")
        if len(value) > MAX_ENTRIES:
            raise _InvalidError(f"has {len(value)} entries, over the limit of {MAX_ENTRIES}")
        inner = typing.get_args(tp)[1]
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _InvalidError(f"key {key!r} is not a string")
            try:
                out[key] = _value(item, inner)
            except _InvalidError as err:
                raise _InvalidError(f"[{key[:80]!r}]: {err.reason}") from None
        return out
    if origin is list:
        if not isinstance(value, list):
            raise _InvalidError(f"expected {_describe(tp)}, got {_json_type(value)}")
        if len(value) > MAX_ENTRIES:
            raise _InvalidError(f"has {len(value)} entries, over the limit of {MAX_ENTRIES}")
        inner = typing.get_args(tp)[0]
        return [_value(item, inner) for item in value]
    if tp is type(None):
        if value is not None:
            raise _InvalidError(f"expected null, got {_json_type(value)}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _InvalidError(f"expected true or false, got {_json_type(value)}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _InvalidError(f"expected an integer, got {_json_type(value)}")
        if abs(value) > MAX_INT:
            raise _InvalidError(f"integer {value} is out of range (|x| <= 2**53-1)")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _InvalidError(f"expected a number, got {_json_type(value)}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise _InvalidError(f"number {value} is out of range (|x| <= 2**53-1)")
        if not math.isfinite(value):
            raise _InvalidError(f"number {value} is not finite")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _InvalidError(f"expected a string, got {_json_type(value)}")
        if len(value) > MAX_TEXT:
            raise _InvalidError(f"string of {len(value)} characters, over the limit of {MAX_TEXT}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _InvalidError("string contains an unpaired surrogate") from None
        return value
    raise _InvalidError(f"unsupported type {tp!r}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"[:60]
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    """Validate ``values`` (the wire object less v/kind) as ``cls``; raises MessageError."""
    specs = _SPECS[cls]
    known = {s.name for s in specs}
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        names = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise MessageError(f"kind {cls.KIND!r}: unknown field(s) {names}")
    out: dict[str, Any] = {}
    for spec in specs:
        # encode writes every field, so a missing one means a foreign or truncated sender
        if spec.name not in values:
            raise MessageError(f"kind {cls.KIND!r}: missing field {spec.name!r}")
        out[spec.name] = _checked(cls, spec, values[spec.name])
    msg = cls(**out)
    problem = msg.problem()
    if problem:
        raise MessageError(f"kind {cls.KIND!r}: {problem}")
    return msg


def _checked(cls: type[Message], spec: _FieldSpec, raw: Any) -> Any:
    try:
        value = _value(raw, spec.tp)
    except _InvalidError as err:
        raise MessageError(f"kind {cls.KIND!r}: field {spec.name!r}: {err.reason}") from None
    problem = spec.check(value) if spec.check and value is not None else None
    if problem:
        raise MessageError(f"kind {cls.KIND!r}: field {spec.name!r}: {problem}")
    return value


def validate(msg: Message) -> None:
    """Check a locally built message against the wire rules; raises MessageError."""
    cls = type(msg)
    if cls not in _SPECS:
        raise MessageError(f"{cls.__name__} is not a registered message kind")
    for spec in _SPECS[cls]:
        _checked(cls, spec, getattr(msg, spec.name))
    problem = msg.problem()
    if problem:
        raise MessageError(f"kind {cls.KIND!r}: {problem}")


# --- topics -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopicRef:
    """A parsed topic: its category and the names it carries (None where it carries none)."""

    prefix: str
    cluster: str
    category: str
    host: str | None = None
    vm: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class TopicPolicy:
    """How a topic category is published unless the caller says otherwise."""

    retain: bool
    qos: int


TOPIC_POLICY = {
    "host": TopicPolicy(retain=True, qos=1),
    "hb": TopicPolicy(retain=False, qos=0),
    "vm_state": TopicPolicy(retain=True, qos=1),
    "cmd": TopicPolicy(retain=False, qos=1),
    "group": TopicPolicy(retain=False, qos=1),
    "events": TopicPolicy(retain=False, qos=0),
}


def _name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise MessageError(f"{what} {value!r} is not a valid name (must match {NAME_RE.pattern})")
    return value


def topic_host(host: str) -> str:
    """Suffix of ``host``'s retained host record.  Raises MessageError for a bad name."""
    return f"host/{_name(host, 'host')}"


def topic_hb(host: str) -> str:
    """Suffix of ``host``'s heartbeats.  Raises MessageError for a bad name."""
    return f"hb/{_name(host, 'host')}"


def topic_vm_state(vm: str, host: str) -> str:
    """Suffix of ``host``'s retained view of ``vm``.  Raises MessageError for a bad name."""
    return f"vm/{_name(vm, 'vm')}/state/{_name(host, 'host')}"


def topic_cmd(host: str) -> str:
    """Suffix of ``host``'s command mailbox.  Raises MessageError for a bad name."""
    return f"cmd/{_name(host, 'host')}"


def topic_group(group: str, *rest: str) -> str:
    """Suffix under ``group``'s synchronizer space.  Raises MessageError for a bad name."""
    return "/".join([f"group/{_name(group, 'group')}", *(_name(r, "topic level") for r in rest)])


TOPIC_EVENTS = "events"


@dataclass(frozen=True)
class Namespace:
    """The ``{prefix}/{cluster}`` every ftd topic lives under."""

    cluster: str
    prefix: str = "ftd"

    def __post_init__(self) -> None:
        _name(self.prefix, "topic prefix")
        _name(self.cluster, "cluster")

    @property
    def root(self) -> str:
        """``prefix/cluster``."""
        return f"{self.prefix}/{self.cluster}"

    def topic(self, suffix: str) -> str:
        """The full topic of ``suffix`` (a concrete topic or a subscription pattern)."""
        return f"{self.root}/{suffix}"

    def suffix(self, topic: str) -> str | None:
        """The suffix of a full topic in this namespace, or None when it is outside."""
        head = self.root + "/"
        return topic[len(head) :] if topic.startswith(head) else None


def parse_topic(topic: str) -> TopicRef:
    """Split a full ftd topic into its parts.  Raises MessageError when it is not one."""
    if not isinstance(topic, str) or len(topic) > 512:
        raise MessageError(f"topic {str(topic)[:80]!r} is not a string of at most 512 characters")
    parts = topic.split("/")
    if len(parts) < 3:
        raise MessageError(f"topic {topic!r} is not under prefix/cluster/")
    prefix, cluster, category, *rest = parts
    for what, value in (("topic prefix", prefix), ("cluster", cluster)):
        if not NAME_RE.fullmatch(value):
            raise MessageError(f"topic {topic!r}: bad {what} {value!r}")

    def bad(why: str) -> MessageError:
        return MessageError(f"topic {topic!r}: {why}")

    def names(*values: str) -> None:
        for value in values:
            if not NAME_RE.fullmatch(value):
                raise bad(f"{value!r} is not a valid name")

    if category in ("host", "hb", "cmd"):
        if len(rest) != 1:
            raise bad(f"expected {category}/HOST")
        names(rest[0])
        return TopicRef(prefix, cluster, category, host=rest[0])
    if category == "vm":
        if len(rest) != 3 or rest[1] != "state":
            raise bad("expected vm/VM/state/HOST")
        names(rest[0], rest[2])
        return TopicRef(prefix, cluster, "vm_state", host=rest[2], vm=rest[0])
    if category == "group":
        if not rest:
            raise bad("expected group/GROUP/...")
        names(*rest)
        return TopicRef(prefix, cluster, "group", group=rest[0])
    if category == "events":
        if rest:
            raise bad("nothing may follow 'events'")
        return TopicRef(prefix, cluster, "events")
    raise bad(f"unknown topic category {category!r}")


def check_topic(ref: TopicRef, msg: Message) -> None:
    """Refuse a message on a topic it may not use, or naming a sender other than the topic's.

    Raises MessageError ("forged: ...") when one host speaks for another.
    """
    if ref.category != msg.TOPIC:
        raise MessageError(f"kind {msg.KIND!r} may not be published on {ref.category!r} topics")
    if ref.category in ("host", "hb", "vm_state") and ref.host != msg.host:
        raise MessageError(
            f"forged: topic belongs to host {ref.host!r} but the message says {msg.host!r}"
        )
    if ref.vm is not None and getattr(msg, "vm", None) != ref.vm:
        raise MessageError(f"topic is about vm {ref.vm!r} but the message is about another")
    if ref.group is not None and getattr(msg, "group", None) != ref.group:
        raise MessageError(f"topic is about group {ref.group!r} but the message is about another")


def validate_pattern(pattern: str) -> str:
    """Check an MQTT subscription pattern (``+`` and ``#`` only as whole levels, ``#`` last).

    Returns it unchanged; raises MessageError naming the problem.
    """
    if not pattern or len(pattern) > 512:
        raise MessageError(f"subscription pattern {pattern[:80]!r} is empty or too long")
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            raise MessageError(f"pattern {pattern!r}: '#' must be the last level")
        if level not in ("+", "#") and ("+" in level or "#" in level):
            raise MessageError(f"pattern {pattern!r}: wildcards must fill a whole level")
    return pattern


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT subscription ``pattern`` (``+`` one level, ``#`` rest)."""
    pat = pattern.split("/")
    top = topic.split("/")
    for i, level in enumerate(pat):
        if level == "#":
            return True
        if i >= len(top) or (level != "+" and level != top[i]):
            return False
    return len(pat) == len(top)


# --- encode / parse ---------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise _InvalidError(f"{name} is not allowed in messages")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _InvalidError(f"number {text[:40]} overflows to infinity")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _InvalidError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children: Iterator[Any] = iter(item.values() if isinstance(item, dict) else item)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def decode_json(payload: bytes) -> dict[str, Any]:
    """The JSON object in ``payload``, with the size, encoding and shape limits enforced.

    Raises MessageError (empty, oversized, not UTF-8, not JSON, NaN/Infinity, duplicate keys,
    too deep, not an object).
    """
    if not isinstance(payload, bytes | bytearray):
        raise MessageError(f"payload must be bytes, got {type(payload).__name__}")
    if not payload:
        raise MessageError("empty payload")
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(f"payload is {len(payload)} bytes, over the {MAX_PAYLOAD}-byte limit")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as err:
        raise MessageError(f"payload is not UTF-8: {err.reason} at byte {err.start}") from None
    try:
        obj = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except _InvalidError as err:
        raise MessageError(f"payload rejected: {err.reason}") from None
    except RecursionError:
        raise MessageError(f"payload nested too deeply (limit {MAX_DEPTH})") from None
    except ValueError as err:
        raise MessageError(f"payload is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise MessageError(f"payload must be a JSON object, got {_json_type(obj)}")
    if _depth(obj) > MAX_DEPTH:
        raise MessageError(f"payload nested too deeply (limit {MAX_DEPTH})")
    return obj


def parse(topic: str, payload: bytes) -> Message:
    """Validate one inbound message completely and return it.

    Checks size, encoding, JSON shape, protocol version, kind, every field's type and range,
    that the kind belongs on the topic, and that the sender is the host the topic belongs to.
    Raises MessageError with the reason for anything else; never anything other than that.
    """
    ref = parse_topic(topic)
    obj = decode_json(payload)
    version = obj.pop("v", None)
    if type(version) is not int:
        raise MessageError(f"protocol version 'v' missing or not an integer: {version!r}"[:160])
    if version != PROTOCOL_VERSION:
        raise MessageError(
            f"unsupported protocol version {version} (this ftd speaks {PROTOCOL_VERSION})"
        )
    kind = obj.pop("kind", None)
    if not isinstance(kind, str):
        raise MessageError(f"'kind' missing or not a string: {kind!r}"[:160])
    cls = _KINDS.get(kind)
    if cls is None:
        raise MessageError(f"unknown kind {kind[:40]!r}")
    msg = _build(cls, obj)
    check_topic(ref, msg)
    return msg


def encode(msg: Message) -> bytes:
    """The wire form of a stamped message.  Raises MessageError when parse would refuse it."""
    validate(msg)
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": msg.KIND}
    for spec in _SPECS[type(msg)]:
        body[spec.name] = getattr(msg, spec.name)
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    payload = data.encode("utf-8")
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(f"{msg.KIND} message is {len(payload)} bytes, over {MAX_PAYLOAD}")
    return payload


for _cls in (HostRecord, Heartbeat, VmState, Command, CommandResult, Event):
    register_kind(_cls)


# --- freshness --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether a message is admitted, and why."""

    ok: bool
    reason: str


class Freshness:
    """Admits a message only when its (epoch, seq) is newer than the last admitted one.

    Tracked per (sender, topic): retained messages of one sender on different topics reach a
    new subscriber in subscription order, not in the order they were sent, so a per-sender
    high-water mark would refuse good state.  A higher epoch (the sender restarted) starts
    over at any seq.  One exception: an offline HostRecord of the current epoch is admitted
    even with an older seq, because the broker sends a last will whose seq was fixed when the
    connection opened; the high-water mark is kept, so the sender's next record still counts.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[int, int]] = {}

    def admit(self, topic: str, msg: Message) -> Verdict:
        """Decide on ``msg`` received on ``topic`` and remember it when admitted."""
        offline = isinstance(msg, HostRecord) and not msg.online
        return self.check(msg.host, topic, msg.epoch, msg.seq, offline_record=offline)

    def check(
        self, host: str, topic: str, epoch: int, seq: int, *, offline_record: bool = False
    ) -> Verdict:
        """Decide on ``host``'s (``epoch``, ``seq``) on ``topic`` (any channel with such
        stamps, e.g. the direct heartbeats) and remember it when admitted."""
        key = (host, topic)
        seen = self._last.get(key)
        if seen is None:
            self._last[key] = (epoch, seq)
            return Verdict(True, f"first message from {host} on {topic}")
        last_epoch, last_seq = seen
        if epoch > last_epoch:
            self._last[key] = (epoch, seq)
            return Verdict(True, f"{host} started epoch {epoch} (was {last_epoch})")
        if epoch < last_epoch:
            return Verdict(False, f"stale: epoch {epoch} of {host} is older than {last_epoch}")
        if seq > last_seq:
            self._last[key] = (last_epoch, seq)
            return Verdict(True, f"seq {seq} follows {last_seq}")
        if offline_record:
            return Verdict(True, f"offline record of {host} ends epoch {last_epoch}")
        if seq == last_seq:
            return Verdict(False, f"replay: seq {seq} of {host} epoch {last_epoch} seen")
        return Verdict(False, f"stale: seq {seq} of {host} is older than {last_seq}")

    def forget(self, host: str) -> None:
        """Drop what is known about ``host`` (it left the cluster for good)."""
        for key in [k for k in self._last if k[0] == host]:
            del self._last[key]
