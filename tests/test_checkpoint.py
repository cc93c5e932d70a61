"""Change-detector checkpoints: saved, restored, ignored with --fresh or when broken."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import trio
from _cli import run_cli
from prometheus_client import CollectorRegistry

from flows import Batch, ChangeDetector, Flow, Runtime, Tick
from flows.testing import ListSink, ListSource, run_briefly

ROOT = Path(__file__).resolve().parent.parent


def prices(ts: float, moved: set[int] = frozenset()) -> list[Tick]:
    return [Tick("x", f"S{i}", 100.0 + i + (5 if i in moved else 0), ts) for i in range(50)]


async def run_once(path, batch, **kw) -> list[Tick]:
    sink = ListSink()
    flow = Flow("cp", sources=[ListSource([batch])],
                stages=[ChangeDetector(checkpoint=path, rel=0.001)], sinks=[sink])
    await run_briefly(flow, **kw)
    return sink.records


async def test_restart_does_not_re_emit_unchanged_symbols(tmp_path):
    path = tmp_path / "change.ckpt"
    assert len(await run_once(path, prices(1.0))) == 50
    assert path.exists()
    again = await run_once(path, prices(2.0, moved={3, 7}))
    assert [t.symbol for t in again] == ["S3", "S7"]
    # the moved prices were saved too
    assert await run_once(path, prices(3.0, moved={3, 7})) == []


async def test_fresh_run_ignores_the_checkpoint(tmp_path):
    path = tmp_path / "change.ckpt"
    await run_once(path, prices(1.0))
    assert len(await run_once(path, prices(2.0), fresh=True)) == 50


async def test_broken_checkpoints_are_logged_once_and_ignored(tmp_path, caplog):
    path = tmp_path / "change.ckpt"
    await run_once(path, prices(1.0))
    good = path.read_bytes()
    for broken in (good[: len(good) // 2], b"", b"\x93\x02\xa4nope\x90"):
        path.write_bytes(broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flows.change"):
            assert len(await run_once(path, prices(2.0))) == 50
        warnings = [r for r in caplog.records if r.name == "flows.change"]
        assert len(warnings) == 1 and "unusable" in warnings[0].getMessage()


async def test_state_is_saved_periodically_while_running(tmp_path):
    path = tmp_path / "change.ckpt"
    saved = trio.Event()

    class Ticking:
        name = "ticking"
        sent = 0

        async def run(self, outbox):
            for second in range(1000):
                await outbox.send(Batch(prices(float(second))))
                self.sent += 1
                await trio.sleep(0.01)

    class Observed(ChangeDetector):
        def save(self):
            super().save()
            trio.from_thread.run_sync(saved.set)

    source = Ticking()
    detector = Observed(checkpoint=path, checkpoint_every=0.2)
    flow = Flow("periodic", sources=[source], stages=[detector], sinks=[ListSink()])
    rt = Runtime(flow, metrics_addr=None, registry=CollectorRegistry())
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        started = trio.current_time()
        await saved.wait()
        assert trio.current_time() - started >= 0.2
        assert source.sent < 1000  # saved while running, not at the end
        assert ChangeDetector(checkpoint=path).restore() == 50
        rt.stop()


def test_cli_fresh_flag(tmp_path):
    db, ckpt = tmp_path / "t.db", tmp_path / "c.ckpt"
    (tmp_path / "f.py").write_text(
        "from flows import Flow, ChangeDetector\n"
        "from sources.synthetic import SyntheticMarket\n"
        "from sinks.sqlite import SQLiteSink\n"
        f"flow = Flow('f', sources=[SyntheticMarket(symbols=40, unchanged=1.0, interval=0, limit=200)],\n"
        f"            stages=[ChangeDetector(checkpoint={str(ckpt)!r})], sinks=[SQLiteSink({str(db)!r})])\n"
    )

    def rows_after(*extra: str) -> int:
        proc = run_cli(str(tmp_path / "f.py"), "--metrics-addr", "0", *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM ticks").fetchone()[0]

    assert rows_after() == 40  # prices never move: each symbol once
    assert rows_after() == 40  # restored: nothing new
    assert rows_after("--fresh") == 80  # forgotten: every symbol again


async def test_the_checkpoint_holds_only_what_the_sinks_acknowledged(tmp_path):
    """Emitted but not yet stored: a save must not record it as seen."""
    from flows.testing import GatedSink

    path = tmp_path / "change.ckpt"
    detector = ChangeDetector(checkpoint=path, checkpoint_every=1000)
    sink = GatedSink()
    flow = Flow("acked", sources=[ListSource([prices(1.0)])], stages=[detector], sinks=[sink])
    rt = Runtime(flow, metrics_addr=None, registry=CollectorRegistry())
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(10):  # the restore runs in a thread: poll, with a deadline
            while len(detector.state) < 50:
                await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()  # emitted, waiting at the stalled sink
        await trio.to_thread.run_sync(detector.save)
        assert ChangeDetector(checkpoint=path).restore() == 0
        sink.gate.set()
    assert ChangeDetector(checkpoint=path).restore() == 50  # the final save, after the ack


async def test_a_failed_batch_is_left_out_of_the_checkpoint(tmp_path):
    class Failing:
        name = "failing"

        async def run(self, inbox):
            async for batch in inbox:
                batch.ack("failed" if batch.records[0].ts == 1.0 else "written")

    path = tmp_path / "change.ckpt"
    moved = {i for i in range(10)}
    flow = Flow("failed", sources=[ListSource([prices(1.0), prices(2.0, moved)])],
                stages=[ChangeDetector(checkpoint=path)], sinks=[Failing()])
    await run_briefly(flow)
    restored = ChangeDetector(checkpoint=path)
    assert restored.restore() == 10  # only the ten written in the second batch
    assert all(t == 2.0 for _, t in restored.acked.values())


def test_hostile_and_huge_checkpoints_are_read_with_bounds(tmp_path, caplog):
    import msgspec

    path = tmp_path / "change.ckpt"
    marker = msgspec.msgpack.encode("KEY")
    old = msgspec.msgpack.encode({"version": 1, "kind": "flows.ChangeDetector",
                                  "entries": [["KEY", 1.0, 1.0]]})
    for depth in (500, 100_000):  # a key nested that deep: arrays of one array
        path.write_bytes(old.replace(marker, b"\x91" * depth + b"\x90"))
        with caplog.at_level(logging.WARNING, logger="flows.change"):
            assert ChangeDetector(checkpoint=path).restore() == 0
    with caplog.at_level(logging.WARNING, logger="flows.change"):
        assert ChangeDetector(checkpoint=path).restore() == 0
    assert "unusable" in caplog.text
    big = ChangeDetector(checkpoint=path)
    big.acked.update((("x", f"S{i}"), (1.0 + i, float(i))) for i in range(100_000))
    big.save()
    small = ChangeDetector(checkpoint=path, max_keys=1000)
    assert small.restore() == 1000
    # the most recently emitted keys are the ones kept
    assert min(int(k[1][1:]) for k in small.state) == 99_000
    assert list(small.state)[-1] == ("x", "S99999")
    path.write_bytes(path.read_bytes()[:-10])  # cut short: the frame that holds keys 0.. is damaged
    assert ChangeDetector(checkpoint=path, max_keys=1000).restore() == 1000  # not read that far
    assert ChangeDetector(checkpoint=path).restore() == 0  # read that far: unusable


def _replay_file(path: Path, seed: int, symbols: int = 50, rounds: int = 60) -> list[tuple[str, float, float]]:
    import json
    import random

    rng = random.Random(seed)
    price = {f"S{i}": 100.0 + i for i in range(symbols)}
    rows = []
    for r in range(rounds):
        for s, p in price.items():
            if rng.random() > 0.6:
                price[s] = p = round(p * (1 + rng.uniform(-0.01, 0.01)), 4)
            rows.append((s, p, 1_700_000_000.0 + r + int(s[1:]) / 1000))
    path.write_text("".join(json.dumps({"source": "rp", "symbol": s, "price": p, "ts": t}) + "\n"
                            for s, p, t in rows))
    return rows


def test_sigkill_after_checkpoints_never_skips_a_record_for_good(tmp_path):
    """replay -> change detector (checkpoint every 0.1 s) -> SQLite flushing
    every 0.7 s, killed with SIGKILL at several points after checkpoints,
    then run to the end: the table holds every record an uninterrupted run
    emits (rel=0: a record whose price changed)."""
    import random

    from _cli import kill_mid_run_then_finish

    for seed, kill_after in ((1, 0.0), (2, 0.25), (3, 0.6)):
        work = tmp_path / f"seed{seed}"
        work.mkdir()
        rows = _replay_file(work / "ticks.jsonl", seed)
        last: dict[str, float] = {}
        expected = set()
        for s, p, t in rows:
            if last.get(s) != p:
                expected.add((s, t))
            last[s] = p
        (work / "f.py").write_text(
            "import os\n"
            "from flows import ChangeDetector, Flow\n"
            "from sinks.sqlite import SQLiteSink\n"
            "from sources.replay import ReplaySource\n"
            "flow = Flow('kill', sources=[ReplaySource(path='ticks.jsonl',"
            " speed=float(os.environ['SPEED']) or None, batch_size=100, offset_every=0.1)],\n"
            "            stages=[ChangeDetector(checkpoint='change.ckpt', checkpoint_every=0.1)],\n"
            "            sinks=[SQLiteSink('t.db', flush_interval=0.7, batch_size=100000)])\n"
        )
        # killed after the first save
        done = kill_mid_run_then_finish(
            "f.py", work, speed=40, written="change.ckpt",
            kill_after=kill_after + random.Random(seed).uniform(0, 0.05))
        assert done.returncode == 0, done.stderr
        with sqlite3.connect(work / "t.db") as db:
            stored = {(s, t) for s, t in db.execute("SELECT symbol, ts FROM ticks")}
        missing = expected - stored
        assert not missing, f"seed {seed}: {len(missing)} records skipped for good, e.g. {sorted(missing)[:3]}"
