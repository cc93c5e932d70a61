"""The HTTP endpoints of a running flow, served by hypercorn inside its nursery.

- ``/metrics``: Prometheus exposition (text or OpenMetrics, gzip on request)
- ``/healthz``: 200 while the process serves
- ``/readyz``: 200 when every actor runs, else 503 with a JSON reason
- ``/status``: JSON, the flow graph with per-actor figures

hypercorn was chosen because it runs an ASGI app natively on trio (no
thread, no second event loop) and stops with the flow's nursery.

The endpoints share the flow's thread, so a storm of scrapers must not be
able to take it over:

- ``/metrics`` and ``/status`` are computed at most once per ``cache``
  seconds (trio's clock); every request in that interval, concurrent or
  not, is answered with that body (``/metrics``: one body per format,
  compression and ``name[]`` selection, all from one collection of the
  registry). They are computed on the flow's thread, not in a worker
  thread: the live collectors and ``/status`` read objects the flow mutates
  on its thread. Computing is synchronous, so concurrent requests never
  compute twice.
- ``/readyz`` is computed at most once per ``cache`` seconds too, and again
  as soon as the flow's state changes (starting, running, draining, stopped).
- ``/healthz`` is a constant.
- Each endpoint (and, together, every unknown path) answers at most
  ``rate`` requests per second on average, ``burst`` back to back. A
  request over the rate waits its turn (first come, first served): it
  costs nothing while it waits, and a client that waits for its answer
  before asking again is slowed down. So the server's share of the thread
  stays bounded whatever the clients do (each answer costs about half a
  millisecond of hypercorn and trio even when its body is reused), and a
  storm on ``/metrics`` does not delay ``/readyz`` or ``/healthz``. A
  waiter that gives up (its client went away) leaves its slot unused.

Measured by ``bench/scrape.py``: 50 clients scraping as fast as they can
leave an unthrottled flow about 95% of its throughput (about 11% for
``/metrics`` and 22% for ``/status`` when every request was computed).
"""

from __future__ import annotations

import gzip
import ipaddress
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import parse_qs

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from ._runtime import Runtime

__all__ = [
    "BURST", "CACHE_SECONDS", "RATE", "answer_lifespan", "check_addr", "check_limits",
    "is_loopback", "make_app",
    "parse_addr", "serve_endpoints",
]  # fmt: skip

log = logging.getLogger("flows.server")

CACHE_SECONDS = 0.5  # the longest an answer of /metrics, /status or /readyz is reused
RATE = 20.0  # requests per second per endpoint, on average
BURST = 20  # requests per endpoint answered back to back before the rate applies
_PATHS = ("/metrics", "/healthz", "/readyz", "/status")

_json = msgspec.json.Encoder()
T = TypeVar("T")


def parse_addr(addr: str) -> tuple[str, int]:
    """``"host:port"``, ``"[ipv6]:port"``, ``":port"`` or ``"port"`` -> (host, port).

    An IPv6 address takes brackets (``[::1]:9099``); the host defaults to
    127.0.0.1.
    """
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"metrics address {addr!r}: empty brackets")
    elif "[" in host or "]" in host:
        raise ValueError(f"metrics address {addr!r}: unbalanced brackets")
    elif ":" in host:
        raise ValueError(f"metrics address {addr!r}: an IPv6 address takes brackets, "
                         f"as in [::1]:9099")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"metrics address {addr!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"metrics address {addr!r}: port out of range")
    return host or "127.0.0.1", number


def check_limits(cache: float, rate: float | None) -> None:
    """Raise ValueError unless ``cache`` (seconds) and ``rate`` (per second,
    or ``None``) are usable ``make_app`` settings."""
    if not (isinstance(cache, (int, float)) and math.isfinite(cache) and cache >= 0):
        raise ValueError(f"endpoint cache must be a number of seconds >= 0, got {cache!r}")
    if rate is not None and not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"endpoint rate must be a positive number or None, got {rate!r}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is reachable only
    from this machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def answer_lifespan(receive: Any, send: Any) -> None:
    """Answer an ASGI server's lifespan messages (startup, shutdown)."""
    while True:
        message = await receive()
        kind = message["type"].rsplit(".", 1)[-1]
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def _send(send: Any, status: int, body: bytes, content_type: bytes,
                extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Cached(Generic[T]):
    """``make()``'s value, made again only once ``ttl`` seconds of trio's
    clock have passed since it was last made, or when ``key`` changes.

    ``make`` is synchronous, so tasks asking at the same time never make it
    twice. ``made`` counts how often it was made.
    """

    def __init__(self, make: Callable[[], T], ttl: float) -> None:
        self._make = make
        self._ttl = ttl
        self._value: T | None = None
        self._key: Any = None
        self._expires = -math.inf
        self.made = 0

    def get(self, key: Any = None) -> T:
        now = trio.current_time()
        if self._value is None or now >= self._expires or key != self._key:
            self._value = self._make()
            self._key = key
            self._expires = now + self._ttl
            self.made += 1
        return self._value


class _Pace:
    """At most ``rate`` callers per second on average, ``burst`` back to
    back; the others wait their turn, first come first served (the generic
    cell rate algorithm: each caller books the next slot when it arrives)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._spacing = 1.0 / rate
        self._allowance = burst * self._spacing
        self._booked = -math.inf  # the end of the last slot booked

    async def wait(self) -> None:
        now = trio.current_time()
        self._booked = max(self._booked, now) + self._spacing
        await trio.sleep_until(self._booked - self._allowance)


class _Families:
    """A registry stand-in whose ``collect()`` replays collected families."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _select(families: list[Metric], names: frozenset[str]) -> list[Metric]:
    """The samples named in ``names`` (the ``name[]`` query), by family."""
    out = []
    for family in families:
        samples = [s for s in family.samples if s.name in names]
        if samples:
            m = Metric(family.name, family.documentation, family.type, family.unit)
            m.samples = samples
            out.append(m)
    return out


_BodyKey = tuple[str, bool, "frozenset[str] | None"]  # (content type, gzipped, name[] selection)


class _Exposition:
    """/metrics bodies: one collection of the registry per ``ttl`` seconds,
    each format (text, OpenMetrics), compression and ``name[]`` selection
    encoded from it once."""

    def __init__(self, registry: CollectorRegistry, ttl: float) -> None:
        self._collected: _Cached[tuple[list[Metric], dict[_BodyKey, bytes]]] = _Cached(
            lambda: (list(registry.collect()), {}), ttl)

    @property
    def collections(self) -> int:
        """How many times the registry was collected."""
        return self._collected.made

    def body(self, accept: str, accept_encoding: str,
             names: frozenset[str] | None) -> tuple[bytes, str, bool]:
        """(body, content type, gzipped) for a request's headers and ``name[]``."""
        families, bodies = self._collected.get()
        encoder, content_type = choose_encoder(accept)
        gzipped = gzip_accepted(accept_encoding)
        key = (content_type, gzipped, names)
        body = bodies.get(key)
        if body is None:
            body = encoder(_Families(families if names is None else _select(families, names)))
            if gzipped:
                body = gzip.compress(body)
            bodies[key] = body
        return body, content_type, gzipped


def _header(scope: dict[str, Any], name: bytes) -> str:
    return ",".join(v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == name)


def make_app(rt: Runtime, *, cache: float = CACHE_SECONDS, rate: float | None = RATE,
             burst: int = BURST) -> Any:
    """The ASGI app serving ``rt``'s endpoints.

    Parameters:
        rt: the runtime whose ``registry``, ``status()``, ``ready()`` and
            ``state`` are served.
        cache: the longest an answer of /metrics, /status or /readyz is
            reused, in seconds (0: computed for every request).
        rate: requests answered per second on average, per endpoint (unknown
            paths share one allowance); ``None``: no limit.
        burst: requests per endpoint answered back to back before ``rate``
            applies.

    The app's ``caches`` attribute holds its caches (for tests).
    """
    check_limits(cache, rate)
    if burst < 1:
        raise ValueError(f"endpoint burst must be >= 1, got {burst!r}")
    exposition = _Exposition(rt.registry, cache)
    status = _Cached(lambda: _json.encode(rt.status()), cache)

    def readiness() -> tuple[int, bytes]:
        ready, reasons = rt.ready()
        return 200 if ready else 503, _json.encode({"ready": ready, "reasons": reasons})

    readyz = _Cached(readiness, cache)
    lanes = {path: _Pace(rate, burst) for path in (*_PATHS, "")} if rate is not None else {}
    json_type = b"application/json"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        lane = lanes.get(path if path in _PATHS else "")
        if lane is not None:
            await lane.wait()
        if path == "/metrics":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            names = frozenset(query["name[]"]) if "name[]" in query else None
            body, content_type, gzipped = exposition.body(
                _header(scope, b"accept"), _header(scope, b"accept-encoding"), names
            )
            extra = [(b"content-encoding", b"gzip")] if gzipped else []
            await _send(send, 200, body, content_type.encode(), extra)
        elif path == "/healthz":
            await _send(send, 200, b"ok\n", b"text/plain")
        elif path == "/readyz":
            code, body = readyz.get(getattr(rt, "state", None))
            await _send(send, code, body, json_type)
        elif path == "/status":
            await _send(send, 200, status.get(), json_type)
        else:
            body = b"not found; try /metrics, /healthz, /readyz or /status\n"
            await _send(send, 404, body, b"text/plain")

    app.caches = {"metrics": exposition, "status": status, "readyz": readyz}  # type: ignore[attr-defined]
    return app


async def check_addr(addr: str) -> None:
    """Raise OSError with a clear message if ``addr`` cannot be bound."""
    host, port = parse_addr(addr)
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    try:
        with trio.socket.socket(family) as probe:
            probe.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await probe.bind((host, port))
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {_hostport(host, port)}: "
                      f"{exc.strerror or exc}") from None


async def serve_endpoints(
    rt: Runtime, addr: str, *, cache: float = CACHE_SECONDS, rate: float | None = RATE,
    burst: int = BURST, task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``rt``'s endpoints on ``addr``; reports the bound URL when listening.

    ``cache``, ``rate`` and ``burst`` are ``make_app``'s. Binding to an
    address other than a loopback one logs a warning: the endpoints have no
    authentication.
    """
    host, port = parse_addr(addr)
    config = Config()
    config.bind = [_hostport(host, port)]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 0.5
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, make_app(rt, cache=cache, rate=rate, burst=burst), config)
        if not is_loopback(host):  # before started(): the warning precedes the flow's first line
            log.warning(
                "endpoints on %s have no authentication: anyone who can reach this address "
                "can read /metrics and /status (bind to 127.0.0.1 or put a proxy with "
                "authentication in front)", urls[0],
            )
        task_status.started(urls[0])
