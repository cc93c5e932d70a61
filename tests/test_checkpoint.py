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
