"""sinks.jsonl against real files: order, acks after fsync, rotation, rejects, retries."""

from __future__ import annotations

import errno
import functools
from pathlib import Path

import msgspec
import pytest
import trio

import sinks.jsonl
from flows import Batch, Flow, FlowFailed, Retry, Supervision, Tick
from flows.testing import ListSource, assert_component_metrics, run_briefly, sample
from sinks.jsonl import JSONLSink

DECODER = msgspec.json.Decoder(Tick)


def ticks(n: int, offset: int = 0) -> list[Tick]:
    return [Tick("t", f"S{i % 7}", 10.0 + i, 1_700_000_000.0 + i, bid=9.5, volume=3.0)
            for i in range(offset, offset + n)]


def chunks(data: list, size: int) -> list[list]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def read(path: Path) -> list[Tick]:
    return [DECODER.decode(line) for line in path.read_bytes().splitlines()]


def generations(path: Path) -> list[Path]:
    """The rotated files then the current one, oldest first."""
    rotated = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return rotated + ([path] if path.exists() else [])


class AckingSource:
    """Source: sends batches carrying an ack hook; the hook checks the file."""

    def __init__(self, batches: list[list[Tick]], path: Path, *, name: str = "acking") -> None:
        self.batches = batches
        self.path = path
        self.name = name
        self.outcomes: list[tuple[int, str]] = []
        self.on_disk: list[bool] = []

    async def run(self, outbox) -> None:
        for i, records in enumerate(self.batches):
            with outbox.metrics.timed_batch():
                batch = Batch(records, acks=[functools.partial(self.hook, i)])
            await outbox.send(batch)

    def hook(self, i: int, outcome: str) -> None:
        self.outcomes.append((i, outcome))
        start = sum(len(b) for b in self.batches[:i])
        stored = read(self.path)[start:start + len(self.batches[i])]
        self.on_disk.append(stored == self.batches[i])


async def test_writes_every_tick_in_order_and_moves_its_metrics(tmp_path):
    path = tmp_path / "ticks.jsonl"
    data = ticks(2500)
    sink = JSONLSink(path, batch_size=1000, flush_interval=60.0)
    flow = Flow("jl", sources=[ListSource(chunks(data, 100))], sinks=[sink])
    result, registry = await run_briefly(flow)
    assert result.clean
    assert read(path) == data
    first = msgspec.json.decode(path.read_bytes().splitlines()[0])
    assert list(first) == ["source", "symbol", "price", "ts", "bid", "ask", "volume"]
    # 1000 + 1000 by size, the last 500 at the drain
    assert sample(registry, "flows_sink_batch_records_count", "jl", "jsonl") == 3
    assert sample(registry, "flows_sink_batch_records_sum", "jl", "jsonl") == 2500
    assert sample(registry, "flows_sink_write_seconds_count", "jl", "jsonl") == 3
    assert_component_metrics(registry, "jl", "jsonl", "sink")


async def test_a_second_run_appends(tmp_path):
    path = tmp_path / "ticks.jsonl"
    data = ticks(30)
    await run_briefly(Flow("a", sources=[ListSource([data[:10]])], sinks=[JSONLSink(path)]))
    await run_briefly(Flow("a", sources=[ListSource([data[10:]])], sinks=[JSONLSink(path)]))
    assert read(path) == data


async def test_a_torn_last_line_is_left_alone_on_its_own_line(tmp_path):
    path = tmp_path / "ticks.jsonl"
    path.write_bytes(b'{"source":"t","sym')
    data = ticks(5)
    await run_briefly(Flow("torn", sources=[ListSource([data])], sinks=[JSONLSink(path)]))
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"source":"t","sym'
    assert [DECODER.decode(line) for line in lines[1:]] == data


async def test_every_batch_is_acked_once_after_its_lines_are_on_disk(tmp_path):
    path = tmp_path / "ticks.jsonl"
    data = ticks(230)
    source = AckingSource(chunks(data, 10), path)
    sink = JSONLSink(path, batch_size=50, flush_interval=60.0)
    result, _ = await run_briefly(Flow("acks", sources=[source], sinks=[sink]))
    assert result.clean
    assert sorted(source.outcomes) == [(i, "written") for i in range(23)]
    assert source.on_disk == [True] * 23
    assert read(path) == data


async def test_flushes_by_time_while_the_flow_runs(tmp_path, autojump_clock):
    path = tmp_path / "ticks.jsonl"
    data = ticks(30)
    acked = trio.Event()

    class Lingering(AckingSource):
        async def run(self, outbox):
            await super().run(outbox)
            await acked.wait()  # stay alive: only the timer can flush

        def hook(self, i, outcome):
            super().hook(i, outcome)
            acked.set()

    source = Lingering([data], path)
    sink = JSONLSink(path, batch_size=10_000, flush_interval=2.0)
    result, _ = await run_briefly(Flow("timed", sources=[source], sinks=[sink]))
    assert result.clean
    assert source.outcomes == [(0, "written")] and source.on_disk == [True]
    assert trio.current_time() >= 2.0  # the write waited for the flush interval


async def test_rotates_by_size_without_splitting_a_write(tmp_path):
    path = tmp_path / "ticks.jsonl"
    data = ticks(200)
    line = len(msgspec.json.encode(data[0])) + 1
    rotate = 12 * line  # room for two writes of 5 lines, not three
    sink = JSONLSink(path, batch_size=5, flush_interval=60.0, rotate_bytes=rotate)
    result, registry = await run_briefly(
        Flow("rot", sources=[ListSource(chunks(data, 5))], sinks=[sink])
    )
    assert result.clean
    files = generations(path)
    assert [p.name for p in files] == [f"ticks.jsonl.{i}" for i in range(19, 0, -1)] + ["ticks.jsonl"]
    assert all(p.stat().st_size <= rotate for p in files)
    assert [t for p in files for t in read(p)] == data
    assert sample(registry, "flows_sink_batch_records_count", "rot", "jsonl") == 40


async def test_a_write_larger_than_rotate_bytes_gets_a_file_of_its_own(tmp_path):
    path = tmp_path / "ticks.jsonl"
    data = ticks(60)
    sink = JSONLSink(path, batch_size=20, flush_interval=60.0, rotate_bytes=100)
    await run_briefly(Flow("big", sources=[ListSource(chunks(data, 20))], sinks=[sink]))
    files = generations(path)
    assert [p.name for p in files] == ["ticks.jsonl.2", "ticks.jsonl.1", "ticks.jsonl"]
    assert [read(p) for p in files] == chunks(data, 20)


async def test_keep_limits_the_rotated_files(tmp_path):
    path = tmp_path / "ticks.jsonl"
    data = ticks(200)
    line = len(msgspec.json.encode(data[0])) + 1
    sink = JSONLSink(path, batch_size=5, flush_interval=60.0, rotate_bytes=12 * line, keep=3)
    await run_briefly(Flow("keep", sources=[ListSource(chunks(data, 5))], sinks=[sink]))
    files = generations(path)
    assert [p.name for p in files] == ["ticks.jsonl.3", "ticks.jsonl.2", "ticks.jsonl.1", "ticks.jsonl"]
    assert [t for p in files for t in read(p)] == data[-40:]  # 4 files of 2 writes of 5


async def test_a_record_that_cannot_be_encoded_is_dropped_alone(tmp_path):
    path = tmp_path / "ticks.jsonl"
    good = ticks(10)
    batches = [good[:3] + [object()] + good[3:6], good[6:]]
    sink = JSONLSink(path, batch_size=100, flush_interval=60.0)
    result, registry = await run_briefly(Flow("bad", sources=[ListSource(batches)], sinks=[sink]))
    assert result.clean
    assert read(path) == good  # nothing of a failed encoding reached the file
    assert sample(registry, "flows_records_discarded_total", "bad", "jsonl", reason="rejected") == 1
    assert sample(registry, "flows_errors_total", "bad", "jsonl", error_type="TypeError") >= 1
    assert sample(registry, "flows_sink_retries_total", "bad", "jsonl") == 0


async def test_a_full_disk_is_retried_not_dropped(tmp_path, autojump_clock):
    path = tmp_path / "ticks.jsonl"
    data = ticks(40)

    class FullDisk(JSONLSink):
        failures = 2

        def _write_sync(self, data):
            if self.failures:
                self.failures -= 1
                raise OSError(errno.ENOSPC, "No space left on device")
            super()._write_sync(data)

    sink = FullDisk(path, batch_size=100, retry=Retry(backoff=0.5, max_backoff=1.0))
    source = AckingSource(chunks(data, 10), path)
    result, registry = await run_briefly(Flow("full", sources=[source], sinks=[sink]))
    assert result.clean
    assert read(path) == data
    assert sorted(source.outcomes) == [(i, "written") for i in range(4)]
    assert sample(registry, "flows_sink_retries_total", "full", "jsonl") == 2
    assert sample(registry, "flows_sink_write_errors_total", "full", "jsonl") == 2
    assert sample(registry, "flows_errors_total", "full", "jsonl", error_type="OSError") == 2
    for reason in ("rejected", "write_failed"):
        assert sample(registry, "flows_records_discarded_total", "full", "jsonl", reason=reason) == 0


async def test_a_write_that_fails_half_way_is_cut_off_before_the_retry(tmp_path, monkeypatch, autojump_clock):
    path = tmp_path / "ticks.jsonl"
    data = ticks(20)
    write_all = sinks.jsonl._write_all
    failures = []

    def half_then_full(f, buffer):
        if not failures:
            failures.append(len(buffer))
            write_all(f, buffer[: len(buffer) // 2 + 3])
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(f, buffer)

    monkeypatch.setattr(sinks.jsonl, "_write_all", half_then_full)
    sink = JSONLSink(path, batch_size=10, flush_interval=60.0)
    result, registry = await run_briefly(Flow("torn", sources=[ListSource(chunks(data, 10))], sinks=[sink]))
    assert result.clean and failures
    assert read(path) == data  # no torn line, nothing twice
    assert sample(registry, "flows_sink_retries_total", "torn", "jsonl") == 1


async def test_a_missing_directory_is_a_clear_error_at_open(tmp_path, autojump_clock):
    path = tmp_path / "missing" / "ticks.jsonl"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        await JSONLSink(path).open()
    flow = Flow("nodir", sources=[ListSource([ticks(3)])], sinks=[JSONLSink(path)],
                supervision=Supervision(max_restarts=1))
    with pytest.raises(FlowFailed, match=r"directory .* does not exist"):
        await run_briefly(flow)
    assert not path.parent.exists()


def test_rejects_bad_configuration(tmp_path):
    path = tmp_path / "ticks.jsonl"
    with pytest.raises(ValueError, match="batch_size"):
        JSONLSink(path, batch_size=0)
    with pytest.raises(ValueError, match="flush_interval"):
        JSONLSink(path, flush_interval=0)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="rotate_bytes"):
            JSONLSink(path, rotate_bytes=bad)
    with pytest.raises(ValueError, match="needs rotate_bytes"):
        JSONLSink(path, keep=3)
    with pytest.raises(ValueError, match="keep"):
        JSONLSink(path, rotate_bytes=1000, keep=0)


async def test_a_rotation_that_fails_half_way_is_completed_by_the_retry(tmp_path, monkeypatch, autojump_clock):
    path = tmp_path / "ticks.jsonl"
    data = ticks(40)
    line = len(msgspec.json.encode(data[0])) + 1
    rename = sinks.jsonl.os.rename
    failed = []

    def flaky_rename(src, dst):
        if Path(src) == path and not failed and Path(f"{path}.2").exists():
            failed.append(dst)  # the older files moved up, the current one did not
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(sinks.jsonl.os, "rename", flaky_rename)
    sink = JSONLSink(path, batch_size=5, flush_interval=60.0, rotate_bytes=12 * line,
                     retry=Retry(backoff=0.5, max_backoff=1.0))
    result, registry = await run_briefly(Flow("rf", sources=[ListSource(chunks(data, 5))], sinks=[sink]))
    assert result.clean and failed == [tmp_path / "ticks.jsonl.1"]
    files = generations(path)
    assert [p.name for p in files] == ["ticks.jsonl.3", "ticks.jsonl.2", "ticks.jsonl.1", "ticks.jsonl"]
    assert [t for p in files for t in read(p)] == data
    assert sample(registry, "flows_sink_retries_total", "rf", "jsonl") == 1


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied"),
    OSError(errno.EROFS, "Read-only file system"),
])
async def test_a_file_the_sink_may_not_write_fails_it_not_retried(tmp_path, monkeypatch, error):
    """Fault 3: permission denied or a read-only file system is the sink's own
    fault: the flow stops with the error instead of retrying for ever."""
    path = tmp_path / "ticks.jsonl"

    def refuse(f, buffer):
        raise error

    monkeypatch.setattr(sinks.jsonl, "_write_all", refuse)
    flow = Flow("ro", sources=[ListSource([ticks(4)])], sinks=[JSONLSink(path)],
                supervision=Supervision(max_restarts=1, backoff=0.0))
    with trio.fail_after(10), pytest.raises(FlowFailed, match=error.strerror) as failed:
        await run_briefly(flow)
    assert "sink 'jsonl' failed 2 times" in str(failed.value)
    assert path.read_bytes() == b""
