"""Fault knobs (msgspec Structs, decodable from the control endpoint's JSON)
and the body corruptions they drive.

Every share is a probability per request (``bad_value_rate``: per record),
drawn from the emulator's seeded ``random.Random``; a share of 0 draws
nothing, so turning one knob does not shift the others' sequence.
"""

from __future__ import annotations

import math
import random
from typing import Annotated, Any, Literal

import attrs
import msgspec

__all__ = [
    "BAD_VALUE_KINDS",
    "KRAKEN_THROTTLE_ERRORS",
    "Faults",
    "Field",
    "Latency",
    "WsFaults",
    "corrupt_field",
    "malform",
    "truncate",
]

_Share = Annotated[float, msgspec.Meta(ge=0, le=1)]
_NonNeg = Annotated[float, msgspec.Meta(ge=0)]

_BadKind = Literal["missing", "abc", "negative", "nan"]
BAD_VALUE_KINDS: tuple[_BadKind, ...] = ("missing", "abc", "negative", "nan")
_Status = Annotated[int, msgspec.Meta(ge=500, le=599)]
_KrakenThrottle = Literal[
    "EGeneral:Too many requests", "EService:Throttled", "EAPI:Rate limit exceeded"
]
KRAKEN_THROTTLE_ERRORS: tuple[_KrakenThrottle, ...] = (
    "EGeneral:Too many requests", "EService:Throttled", "EAPI:Rate limit exceeded"
)


class Latency(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Added delay before every answer (refusals and errors included).

    - ``fixed``: ``ms``
    - ``uniform``: between ``ms`` and ``max_ms``
    - ``lognormal``: median ``ms``, log-space standard deviation ``sigma``
    """

    dist: Literal["fixed", "uniform", "lognormal"] = "fixed"
    ms: _NonNeg = 0.0
    max_ms: _NonNeg = 0.0
    sigma: _NonNeg = 0.5

    def sample(self, rng: random.Random) -> float:
        """A delay in seconds (0.0 draws nothing)."""
        if self.ms <= 0 and (self.dist != "uniform" or self.max_ms <= 0):
            return 0.0
        if self.dist == "fixed":
            ms = self.ms
        elif self.dist == "uniform":
            ms = rng.uniform(self.ms, max(self.ms, self.max_ms))
        else:
            ms = self.ms * math.exp(rng.gauss(0.0, self.sigma))
        return ms / 1000.0


class WsFaults(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What goes wrong on websocket streams (``Faults.ws``). Shares are
    probabilities per message sent (``gap_rate``: per stream event).

    - ``malformed_rate``: a text frame that is not JSON (cut short or
      mangled).
    - ``gap_rate``: the event's update id (Binance bookTicker ``u``, trade
      ``t``; Coinbase ticker ``sequence``) jumps by 2-5 instead of 1, as if
      events were lost (every subscriber of the stream sees the same jump;
      never on a stream's first event). Kraken's v2 ticker has no id: there the event is not sent at all.
    - ``abrupt_close_rate``: the TCP connection is closed with no close
      frame (the client sees 1006, abnormal closure).
    - ``stall_rate``: the connection goes silent: it stays open (protocol
      pings go on) but no more data (events, heartbeats) is sent on it.
    - ``close_rate``: the server closes the connection with a close frame
      (1001, going away), as a server restart does.
    - ``shutdown_rate`` (Binance): a ``{"e":"serverShutdown","E":ms}``
      event announces that the server goes down; the connection carries
      no more events and is closed (1001) ``shutdown_after`` seconds later
      (a feed attribute; Binance: about 10 minutes) unless the client
      leaves first.
    - ``string_numbers_rate``: per event, the values an exchange is known
      to send either as numbers or as strings come the other way: Kraken
      v2 ticker decimals as strings, Coinbase ``sequence``, ``trade_id``
      and ``last_trade_id`` as strings (Binance: no such field).
    """

    malformed_rate: _Share = 0.0
    gap_rate: _Share = 0.0
    abrupt_close_rate: _Share = 0.0
    stall_rate: _Share = 0.0
    close_rate: _Share = 0.0
    shutdown_rate: _Share = 0.0
    string_numbers_rate: _Share = 0.0


class Faults(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What goes wrong, per request, for one exchange (or all of them).

    - ``latency``: a ``Latency`` before every answer.
    - ``error_rate``: answer a 5xx (status drawn from ``error_statuses``):
      an HTML gateway page with probability ``html_error_share``, else the
      exchange's own error body (Kraken's is HTTP 200 with
      ``{"error":["EService:Unavailable"]}``, like the real API).
    - ``throttle_rate``: refuse as over the rate limit (the exchange's 429
      shape; Kraken's ``EGeneral:Too many requests``), limit or not.
    - ``hang_rate``: sleep ``hang_seconds`` before answering (a 504 HTML
      page, if the client is still there); ends early when the client
      disconnects.
    - ``empty_rate``: a 200 with no records (``[]``, ``{}``, ``"result":{}``,
      ``"data":[]``: the exchange's empty shape).
    - ``bad_value_rate``: per record, one price field gets one of
      ``bad_value_kinds``: ``missing`` (field removed), ``abc``,
      ``negative`` (``"-1"``), ``nan`` (``"NaN"``; ``null`` where the
      exchange sends numbers, as JSON has no NaN).
    - ``malformed_rate``: a 200 whose body is not JSON (garbage bytes in
      the body, a mangled quote, or an HTML page).
    - ``truncated_rate``: a 200 whose body is a proper prefix of the real
      one (Content-Length matches the cut body).
    - ``delisted``: symbols the exchange answers as unknown although the
      universe has them (a delisting): in its own naming (``BTCUSDT``,
      ``XBTUSD``, ``bitcoin``) or as a base asset code (``BTC``: every
      exchange); names that match nothing are ignored. Each exchange
      answers the way it does for any unknown symbol: Binance 400 -1121
      for a whole ``symbols=[...]`` request, Kraken ``EQuery:Unknown asset
      pair`` for a whole ``pair=`` list, Coinbase 404, OKX code 51001 (and
      left out of ``market/tickers``), CoinGecko and CoinCap leave it out
      of the answer (CoinCap's ``/v3/assets/{id}``: 404); all-symbol
      listings leave it out.
    - ``throttle_errors`` (Kraken): the error a refused request carries,
      drawn per refusal from these (``EGeneral:Too many requests``,
      ``EService:Throttled``, ``EAPI:Rate limit exceeded``); empty: the
      usual ``EGeneral:Too many requests``.
    - ``string_numbers_rate``: per answer, the values an exchange is known
      to send either way come the other way: Coinbase's ``trade_id`` as a
      string, OKX's and CoinCap's decimal strings as JSON numbers (and
      OKX's ``ts`` as an integer); no effect on Binance, Kraken and
      CoinGecko answers.
    - ``ws``: faults on websocket streams (``WsFaults``).
    """

    latency: Latency = msgspec.field(default_factory=Latency)
    error_rate: _Share = 0.0
    error_statuses: tuple[_Status, ...] = (500, 502, 503)
    html_error_share: _Share = 0.5
    throttle_rate: _Share = 0.0
    hang_rate: _Share = 0.0
    hang_seconds: _NonNeg = 60.0
    empty_rate: _Share = 0.0
    bad_value_rate: _Share = 0.0
    bad_value_kinds: tuple[_BadKind, ...] = BAD_VALUE_KINDS
    malformed_rate: _Share = 0.0
    truncated_rate: _Share = 0.0
    delisted: tuple[str, ...] = ()
    throttle_errors: tuple[_KrakenThrottle, ...] = ()
    string_numbers_rate: _Share = 0.0
    ws: WsFaults = msgspec.field(default_factory=WsFaults)

    def __post_init__(self) -> None:
        if not self.error_statuses:
            raise ValueError("error_statuses must not be empty")
        if not self.bad_value_kinds:
            raise ValueError("bad_value_kinds must not be empty")


@attrs.define
class Field:
    """A price field in a response body that a bad-value fault may spoil.

    ``parent[key]`` holds the value, or ``parent[key][index]`` when
    ``index`` is set (Kraken's ``"c": [price, lot volume]``).
    """

    symbol: str
    parent: dict[str, Any]
    key: str
    index: int | None = None
    numeric: bool = False  # the exchange sends a JSON number here


def corrupt_field(field: Field, kind: str) -> None:
    """Spoil ``field`` in place with ``kind`` (one of BAD_VALUE_KINDS)."""
    if kind == "missing":
        field.parent.pop(field.key, None)
        return
    if field.numeric:
        value: Any = {"abc": "abc", "negative": -1, "nan": None}[kind]
    else:
        value = {"abc": "abc", "negative": "-1", "nan": "NaN"}[kind]
    if field.index is None:
        field.parent[field.key] = value
    else:
        field.parent[field.key][field.index] = value


HTML_PAGE = (
    "<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{status} {reason}</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def malform(body: bytes, rng: random.Random) -> tuple[bytes, str]:
    """A body that is no longer JSON, and the content type to send it with."""
    how = rng.choice(("garbage", "quote", "html"))
    if how == "quote" and b'"' in body:
        spots = [i for i, c in enumerate(body) if c == ord('"')]
        at = rng.choice(spots)
        return body[:at] + b"'" + body[at + 1 :], "application/json"
    if how == "html":
        page = HTML_PAGE.format(status=200, reason="OK").replace(
            "<hr>", "<hr>maintenance"
        )
        return page.encode(), "application/json"
    at = rng.randrange(0, len(body) + 1)
    return body[:at] + b"\x00\xff<!--" + body[at:], "application/json"


def truncate(body: bytes, rng: random.Random) -> bytes:
    """A proper, non-empty prefix of ``body`` (never valid JSON for an
    object or array body)."""
    if len(body) < 2:
        return b""
    return body[: rng.randrange(1, len(body))]
