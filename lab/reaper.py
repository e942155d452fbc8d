"""Destroy a lab when the process that created it dies, however it dies (SIGKILL included).

Usage: ``python -m lab.reaper OWNER_PID LAB_ID``.  Started by ``Lab.create()`` in its own
session, so a signal sent to the owner's process group (Ctrl-C, a test runner's kill) does not
reach it.  It prints ``ready`` once it holds a pidfd on the owner, which rules out mistaking a
recycled pid for the owner.  A normal ``Lab.destroy()`` terminates it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
from collections.abc import Sequence

from lab.netns import teardown

_USAGE = "usage: python -m lab.reaper OWNER_PID LAB_ID"


def open_owner(pid: int) -> int | None:
    """A pidfd on ``pid``, or None when that process has already gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def wait_for_exit(pidfd: int) -> None:
    """Block until the process behind ``pidfd`` has exited, then close ``pidfd``."""
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        # A pidfd becomes readable when its process exits; EINTR is retried (PEP 475).
        poller.poll()
    finally:
        os.close(pidfd)


def _report(line: str) -> None:
    # The owner's stderr may be a pipe nobody reads any more; losing the report is acceptable.
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str]) -> int:
    """Wait for the owner of a lab to die, then tear the lab down.  Exit 0 when all went, 1 when
    something was left (reported on stderr), 2 on bad arguments."""
    if len(argv) != 2 or not argv[0].isdigit():
        _report(_USAGE)
        return 2
    owner, lab_id = int(argv[0]), argv[1]
    pidfd = open_owner(owner)
    print("ready", flush=True)
    sys.stdout.close()
    if pidfd is not None:
        wait_for_exit(pidfd)
    problems = teardown(lab_id)
    for problem in problems:
        _report(f"lab.reaper: lab {lab_id}: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
