"""The trace parser and follower, on real QEMU 11.1.3 trace lines.

The fixtures were captured from ``-trace enable=... -msg timestamp=on -D trace.log`` of a COLO
pair on this machine (primary: checkpoints then its secondary killed and a failover; secondary:
the start of COLO and one checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ftd.errors import QemuError
from ftd.qemu.trace import (
    Checkpoint,
    CheckpointParser,
    ColoEntered,
    FailoverState,
    Miscompare,
    TraceFollower,
    parse_line,
)

PRIMARY = """\
2026-11-22T00:37:00.381674Z migration_bitmap_sync_end dirty_pages 0
2026-11-22T00:37:00.387149Z migration_bitmap_sync_end dirty_pages 0
2026-11-22T00:37:00.434799Z migration_bitmap_sync_end dirty_pages 0
2026-11-22T00:37:00.479451Z colo_receive_message Receive 'checkpoint-ready' message
2026-11-22T00:37:00.479934Z colo_vm_state_change Change 'stop' => 'run'
2026-11-22T00:37:01.479204Z colo_send_message Send 'checkpoint-request' message
2026-11-22T00:37:01.480784Z colo_receive_message Receive 'checkpoint-reply' message
2026-11-22T00:37:01.481336Z colo_vm_state_change Change 'run' => 'stop'
2026-11-22T00:37:01.481369Z colo_send_message Send 'vmstate-send' message
2026-11-22T00:37:01.482662Z migration_bitmap_sync_end dirty_pages 4
2026-11-22T00:37:01.482713Z colo_send_message Send 'vmstate-size' message
2026-11-22T00:37:01.524220Z colo_receive_message Receive 'vmstate-received' message
2026-11-22T00:37:01.579512Z colo_receive_message Receive 'vmstate-loaded' message
2026-11-22T00:37:01.580011Z colo_vm_state_change Change 'stop' => 'run'
2026-11-22T00:37:02.464407Z colo_send_message Send 'checkpoint-request' message
2026-11-22T00:37:02.465118Z colo_receive_message Receive 'checkpoint-reply' message
2026-11-22T00:37:02.465469Z colo_vm_state_change Change 'run' => 'stop'
2026-11-22T00:37:02.465483Z colo_send_message Send 'vmstate-send' message
2026-11-22T00:37:02.466154Z migration_bitmap_sync_end dirty_pages 8
2026-11-22T00:37:02.466174Z colo_send_message Send 'vmstate-size' message
2026-11-22T00:37:02.507651Z colo_receive_message Receive 'vmstate-received' message
2026-11-22T00:37:02.551501Z colo_receive_message Receive 'vmstate-loaded' message
2026-11-22T00:37:02.552001Z colo_vm_state_change Change 'stop' => 'run'
2026-11-22T00:37:05.487494Z colo_send_message Send 'checkpoint-request' message
2026-11-22T00:37:05.488233Z colo_vm_state_change Change 'run' => 'stop'
2026-11-22T00:37:06.004203Z colo_failover_set_state new state require
2026-11-22T00:37:06.004235Z colo_failover_set_state new state active
2026-11-22T00:37:06.004397Z colo_failover_set_state new state completed
"""

SECONDARY = """\
2026-11-22T00:37:00.442579Z colo_vm_state_change Change 'stop' => 'run'
2026-11-22T00:37:00.442634Z colo_send_message Send 'checkpoint-ready' message
2026-11-22T00:37:01.479273Z colo_receive_message Receive 'checkpoint-request' message
2026-11-22T00:37:01.480723Z colo_vm_state_change Change 'run' => 'stop'
2026-11-22T00:37:01.480767Z colo_send_message Send 'checkpoint-reply' message
2026-11-22T00:37:01.481385Z colo_receive_message Receive 'vmstate-send' message
2026-11-22T00:37:01.523517Z colo_receive_message Receive 'vmstate-size' message
2026-11-22T00:37:01.523600Z colo_send_message Send 'vmstate-received' message
2026-11-22T00:37:01.524451Z colo_flush_ram_cache_begin dirty_pages 4
2026-11-22T00:37:01.524466Z colo_flush_ram_cache_end
2026-11-22T00:37:01.529159Z colo_vm_state_change Change 'stop' => 'run'
2026-11-22T00:37:01.529179Z colo_send_message Send 'vmstate-loaded' message
2026-11-22T00:37:02.479160Z colo_receive_message Receive 'checkpoint-request' message
2026-11-22T00:37:02.480382Z colo_vm_state_change Change 'run' => 'stop'
"""


def feed_all(parser: CheckpointParser, text: str) -> list[object]:
    out: list[object] = []
    for line in text.splitlines():
        out.extend(parser.feed(line))
    return out


def test_parse_line_reads_time_event_and_args() -> None:
    rec = parse_line("2026-11-22T00:37:01.482662Z migration_bitmap_sync_end dirty_pages 4\n")
    assert rec is not None
    assert rec.event == "migration_bitmap_sync_end"
    assert rec.args == "dirty_pages 4"
    assert rec.time == pytest.approx(1795307821.482662, abs=1e-6)


def test_parse_line_event_without_arguments() -> None:
    rec = parse_line("2026-11-22T00:37:01.524466Z colo_flush_ram_cache_end ")
    assert rec is not None and rec.event == "colo_flush_ram_cache_end" and rec.args == ""


@pytest.mark.parametrize(
    "line",
    ["", "qemu-system-x86_64: warning: something", "colo_send_message Send 'x' message", "2026"],
)
def test_parse_line_ignores_other_output(line: str) -> None:
    assert parse_line(line) is None


def test_primary_checkpoints_pause_dirty_pages_and_failover() -> None:
    obs = feed_all(CheckpointParser("primary"), PRIMARY)
    assert isinstance(obs[0], ColoEntered)
    cps = [o for o in obs if isinstance(o, Checkpoint)]
    assert [c.index for c in cps] == [1, 2]
    first, second = cps
    # Pause: 'run' => 'stop' at .481336 .. 'stop' => 'run' at .580011.
    assert first.pause_s == pytest.approx(0.098675, abs=1e-6)
    assert first.dirty_pages == 4
    assert first.duration_s == pytest.approx(1.580011 - 1.479204, abs=1e-6)
    assert second.dirty_pages == 8
    assert second.pause_s == pytest.approx(0.086532, abs=1e-6)
    # The pre-COLO bitmap syncs (dirty_pages 0) belong to no checkpoint.
    states = [o.state for o in obs if isinstance(o, FailoverState)]
    assert states == ["require", "active", "completed"]


def test_interrupted_checkpoint_is_left_pending_not_reported() -> None:
    parser = CheckpointParser("primary")
    obs = feed_all(parser, PRIMARY)
    assert parser.count == 2
    assert parser.pending is not None and parser.pending.pause_start is not None
    assert not [o for o in obs if isinstance(o, Checkpoint) and o.index > 2]


def test_secondary_checkpoint_uses_flush_dirty_pages() -> None:
    parser = CheckpointParser("secondary")
    obs = feed_all(parser, SECONDARY)
    assert isinstance(obs[0], ColoEntered)
    cps = [o for o in obs if isinstance(o, Checkpoint)]
    assert len(cps) == 1
    assert cps[0].role == "secondary"
    assert cps[0].dirty_pages == 4
    assert cps[0].pause_s == pytest.approx(1.529159 - 1.480723, abs=1e-6)
    assert parser.pending is not None


def test_primary_parser_ignores_secondary_lines() -> None:
    # The secondary's lines have the opposite directions: no checkpoint is seen as primary.
    obs = feed_all(CheckpointParser("primary"), SECONDARY)
    assert not [o for o in obs if isinstance(o, Checkpoint | ColoEntered)]


def test_new_request_drops_unfinished_checkpoint() -> None:
    parser = CheckpointParser("primary")
    lines = PRIMARY.splitlines()
    # Cut checkpoint 1 after its pause began, then replay checkpoint 2 whole.
    feed_all(parser, "\n".join(lines[5:9]))
    obs = feed_all(parser, "\n".join(lines[14:23]))
    cps = [o for o in obs if isinstance(o, Checkpoint)]
    assert len(cps) == 1 and cps[0].index == 1 and cps[0].dirty_pages == 8


def test_miscompare_is_reported() -> None:
    # Built from the format QEMU 11.1.3 carries for this event ("... : %s = %d").
    obs = CheckpointParser("primary").feed(
        "2026-11-22T00:37:01.000001Z colo_compare_icmp_miscompare : pkt_size = 98"
    )
    assert len(obs) == 1 and isinstance(obs[0], Miscompare)
    assert obs[0].kind == "icmp" and obs[0].time == pytest.approx(1795307821.000001)


def test_unknown_role_is_refused() -> None:
    with pytest.raises(QemuError, match="unknown role"):
        CheckpointParser("tertiary")


def test_follower_reads_whole_lines_incrementally(tmp_path: Path) -> None:
    log = tmp_path / "trace.log"
    follower = TraceFollower(log, CheckpointParser("primary"))
    assert follower.poll() == []  # QEMU has not created the file yet
    text = PRIMARY
    cut = text.index("vmstate-loaded") + 5  # in the middle of a line
    log.write_text(text[:cut])
    first = follower.poll()
    assert not [o for o in first if isinstance(o, Checkpoint)]
    with log.open("a") as f:
        f.write(text[cut:])
    rest = follower.poll()
    assert [o.index for o in rest if isinstance(o, Checkpoint)] == [1, 2]
    assert follower.poll() == []


def test_follower_restarts_on_truncated_file(tmp_path: Path) -> None:
    log = tmp_path / "trace.log"
    log.write_text(PRIMARY)
    follower = TraceFollower(log, CheckpointParser("primary"))
    assert len([o for o in follower.poll() if isinstance(o, Checkpoint)]) == 2
    # A restarted QEMU truncates its log.
    log.write_text(PRIMARY.split("2026-11-22T00:37:02.464407Z", maxsplit=1)[0])
    again = follower.poll()
    assert len([o for o in again if isinstance(o, Checkpoint)]) == 1


def test_follower_from_end_skips_history(tmp_path: Path) -> None:
    log = tmp_path / "trace.log"
    log.write_text(PRIMARY)
    follower = TraceFollower(log, CheckpointParser("primary"), from_end=True)
    assert follower.poll() == []
