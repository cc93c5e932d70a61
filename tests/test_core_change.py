"""ChangeDetector behaviour that mutation testing found unpinned (issue 20):
the generic path (custom key, value and time), thresholds at their
boundaries, eviction order of large detectors, and checkpoints (restore's
return values, bounds, the interval)."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from flows import ChangeDetector, Flow, Tick
from flows.testing import ListSink, ListSource, run_briefly, sample

NAN = math.nan


def rec(k: Any, v: float, t: float) -> dict[str, Any]:
    return {"k": k, "v": v, "t": t}


def generic(**options: Any) -> ChangeDetector:
    return ChangeDetector(key=lambda r: r["k"], value=lambda r: r["v"], time=lambda r: r["t"],
                          **options)


def kept(det: ChangeDetector, records: list[Any]) -> list[int]:
    return [records.index(r) for r in det.filter(records)]


# -- the generic path ---------------------------------------------------------------


def test_without_thresholds_any_change_emits():
    det = generic()
    records = [rec("a", 1.0, 0), rec("a", 1.0, 1), rec("a", 2.0, 2), rec("a", 2.0, 3),
               rec("a", 1.0, 4), rec("b", 1.0, 5)]
    assert kept(det, records) == [0, 2, 4, 5]


def test_an_invalid_record_mid_batch_drops_only_itself():
    det = generic()
    records = [rec("a", 1.0, 0), rec("b", NAN, 1), rec("c", -1.0, 2), rec("d", 0.0, 3),
               rec("e", math.inf, 4), rec("f", 3.0, 5), rec("a", 1.0, 6)]
    assert kept(det, records) == [0, 5]
    assert list(det.state) == ["a", "f"]


def test_value_and_time_are_read_from_their_own_functions():
    det = generic(heartbeat=10.0)
    det.filter([rec("a", 5.0, 100.0)])
    assert det.state["a"] == [5.0, 100.0]
    assert kept(det, [rec("a", 5.0, 109.0)]) == []  # 9 s: no heartbeat yet
    assert kept(det, [rec("a", 5.0, 110.0)]) == [0]  # exactly 10 s: due
    assert det.state["a"] == [5.0, 110.0]


@pytest.mark.parametrize("default", [True, False], ids=["ticks", "generic"])
def test_thresholds_emit_at_exactly_their_value(default: bool):
    def one(det, v):
        r = Tick("x", "A", v, 0.0) if default else rec("A", v, 0.0)
        return len(det.filter([r]))

    make = ChangeDetector if default else generic
    rel = make(rel=0.25)
    assert [one(rel, v) for v in (4.0, 4.9, 3.1, 5.0, 5.0, 3.75)] == [1, 0, 0, 1, 0, 1]
    abs_ = make(abs=0.5)
    assert [one(abs_, v) for v in (4.0, 4.4, 3.6, 4.5, 4.0)] == [1, 0, 0, 1, 1]
    both = make(rel=0.5, abs=1.0)  # either threshold is enough
    assert [one(both, v) for v in (4.0, 4.9, 5.0, 5.5)] == [1, 0, 1, 0]


async def test_the_generic_path_counts_invalid_unchanged_and_evicted():
    records = [[rec("a", 1.0, 0), rec("b", NAN, 1), rec("b", 2.0, 2)],
               [rec("a", 1.0, 3), rec("c", 3.0, 4), rec("d", 4.0, 5), rec("d", 4.0, 6)]]

    flow = Flow("gen", sources=[ListSource(records)], stages=[generic(max_keys=2)],
                sinks=[ListSink()])
    _, registry = await run_briefly(flow)

    def discarded(reason):
        return sample(registry, "flows_records_discarded_total", "gen", "change", reason=reason)

    assert discarded("invalid") == 1
    assert discarded("unchanged") == 2
    assert discarded("evicted") == 2  # c evicts a, d evicts b
    assert sample(registry, "flows_records_sent_total", "gen", "change") == 4


def test_several_sources_keep_apart_under_the_default_key():
    det = ChangeDetector()
    a = [Tick("one", "BTC", 1.0, 0.0), Tick("one", "ETH", 2.0, 0.0)]
    assert len(det.filter(a)) == 2
    b = [Tick("two", "BTC", 1.0, 1.0), Tick("one", "BTC", 1.0, 1.0), Tick("two", "BTC", 1.0, 2.0)]
    assert [b.index(r) for r in det.filter(b)] == [0]
    assert list(det.state) == [("one", "BTC"), ("one", "ETH"), ("two", "BTC")]
    assert det.filter([Tick("one", "ETH", 2.5, 3.0)]) != []


# -- eviction in large detectors ----------------------------------------------------


def fill(det: ChangeDetector, start: int, stop: int) -> None:
    det.filter([Tick("x", f"S{i}", 1.0, 0.0) for i in range(start, stop)])


def test_a_large_detector_evicts_by_recency_once_three_quarters_full():
    det = ChangeDetector(max_keys=1024)
    fill(det, 0, 800)  # past three quarters (768): recency is tracked
    det.filter([Tick("x", "S0", 1.0, 1.0)])  # seen again (unchanged)
    fill(det, 800, 1025)  # one more than max_keys
    assert ("x", "S0") in det.state
    assert ("x", "S1") not in det.state  # the least recently seen went
    assert len(det.state) == 1024


def test_a_large_detector_does_not_track_recency_while_far_from_full():
    det = ChangeDetector(max_keys=1024)
    fill(det, 0, 10)
    det.filter([Tick("x", "S0", 1.0, 1.0)])  # seen again while the state is small: free
    fill(det, 10, 1025)
    assert ("x", "S0") not in det.state  # evicted first: stored first, not seen since 768
    assert ("x", "S1") in det.state


def test_a_small_detector_tracks_recency_from_the_first_key():
    det = ChangeDetector(max_keys=3)
    fill(det, 0, 3)
    det.filter([Tick("x", "S0", 1.0, 1.0)])
    fill(det, 3, 4)
    assert list(det.state) == [("x", "S2"), ("x", "S0"), ("x", "S3")]


# -- checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("every", [0.0, -1.0])
def test_checkpoint_every_must_be_positive(every: float, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every"):
        ChangeDetector(checkpoint=tmp_path / "c", checkpoint_every=every)


def test_restore_says_how_many_keys_it_loaded(tmp_path):
    assert ChangeDetector().restore() == 0  # no checkpoint configured
    path = tmp_path / "c.ckpt"
    assert ChangeDetector(checkpoint=path).restore() == 0  # none yet
    det = ChangeDetector(checkpoint=path, heartbeat=60.0)
    det.filter([Tick("x", f"S{i}", 1.0 + i, 10.0 + i) for i in range(5)])
    saved = _save_all(det)
    assert saved == 5
    again = ChangeDetector(checkpoint=path, heartbeat=60.0)
    assert again.restore() == 5
    assert again.state == det.state
    path.write_bytes(b"not a checkpoint")
    assert ChangeDetector(checkpoint=path).restore() == 0  # unusable: ignored
    (tmp_path / "dir").mkdir()
    assert ChangeDetector(checkpoint=tmp_path / "dir").restore() == 0  # unreadable: ignored


def _save_all(det: ChangeDetector) -> int:
    """Save ``det``'s whole state, as if every emitted batch was acknowledged
    (``det`` needs a heartbeat: the state keeps times only then)."""
    from collections import OrderedDict

    det.acked = OrderedDict((k, (v, t)) for k, (v, t) in det.state.items())
    det.save()
    return len(det.acked)


def test_a_restore_reads_at_most_max_keys_the_most_recent(tmp_path):
    path = tmp_path / "c.ckpt"
    det = ChangeDetector(checkpoint=path, heartbeat=60.0)
    det.filter([Tick("x", f"S{i}", 1.0 + i, 10.0 + i) for i in range(6)])
    _save_all(det)
    small = ChangeDetector(checkpoint=path, heartbeat=60.0, max_keys=3)
    assert small.restore() == 3
    assert list(small.state) == [("x", "S3"), ("x", "S4"), ("x", "S5")]
    # full after the restore: a new key evicts the least recent one
    assert len(small.filter([Tick("x", "NEW", 1.0, 20.0)])) == 1
    assert list(small.state) == [("x", "S4"), ("x", "S5"), ("x", "NEW")]
    # and the restored values hold: unchanged prices are not emitted again
    assert small.filter([Tick("x", "S5", 6.0, 21.0)]) == []


def test_generic_keys_survive_a_checkpoint(tmp_path):
    path = tmp_path / "c.ckpt"
    det = generic(checkpoint=path, heartbeat=5.0)
    det.filter([rec(("a", 1), 2.0, 100.0), rec("b", 3.0, 101.0), rec(7, 4.0, 102.0)])
    _save_all(det)
    again = generic(checkpoint=path, heartbeat=5.0)
    assert again.restore() == 3
    assert again.state == det.state
    assert again.filter([rec(("a", 1), 2.0, 104.0), rec("b", 3.0, 106.0)]) == [
        rec("b", 3.0, 106.0)]  # only b's heartbeat is due


def test_a_checkpoint_of_many_frames_is_read_whole(tmp_path):
    path = tmp_path / "c.ckpt"
    det = ChangeDetector(checkpoint=path, heartbeat=60.0)
    fill(det, 0, 5000)  # more than one frame of entries
    _save_all(det)
    again = ChangeDetector(checkpoint=path, heartbeat=60.0)
    assert again.restore() == 5000
    assert again.filter([Tick("x", "S4999", 1.0, 1.0), Tick("x", "S0", 1.0, 1.0)]) == []


def test_a_version_1_checkpoint_is_still_read(tmp_path):
    path = tmp_path / "c.ckpt"
    entries = [[["x", f"S{i}"], 1.0 + i, 10.0 + i] for i in range(4)]  # oldest first
    path.write_bytes(msgspec.msgpack.encode(
        {"version": 1, "kind": "flows.ChangeDetector", "entries": entries}))
    det = ChangeDetector(checkpoint=path, max_keys=3, heartbeat=60.0)
    assert det.restore() == 3
    assert list(det.state) == [("x", "S1"), ("x", "S2"), ("x", "S3")]
    assert det.state[("x", "S3")] == [4.0, 13.0]
    path.write_bytes(msgspec.msgpack.encode(
        {"version": 3, "kind": "flows.ChangeDetector", "entries": entries}))
    assert ChangeDetector(checkpoint=path).restore() == 0  # a version we do not know


async def test_a_failed_batch_acked_after_a_later_one_does_not_hold_up_the_checkpoint(tmp_path):
    class OutOfOrder:
        """Acks the second batch first (written), then the first (failed)."""

        name = "sink"

        async def run(self, inbox):
            first = await inbox.receive()
            second = await inbox.receive()
            second.ack("written")
            first.ack("failed")
            async for batch in inbox:
                batch.ack("written")

    path = tmp_path / "c.ckpt"
    batches = [[Tick("x", "A", 1.0, 1.0)], [Tick("x", "B", 2.0, 2.0)]]
    flow = Flow("ooo", sources=[ListSource(batches)],
                stages=[ChangeDetector(checkpoint=path, heartbeat=60.0)], sinks=[OutOfOrder()])
    await run_briefly(flow)
    restored = ChangeDetector(checkpoint=path, heartbeat=60.0)
    assert restored.restore() == 1  # B, written; A failed: it must be emitted again
    assert list(restored.state) == [("x", "B")]


async def test_a_checkpoint_that_cannot_be_written_is_counted_and_the_flow_goes_on(
    tmp_path, autojump_clock
):
    import trio

    from flows import Batch

    class Paced(ListSource):
        """One batch a second, each once the sink has it (so no timer runs
        while the stage restores its checkpoint in a thread)."""

        async def run(self, outbox):
            for records in self.batches:
                got = sink.got
                await outbox.send(Batch(records))
                await got.wait()
                await trio.sleep(1.0)

    class Signalling(ListSink):
        def __init__(self):
            super().__init__()
            self.got = trio.Event()

        async def run(self, inbox):
            async for batch in inbox:
                self.records.extend(batch.records)
                batch.ack("written")
                self.got.set()
                self.got = trio.Event()

    path = tmp_path / "missing" / "c.ckpt"  # its directory does not exist
    batches = [[Tick("x", f"S{i}", 1.0, float(i))] for i in range(4)]
    sink = Signalling()
    flow = Flow("ck", sources=[Paced(batches)],
                stages=[ChangeDetector(checkpoint=path, checkpoint_every=1.5)], sinks=[sink])
    _, registry = await run_briefly(flow)
    assert len(sink.records) == 4
    errors = sample(registry, "flows_errors_total", "ck", "change", error_type="checkpoint")
    assert errors >= 2  # while running (every 1.5 s) and at the end


def test_a_heartbeat_set_later_treats_untimed_keys_as_due():
    """Without a heartbeat the times of the first source's keys are not
    kept; once a heartbeat is set, such a key counts as never emitted."""
    for second_source in (False, True):
        det = ChangeDetector()
        det.filter([Tick("x", "A", 1.0, 100.0)])
        if second_source:  # the state changes form, still without times
            det.filter([Tick("y", "A", 1.0, 100.0)])
        det.heartbeat = 10.0
        assert len(det.filter([Tick("x", "A", 1.0, 101.0)])) == 1
        assert det.filter([Tick("x", "A", 1.0, 105.0)]) == []  # now it has a time


def test_an_invalid_value_is_logged_with_its_key(caplog):
    det = ChangeDetector(max_keys=3)  # the ordered form
    det.filter([Tick("x", "A", 1.0, 1.0)])
    with caplog.at_level("WARNING"):
        det.filter([Tick("x", "B", NAN, 2.0)])
    assert any("('x', 'B')" in r.getMessage() for r in caplog.records)


# -- survivors of the second mutation run (issue 20) -------------------------------------


def test_a_value_or_time_that_is_not_a_float_is_kept_as_it_is():
    when = datetime(2026, 1, 1, 12, 0)
    det = generic(heartbeat=None)
    assert kept(det, [rec("a", 1.5, when), rec("b", Decimal("2.5"), 0.0)]) == [0, 1]
    assert det.state["a"] == [1.5, None]  # (no heartbeat: times are not kept)
    assert det.state["b"] == [Decimal("2.5"), None]
    later = [rec("a", 1.5, when), rec("b", Decimal("2.5"), 1.0), rec("b", Decimal("2.6"), 2.0)]
    assert kept(det, later) == [2]
    assert det.state["b"] == [Decimal("2.6"), None]
    timed = generic(heartbeat=100.0)
    assert kept(timed, [rec("a", 1.5, 7), rec("b", Decimal("2.5"), 0.0)]) == [0, 1]
    assert timed.state["a"] == [1.5, 7] and timed.state["a"][1].__class__ is int
    assert timed.state["b"] == [Decimal("2.5"), 0.0]


def test_a_checkpoint_of_values_that_are_not_floats_is_restored_whole(tmp_path):
    path = tmp_path / "c.ckpt"
    det = ChangeDetector(checkpoint=path, heartbeat=10.0)
    det.filter([Tick("x", "A", 1, 100.0), Tick("x", "B", 2.0, 100.0)])
    assert _save_all(det) == 2
    again = ChangeDetector(checkpoint=path, heartbeat=10.0)
    assert again.restore() == 2
    assert again.state == det.state
    assert again.filter([Tick("x", "A", 1, 105.0), Tick("x", "B", 2.0, 105.0)]) == []
    assert len(again.filter([Tick("x", "A", 1, 110.0)])) == 1  # the heartbeat
    assert len(again.filter([Tick("x", "B", 3.0, 111.0)])) == 1  # a change


def test_a_heartbeat_set_later_over_values_that_are_not_floats():
    det = ChangeDetector()
    det.filter([Tick("x", "A", 1, 100.0), Tick("x", "B", 2.0, 100.0)])
    det.heartbeat = 10.0
    assert len(det.filter([Tick("x", "A", 1, 101.0), Tick("x", "B", 2.0, 101.0)])) == 2
    assert det.filter([Tick("x", "A", 1, 105.0)]) == []
    assert list(det.state) == [("x", "A"), ("x", "B")]
    assert len(det.filter([Tick("y", "A", 1.0, 106.0)])) == 1  # a second source keeps apart
    assert list(det.state) == [("x", "A"), ("x", "B"), ("y", "A")]


def test_drops_are_logged_under_the_stage_logger(caplog):
    det = ChangeDetector(name="prices")
    with caplog.at_level("WARNING"):
        det.filter([Tick("x", "A", NAN, 1.0)])
    assert [r.name for r in caplog.records if "('x', 'A')" in r.getMessage()] == [
        "flows.stage.prices"]
