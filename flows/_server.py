"""The HTTP endpoints of a running flow, served by hypercorn inside its nursery.

- ``/metrics``: Prometheus exposition (text or OpenMetrics, gzip on request)
- ``/healthz``: 200 while the process serves
- ``/readyz``: 200 when every actor runs, else 503 with a JSON reason
- ``/status``: JSON, the flow graph with per-actor figures

hypercorn was chosen because it runs an ASGI app natively on trio (no
thread, no second event loop) and stops with the flow's nursery.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from prometheus_client import make_asgi_app

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["answer_lifespan", "check_addr", "make_app", "parse_addr", "serve_endpoints"]

_json = msgspec.json.Encoder()


def parse_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` (or ``":port"``, or ``"port"``) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "", addr
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"metrics address {addr!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"metrics address {addr!r}: port out of range")
    return host.strip("[]") or "127.0.0.1", number


async def answer_lifespan(receive: Any, send: Any) -> None:
    """Answer an ASGI server's lifespan messages (startup, shutdown)."""
    while True:
        message = await receive()
        kind = message["type"].rsplit(".", 1)[-1]
        await send({"type": f"lifespan.{kind}.complete"})
        if kind == "shutdown":
            return


async def _send(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def make_app(rt: Runtime) -> Any:
    """The ASGI app serving ``rt``'s endpoints."""
    metrics_app = make_asgi_app(rt.registry)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"].rstrip("/") or "/"
        json_type = b"application/json"
        if path == "/metrics":
            await metrics_app(scope, receive, send)
        elif path == "/healthz":
            await _send(send, 200, b"ok\n", b"text/plain")
        elif path == "/readyz":
            ready, reasons = rt.ready()
            body = _json.encode({"ready": ready, "reasons": reasons})
            await _send(send, 200 if ready else 503, body, json_type)
        elif path == "/status":
            await _send(send, 200, _json.encode(rt.status()), json_type)
        else:
            body = b"not found; try /metrics, /healthz, /readyz or /status\n"
            await _send(send, 404, body, b"text/plain")

    return app


async def check_addr(addr: str) -> None:
    """Raise OSError with a clear message if ``addr`` cannot be bound."""
    host, port = parse_addr(addr)
    try:
        with trio.socket.socket() as probe:
            probe.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await probe.bind((host, port))
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None


async def serve_endpoints(
    rt: Runtime, addr: str, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``rt``'s endpoints on ``addr``; reports the bound URL when listening."""
    host, port = parse_addr(addr)
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("flows.server")
    config.graceful_timeout = 0.5
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, make_app(rt), config)
        task_status.started(urls[0])
