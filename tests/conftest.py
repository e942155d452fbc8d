"""Shared fixtures: network-namespace labs that are always torn down."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest

from lab.netns import Lab

LabFactory = Callable[..., Lab]


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """``make(hosts, broker=False, lab_id=None) -> Lab``: a created lab, destroyed at teardown.

    Teardown fails the test when anything of a lab could not be removed.
    """
    labs: list[Lab] = []

    def make(hosts: Sequence[str], *, broker: bool = False, lab_id: str | None = None) -> Lab:
        lab = Lab(hosts, lab_id, broker=broker)
        labs.append(lab)
        return lab.create()

    yield make
    problems = [problem for lab in reversed(labs) for problem in lab.destroy()]
    assert not problems, f"lab teardown left: {problems}"


@pytest.fixture
def lab2(lab_factory: LabFactory) -> Lab:
    """Hosts ``a``, ``b``, ``client`` and ``broker`` (mosquitto running) on one switch."""
    return lab_factory(["a", "b", "client"], broker=True)
