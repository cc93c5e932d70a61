"""Redis Streams source: one consumer of a consumer group (scale-out).

The reference (what it talks to, parameters, metrics, examples) is
docs/sources/redis.md (which renders the parameters from the class docstring).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import msgspec
import redis
import trio

from flows import (
    Batch,
    ComponentMetrics,
    DropLog,
    Outbox,
    Retry,
    Tick,
    check_tick,
    redact,
)
from sinks.redis import FIELD, no_retry

__all__ = ["RedisStreamSource"]

ACKED_OUTCOMES = frozenset({"written", "skipped", "dropped"})
"""Outcomes that XACK a batch's entries; ``failed`` leaves them pending."""

_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, OSError)
_XACK_CHUNK = 10_000


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


Entries = list[tuple[bytes, dict[bytes, bytes] | None]]


def _stream_entries(response: Any) -> Entries:
    """The entries of an XREADGROUP reply for one stream (RESP2 or RESP3 shape)."""
    if not response:
        return []
    if isinstance(response, dict):  # RESP3: {stream: [entries]}
        (value,) = response.values()
        return value[0] if value and isinstance(value[0], list) else value
    return response[0][1]


class RedisStreamSource:
    """Source: consume a Redis stream as one consumer of a consumer group.

    Parameters:
        url: the server, as redis-py's ``from_url`` takes it (a password
            in it is masked wherever the source is shown).
        stream: the stream's key.
        group: the consumer group (created if missing).
        consumer: this consumer's name in the group; keep it stable across
            restarts of the same worker so it redelivers its own pending
            entries (default: ``hostname-pid``).
        batch_size: entries per read at most (so records per batch).
        block: longest one ``XREADGROUP`` waits for new entries (s).
        claim_idle: reclaim entries pending longer than this (s), checking
            every ``claim_idle / 2``; ``None``: never reclaim.
        start_id: where a newly created group starts: ``"0"`` the whole
            stream, ``"$"`` only entries added from now on.
        record_type: what the ``t`` field decodes into (default ``Tick``).
        ack_linger: how long the ack thread waits, after ``run()`` ended,
            for batches still on their way through the flow (s).
        socket_timeout: seconds a Redis call may take (on top of ``block``
            for reads) before it fails and is retried.
        retry: the policy for connection errors and timeouts, of reads and
            of ``XACK`` (``flows.Retry``; default ``DEFAULT_RETRY``:
            forever, 0.05 s doubling up to 5 s).
        name: the actor's name.

    Attributes: ``emitted`` (records sent), ``redelivered`` (of which read
    from a pending-entries list: own pending at start, or reclaimed).
    """

    DEFAULT_RETRY = Retry(backoff=0.05, max_backoff=5.0)

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        stream: str = "ticks",
        group: str = "flows",
        consumer: str | None = None,
        batch_size: int = 1000,
        block: float = 1.0,
        claim_idle: float | None = 30.0,
        start_id: str = "0",
        record_type: Any = Tick,
        ack_linger: float = 60.0,
        socket_timeout: float = 10.0,
        retry: Retry | None = None,
        name: str = "redis",
    ) -> None:
        if not stream or not group:
            raise ValueError("stream and group must not be empty")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not block > 0:
            raise ValueError("block must be > 0 (seconds)")
        if claim_idle is not None and not claim_idle > 0:
            raise ValueError("claim_idle must be > 0 (seconds) or None")
        if ack_linger < 0 or not socket_timeout > 0:
            raise ValueError("ack_linger must be >= 0 and socket_timeout > 0")
        self.url = url
        self._shown_url = redact(url, learn=True)  # the password never shows
        self.stream = stream
        self.group = group
        self.consumer = consumer or _default_consumer()
        self.batch_size = batch_size
        self.block = block
        self.claim_idle = claim_idle
        self.start_id = start_id
        self.record_type = record_type
        self.ack_linger = ack_linger
        self.socket_timeout = socket_timeout
        self.retry = self.DEFAULT_RETRY if retry is None else retry
        self.name = name
        self.emitted = 0
        self.redelivered = 0
        self._decoder = msgspec.json.Decoder(record_type)
        self._log = logging.getLogger(f"flows.source.{name}")
        self._drops = DropLog(f"flows.source.{name}")
        self._acker = _Acker(self)
        self._reader_name = ""

    def __repr__(self) -> str:
        return (f"RedisStreamSource({self._shown_url!r}, stream={self.stream!r}, "
                f"group={self.group!r}, consumer={self.consumer!r})")

    # -- the consumer loop -------------------------------------------------

    async def run(self, outbox: Outbox) -> None:
        m = outbox.metrics
        self._acker.acquire(m)
        reader: redis.Redis | None = None
        try:
            self._reader_name = f"flows:{self.consumer}:{uuid.uuid4().hex[:8]}"
            reader = await self._call(m, self._connect)
            await self._call(m, self._create_group, reader)
            await self._emit_own_pending(reader, outbox)
            period = None if self.claim_idle is None else self.claim_idle / 2
            next_claim = trio.current_time()
            while True:
                wait = self.block
                if period is not None:
                    if trio.current_time() >= next_claim:
                        await self._claim(reader, outbox)
                        next_claim = trio.current_time() + period
                    wait = min(wait, next_claim - trio.current_time())
                entries = await self._call(m, self._read_new, reader, max(wait, 0.001), wake=True)
                await self._emit(entries, outbox)
        finally:
            if reader is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(reader.close)
            self._acker.release()

    async def wait_acked(self, timeout: float = 10.0) -> bool:
        """Wait until every batch emitted so far was acked and its XACK sent;
        once ``run()`` has ended, also until the ack thread has exited.

        Returns False if that did not happen within ``timeout`` seconds (a
        batch was never acked, or Redis is unreachable).
        """
        return await trio.to_thread.run_sync(self._acker.wait_idle, timeout)

    # -- Redis calls (each runs in a worker thread) --------------------------

    def _connect(self) -> redis.Redis:
        # one dedicated connection, named so that a stop can CLIENT UNBLOCK it
        return redis.Redis.from_url(
            self.url,
            single_connection_client=True,
            client_name=self._reader_name,
            protocol=2,
            retry=no_retry(),
            socket_timeout=self.block + self.socket_timeout,
            socket_connect_timeout=min(self.socket_timeout, 5.0),
        )

    def _create_group(self, reader: redis.Redis) -> None:
        try:
            reader.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read_pending(self, reader: redis.Redis, after: bytes | str) -> Entries:
        return _stream_entries(
            reader.xreadgroup(self.group, self.consumer, {self.stream: after}, count=self.batch_size)
        )

    def _read_new(self, reader: redis.Redis, block: float) -> Entries:
        return _stream_entries(
            reader.xreadgroup(
                self.group, self.consumer, {self.stream: ">"},
                count=self.batch_size, block=max(1, round(block * 1000)),
            )
        )

    def _autoclaim(self, reader: redis.Redis, cursor: bytes | str) -> tuple[Any, Entries, list]:
        assert self.claim_idle is not None
        reply = reader.xautoclaim(
            self.stream, self.group, self.consumer, round(self.claim_idle * 1000),
            start_id=cursor, count=self.batch_size,
        )
        deleted = reply[2] if len(reply) > 2 else []  # Redis 7 reports trimmed entries
        return reply[0], reply[1], deleted

    def _unblock(self, finished: threading.Event) -> None:
        """Wake the reader's blocked XREADGROUP (CLIENT UNBLOCK by name)."""
        if finished.wait(0.002):
            return
        deadline = time.monotonic() + self.block + 1.0
        control = redis.Redis.from_url(
            self.url, protocol=2, retry=no_retry(), socket_timeout=1.0, socket_connect_timeout=1.0
        )
        try:
            while not finished.is_set() and time.monotonic() < deadline:
                try:
                    for client in control.client_list():
                        if client.get("name") == self._reader_name:
                            control.client_unblock(int(client["id"]))
                except redis.RedisError:
                    pass  # the reader ends by itself within `block`
                finished.wait(0.02)
        finally:
            control.close()

    async def _call(
        self, m: ComponentMetrics, fn: Callable[..., Any], *args: Any, wake: bool = False
    ) -> Any:
        """Run ``fn(*args)`` in a thread; retry connection errors by ``retry``
        (the last one raises once a finite policy is used up).

        ``wake``: a blocking call, woken by CLIENT UNBLOCK when cancelled.
        """
        delays = self.retry.delays()
        while True:
            try:
                if wake:
                    return await self._wakeable(fn, *args)
                return await trio.to_thread.run_sync(fn, *args)
            except _TRANSIENT as exc:
                m.error(type(exc).__name__)
                pause = next(delays, None)
                if pause is None:
                    raise
                self._log.warning(
                    "redis call failed (%s: %s); retrying in %.2fs", type(exc).__name__, exc, pause
                )
                await trio.sleep(pause)

    async def _wakeable(self, fn: Callable[..., Any], *args: Any) -> Any:
        finished = threading.Event()

        def work() -> Any:
            try:
                return fn(*args)
            finally:
                finished.set()

        limiter = _Marking()
        try:
            # trio accepts any object with the limiter's two methods (typed as CapacityLimiter)
            return await trio.to_thread.run_sync(
                work, abandon_on_cancel=True, limiter=cast(trio.CapacityLimiter, limiter))
        except trio.Cancelled:
            if limiter.acquired:  # the thread runs: wake the read and wait for it, so
                # the connection is idle when run() closes it. Entries it
                # returned stay pending (redelivered later).
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._unblock, finished)
            raise

    # -- emitting ----------------------------------------------------------

    async def _emit_own_pending(self, reader: redis.Redis, outbox: Outbox) -> None:
        in_flight = self._acker.in_flight_ids()  # from an earlier run() of this object
        after: bytes | str = "0"
        while True:
            entries = await self._call(outbox.metrics, self._read_pending, reader, after)
            if not entries:
                return
            after = entries[-1][0]
            await self._emit(entries, outbox, skip=in_flight, redelivered=True)

    async def _claim(self, reader: redis.Redis, outbox: Outbox) -> None:
        m = outbox.metrics
        in_flight: set[bytes] | None = None
        cursor: bytes | str = "0-0"
        while True:
            cursor, entries, deleted = await self._call(m, self._autoclaim, reader, cursor)
            if deleted:
                m.discarded("trimmed", len(deleted))
                self._drops.drop("trimmed", f"{len(deleted)} pending entries no longer in the stream")
            if entries:
                if in_flight is None:  # ours, still on their way: do not send twice
                    in_flight = self._acker.in_flight_ids()
                await self._emit(entries, outbox, skip=in_flight, redelivered=True)
            if cursor in (b"0-0", "0-0"):
                return

    async def _emit(
        self,
        entries: Entries,
        outbox: Outbox,
        *,
        skip: set[bytes] | frozenset[bytes] = frozenset(),
        redelivered: bool = False,
    ) -> None:
        if not entries:
            return
        m = outbox.metrics
        decode = self._decoder.decode
        records: list[Any] = []
        ids: list[bytes] = []
        with m.timed_batch():
            bad: list[bytes] = []
            now = time.time()
            for entry_id, fields in entries:
                if entry_id in skip:
                    continue
                payload = fields.get(FIELD) if fields else None
                if payload is None:
                    reason = "invalid" if fields else "trimmed"  # no fields: deleted meanwhile
                    m.discarded(reason)
                    self._drops.drop(reason, f"entry {entry_id!r}: no {FIELD!r} field")
                    bad.append(entry_id)
                    continue
                why: str | None
                try:
                    record = decode(payload)
                except msgspec.DecodeError as exc:
                    record, why = None, str(exc)
                else:
                    why = check_tick(record, now)
                if why is not None:
                    m.discarded("invalid")
                    self._drops.drop("invalid", f"entry {entry_id!r}: {why}")
                    bad.append(entry_id)
                    continue
                records.append(record)
                ids.append(entry_id)
            if bad:
                self._acker.ack_now(bad)
        if not records:
            return
        token, hook = self._acker.track(ids)
        try:
            await outbox.send(Batch(records, acks=[hook]))
        except BaseException:
            self._acker.abandon(token)  # not (wholly) delivered: stays pending
            raise
        self.emitted += len(records)
        if redelivered:
            self.redelivered += len(records)


class _Marking:
    """trio's default thread limiter, noting whether ``to_thread.run_sync`` got
    past it: it acquires the limiter right before starting the thread (as
    documented), so a cancel after that means the function runs."""

    def __init__(self) -> None:
        self._inner = trio.to_thread.current_default_thread_limiter()
        self.acquired = False

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self._inner.acquire_on_behalf_of(borrower)
        self.acquired = True

    def release_on_behalf_of(self, borrower: object) -> None:
        self._inner.release_on_behalf_of(borrower)


class _Acker:
    """XACKs entry ids from a thread of its own (see the module docstring).

    ``track`` registers a batch's ids and returns its hook; the hook moves
    them to the queue (or, on ``failed``, forgets them). The thread runs
    while a ``run()`` is active, and afterwards until nothing is in flight
    or ``ack_linger`` has passed; a late hook starts it again.
    """

    def __init__(self, source: RedisStreamSource) -> None:
        self._source = source
        self._log = logging.getLogger(f"flows.source.{source.name}")
        self._cond = threading.Condition()
        self._queue: list[bytes] = []
        self._in_flight: dict[int, list[bytes]] = {}
        self._tokens = itertools.count()
        self._users = 0
        self._deadline = 0.0
        self._busy = False
        self._running = False
        self._thread: threading.Thread | None = None
        self._metrics: ComponentMetrics | None = None
        self.acked = 0  # entries XACKed so far

    # -- called on the trio thread ---------------------------------------

    def acquire(self, metrics: ComponentMetrics) -> None:
        with self._cond:
            self._users += 1
            self._metrics = metrics
            self._ensure_thread()

    def release(self) -> None:
        with self._cond:
            self._users -= 1
            self._deadline = time.monotonic() + self._source.ack_linger
            self._cond.notify_all()

    def track(self, ids: list[bytes]) -> tuple[int, Callable[[str], None]]:
        token = next(self._tokens)
        with self._cond:
            self._in_flight[token] = ids

        def hook(outcome: str) -> None:
            self._settle(token, outcome)

        return token, hook

    def _settle(self, token: int, outcome: str) -> None:
        with self._cond:
            ids = self._in_flight.pop(token, None)
            if ids is not None and outcome in ACKED_OUTCOMES:
                self._queue.extend(ids)
                self._ensure_thread()
            self._cond.notify_all()

    def abandon(self, token: int) -> None:
        with self._cond:
            self._in_flight.pop(token, None)
            self._cond.notify_all()

    def ack_now(self, ids: list[bytes]) -> None:
        with self._cond:
            self._queue.extend(ids)
            self._ensure_thread()
            self._cond.notify_all()

    def in_flight_ids(self) -> set[bytes]:
        with self._cond:
            return {i for ids in self._in_flight.values() for i in ids}

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout

        def idle() -> bool:
            return (
                not self._queue and not self._busy and not self._in_flight
                and (self._users > 0 or not self._running)
            )

        with self._cond:
            ok = self._cond.wait_for(idle, timeout)
            thread = self._thread if self._users == 0 else None
        if ok and thread is not None:
            thread.join(max(deadline - time.monotonic(), 0.0))
            ok = not thread.is_alive()
        return ok

    def _ensure_thread(self) -> None:  # with self._cond held
        if not self._running:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="flows-redis-ack", daemon=True)
            self._thread.start()

    # -- the ack thread ----------------------------------------------------

    def _loop(self) -> None:
        client: redis.Redis | None = None
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        if self._users == 0:
                            left = self._deadline - time.monotonic()
                            if not self._in_flight or left <= 0:
                                if self._in_flight:
                                    n = sum(len(ids) for ids in self._in_flight.values())
                                    self._log.warning(
                                        "%d entries were never acked by the flow within %gs; they stay "
                                        "pending and will be redelivered", n, self._source.ack_linger,
                                    )
                                # decided under the lock: a later hook starts a new thread
                                self._running = False
                                self._cond.notify_all()
                                return
                            self._cond.wait(left)
                        else:
                            self._cond.wait()
                    ids, self._queue = self._queue, []
                    self._busy = True
                try:
                    client = self._xack(client, ids)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        except BaseException:
            with self._cond:
                self._running = False
                self._cond.notify_all()
            raise
        finally:
            if client is not None:
                client.close()

    def _giving_up(self) -> bool:
        return self._linger_left() <= 0

    def _linger_left(self) -> float:
        """Seconds left to retry in (``ack_linger`` after ``run()`` ended)."""
        with self._cond:
            if self._users > 0:
                return float("inf")
            return self._deadline - time.monotonic()

    def _xack(self, client: redis.Redis | None, ids: list[bytes]) -> redis.Redis | None:
        src = self._source
        for start in range(0, len(ids), _XACK_CHUNK):
            chunk = ids[start : start + _XACK_CHUNK]
            delays = src.retry.delays()
            while True:
                try:
                    if client is None:
                        client = redis.Redis.from_url(
                            src.url, protocol=2, retry=no_retry(),
                            socket_timeout=src.socket_timeout,
                            socket_connect_timeout=min(src.socket_timeout, 5.0),
                        )
                    client.xack(src.stream, src.group, *chunk)
                    self.acked += len(chunk)
                    break
                except _TRANSIENT as exc:
                    self._count_error(exc)
                    pause, lingered = next(delays, None), self._giving_up()
                    if pause is None or lingered:
                        self._log.warning(
                            "could not XACK %d entries (%r); they stay pending and will be "
                            "redelivered", len(ids) - start if lingered else len(chunk), exc,
                        )
                        if lingered:
                            return client  # run() ended ack_linger ago
                        break  # the policy is used up for this chunk
                    self._log.warning(
                        "XACK failed (%s: %s); retrying in %.2fs", type(exc).__name__, exc, pause
                    )
                    time.sleep(max(min(pause, self._linger_left()), 0.0))
                except redis.RedisError as exc:  # NOGROUP: nothing left to ack
                    self._count_error(exc)
                    self._log.error("XACK of %d entries failed: %r", len(chunk), exc)
                    break
        return client

    def _count_error(self, exc: Exception) -> None:
        if self._metrics is not None:
            self._metrics.error(type(exc).__name__)
