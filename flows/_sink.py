"""The base every storing sink shares: batching by size and time, retries, acks.

A subclass implements ``write(records)`` (durable when it returns) and, if it
holds a connection, ``open()`` and ``close()``. The base gathers incoming
batches until ``batch_size`` records or ``flush_interval`` seconds since the
first pending one, writes them in one call, retries transient failures with
exponential backoff and full jitter (blocking the inbox meanwhile: that is
backpressure, not loss), then observes end-to-end latency and calls each
batch's ack hooks with ``"written"``. Records the database rejects for good
(``is_transient`` false) are isolated by splitting the write, and only they
are dropped, counted with reason ``rejected``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import attrs
import trio

from ._channels import Inbox
from ._log import DropLog
from ._metrics import ComponentMetrics
from ._records import Batch

__all__ = ["BatchingSink", "Retry"]


@attrs.frozen(kw_only=True)
class Retry:
    """Retry policy: exponential backoff with full jitter.

    ``attempts=None`` retries forever (the sink blocks while its database is
    down, and the flow backs up behind it).
    """

    attempts: int | None = None
    backoff: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    max_backoff: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))

    def delays(self) -> Iterator[float]:
        """Sleep before each retry: uniform(0, min(max_backoff, backoff * 2**n))."""
        n = 0
        while self.attempts is None or n < self.attempts - 1:
            yield random.uniform(0, min(self.max_backoff, self.backoff * 2**n))
            n += 1


class BatchingSink:
    """Base class for sinks that write batches of records somewhere durable.

    Parameters (keyword-only in subclasses):
        batch_size: write when this many records are pending.
        flush_interval: or when the oldest pending batch is this old (s).
        retry: policy for failures ``is_transient`` accepts.
    """

    name: str = "sink"
    batch_size: int = 1000
    flush_interval: float = 1.0
    retry: Retry = Retry()

    def __init__(
        self,
        *,
        name: str,
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        retry: Retry | None = None,
    ) -> None:
        if batch_size < 1 or not flush_interval > 0:
            raise ValueError("batch_size must be >= 1 and flush_interval > 0")
        self.name = name
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry = retry or Retry()

    async def open(self) -> None:
        """Connect or prepare; called at every (re)start of the actor."""

    async def close(self) -> None:
        """Release what ``open`` took; called when the actor exits."""

    async def write(self, records: list[Any]) -> None:
        """Write ``records`` durably, or raise."""
        raise NotImplementedError

    def is_transient(self, exc: Exception) -> bool:
        """Whether a failed write is worth retrying (default: OS-level errors)."""
        return isinstance(exc, (OSError, TimeoutError, ConnectionError))

    async def run(self, inbox: Inbox) -> None:
        log = logging.getLogger(f"flows.sink.{self.name}")
        await self.open()
        try:
            pending: list[Batch] = []
            count = 0
            deadline = math.inf
            while True:
                with trio.move_on_at(deadline):
                    try:
                        batch = await inbox.receive()
                    except trio.EndOfChannel:
                        break
                    if not pending:
                        deadline = trio.current_time() + self.flush_interval
                    pending.append(batch)
                    count += len(batch.records)
                    if count < self.batch_size:
                        continue
                await self._flush(pending, inbox.metrics, log)
                pending, count, deadline = [], 0, math.inf
            await self._flush(pending, inbox.metrics, log)
        finally:
            with trio.CancelScope(shield=True):
                await self.close()

    async def _flush(self, batches: list[Batch], m: ComponentMetrics, log: logging.Logger) -> None:
        if not batches:
            return
        records = [r for b in batches for r in b.records]
        try:
            await self._write_isolating(records, m, log)
        except _GaveUp as exc:
            log.error("write of %d records failed, dropping them: %r", len(records), exc.__cause__)
            m.discarded("write_failed", len(records))
            _ack(batches, "failed")
            return
        now = time.monotonic()
        for b in batches:
            m.end_to_end.observe(max(now - b.created, 0.0))
        _ack(batches, "written")

    async def _write_isolating(
        self, records: list[Any], m: ComponentMetrics, log: logging.Logger
    ) -> None:
        """Write ``records``; when the database rejects them for good, split
        the write in halves until the bad records are found, and drop only
        those (counted as ``rejected``)."""
        try:
            await self._write_retrying(records, m, log)
        except _Rejected as exc:
            if len(records) == 1:
                m.discarded("rejected", 1)
                self._drops.drop("rejected", f"{records[0]!r}: {exc.__cause__!r}")
                return
            mid = len(records) // 2
            await self._write_isolating(records[:mid], m, log)
            await self._write_isolating(records[mid:], m, log)

    async def _write_retrying(
        self, records: list[Any], m: ComponentMetrics, log: logging.Logger
    ) -> None:
        delays = self.retry.delays()
        while True:
            t0 = time.perf_counter()
            try:
                await self.write(records)
            except Exception as exc:
                m.write_errors.inc()
                m.error(type(exc).__name__)
                if not self.is_transient(exc):
                    raise _Rejected from exc
                delay = next(delays, None)
                if delay is None:
                    raise _GaveUp from exc
                log.warning(
                    "write of %d records failed (%r); retrying in %.2fs", len(records), exc, delay
                )
                m.write_retries.inc()
                await trio.sleep(delay)
                continue
            m.write_seconds.observe(time.perf_counter() - t0)
            m.write_records.observe(len(records))
            return

    @property
    def _drops(self) -> DropLog:
        drops = self.__dict__.get("_drop_log")
        if drops is None:
            drops = self.__dict__["_drop_log"] = DropLog(f"flows.sink.{self.name}")
        return drops


class _Rejected(Exception):
    """The database refused the records themselves (not worth retrying)."""


class _GaveUp(Exception):
    """Transient failures outlasted the retry policy."""


def _ack(batches: list[Batch], outcome: str) -> None:
    for b in batches:
        b.ack(outcome)
