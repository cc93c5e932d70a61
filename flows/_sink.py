"""The base every storing sink shares: batching by size and time, retries, acks.

A subclass implements ``write(records)`` (durable when it returns) and, if it
holds a connection, ``open()`` and ``close()``. The base gathers incoming
batches until ``batch_size`` records or ``flush_interval`` seconds since the
first pending one, writes them in one call, and sorts a failure into one of
three kinds:

- transient (``is_transient``: connection refused or lost, timeouts, a
  server shutting down, 5xx): retried by the ``retry`` policy
  (``flows.Retry``; default: forever), blocking the inbox meanwhile
  (backpressure, not loss);
- the records' fault (neither transient nor fatal: a value the database
  refuses, a record that cannot be encoded): the write is split until the
  bad records are isolated, and only they are dropped, counted with reason
  ``rejected``;
- the sink's own fault (``is_fatal``: bad credentials, a missing database,
  a missing privilege, a table of another shape): the write's records are
  dropped (``write_failed``), one error line says why, and the actor
  raises, so the supervisor restarts it and, past its restart budget, stops
  the flow with that error instead of retrying for ever (until a write
  succeeds again, the end of its inbox raises the error again rather than
  let the flow end cleanly).

Every write is bounded in time: one attempt that has not returned after
``write_timeout`` seconds (wall clock) is cancelled, ``abort()`` is called
so a worker thread blocked on a socket gets out, and the attempt counts as a
transient ``TimeoutError``. Work in a worker thread goes through
``run_in_thread``, which a forced stop abandons at once (the thread is told
to get out through ``abort()``), so a hung database cannot hold the process.

A sink whose write has been failing or in progress for ``unready_after``
seconds reports it through ``health()``, which makes the flow not ready
(``/readyz`` 503 with the reason). Records a forced stop takes from the sink
(those it holds, those of the write in progress) are counted with reason
``forced_stop`` and their batches acked ``failed``.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

from ._channels import Inbox
from ._log import DropLog
from ._metrics import ComponentMetrics
from ._records import Batch
from ._retry import Retry

__all__ = ["BatchingSink"]

T = TypeVar("T")

_CLOSE_AFTER_FORCE = 2.0
"""Seconds a sink's ``close()`` may take after a forced stop."""


class BatchingSink:
    """Base class for sinks that write batches of records somewhere durable.

    Subclasses take these keyword-only.

    Parameters:
        name: the actor's name.
        batch_size: write when this many records are pending.
        flush_interval: or when the oldest pending batch is this old (s).
        retry: policy for failures ``is_transient`` accepts (``flows.Retry``;
            default ``Retry()``: forever, 0.1 s doubling up to 10 s).
        write_timeout: longest one write attempt may take (s, wall clock;
            default 30; ``None``: unbounded). Past it the attempt is
            cancelled, ``abort()`` is called, and it is retried.
        unready_after: the sink makes the flow not ready once a write has
            been failing or in progress this long (s, default 30).
    """

    name: str = "sink"
    batch_size: int = 1000
    flush_interval: float = 1.0
    retry: Retry = Retry()
    write_timeout: float | None = 30.0
    unready_after: float = 30.0

    def __init__(
        self,
        *,
        name: str,
        batch_size: int = 1000,
        flush_interval: float = 1.0,
        retry: Retry | None = None,
        write_timeout: float | None = 30.0,
        unready_after: float = 30.0,
    ) -> None:
        if batch_size < 1 or not flush_interval > 0:
            raise ValueError("batch_size must be >= 1 and flush_interval > 0")
        if write_timeout is not None and not write_timeout > 0:
            raise ValueError("write_timeout must be > 0 (or None)")
        if not unready_after > 0:
            raise ValueError("unready_after must be > 0")
        self.name = name
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry = retry or Retry()
        self.write_timeout = write_timeout
        self.unready_after = unready_after

    # -- what a subclass provides ------------------------------------------

    async def open(self) -> None:
        """Connect or prepare; called at every (re)start of the actor."""

    async def close(self) -> None:
        """Release what ``open`` took; called when the actor exits (bounded
        in time: after a forced stop it is given up after a few seconds)."""

    async def write(self, records: list[Any]) -> None:
        """Write ``records`` durably, or raise."""
        raise NotImplementedError

    def abort(self) -> None:
        """Make a write in progress in a worker thread fail fast (shut down
        its socket, interrupt its statement). Called from the trio thread or
        from a timer thread when a write is given up: must be thread-safe and
        must not block. Default: nothing (the thread is abandoned)."""

    def is_transient(self, exc: Exception) -> bool:
        """Whether a failed write is worth retrying (default: OS-level errors
        and timeouts). Neither transient nor fatal: the records' fault."""
        return isinstance(exc, (OSError, TimeoutError, ConnectionError))

    def is_fatal(self, exc: Exception) -> bool:
        """Whether a failed write is the sink's own fault (credentials,
        database, privileges, schema, URL): no retry, and no record is to
        blame; the actor fails. Checked before ``is_transient``. Default:
        never."""
        return False

    async def run_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread, one at a time for this sink.

        A cancellation (a forced stop, a write timeout) does not wait for the
        thread: it is abandoned, and ``abort()`` is called so that it gets
        out of a blocking call soon. The next call waits until the abandoned
        thread has finished, so two never use one connection at once.
        """
        token = trio.lowlevel.current_trio_token()
        run, limiter = self.__dict__.get("_thread_limiter", (None, None))
        if run is not token or limiter is None:
            # one per trio run: a thread abandoned in an earlier run may
            # never hand its token back to this one
            limiter = trio.CapacityLimiter(1)
            self.__dict__["_thread_limiter"] = (token, limiter)
        try:
            return await trio.to_thread.run_sync(
                fn, *args, abandon_on_cancel=True, limiter=limiter
            )
        except trio.Cancelled:
            self._abort_quietly()
            raise

    # -- status --------------------------------------------------------------

    def health(self) -> str | None:
        """None when healthy, else why not (shown on /readyz): a write that
        has been failing or in progress for ``unready_after`` seconds."""
        flush = self.__dict__.get("_flush_state")
        if flush is None:
            return None
        try:
            elapsed = trio.current_time() - flush.started
        except RuntimeError:  # called outside trio (a server thread)
            elapsed = time.monotonic() - flush.started_wall
        if elapsed < self.unready_after:
            return None
        if flush.last_error is None:
            state = "in progress"
        else:
            state = f"failing ({flush.failures} failed attempts; last error: {flush.last_error})"
        return f"sink {self.name}: a write of {flush.records} records has been {state} for {elapsed:.0f}s"

    # -- the actor -----------------------------------------------------------

    async def run(self, inbox: Inbox) -> None:
        log = logging.getLogger(f"flows.sink.{self.name}")
        m = inbox.metrics
        pending: list[Batch] = []  # received, not yet handed to a write
        cancelled = False
        try:
            await self.open()
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
                batches, pending, count, deadline = pending, [], 0, math.inf
                await self._flush(batches, m, log)
            batches, pending = pending, []
            await self._flush(batches, m, log)
            failed = self.__dict__.get("_fatal_error")
            if failed is not None:
                # Not written since a configuration error: ending cleanly
                # would hide it (a finite flow whose records were dropped).
                raise failed.with_traceback(None)
        except trio.Cancelled:
            cancelled = True
            _lose(pending, 0, "forced_stop", m, log)
            raise
        except BaseException:
            _lose(pending, 0, "write_failed", m, log)
            raise
        finally:
            # Bounded: after a forced stop the process must end whatever the
            # database does; a clean close gets write_timeout.
            limit = _CLOSE_AFTER_FORCE if cancelled else self.write_timeout
            with trio.CancelScope(shield=True):
                try:
                    await self._bounded(self.close, limit)
                except TimeoutError:
                    log.warning("closing did not finish within %gs; left to the OS", limit)
                except Exception as exc:
                    log.warning("closing failed: %r", exc)

    async def _flush(self, batches: list[Batch], m: ComponentMetrics, log: logging.Logger) -> None:
        """Write the records of ``batches`` and settle every batch: acked
        ``written``, or (records counted as discarded) ``failed``."""
        if not batches:
            return
        records = [r for b in batches for r in b.records]
        flush = self.__dict__["_flush_state"] = _FlushState(
            trio.current_time(), time.monotonic(), len(records)
        )
        try:
            await self._write_isolating(records, flush, m, log)
        except _GaveUp as exc:
            log.error("write of %d records failed, dropping them: %r", len(records), exc.__cause__)
            _lose(batches, flush.settled, "write_failed", m, log, quiet=True)
            return
        except _Fatal as exc:
            cause = exc.__cause__
            assert isinstance(cause, Exception)
            log.error(
                "cannot write (%s: %s): a configuration error, not retried; "
                "%d records dropped", type(cause).__name__, _short(str(cause), 500),
                len(records) - flush.settled,
            )
            _lose(batches, flush.settled, "write_failed", m, log, quiet=True)
            self.__dict__["_fatal_error"] = cause
            raise cause from None
        except trio.Cancelled:
            _lose(batches, flush.settled, "forced_stop", m, log)
            raise
        except BaseException:
            _lose(batches, flush.settled, "write_failed", m, log)
            raise
        finally:
            self.__dict__["_flush_state"] = None
        self.__dict__["_fatal_error"] = None
        now = time.monotonic()
        for b in batches:
            m.end_to_end.observe(max(now - b.created, 0.0))
        _ack(batches, "written")

    async def _write_isolating(
        self, records: list[Any], flush: _FlushState, m: ComponentMetrics, log: logging.Logger
    ) -> None:
        """Write ``records``; when the database rejects them for good, split
        the write in halves until the bad records are found, and drop only
        those (counted as ``rejected``)."""
        try:
            await self._write_retrying(records, flush, m, log)
        except _Rejected as exc:
            if len(records) == 1:
                m.discarded("rejected", 1)
                flush.settled += 1
                self._drops.drop("rejected", f"{_short(records[0])}: {_short(exc.__cause__)}")
                return
            mid = len(records) // 2
            await self._write_isolating(records[:mid], flush, m, log)
            await self._write_isolating(records[mid:], flush, m, log)
        else:
            flush.settled += len(records)

    async def _write_retrying(
        self, records: list[Any], flush: _FlushState, m: ComponentMetrics, log: logging.Logger
    ) -> None:
        delays = self.retry.delays()
        while True:
            t0 = time.perf_counter()
            try:
                await self._bounded(lambda: self.write(records), self.write_timeout)
            except Exception as exc:
                m.write_errors.inc()
                m.error(type(exc).__name__)
                flush.failures += 1
                flush.last_error = _short(f"{type(exc).__name__}: {exc}")
                if self.is_fatal(exc):
                    raise _Fatal from exc
                if not self.is_transient(exc):
                    raise _Rejected from exc
                delay = next(delays, None)
                if delay is None:
                    raise _GaveUp from exc
                log.warning(
                    "write of %d records failed (%s); retrying in %.2fs",
                    len(records), _short(exc, 500), delay
                )
                m.write_retries.inc()
                await trio.sleep(delay)
                continue
            m.write_seconds.observe(time.perf_counter() - t0)
            m.write_records.observe(len(records))
            return

    async def _bounded(self, call: Callable[[], Any], timeout: float | None) -> Any:
        """``await call()``, cancelled after ``timeout`` seconds of wall-clock
        time (not trio's clock: a test's MockClock must not expire a write
        that runs in a thread) with ``abort()`` called; then TimeoutError."""
        if timeout is None:
            return await call()
        expired = threading.Event()
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:

            def expire() -> None:
                expired.set()
                self._abort_quietly()
                try:
                    token.run_sync_soon(scope.cancel)
                except trio.RunFinishedError:
                    pass

            timer = _WATCHDOG.call_later(timeout, expire)
            try:
                return await call()
            except Exception as exc:
                if expired.is_set():
                    raise TimeoutError(f"did not finish within {timeout:g}s") from exc
                raise
            finally:
                _WATCHDOG.cancel(timer)
        raise TimeoutError(f"did not finish within {timeout:g}s")

    def _abort_quietly(self) -> None:
        try:
            self.abort()
        except Exception:
            logging.getLogger(f"flows.sink.{self.name}").debug("abort() failed", exc_info=True)

    @property
    def _drops(self) -> DropLog:
        drops = self.__dict__.get("_drop_log")
        if drops is None:
            drops = self.__dict__["_drop_log"] = DropLog(f"flows.sink.{self.name}")
        return drops


class _Watchdog:
    """One daemon thread that calls functions after wall-clock delays: what
    ``threading.Timer`` does, without a thread per write (~3 us, not ~170)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._seq = 0
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> int:
        with self._cond:
            self._seq += 1
            heapq.heappush(self._heap, (time.monotonic() + delay, self._seq, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flows-sink-watchdog",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][1] == self._seq:
                self._cond.notify()  # the new one is the earliest
            return self._seq

    def cancel(self, handle: int) -> None:
        with self._cond:
            if any(seq == handle for _, seq, _ in self._heap[:1]):
                heapq.heappop(self._heap)  # the common case: the earliest, just done
            else:
                self._cancelled.add(handle)
                if len(self._cancelled) > 1024:  # many sinks at once: do not pile up
                    self._heap = [e for e in self._heap if e[1] not in self._cancelled]
                    heapq.heapify(self._heap)
                    self._cancelled.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][1] in self._cancelled:
                        self._cancelled.discard(heapq.heappop(self._heap)[1])
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        fn = heapq.heappop(self._heap)[2]
                        break
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(wait)
            try:
                fn()
            except Exception:
                logging.getLogger("flows.sink").exception("watchdog callback failed")


_WATCHDOG = _Watchdog()


@attrs.define
class _FlushState:
    """The write in progress, for ``health()``."""

    started: float  # trio clock
    started_wall: float  # time.monotonic()
    records: int
    settled: int = 0  # records written or rejected so far
    failures: int = 0
    last_error: str | None = None


class _Rejected(Exception):
    """The database refused the records themselves (not worth retrying)."""


class _GaveUp(Exception):
    """Transient failures outlasted the retry policy."""


class _Fatal(Exception):
    """The sink cannot write at all (its configuration): not retried."""


def _short(value: object, limit: int = 200) -> str:
    """``repr`` (or the text) of ``value``, cut to ``limit`` characters: a
    hostile record must not make a huge log line."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _lose(batches: list[Batch], settled: int, reason: str, m: ComponentMetrics,
          log: logging.Logger, *, quiet: bool = False) -> None:
    """Count the records of ``batches`` past the first ``settled`` (written
    or rejected already) as discarded for ``reason``; ack the batches
    ``failed`` (a source may deliver them again)."""
    lost = sum(len(b.records) for b in batches) - settled
    if lost > 0:
        m.discarded(reason, lost)
        if not quiet:
            log.error("%d records held by the sink are lost (%s)", lost, reason)
    _ack(batches, "failed")


def _ack(batches: list[Batch], outcome: str) -> None:
    for b in batches:
        b.ack(outcome)
