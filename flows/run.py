"""``python -m flows.run [TARGET]``: run a flow from the command line.

TARGET is a ``.py`` file or ``package.module:attr`` holding a Flow (or a
function returning one). Without TARGET the built-in demo runs: a synthetic
market -> change detection -> SQLite and a console summary. ``--list``
prints the registered sources and sinks (entry points ``flows.sources`` and
``flows.sinks``), one a line with its one-line doc.

Exit codes: 0 after a clean drain, 1 when the flow failed or had to be
stopped by force, 2 for a bad command line or flow definition.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import trio

from ._budget import RateBudget
from ._flow import Flow, FlowError
from ._log import setup_logging
from ._redact import redact
from ._registry import ComponentError, components, load_component
from ._runtime import FlowFailed, Runtime
from ._shard import Shard

__all__ = ["demo_flow", "list_components", "load_flow", "main"]

log = logging.getLogger("flows.run")


class TargetError(Exception):
    """A TARGET that does not give a Flow; the message is one line."""


def demo_flow(db: str = "ticks.db") -> Flow:
    """The built-in demo: synthetic market -> ChangeDetector -> SQLite + console.

    Its source and sinks come through the component registry (entry points).
    """
    from ._change import ChangeDetector

    SyntheticMarket = load_component("source", "synthetic")
    SQLiteSink = load_component("sink", "sqlite")
    ConsoleSink = load_component("sink", "console")

    return Flow(
        "demo",
        sources=[SyntheticMarket(symbols=300, interval=0.5, unchanged=0.6)],
        stages=[ChangeDetector(rel=0.0005, heartbeat=60.0)],
        sinks=[SQLiteSink(db, flush_interval=0.5), ConsoleSink(every=5.0)],
    )


def list_components(out: Any = None, err: Any = None) -> int:
    """Print the registered sources and sinks, one a line with its one-line
    doc; a component that cannot be loaded gets one error line on ``err``.
    Returns the exit code (1 if any failed to load)."""
    out, err = out or sys.stdout, err or sys.stderr
    found = components()
    width = max((len(c.name) for c in found), default=0)
    path = max((len(c.value) for c in found), default=0)
    failed = 0
    for c in found:
        try:
            doc = c.summary()
        except ComponentError as exc:
            failed += 1
            print(f"flows: error: {exc}", file=err)
            continue
        print(f"{c.kind:6}  {c.name:{width}}  {c.value:{path}}  {doc}".rstrip(), file=out)
    if not found:
        print("flows: no components registered (is flows installed? pip install -e .)", file=err)
    return 1 if failed else 0


def _where(exc: BaseException, origin: str) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == origin]
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f" (line {exc.lineno})"
    return f" (line {frames[-1].lineno})" if frames else ""


def _import_file(path: Path) -> Any:
    if not path.exists():
        raise TargetError(f"flow file {str(path)!r} does not exist")
    if path.suffix != ".py":
        raise TargetError(f"flow file {str(path)!r} is not a .py file")
    name = f"_flows_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except FlowError as exc:
        raise TargetError(f"{path}: bad flow definition: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any import error becomes one line
        where = _where(exc, str(path.resolve()))
        raise TargetError(
            f"{path}: importing it raised {type(exc).__name__}{where}: {exc}"
        ) from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def _import_module(spec: str) -> Any:
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise TargetError(f"module {spec!r} not found ({exc})") from None
    except FlowError as exc:
        raise TargetError(f"{spec}: bad flow definition: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any import error becomes one line
        raise TargetError(f"{spec}: importing it raised {type(exc).__name__}: {exc}") from None


def load_flow(target: str, attr: str | None = None) -> Flow:
    """The Flow named by TARGET (``file.py`` or ``module:attr``) and ``--flow``."""
    if target.endswith(".py") or "/" in target:
        module, name = _import_file(Path(target)), attr or "flow"
    else:
        modname, _, inline = target.partition(":")
        module, name = _import_module(modname), attr or inline or "flow"
    if not hasattr(module, name):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, Flow))
        hint = f"; it has {', '.join(found)} (use --flow NAME)" if found else "; it defines no Flow"
        raise TargetError(f"{target}: no attribute {name!r}{hint}")
    obj = getattr(module, name)
    if callable(obj) and not isinstance(obj, Flow):
        try:
            obj = obj()
        except FlowError as exc:
            raise TargetError(f"{target}: {name}(): bad flow definition: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - reported as one line
            raise TargetError(f"{target}: {name}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, Flow):
        raise TargetError(f"{target}: {name!r} is a {type(obj).__name__}, not a Flow")
    return obj


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: ``flows: error: ...`` and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"flows: error: {message} (see --help)\n")


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _db_arg(text: str) -> str:
    folder = Path(text).expanduser().resolve().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {str(folder)!r} is not writable")
    return text


def _shard_arg(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _budget_arg(text: str) -> RateBudget:
    try:
        return RateBudget(url=text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m flows.run",
        description="Run a flow. Without TARGET, run the built-in demo "
        "(synthetic market -> change detection -> SQLite + console summary).",
    )
    p.add_argument("target", nargs="?", help="a .py file or package.module:attr holding a Flow")
    p.add_argument("--list", action="store_true",
                   help="list the registered sources and sinks (entry points) and exit")
    p.add_argument("--flow", metavar="NAME", help="attribute holding the Flow (default: flow)")
    p.add_argument("--duration", type=_seconds_arg, metavar="SECONDS", help="drain and stop after this long")
    p.add_argument(
        "--metrics-addr", default="127.0.0.1:9099", metavar="HOST:PORT",
        help="serve /metrics, /healthz, /readyz, /status here; 0 disables (default: %(default)s)",
    )
    p.add_argument("--drain-timeout", type=_seconds_arg, default=30.0, metavar="SECONDS",
                   help="longest a drain may take before a forced stop (default: %(default)s)")
    p.add_argument("--shard", metavar="K/N", type=_shard_arg,
                   help="poll only shard K of N of each source's symbols (rendezvous hashing)")
    p.add_argument("--rate-budget", metavar="URL", type=_budget_arg,
                   help="share each HTTP source's rate limit with the other processes on this "
                        "host through Redis (redis://HOST:PORT/DB); see 'Scaling out'")
    p.add_argument("--fresh", action="store_true",
                   help="ignore saved state (change-detector checkpoints, replay offsets)")
    p.add_argument("--graph", action="store_true",
                   help="print the flow's graph (text, then a Mermaid block) and exit")
    p.add_argument("--db", default="ticks.db", type=_db_arg, help="SQLite file for the demo (default: %(default)s)")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", default="INFO",
                   choices=("DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        try:
            return list_components()
        except BrokenPipeError:  # `--list | head`: the reader left; not an error
            sys.stdout = None  # type: ignore[assignment]  # no flush at exit
            return 0
    setup_logging(args.log_format, args.log_level)
    try:
        flow = load_flow(args.target, args.flow) if args.target else demo_flow(args.db)
        if args.graph:
            print(flow.validate().to_text())
            print(f"\n```mermaid\n{flow.to_mermaid()}\n```")
            return 0
        runtime = Runtime(
            flow,
            metrics_addr=args.metrics_addr,
            drain_timeout=args.drain_timeout,
            duration=args.duration,
            handle_signals=True,
            fresh=args.fresh,
            shard=args.shard,
            rate_budget=args.rate_budget,
        )
    except (TargetError, FlowError, ComponentError, ValueError) as exc:
        print(f"flows: error: {redact(exc)}", file=sys.stderr)
        return 2
    try:
        result = trio.run(runtime.run)
    except FlowFailed as exc:
        print(f"flows: error: {redact(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"flows: error: {redact(exc)}", file=sys.stderr)
        return 1
    return 0 if result.clean else 1


if __name__ == "__main__":
    sys.exit(main())
