"""Replay: recorded ticks from a local JSONL or CSV file, once, then the flow ends.

The reference (what it talks to, parameters, metrics, examples) is
docs/sources/replay.md (which renders the parameters from the class docstring).
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any, Literal

import attrs
import msgspec
import trio

from flows import (
    Batch,
    ComponentMetrics,
    DropLog,
    Outbox,
    Progress,
    RunContext,
    Tick,
    check_tick,
    write_atomic,
)

__all__ = ["OFFSET_VERSION", "OffsetTracker", "ReplaySource", "count_lines"]

OFFSET_VERSION = 1

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
_OK = frozenset(("written", "skipped", "dropped"))
_REQUIRED = ("symbol", "price", "ts")
_OPTIONAL = ("bid", "ask", "volume")

# One line of the file: (tick or None, the line's number (1-based), why it
# is invalid or None). (None, n, None) is a blank line.
_Row = tuple[Tick | None, int, str | None]


def _bounded_lines(f: IO[Any], most: int) -> Iterator[Any]:
    """The lines of ``f``, each read with at most ``most + 1`` characters
    (bytes in binary mode) in memory; a longer line is skipped in pieces
    and yields ``None`` instead."""
    ends = ("\n", "\r") if isinstance(f, io.TextIOBase) else (b"\n",)
    readline = f.readline
    while raw := readline(most + 1):
        if len(raw) > most and not raw.endswith(ends):
            while raw and not raw.endswith(ends):
                raw = readline(1 << 16)
            yield None
            continue
        yield raw


class _CsvLines:
    """The lines of a CSV file for ``csv.reader``: an overlong line becomes
    an empty one, and ``overlong`` counts them (so the row is refused)."""

    def __init__(self, f: IO[str], most: int) -> None:
        self._lines = _bounded_lines(f, most)
        self.overlong = 0

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        if line is None:
            self.overlong += 1
            return "\n"
        return line


def count_lines(path: str | os.PathLike[str], chunk: int = 1 << 20) -> int:
    """Lines in the file at ``path`` (a last line without a newline counts)."""
    lines = 0
    last = b"\n"
    with open(path, "rb") as f:
        while data := f.read(chunk):
            lines += data.count(b"\n")
            last = data[-1:]
    return lines + (last != b"\n")


class OffsetTracker:
    """The resume offset of a source whose batches are acked out of order.

    ``add(end)`` registers a batch sent whose last line is ``end`` and
    returns its token; ``ack(token, outcome)`` records its outcome. ``done``
    is the end of the longest run of batches, in sending order, all acked
    ``written``, ``skipped`` or ``dropped``: a ``failed`` (or unknown)
    outcome stops it. ``sent`` is the end of the last batch sent.
    """

    def __init__(self, start: int = 0) -> None:
        self.done = start
        self.sent = start
        self._pending: deque[tuple[int, int]] = deque()  # (token, end), sending order
        self._outcomes: dict[int, str] = {}  # pending tokens acked so far
        self._next = 0
        self.failed_at: int | None = None
        """Where the first batch acked ``failed`` starts: ``done`` stops there."""

    @property
    def outstanding(self) -> int:
        """Batches sent and not acked yet."""
        return len(self._pending) - len(self._outcomes)

    @property
    def blocked(self) -> bool:
        """True when a failed batch holds the offset back."""
        return bool(self._pending) and self._outcomes.get(self._pending[0][0], "written") not in _OK

    def add(self, end: int) -> int:
        token = self._next
        self._next += 1
        self._pending.append((token, end))
        self.sent = end
        return token

    def ack(self, token: int, outcome: str) -> bool:
        """Record ``outcome`` for ``token``; True when ``done`` advanced."""
        pending, outcomes = self._pending, self._outcomes
        if token in outcomes or not pending or not pending[0][0] <= token <= pending[-1][0]:
            return False  # a second ack, or a batch already done or forgotten
        outcomes[token] = outcome
        if outcome not in _OK:
            start = self.done
            for t, end in pending:
                if t == token:
                    break
                start = end
            if self.failed_at is None or start < self.failed_at:
                self.failed_at = start
        before = self.done
        while pending and outcomes.get(pending[0][0]) in _OK:
            head, self.done = pending.popleft()
            del outcomes[head]
        return self.done != before

    def abandon(self, token: int) -> None:
        """Forget the last batch added, which never reached the flow (its
        send was cancelled): ``sent`` goes back to the batch before it."""
        if self._pending and self._pending[-1][0] == token and token not in self._outcomes:
            self._pending.pop()
            self.sent = self._pending[-1][1] if self._pending else self.done


class _OffsetFile(msgspec.Struct):
    version: int
    path: str
    line: int
    size: int


def _stderr_is_tty() -> bool:
    stream = sys.stderr
    return stream is not None and stream.isatty()


def _path(value: str | os.PathLike[str]) -> Path:
    return Path(value)


def _optional_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


def _default_offset_path(self: ReplaySource) -> Path:
    return Path(f"{self.path}.offset")


def _positive_or_none(instance: Any, attribute: Any, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a positive number or None, got {value!r}")


def _positive_or_none_or_zero(instance: Any, attribute: Any, value: float | None) -> None:
    if value is not None and not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a number >= 0 or None, got {value!r}")


@attrs.define(kw_only=True)
class ReplaySource:
    """Source: replay the ticks recorded in a JSONL or CSV file, then end.

    Parameters:
        path: the file to replay.
        format: ``"jsonl"``, ``"csv"`` or ``None`` (default: from the
            extension; an unknown one is a ``ValueError``).
        source: the ``source`` of CSV rows without one (default: the file's
            stem).
        speed: ``None`` (default): as fast as the flow takes the ticks;
            ``1.0``: the recording's pacing, by the ticks' ``ts``; ``2.0``:
            twice as fast.
        batch_size: most records per batch (default 1000).
        offset_path: where the resume offset is kept (default:
            ``<path>.offset``; ``None``: no offsets, always from the top).
        offset_every: least seconds between offset writes while acks come
            in (default 1.0).
        fresh: ignore a saved offset: replay from the top (default False).
        progress: show a ``rich`` progress bar (default: when stderr is a
            terminal); else log lines.
        progress_every: seconds between progress log lines (default 5;
            ``None``: no progress lines, and no line count up front).
        max_line_bytes: longest line read (default 65536; characters for
            CSV); a longer one is skipped and counted ``invalid``.
        record: the record type of a JSONL file's lines (default ``Tick``;
            ``flows.Trade`` replays recorded trades; any msgspec Struct).
            CSV files hold ticks.
        name: the actor's name (default ``replay``).
    """

    path: Path = attrs.field(converter=_path)
    format: Literal["jsonl", "csv"] | None = attrs.field(
        default=None, validator=attrs.validators.in_(("jsonl", "csv", None))
    )
    source: str | None = None
    speed: float | None = attrs.field(default=None, validator=_positive_or_none)
    batch_size: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    offset_path: Path | None = attrs.field(
        default=attrs.Factory(_default_offset_path, takes_self=True), converter=_optional_path
    )
    offset_every: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    fresh: bool = False
    progress: bool = attrs.field(factory=_stderr_is_tty)
    progress_every: float | None = attrs.field(default=5.0, validator=_positive_or_none_or_zero)
    max_line_bytes: int = attrs.field(default=65_536, validator=attrs.validators.ge(64))
    record: type = Tick
    name: str = "replay"
    _fmt: str = attrs.field(init=False)
    _log: logging.Logger = attrs.field(init=False)
    _drops: DropLog = attrs.field(init=False)
    _decoder: msgspec.json.Decoder[Tick] = attrs.field(init=False)
    _tracker: OffsetTracker | None = attrs.field(default=None, init=False)
    _total: int | None = attrs.field(default=None, init=False)
    _finished: bool = attrs.field(default=False, init=False)
    _fresh_run: bool = attrs.field(default=False, init=False)
    _warned_failed: bool = attrs.field(default=False, init=False)
    _saved_line: int | None = attrs.field(default=None, init=False)
    _saved_at: float = attrs.field(default=-math.inf, init=False)
    _metrics: ComponentMetrics | None = attrs.field(default=None, init=False)
    _acked: trio.Event | None = attrs.field(default=None, init=False)  # set while paced waits

    def __attrs_post_init__(self) -> None:
        if self.format is None:
            suffix = self.path.suffix.lower()
            fmt = _EXTENSIONS.get(suffix)
            if fmt is None:
                raise ValueError(
                    f"replay {self.path}: cannot tell the format from the extension "
                    f"{suffix or '(none)'!r}: use .jsonl, .json, .ndjson or .csv, "
                    "or pass format='jsonl' or format='csv'"
                )
            self._fmt = fmt
        else:
            self._fmt = self.format
        if self.source is None:
            self.source = self.path.stem
        self._log = logging.getLogger(f"flows.source.{self.name}")
        self._drops = DropLog(f"flows.source.{self.name}")
        if self.record is not Tick and self._fmt != "jsonl":
            raise ValueError(f"replay {self.path}: record={self.record.__name__} needs a JSONL file")
        self._decoder = msgspec.json.Decoder(self.record)

    # -- offsets -------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Lines done: every batch up to there was acked (not ``failed``)."""
        return 0 if self._tracker is None else self._tracker.done

    def setup(self, context: RunContext) -> None:
        """Runtime hook: a ``fresh`` run ignores the saved offset."""
        self._fresh_run = context.fresh

    def load_offset(self) -> int:
        """The saved offset (lines to skip) for this file; 0 when there is
        none, ``fresh`` is set, or the offset file is unusable (one warning)."""
        path = self.offset_path
        if path is None:
            return 0
        if self.fresh or self._fresh_run:
            if path.exists():
                self._log.info("replay %s: fresh run: ignoring offset %s", self.name, path)
            return 0
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            self._offset_unusable(f"cannot read it ({exc})")
            return 0
        try:
            state = msgspec.json.decode(data, type=_OffsetFile)
        except msgspec.MsgspecError as exc:
            self._offset_unusable(f"not an offset file ({exc})")
            return 0
        if state.version != OFFSET_VERSION:
            self._offset_unusable(f"version {state.version}, expected {OFFSET_VERSION}")
            return 0
        if state.path != self._identity():
            self._offset_unusable(f"it was saved for {state.path}")
            return 0
        if state.line < 0 or (self._total is not None and state.line > self._total):
            self._offset_unusable(f"line {state.line} is not a line of the file")
            return 0
        try:
            size = self.path.stat().st_size
        except OSError:
            size = None  # the replay itself reports a missing file
        if size is not None and size < state.size:
            self._offset_unusable(
                f"the file has {size} bytes, {state.size} when the offset was saved: "
                "it was replaced or truncated"
            )
            return 0
        self._saved_line = state.line
        self._log.info("replay %s: resuming %s after line %d", self.name, self.path, state.line)
        return state.line

    def save_offset(self) -> bool:
        """Write the current offset to ``offset_path`` (atomically) if it
        moved since the last write; True when written. Never raises: a
        failed write is logged and counted (``offset_write``)."""
        tracker, path = self._tracker, self.offset_path
        if tracker is None or path is None or tracker.done == self._saved_line:
            return False
        line = tracker.done
        self._saved_at = _now()
        try:
            size = self.path.stat().st_size
            data = msgspec.json.encode(_OffsetFile(OFFSET_VERSION, self._identity(), line, size))
            write_atomic(path, data)
        except OSError as exc:
            if self._metrics is not None:
                self._metrics.error("offset_write")
            self._log.error("replay %s: cannot write offset %s: %s", self.name, path, exc)
            return False
        self._saved_line = line
        return True

    def _identity(self) -> str:
        return str(self.path.resolve())

    def _offset_unusable(self, why: str) -> None:
        self._log.warning(
            "replay %s: ignoring offset file %s: %s; replaying %s from the start",
            self.name, self.offset_path, why, self.path,
        )

    def _maybe_save(self, now: float) -> None:
        if now - self._saved_at >= self.offset_every:
            self.save_offset()

    def _dirty(self) -> bool:
        return (
            self.offset_path is not None
            and self._tracker is not None
            and self._tracker.done != self._saved_line
        )

    def _on_ack(self, token: int, outcome: str) -> None:
        tracker = self._tracker
        assert tracker is not None
        advanced = tracker.ack(token, outcome)
        if outcome not in _OK and not self._warned_failed:
            self._warned_failed = True
            self._log.warning(
                "replay %s: a batch was acked %r: the resume offset will not pass line %d "
                "(the next run replays from there)",
                self.name, outcome, tracker.failed_at,
            )
        if self.offset_path is None:
            return
        if self._finished and tracker.outstanding == 0:
            if self._dirty():
                self.save_offset()  # the last ack after the source finished: final
            return
        if not advanced:
            return
        self._maybe_save(_now())
        if self._acked is not None and self._dirty():
            self._acked.set()  # a paced source is waiting: have it save later

    # -- reading -------------------------------------------------------------

    def _open(self, start: int) -> tuple[IO[Any], Iterator[_Row]]:
        """Open the file, skip its first ``start`` lines (blocking)."""
        if self._fmt == "jsonl":
            f: IO[Any] = open(self.path, "rb")  # noqa: SIM115 - returned, closed by run()
            try:
                lines = _bounded_lines(f, self.max_line_bytes)
                for _ in zip(range(start), lines):
                    pass
            except BaseException:
                f.close()
                raise
            return f, self._jsonl_rows(lines, start)
        f = open(self.path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115 - returned
        try:
            csv_lines = _CsvLines(f, self.max_line_bytes)
            reader = csv.reader(csv_lines)
            header = next(reader, None)
            if header is None:
                return f, iter(())
            columns = {name.strip().lower(): i for i, name in enumerate(header)}
            missing = [c for c in _REQUIRED if c not in columns]
            if missing:
                raise ValueError(
                    f"replay {self.path}: the CSV header lacks the column(s) "
                    f"{', '.join(missing)} (it has {', '.join(header)})"
                )
            while reader.line_num < start:
                try:
                    if next(reader, None) is None:
                        break
                except csv.Error:
                    continue
        except BaseException:
            f.close()
            raise
        return f, self._csv_rows(reader, csv_lines, columns, len(header))

    def _too_long(self) -> str:
        return f"line longer than {self.max_line_bytes} bytes (max_line_bytes), skipped"

    def _jsonl_rows(self, lines: Iterator[bytes | None], line: int) -> Iterator[_Row]:
        decode = self._decoder.decode
        now = time.time()
        for raw in lines:
            line += 1
            if not line & 4095:
                now = time.time()  # check_tick's "tomorrow", read once per 4096 lines
            if raw is None:
                yield None, line, self._too_long()
                continue
            raw = raw.strip()
            if not raw:
                yield None, line, None
                continue
            try:
                tick = decode(raw)
            except msgspec.MsgspecError as exc:
                yield None, line, str(exc)
                continue
            why = check_tick(tick, now)
            yield (tick, line, None) if why is None else (None, line, why)

    def _csv_rows(
        self, reader: Any, lines: _CsvLines, columns: dict[str, int], width: int
    ) -> Iterator[_Row]:
        i_symbol, i_price, i_ts = (columns[c] for c in _REQUIRED)
        i_source = columns.get("source")
        optional = [(c, columns[c]) for c in _OPTIONAL if c in columns]
        default_source = self.source or self.path.stem  # set in __attrs_post_init__
        while True:
            overlong = lines.overlong
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield None, reader.line_num, f"CSV: {exc}"
                continue
            line = reader.line_num
            if lines.overlong != overlong:
                yield None, line, self._too_long()
                continue
            if not row or (len(row) == 1 and not row[0].strip()):
                yield None, line, None
                continue
            if len(row) != width:
                yield None, line, f"{len(row)} cells, the header has {width}"
                continue
            try:
                symbol = row[i_symbol].strip()
                if not symbol:
                    raise ValueError("symbol is empty")
                extra = {}
                for field, i in optional:
                    cell = row[i].strip()
                    extra[field] = float(cell) if cell else None
                source = row[i_source].strip() if i_source is not None else ""
                tick = Tick(
                    source or default_source,
                    symbol,
                    float(row[i_price]),
                    float(row[i_ts]),
                    **extra,
                )
            except ValueError as exc:
                yield None, line, str(exc)
                continue
            why = check_tick(tick)
            yield (tick, line, None) if why is None else (None, line, why)

    # -- running -------------------------------------------------------------

    async def run(self, outbox: Outbox) -> None:
        metrics = self._metrics = outbox.metrics
        if self._total is None and (self.progress_every is not None or self.progress):
            self._total = await trio.to_thread.run_sync(count_lines, self.path)
        if self._tracker is None:
            self._tracker = OffsetTracker(self.load_offset())
        tracker = self._tracker
        self._finished = False
        self._saved_at = trio.current_time()  # the first periodic write is offset_every away
        start = tracker.sent  # after a restart: where the last attempt stopped sending
        report = self._reporter(start)
        reader = _BatchReader(self, start)
        reported = start
        f = None
        try:
            f, reader.rows = await trio.to_thread.run_sync(self._open, start)
            while not reader.eof:
                with metrics.timed_batch():
                    records = reader.take() if self.speed is None else reader.take_due(trio.current_time())
                    if reader.invalid:
                        metrics.discarded("invalid", reader.invalid)
                if reader.consumed > tracker.sent:
                    token = tracker.add(reader.consumed)
                    try:
                        await outbox.send(
                            Batch(records, acks=[functools.partial(self._on_ack, token)])
                        )
                    except BaseException:
                        tracker.abandon(token)  # never sent: not a line of it is done
                        raise
                if reader.consumed != reported:
                    reported = reader.consumed
                    report.update(reported)
                if self.offset_path is not None:
                    self._maybe_save(trio.current_time())
                if reader.due is not None:
                    await self._sleep_until(reader.due)
        finally:
            if f is not None:
                f.close()
            self._finished = True
            report.close("end of file" if reader.eof else "stopped", done=tracker.sent)
            self.save_offset()

    async def _sleep_until(self, due: float) -> None:
        # Paced waits can be long: wake up meanwhile to write the offset the
        # acks moved (at most every offset_every seconds).
        while (now := trio.current_time()) < due:
            wake = due
            if self._dirty():
                self._maybe_save(now)
                if self._dirty():
                    wake = min(due, self._saved_at + self.offset_every)
            self._acked = trio.Event()
            with trio.move_on_at(wake):
                await self._acked.wait()
        self._acked = None

    def _reporter(self, start: int) -> Progress:
        return Progress(f"replay {self.path.name}", total=self._total, done=start, unit="lines",
                        bar=self.progress, every=self.progress_every, logger=self._log)


class _BatchReader:
    """Cuts the rows of the file into batches; paces them when asked to."""

    def __init__(self, source: ReplaySource, start: int) -> None:
        self.rows: Iterator[_Row] = iter(())
        self.size = source.batch_size
        self.speed = source.speed or 1.0
        self.drops = source._drops  # noqa: SLF001 (the reader is its source's helper)
        self.label = source.path.name
        self.consumed = start  # lines read and batched (or skipped: blank, invalid)
        self.invalid = 0  # invalid lines in the last batch
        self.eof = False
        self.due: float | None = None  # paced: when the tick held back is due
        self._held: _Row | None = None
        self._clock0: float | None = None  # trio time of the first tick
        self._ts0 = 0.0  # and its ts

    def _drop(self, line: int, error: str) -> None:
        self.invalid += 1
        self.drops.drop("invalid", f"{self.label}:{line}: {error}")

    def take(self) -> list[Tick]:
        """The ticks of the next ``batch_size`` lines."""
        records: list[Tick] = []
        append = records.append
        self.invalid = taken = 0
        line = self.consumed
        for record, line, error in islice(self.rows, self.size):
            taken += 1
            if record is not None:
                append(record)
            elif error is not None:
                self._drop(line, error)
        self.consumed = line
        self.eof = taken < self.size
        return records

    def take_due(self, now: float) -> list[Tick]:
        """The ticks of the next ``batch_size`` lines that are due at ``now``;
        when one is not, it is held back and ``due`` says when it will be."""
        records: list[Tick] = []
        self.invalid = 0
        self.due = None
        for _ in range(self.size):
            item, self._held = self._held, None
            if item is None:
                item = next(self.rows, None)
                if item is None:
                    self.eof = True
                    break
            record, line, error = item
            if record is not None:
                if self._clock0 is None:
                    self._clock0, self._ts0 = now, record.ts
                at = self._clock0 + (record.ts - self._ts0) / self.speed
                if at > now:
                    self._held, self.due = item, at
                    break
                records.append(record)
            elif error is not None:
                self._drop(line, error)
            self.consumed = line
        return records


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio (a test, a user calling save_offset)
        return time.monotonic()
