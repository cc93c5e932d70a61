"""``python -m flows.testing.emulator``: run the exchange emulator until Ctrl-C.

The first line printed is the base URL (handy for a parent process that
started this one with ``--port 0``); example curl lines follow. Faults set
here are global; change them at run time with ``POST /_emulator/faults``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import msgspec
import trio

from ..._server import is_loopback
from ._emulator import Emulator
from ._faults import KRAKEN_THROTTLE_ERRORS, Faults, Latency, WsFaults
from ._market import EXCHANGES
from ._seeds import SEED_ENDPOINTS

_NAMES = (*EXCHANGES, *SEED_ENDPOINTS)  # every API with a rate limit

__all__ = ["main", "parse_rate_limit"]

log = logging.getLogger("flows.testing.emulator")


def parse_rate_limit(text: str) -> tuple[str, dict[str, Any] | None]:
    """``binance=limit=1200,window=60`` -> ("binance", {"limit": 1200.0, ...});
    ``kraken=off`` -> ("kraken", None)."""
    exchange, sep, spec = text.partition("=")
    exchange = exchange.strip().lower()
    if not sep or exchange not in _NAMES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected EXCHANGE=SPEC with EXCHANGE one of {', '.join(_NAMES)}"
        )
    if spec.strip().lower() in ("off", "none", "0"):
        return exchange, None
    fields: dict[str, Any] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise argparse.ArgumentTypeError(
                f"{text!r}: SPEC is 'off' or key=value[,key=value]"
            )
        if key == "type":
            fields[key] = value.strip()
            continue
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {key} must be a number"
            ) from None
        fields[key] = (
            int(number)
            if number.is_integer() and key in ("limit", "ban_after")
            else number
        )
    return exchange, fields


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.testing.emulator",
        description=(
            "Serve Binance, Coinbase, Kraken, CoinGecko, CoinCap and OKX public ticker APIs "
            "locally, with real formats and rate limits, random-walk prices and injected faults."
        ),
        epilog=(
            "Rate-limit SPEC: 'off', or key=value pairs of the exchange's limit: "
            "binance limit,window,ban_after,ban_seconds (weight per window); coinbase and kraken "
            "rate,burst (token bucket); coingecko, coincap and okx limit,window. "
            "Example: --rate-limit binance=limit=1200 --rate-limit okx=limit=40,window=2. "
            "Control at run time: GET /_emulator, GET /_emulator/stats, POST /_emulator/faults."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to bind (default %(default)s; a non-loopback address warns: the control "
             "API has no authentication)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8765,
        help="port; 0 picks a free one (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="prices and fault draws (default %(default)s)",
    )
    parser.add_argument(
        "--assets", type=int, default=50, help="universe size (default %(default)s)"
    )
    parser.add_argument(
        "--symbols",
        help="comma-separated base assets instead of --assets (BTC,ETH,SOL)",
    )
    parser.add_argument(
        "--tick-interval",
        type=float,
        default=1.0,
        help="seconds per price step; 0: a step per request (default %(default)s)",
    )
    parser.add_argument(
        "--unchanged",
        type=float,
        default=0.6,
        help="share of assets unchanged per step (default %(default)s)",
    )
    parser.add_argument(
        "--volatility",
        type=float,
        default=0.001,
        help="log-return standard deviation per step (default %(default)s)",
    )
    parser.add_argument(
        "--rate-limit",
        action="append",
        type=parse_rate_limit,
        default=[],
        metavar="EXCHANGE=SPEC",
        help="override one exchange's limit (repeatable)",
    )
    parser.add_argument(
        "--no-rate-limits", action="store_true", help="disable every rate limit"
    )
    parser.add_argument(
        "--ws-rate",
        type=float,
        default=10.0,
        help="websocket events per second per stream (default %(default)s)",
    )
    parser.add_argument(
        "--ws-ping-interval",
        type=float,
        default=20.0,
        help="seconds between websocket pings; 0: none (default %(default)s)",
    )
    parser.add_argument(
        "--ws-max-connection-seconds",
        type=float,
        default=86400.0,
        help="websocket connection lifetime (default %(default)s)",
    )
    parser.add_argument(
        "--stocks", type=int, default=300,
        help="stocks in FMP's universe (19205: the daily-sync example's) (default %(default)s)",
    )
    parser.add_argument(
        "--prediction-markets", type=int, default=24,
        help="Polymarket markets (default %(default)s)",
    )
    parser.add_argument(
        "--coincap-key",
        action="append",
        metavar="KEY",
        help="API key CoinCap accepts (repeatable; default test-key)",
    )
    faults = parser.add_argument_group(
        "faults (global; shares are probabilities per request)"
    )
    faults.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="fixed delay, uniform low end, or lognormal median (ms)",
    )
    faults.add_argument(
        "--latency-dist", choices=("fixed", "uniform", "lognormal"), default="fixed"
    )
    faults.add_argument(
        "--latency-max-ms", type=float, default=0.0, help="uniform high end (ms)"
    )
    faults.add_argument(
        "--latency-sigma", type=float, default=0.5, help="lognormal sigma"
    )
    faults.add_argument(
        "--error-rate", type=float, default=0.0, help="share of 5xx answers"
    )
    faults.add_argument(
        "--html-error-share",
        type=float,
        default=0.5,
        help="share of 5xx sent as an HTML gateway page",
    )
    faults.add_argument(
        "--throttle-rate", type=float, default=0.0, help="share of forced 429s"
    )
    faults.add_argument(
        "--hang-rate", type=float, default=0.0, help="share of requests that hang"
    )
    faults.add_argument(
        "--hang-seconds", type=float, default=60.0, help="how long a hang lasts"
    )
    faults.add_argument(
        "--empty-rate", type=float, default=0.0, help="share of empty results"
    )
    faults.add_argument(
        "--bad-value-rate", type=float, default=0.0, help="share of spoiled records"
    )
    faults.add_argument(
        "--malformed-rate", type=float, default=0.0, help="share of non-JSON bodies"
    )
    faults.add_argument(
        "--truncated-rate", type=float, default=0.0, help="share of cut bodies"
    )
    faults.add_argument(
        "--delisted",
        action="append",
        default=[],
        metavar="SYMBOL",
        help="a symbol (exchange naming, or a base code such as SOL) every exchange "
        "answers as unknown (repeatable)",
    )
    faults.add_argument(
        "--throttle-error",
        action="append",
        default=[],
        choices=KRAKEN_THROTTLE_ERRORS,
        help="Kraken's error on a refusal, drawn per refusal (repeatable)",
    )
    faults.add_argument(
        "--string-numbers-rate",
        type=float,
        default=0.0,
        help="share of answers and stream events whose numbers/ids come the other type",
    )
    faults.add_argument(
        "--ws-shutdown-rate",
        type=float,
        default=0.0,
        help="share of Binance stream frames preceded by a serverShutdown event",
    )
    parser.add_argument("--log-level", default="WARNING", help="(default %(default)s)")
    return parser


def _examples(url: str) -> str:
    return "\n".join(
        [
            f"  curl '{url}/api/v3/ticker/price?symbol=BTCUSDT' -i",
            f'  curl -g \'{url}/api/v3/ticker/bookTicker?symbols=["BTCUSDT","ETHUSDT"]\'',
            f"  curl '{url}/products/BTC-USD/ticker'",
            f"  curl '{url}/0/public/Ticker?pair=XBTUSD,ETHUSD'",
            (
                f"  curl '{url}/api/v3/simple/price?ids=bitcoin,ethereum&vs_currencies=usd"
                "&include_last_updated_at=true'"
            ),
            f"  curl -H 'Authorization: Bearer test-key' '{url}/v3/assets?ids=bitcoin,ethereum'",
            f"  curl '{url}/api/v5/market/tickers?instType=SPOT'",
            f"  websocat '{url.replace('http', 'ws', 1)}/stream?streams=btcusdt@trade/ethusdt@bookTicker'",
            (
                f"  echo '{{\"type\":\"subscribe\",\"product_ids\":[\"BTC-USD\"],"
                f"\"channels\":[\"ticker\"]}}' | websocat -n '{url.replace('http', 'ws', 1)}/ws-feed'"
            ),
            (
                f"  echo '{{\"method\":\"subscribe\",\"params\":{{\"channel\":\"ticker\","
                f"\"symbol\":[\"BTC/USD\"]}}}}' | websocat -n '{url.replace('http', 'ws', 1)}/v2'"
            ),
            f"  curl '{url}/_emulator/stats'",
            f'  curl -X POST \'{url}/_emulator/faults\' -d \'{{"exchange": "okx", "error_rate": 0.2}}\'',
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        faults = Faults(
            latency=Latency(
                dist=args.latency_dist,
                ms=args.latency_ms,
                max_ms=args.latency_max_ms,
                sigma=args.latency_sigma,
            ),
            error_rate=args.error_rate,
            html_error_share=args.html_error_share,
            throttle_rate=args.throttle_rate,
            hang_rate=args.hang_rate,
            hang_seconds=args.hang_seconds,
            empty_rate=args.empty_rate,
            bad_value_rate=args.bad_value_rate,
            malformed_rate=args.malformed_rate,
            truncated_rate=args.truncated_rate,
            delisted=tuple(args.delisted),
            throttle_errors=tuple(args.throttle_error),
            string_numbers_rate=args.string_numbers_rate,
            ws=WsFaults(
                shutdown_rate=args.ws_shutdown_rate,
                string_numbers_rate=args.string_numbers_rate,
            ),
        )
        rate_limits: dict[str, Any] = {}
        if args.no_rate_limits:
            rate_limits = {name: None for name in _NAMES}
        rate_limits.update(dict(args.rate_limit))
        assets: Any = args.assets
        if args.symbols:
            assets = [s.strip() for s in args.symbols.split(",") if s.strip()]
        emulator = Emulator(
            seed=args.seed,
            assets=assets,
            rate_limits=rate_limits,
            faults=faults,
            tick_interval=args.tick_interval,
            unchanged=args.unchanged,
            volatility=args.volatility,
            coincap_api_keys=tuple(args.coincap_key or ("test-key",)),
            ws_rate=args.ws_rate,
            ws_ping_interval=args.ws_ping_interval or None,
            ws_max_connection_seconds=args.ws_max_connection_seconds,
            stocks=args.stocks,
            prediction_markets=args.prediction_markets,
        )
    except (ValueError, TypeError, msgspec.ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        # the signals are ours before the URL tells a parent process we are up
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(emulator.serve, args.host, args.port)
                print(url, flush=True)
                if not is_loopback(args.host):
                    log.warning(
                        "the emulator on %s has no authentication: anyone who can reach it can "
                        "change its faults and rate limits through its control API "
                        "(/_emulator/...)",
                        url,
                    )
                print(
                    f"exchange emulator: {len(emulator.universe)} assets, seed {args.seed}; "
                    f"Ctrl-C to stop. Try:\n{_examples(url)}",
                    flush=True,
                )
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        print("stopped", file=sys.stderr)

    failure: BaseException | None = None
    try:
        trio.run(run)
    except* OSError as group:
        failure = group
        while isinstance(failure, BaseExceptionGroup):
            failure = failure.exceptions[0]
    if failure is not None:
        print(
            f"error: cannot serve on {args.host}:{args.port}: {failure}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
