"""Wire kinds of the group synchronizer, on ``group/{group}/{lease|epoch|ack|committed|
failed|order}`` topics (registered with :func:`ftd.bus.messages.register_kind`).

``lease`` and ``committed`` are published retained, so a (re)starting host learns the current
synchronizer and the last committed epoch at once; the others are plain QoS 1 messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ftd.bus.messages import MAX_TEXT, NAME_RE, Message, register_kind

LEASE, EPOCH, ACK, COMMITTED, FAILED, ORDER = (
    "lease",
    "epoch",
    "ack",
    "committed",
    "failed",
    "order",
)
ORDER_OPS = ("failover", "switchover")


def _names_problem(what: str, names: list[str]) -> str | None:
    for n in names:
        if not NAME_RE.fullmatch(n):
            return f"{what}: {n[:80]!r} is not a valid name"
    return None


@dataclass(frozen=True, kw_only=True)
class GroupMessage(Message):
    """Common to the group kinds: the group named in the topic, and non-negative numbers."""

    TOPIC: ClassVar[str] = "group"

    group: str

    def problem(self) -> str | None:
        if not NAME_RE.fullmatch(self.group):
            return f"group {self.group[:80]!r} is not a valid name"
        for name in ("epoch_no", "term", "expires_at", "committed_at", "took_ms"):
            value = getattr(self, name, 0)
            if isinstance(value, int | float) and value < 0:
                return f"{name} {value} is negative"
        for name in ("reason",):
            if len(getattr(self, name, "")) > MAX_TEXT:
                return f"{name} is longer than {MAX_TEXT} characters"
        return None


@dataclass(frozen=True, kw_only=True)
class GroupLease(GroupMessage):
    """``holder`` synchronizes ``group`` until ``expires_at`` (wall clock)."""

    KIND: ClassVar[str] = "group_lease"

    holder: str
    expires_at: float
    term: int

    def problem(self) -> str | None:
        return super().problem() or _names_problem("holder", [self.holder])


@dataclass(frozen=True, kw_only=True)
class EpochPropose(GroupMessage):
    """Checkpoint every member in ``members`` now and ack epoch ``epoch_no``."""

    KIND: ClassVar[str] = "group_epoch"

    epoch_no: int
    members: list[str] = field(default_factory=list)
    timeout_ms: int = 0

    def problem(self) -> str | None:
        return super().problem() or _names_problem("members", self.members)


@dataclass(frozen=True, kw_only=True)
class EpochAck(GroupMessage):
    """Member ``vm`` checkpointed for epoch ``epoch_no`` (``ok``), or why it could not."""

    KIND: ClassVar[str] = "group_ack"

    epoch_no: int
    vm: str
    ok: bool
    reason: str = ""

    def problem(self) -> str | None:
        return super().problem() or _names_problem("vm", [self.vm])


@dataclass(frozen=True, kw_only=True)
class EpochCommitted(GroupMessage):
    """Epoch ``epoch_no`` committed: every member checkpointed (retained)."""

    KIND: ClassVar[str] = "group_committed"

    epoch_no: int
    members: list[str] = field(default_factory=list)
    committed_at: float
    took_ms: float

    def problem(self) -> str | None:
        return super().problem() or _names_problem("members", self.members)


@dataclass(frozen=True, kw_only=True)
class EpochFailed(GroupMessage):
    """Epoch ``epoch_no`` was not committed; ``missing`` did not make it in time."""

    KIND: ClassVar[str] = "group_failed"

    epoch_no: int
    reason: str
    missing: list[str] = field(default_factory=list)

    def problem(self) -> str | None:
        return super().problem() or _names_problem("missing", self.missing)


@dataclass(frozen=True, kw_only=True)
class GroupOrder(GroupMessage):
    """An order to every host running a member's primary (``failover --group``,
    ``switchover --group``)."""

    KIND: ClassVar[str] = "group_order"

    op: str
    reason: str = ""

    def problem(self) -> str | None:
        if self.op not in ORDER_OPS:
            return f"op {self.op[:80]!r} is not one of {', '.join(ORDER_OPS)}"
        return super().problem()


for _cls in (GroupLease, EpochPropose, EpochAck, EpochCommitted, EpochFailed, GroupOrder):
    register_kind(_cls)
