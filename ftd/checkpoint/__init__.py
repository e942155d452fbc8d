"""Checkpoint timing: when to request a COLO checkpoint, from dirty-memory signals.

Pure (no I/O): :mod:`ftd.checkpoint.model` estimates dirty pages and fits checkpoint pauses;
:mod:`ftd.checkpoint.policy` holds the policies, their factory and a replay simulator.
"""

from ftd.checkpoint.model import (
    PAGE_SIZE,
    PAGES_PER_MIB,
    CheckpointObserved,
    DirtyEstimator,
    DirtySample,
    DirtySnapshot,
    PauseModel,
    PauseModelSnapshot,
)
from ftd.checkpoint.policy import (
    Assessment,
    CheckpointPolicy,
    DirtyThreshold,
    FixedInterval,
    PauseBudget,
    PolicyDecision,
    PolicyState,
    SimCheckpoint,
    SimResult,
    make_policy,
    percentile,
    simulate,
)

__all__ = [
    "PAGES_PER_MIB",
    "PAGE_SIZE",
    "Assessment",
    "CheckpointObserved",
    "CheckpointPolicy",
    "DirtyEstimator",
    "DirtySample",
    "DirtySnapshot",
    "DirtyThreshold",
    "FixedInterval",
    "PauseBudget",
    "PauseModel",
    "PauseModelSnapshot",
    "PolicyDecision",
    "PolicyState",
    "SimCheckpoint",
    "SimResult",
    "make_policy",
    "percentile",
    "simulate",
]
