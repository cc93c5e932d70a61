"""The machinery every websocket stream source shares: ``WebSocketSource``.

A subclass says where to connect (``url``), what to subscribe
(``subscribe_messages``) and how to read a message (``parse`` or
``parse_into``); the base class shards the symbols over connections,
batches what arrives, reconnects, tracks gaps and reports health. How it
behaves, its parameters and metrics are on the docs page
``docs/sources/streams.md``; the hooks' contracts are their docstrings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import attrs
import msgspec
import trio

from ._actors import RunContext
from ._channels import Outbox
from ._gaps import WallClock
from ._http import HttpError, HttpSource, Parsed, screened
from ._limits import RateLimit, RateLimiter
from ._log import DropLog
from ._metrics import ComponentMetrics, MetricFamily
from ._records import Batch, Tick, check_symbols
from ._redact import redact
from ._retry import Retry
from ._wsclient import (
    ConnectionClosed,
    HandshakeError,
    Message,
    WebSocket,
    open_ws,
    split_ws_url,
)

__all__ = ["RECONNECT_REASONS", "StreamParsed", "WebSocketSource"]

log = logging.getLogger("flows.ws")

RECONNECT_REASONS = ("closed", "error", "silent", "timeout", "server", "server_shutdown")
"""Why a connection was replaced (the ``reason`` label of reconnects)."""

MESSAGES = MetricFamily("flows_source_messages_total", "counter",
                        "At a stream (websocket) source: messages received.")
RECONNECTS = MetricFamily(
    "flows_source_reconnects_total", "counter",
    "At a stream source: connections replaced, by reason (closed: dropped with no close frame; "
    "server: closed by the server; server_shutdown: replaced at once after the server "
    "announced a shutdown; silent: no message within silence_timeout; timeout: "
    "connecting took too long; error: refused or failed).",
    labels=("reason",),
)
UPTIME = MetricFamily(
    "flows_source_connection_uptime_seconds", "gauge",
    "At a stream source: seconds since the youngest connection opened, 0 while any "
    "connection is down.",
)
GAPS = MetricFamily("flows_source_gaps_total", "counter",
                    "At a stream source: jumps in a symbol's update ids (lost updates).")


_PARSE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, ValueError, KeyError, TypeError)


@attrs.define
class StreamParsed(Parsed):
    """``Parsed`` plus what only streams have.

    ``sequences``: ``(key, update id)`` per update, in message order; ids
    must go up by one per key, a larger jump is a gap. ``replies``: messages
    to send back on the same connection (an exchange-level ping's answer).
    ``reconnect``: the server announced it will close this connection
    (Binance's ``serverShutdown``): the source replaces it at once, once
    this batch is sent (reason ``server_shutdown``).
    """

    sequences: list[tuple[str, int]] = attrs.field(factory=list)
    replies: list[Message] = attrs.field(factory=list)
    reconnect: bool = False

    def merge(self, other: Parsed) -> None:
        """Add ``other``'s ticks, counts, details (and ids, replies) to these."""
        self.ticks += other.ticks
        for reason, n in other.invalid.items():
            self.invalid[reason] = self.invalid.get(reason, 0) + n
        self.details += other.details
        if isinstance(other, StreamParsed):
            self.sequences += other.sequences
            self.replies += other.replies
            self.reconnect = self.reconnect or other.reconnect


@attrs.define(eq=False)
class _Shard:
    """One connection's symbols and state."""

    index: int
    symbols: list[str]
    wanted: frozenset[str]
    down_since: float  # trio time the connection went (or started) down
    opened_at: float | None = None  # trio time, while connected
    opened_mono: float | None = None  # time.monotonic(), for the uptime gauge
    connects: int = 0
    messages: int = 0  # data messages on the current connection
    last_ids: dict[str, int] = attrs.field(factory=dict)
    down_wall: float | None = None  # epoch time (WallClock) the last connection ended
    down_reason: str | None = None  # why: a gap to report once it is back
    last_wall: float | None = None  # epoch time (WallClock) of the last batch received
    new_gaps: list[str] = attrs.field(factory=list)  # keys whose update ids jumped


class WebSocketSource:
    """Base class of websocket stream sources. Subclasses set ``DEFAULT_URL``
    (and the exchange's documented limits) and implement ``parse`` plus
    ``url`` and/or ``subscribe_messages``.

    All parameters are keyword-only.

    Parameters:
        symbols: the symbols to stream, in the exchange's naming.
        base_url: the stream endpoint's root (default: the real one); point
            it at a testnet or the emulator (``ws://127.0.0.1:PORT``).
        max_streams_per_connection: symbols per connection (default: the
            exchange's limit, ``MAX_STREAMS_PER_CONNECTION``); larger sets
            are sharded over several connections.
        connect_timeout: seconds to open a connection (TCP, TLS, handshake).
        close_timeout: seconds to wait for the close handshake.
        silence_timeout: seconds without any message after which the
            connection counts as dead and is replaced.
        retry: the reconnect policy (``flows.Retry``; default
            ``DEFAULT_RETRY``: forever, 0.5 s doubling up to 30 s).
        batch_size: most records per Batch.
        batch_window: seconds a Batch stays open for more messages after its
            first one (0: one socket read per Batch).
        subscribe_limits: pace of messages the source sends per connection
            (default ``SUBSCRIBE_LIMITS``).
        connect_limits: pace of new connections (default ``CONNECT_LIMITS``).
        heartbeat_interval: seconds between ``heartbeat()`` messages
            (default ``HEARTBEAT_INTERVAL``; None: none).
        snapshot: an HTTP source for the same symbols: on a gap, one REST
            snapshot of the symbol is fetched through it (its ``plan``,
            limiter and ``parse``) and sent as this source's Ticks.
        down_after: seconds a connection may be down before ``health()``
            reports the source disconnected.
        max_message_size: larger messages close the connection (1009).
        name: the actor's name and the ``source`` field of its Ticks.
    """

    DEFAULT_URL = ""
    MAX_STREAMS_PER_CONNECTION = 1024
    SUBSCRIBE_LIMITS: tuple[RateLimit, ...] = ()
    CONNECT_LIMITS: tuple[RateLimit, ...] = ()
    HEARTBEAT_INTERVAL: float | None = None
    DEFAULT_RETRY = Retry(backoff=0.5, max_backoff=30.0)
    METRICS: tuple[MetricFamily, ...] = (MESSAGES, RECONNECTS, UPTIME, GAPS)

    def __init__(
        self,
        *,
        symbols: Sequence[str],
        base_url: str | None = None,
        max_streams_per_connection: int | None = None,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        silence_timeout: float = 30.0,
        retry: Retry | None = None,
        batch_size: int = 1000,
        batch_window: float = 0.005,
        subscribe_limits: Sequence[RateLimit] | None = None,
        connect_limits: Sequence[RateLimit] | None = None,
        heartbeat_interval: float | None = None,
        snapshot: HttpSource | None = None,
        down_after: float = 5.0,
        max_message_size: int = 1 << 20,
        name: str,
    ) -> None:
        symbols = check_symbols(symbols, name)
        per = self.MAX_STREAMS_PER_CONNECTION if max_streams_per_connection is None \
            else max_streams_per_connection
        if per < 1 or batch_size < 1 or max_message_size < 1:
            raise ValueError(f"{name}: max_streams_per_connection, batch_size and "
                             "max_message_size must be >= 1")
        if not (connect_timeout > 0 and silence_timeout > 0 and close_timeout > 0):
            raise ValueError(f"{name}: timeouts must be > 0")
        if batch_window < 0:
            raise ValueError(f"{name}: batch_window must be >= 0")
        self.symbols = list(dict.fromkeys(symbols))
        self.base_url = (base_url or self.DEFAULT_URL).rstrip("/")
        redact(self.base_url, learn=True)  # a key in the URL never shows
        self.max_streams_per_connection = per
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.silence_timeout = silence_timeout
        self.retry = self.DEFAULT_RETRY if retry is None else retry
        self.batch_size, self.batch_window = batch_size, batch_window
        self.subscribe_limits = tuple(
            self.SUBSCRIBE_LIMITS if subscribe_limits is None else subscribe_limits
        )
        self.connect_limiter = RateLimiter(
            list(self.CONNECT_LIMITS if connect_limits is None else connect_limits)
        )
        self.heartbeat_interval = (
            self.HEARTBEAT_INTERVAL if heartbeat_interval is None else heartbeat_interval
        )
        self.snapshot = snapshot
        self.down_after = down_after
        self.max_message_size = max_message_size
        self.name = name
        self.shards: list[_Shard] = []
        self._drops = DropLog(f"flows.source.{name}")
        self._gap_keys: set[str] = set()
        self._gap_wake = trio.Event()
        self._running = False
        self._wall: Any = None  # a WallClock, set per run
        self.metrics: ComponentMetrics | None = None
        """The component's metrics once running (for hooks that count their own families)."""

    # -- subclass hooks ----------------------------------------------------

    def url(self, symbols: list[str]) -> str:
        """The URL of a connection carrying ``symbols`` (default: ``base_url``)."""
        return self.base_url

    def subscribe_messages(self, symbols: list[str]) -> list[Message]:
        """Messages to send after connecting (default: none)."""
        return []

    def parse(self, message: Message) -> Parsed:
        """Ticks (and bad records counted by reason) from one message; raise
        on a message that cannot be read."""
        raise NotImplementedError

    def parse_into(self, message: Message, out: StreamParsed) -> None:
        """Add what ``message`` holds to ``out`` (shared by a batch); raise,
        before adding anything, on a message that cannot be read. Default:
        ``parse`` merged into ``out``."""
        out.merge(self.parse(message))

    def heartbeat(self) -> Message | None:
        """The exchange-level heartbeat sent every ``heartbeat_interval`` s."""
        return None

    def on_gap(self, key: str) -> None:
        """A gap in ``key``'s update ids (already counted). Default: with a
        ``snapshot`` source, fetch one REST snapshot of ``key``."""
        if self.snapshot is not None and self._running:
            self._gap_keys.add(key)
            self._gap_wake.set()

    def shard(self, symbols: list[str]) -> list[list[str]]:
        """Split ``symbols`` over connections (default: chunks of
        ``max_streams_per_connection``)."""
        per = self.max_streams_per_connection
        return [symbols[i : i + per] for i in range(0, len(symbols), per)]

    # -- life cycle ----------------------------------------------------------

    def setup(self, context: RunContext) -> None:
        if context.shard is not None:
            self.symbols = context.shard.select(self.symbols)

    def health(self) -> str | None:
        """None when healthy, else why not (shown on /readyz)."""
        if not self._running or not self.shards:
            return None
        try:
            now = trio.current_time()
        except RuntimeError:
            return None
        down = [s for s in self.shards if s.opened_at is None]
        if not down:
            return None
        longest = now - min(s.down_since for s in down)
        if longest < self.down_after:
            return None
        return (f"source {self.name}: disconnected ({len(down)} of {len(self.shards)} "
                f"connections down, for {longest:.0f}s)")

    def uptime(self) -> float:
        """Seconds since the youngest connection opened; 0 while any is down."""
        shards = self.shards
        if not self._running or not shards or any(s.opened_mono is None for s in shards):
            return 0.0
        opened = [s.opened_mono for s in shards if s.opened_mono is not None]
        return max(time.monotonic() - max(opened), 0.0)

    async def run(self, outbox: Outbox) -> None:
        m = outbox.metrics
        self.metrics = m  # for subclasses' hooks: their own declared families
        m.register(*self.METRICS)
        m.labeled(MESSAGES)  # export the series from the start
        m.labeled(GAPS)
        for reason in RECONNECT_REASONS:
            m.labeled(RECONNECTS, reason)
        m.labeled(UPTIME).set_function(self.uptime)
        self._wall = WallClock()
        if not self.symbols:  # this process's shard owns none of them: stand by
            log.info("source %s: no symbols in this shard; idle", self.name)
            await trio.sleep_forever()
        now = trio.current_time()
        split_ws_url(self.url(self.symbols[:1]))  # a bad URL fails here, clearly
        self.shards = [
            _Shard(i, chunk, frozenset(chunk), down_since=now)
            for i, chunk in enumerate(self.shard(self.symbols))
        ]
        self._gap_keys.clear()
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                if self.snapshot is not None:
                    nursery.start_soon(self._snapshots, outbox)
                for shard in self.shards:
                    nursery.start_soon(self._keep_connected, shard, outbox)
        except BaseExceptionGroup as group:
            gave_up, _ = group.split(ReconnectsExhausted)
            if gave_up is None:
                raise
            raise _first(gave_up) from None  # the reason, not "Exceptions from Trio nursery"
        finally:
            self._running = False
            for shard in self.shards:
                shard.opened_at = shard.opened_mono = None

    # -- connections -----------------------------------------------------------

    async def _keep_connected(self, shard: _Shard, outbox: Outbox) -> None:
        m = outbox.metrics
        delays = self.retry.delays()
        while True:
            await self.connect_limiter.acquire()
            reason, delivered = await self._connect_once(shard, outbox)
            m.labeled(RECONNECTS, reason).inc()
            if shard.down_reason is None:  # it was up: the gap starts now
                shard.down_wall, shard.down_reason = self._wall.now(), reason
            if delivered:
                delays = self.retry.delays()  # it worked: a new run of tries
            delay = next(delays, None)
            if delay is None:
                raise ReconnectsExhausted(
                    f"source {self.name}: connection {shard.index} {_REASON_TEXT[reason]}; "
                    f"giving up after {self.retry.attempts} connections without data ({self.retry!r})"
                )
            log.info("source %s: connection %d %s; reconnecting in %.2fs",
                     self.name, shard.index, _REASON_TEXT[reason], _wait(reason, delay),
                     extra={"stage": self.name, "reason": reason})
            await trio.sleep(_wait(reason, delay))

    async def _connect_once(self, shard: _Shard, outbox: Outbox) -> tuple[str, bool]:
        """One connection, from connecting to its end: (reason it ended,
        whether it delivered data)."""
        m = outbox.metrics
        url = self.url(shard.symbols)
        reason: str | None = None
        shard.messages = 0
        shard.last_ids.clear()
        try:
            async with self._open(url) as ws:
                shard.opened_at, shard.opened_mono = trio.current_time(), time.monotonic()
                shard.connects += 1
                if shard.down_reason is not None and shard.down_wall is not None:
                    outbox.gap(shard.symbols, shard.down_wall, self._wall.now(), shard.down_reason)
                shard.down_reason = None
                log.debug("source %s: connection %d open (%d symbols)",
                          self.name, shard.index, len(shard.symbols))
                try:
                    reason = await self._serve(ws, shard, outbox)
                finally:
                    shard.opened_at = shard.opened_mono = None
                    shard.down_since = trio.current_time()
        except TimeoutError:  # (an OSError: caught first)
            reason = reason or "timeout"
        except ConnectionClosed as exc:
            reason = reason or _close_reason(exc)
        except (HandshakeError, OSError, trio.BrokenResourceError) as exc:
            if reason is None:
                reason = "error"
                m.error(type(exc).__name__)
                log.warning("source %s: connection %d to %s failed: %s",
                            self.name, shard.index, redact(url), redact(repr(exc)))
        return reason or "closed", shard.messages > 0

    def _open(self, url: str) -> Any:
        return open_ws(url, connect_timeout=self.connect_timeout,
                       close_timeout=self.close_timeout,
                       max_message_size=self.max_message_size)

    async def _serve(self, ws: Any, shard: _Shard, outbox: Outbox) -> str:
        """Subscribe, keep the heartbeat, read until the connection ends;
        the reconnect reason."""
        limiter = RateLimiter(list(self.subscribe_limits))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._subscribe, ws, shard, limiter)
            if self.heartbeat_interval:
                nursery.start_soon(self._heartbeat, ws, limiter)
            try:
                reason = await self._receive(ws, shard, outbox, limiter)
            except ConnectionClosed as exc:
                reason = _close_reason(exc)
            nursery.cancel_scope.cancel()
        return reason

    async def _send(self, ws: Any, limiter: RateLimiter, message: Message) -> bool:
        await limiter.acquire()
        try:
            await ws.send_message(message)
        except ConnectionClosed:
            return False
        return True

    async def _subscribe(self, ws: Any, shard: _Shard, limiter: RateLimiter) -> None:
        for message in self.subscribe_messages(shard.symbols):
            if not await self._send(ws, limiter, message):
                return

    async def _heartbeat(self, ws: Any, limiter: RateLimiter) -> None:
        assert self.heartbeat_interval
        while True:
            await trio.sleep(self.heartbeat_interval)
            message = self.heartbeat()
            if message is not None and not await self._send(ws, limiter, message):
                return

    async def _receive(
        self, ws: WebSocket, shard: _Shard, outbox: Outbox, limiter: RateLimiter
    ) -> str:
        """Read and send batches until the connection goes silent (returns
        ``"silent"``) or closes (raises ConnectionClosed)."""
        m = outbox.metrics
        counter = m.labeled(MESSAGES)
        gaps = m.labeled(GAPS)
        silence, window, size = self.silence_timeout, self.batch_window, self.batch_size
        while True:
            out = StreamParsed()
            n, busy = 0, 0.0
            closed: ConnectionClosed | None = None
            deadline = trio.current_time() + silence
            while True:  # the first read opens the batch window
                messages: list[bytes] | None = None
                with trio.move_on_at(deadline):
                    try:
                        messages = await ws.receive_messages()
                    except ConnectionClosed as exc:
                        if not n:
                            raise
                        closed = exc
                if messages is None:
                    break
                t0 = time.perf_counter()
                self._parse_all(messages, out, m)
                busy += time.perf_counter() - t0
                if not n:
                    deadline = trio.current_time() + window
                n += len(messages)
                if len(out.ticks) >= size or window <= 0:
                    break
            if not n:
                return "silent"
            t0 = time.perf_counter()
            ticks = self._check(out, shard, m, gaps)
            m.observe_processing(busy + time.perf_counter() - t0)
            now = self._wall.now()
            if shard.new_gaps:
                for key in shard.new_gaps:
                    outbox.gap([key], shard.last_wall or now, now, "sequence")
                shard.new_gaps.clear()
            shard.last_wall = now
            counter.inc(n)
            for reply in out.replies:
                await self._send(ws, limiter, reply)
            if ticks:
                shard.messages += n
                for i in range(0, len(ticks), size):
                    await outbox.send(Batch(ticks[i : i + size], source=self.name))
            if out.reconnect:
                return "server_shutdown"
            if closed is not None:
                raise closed

    def _parse_all(self, messages: list[bytes], out: StreamParsed, m: ComponentMetrics) -> None:
        """Parse ``messages`` into ``out``; count and skip the unreadable."""
        parse_into = self.parse_into
        for message in messages:
            try:
                parse_into(message, out)
            except _PARSE_ERRORS as exc:
                m.discarded("invalid")
                self._drops.drop("invalid", f"unreadable message ({exc}): {message[:100]!r}")

    def _check(
        self, out: StreamParsed, shard: _Shard, m: ComponentMetrics, gaps: Any
    ) -> list[Tick]:
        """The batch's Ticks for subscribed symbols; bad records and unknown
        symbols counted, update ids checked for gaps."""
        screened(out)
        if out.invalid:
            for reason, n in out.invalid.items():
                m.discarded(reason, n)
            for detail in out.details[:1]:
                self._drops.drop("invalid", detail)
        wanted = shard.wanted
        ticks = out.ticks
        unknown = [t for t in ticks if t.symbol not in wanted]
        if unknown:
            m.discarded("unknown_symbol", len(unknown))
            self._drops.drop("unknown_symbol", f"{unknown[0].symbol} was not subscribed")
            ticks = [t for t in ticks if t.symbol in wanted]
        last_ids = shard.last_ids
        for key, seq in out.sequences:
            last = last_ids.get(key)
            if last is None or seq > last:
                if key not in wanted:
                    continue
                last_ids[key] = seq
                if last is not None and seq > last + 1:
                    gaps.inc()
                    shard.new_gaps.append(key)
                    self.on_gap(key)
        return ticks

    # -- gap snapshots -----------------------------------------------------------

    async def _snapshots(self, outbox: Outbox) -> None:
        """Fetch one REST snapshot per symbol that had a gap, through ``snapshot``."""
        import httpx

        snap = self.snapshot
        assert snap is not None
        m = outbox.metrics
        async with httpx.AsyncClient(
            base_url=snap.base_url,
            timeout=snap.timeout,
            headers={"user-agent": "flows/0.1", **snap.headers},
        ) as client:
            while True:
                await self._gap_wake.wait()
                self._gap_wake = trio.Event()
                keys, self._gap_keys = sorted(self._gap_keys), set()
                for request in snap.plan(keys):
                    await snap.limiter.acquire(request.weight)
                    try:
                        parsed = await snap._get(client, request, m)
                    except HttpError as exc:
                        m.error("snapshot")
                        log.warning("source %s: snapshot of %s failed: %s",
                                    self.name, ",".join(request.symbols), exc)
                        continue
                    for reason, n in parsed.invalid.items():
                        m.discarded(reason, n)
                    asked = set(request.symbols)
                    ticks = [
                        msgspec.structs.replace(t, source=self.name)
                        for t in parsed.ticks
                        if not asked or t.symbol in asked
                    ]
                    if ticks:
                        await outbox.send(Batch(ticks, source=self.name))


def _close_reason(closed: ConnectionClosed) -> str:
    """``closed`` for a connection that dropped (1006: no close frame),
    ``error`` for one this side closed (a protocol error, a message too
    large), ``server`` for a close frame from the server."""
    if closed.local:
        return "error"
    return "closed" if closed.code == 1006 else "server"


def _wait(reason: str, backoff: float) -> float:
    """Seconds before the next connection: none when the server asked for a
    new one (a shutdown announced), else the backoff."""
    return 0.0 if reason == "server_shutdown" else backoff


class ReconnectsExhausted(ConnectionError):
    """A finite ``retry`` policy ran out of connection attempts."""


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


_REASON_TEXT = {
    "closed": "dropped (no close frame)",
    "server": "closed by the server",
    "server_shutdown": "replaced: the server announced a shutdown",
    "silent": "went silent",
    "timeout": "timed out connecting",
    "error": "failed",
}
