"""`python -m flows.run`: targets, errors, and a signal-driven drain into SQLite."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _cli import ENV, run_cli

from flows.run import _parser, load_flow, main

FLOW_FILE = """
from flows import Flow, ChangeDetector
from sources.synthetic import SyntheticMarket
from sinks.sqlite import SQLiteSink
from sinks.console import ConsoleSink

flow = Flow(
    "drainme",
    sources=[SyntheticMarket(symbols=200, interval=0.02, unchanged=0.5, batch_size=50)],
    stages=[ChangeDetector(rel=0.0001)],
    sinks=[SQLiteSink({db!r}, flush_interval=0.2), ConsoleSink(every=0.2)],
)
"""


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, r"flow file '.*missing\.py' does not exist"),
        ("x = 1\n", r"no attribute 'flow'; it defines no Flow"),
        ("raise RuntimeError('no config')\n", r"importing it raised RuntimeError \(line 1\): no config"),
        ("def broken(:\n", r"importing it raised SyntaxError \(line 1\)"),
        ("import not_a_module_xyz\n", r"importing it raised ModuleNotFoundError"),
        ("flow = 42\n", r"'flow' is a int, not a Flow"),
        (
            "from flows import Flow\nfrom flows.testing import ListSink\nflow = Flow('x', sources=[], sinks=[ListSink()])\n",
            r"bad flow definition: flow 'x' has no sources",
        ),
    ],
)
def test_bad_targets_get_one_clear_line_and_exit_2(tmp_path, content, expected):
    target = tmp_path / ("missing.py" if content is None else "target.py")
    if content is not None:
        target.write_text(content)
    proc = run_cli(str(target), "--metrics-addr", "0", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flows: error: ")
    assert re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr


def test_named_flow_and_module_targets(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "flows_here.py").write_text(
        textwrap.dedent(
            """
            from flows import Flow
            from flows.testing import ListSink
            from sources.synthetic import SyntheticMarket

            def build():
                return Flow("built", sources=[SyntheticMarket(symbols=5, interval=0, limit=50)],
                            sinks=[ListSink()])

            other = build()
            """
        )
    )
    assert load_flow(str(pkg / "flows_here.py"), "other").name == "built"
    proc = run_cli("mypkg.flows_here:build", "--metrics-addr", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "flow built: drained" in proc.stderr
    proc = run_cli(str(pkg / "flows_here.py"), "--metrics-addr", "0", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no attribute 'flow'; it has other (use --flow NAME)" in proc.stderr
    proc = run_cli("mypkg.nothing:flow", "--metrics-addr", "0", cwd=tmp_path)
    assert proc.returncode == 2 and "module 'mypkg.nothing' not found" in proc.stderr


def test_demo_runs_for_a_duration_and_stores_ticks(tmp_path):
    db = tmp_path / "demo.db"
    proc = run_cli("--duration", "1.5", "--db", str(db), "--metrics-addr", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "flow demo: drained" in proc.stderr
    with sqlite3.connect(db) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM ticks").fetchone()
    assert rows >= 300  # every symbol is new on the first tick
    assert "-- flow demo" in proc.stdout  # the final console summary


def test_unusable_metrics_address_is_an_error(tmp_path):
    proc = run_cli("--metrics-addr", "127.0.0.1:notaport", cwd=tmp_path)
    assert proc.returncode == 2 and "is not a number" in proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_every_emitted_record_into_sqlite(tmp_path, signum):
    db = tmp_path / "drain.db"
    target = tmp_path / "drain_flow.py"
    target.write_text(FLOW_FILE.format(db=str(db)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.run", str(target), "--metrics-addr", "127.0.0.1:0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        # The console summary reports what SQLite wrote; wait for real writes.
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"sink\s+sqlite .* written=(\d+)", line)
            if m and int(m.group(1)) >= 1000:
                break
        else:
            pytest.fail(f"flow ended early: {proc.stderr.read() if proc.stderr else ''}")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"stopping (signal {signal.Signals(signum).name}): draining" in err
    final = re.search(r"drained .* change: in=(\d+) out=(\d+)", err)
    assert final, err
    emitted = int(final.group(2))
    with sqlite3.connect(db) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM ticks").fetchone()
    assert rows == emitted > 1000


def test_json_logs_are_one_object_per_line(tmp_path):
    proc = run_cli("--duration", "0.5", "--db", str(tmp_path / "j.db"), "--metrics-addr", "0",
                   "--log-format", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json

    events = [json.loads(line) for line in proc.stderr.splitlines()]
    drained = [e for e in events if e["logger"] == "flows.runtime" and "drained" in e["event"]]
    assert drained and drained[0]["flow"] == "demo"
    assert all({"ts", "level", "logger", "event"} <= set(e) for e in events)


REPLAY_FLOW = """
from flows import Flow, ChangeDetector
from sources.replay import ReplaySource
from sinks.sqlite import SQLiteSink
from sinks.console import ConsoleSink

flow = Flow(
    "replay",
    sources=[ReplaySource(path={ticks!r}, speed={speed}, batch_size=50)],
    stages=[ChangeDetector(rel=0.001, checkpoint={ckpt!r})],
    sinks=[SQLiteSink({db!r}, flush_interval=0.1), ConsoleSink(every=0.2)],
)
"""


def test_interrupted_replay_resumes_to_the_same_rows_as_one_run(tmp_path):
    import msgspec

    from sources.synthetic import SyntheticMarket

    market = SyntheticMarket(symbols=50, unchanged=0.5, volatility=0.003, seed=11)
    ticks = []
    for second in range(200):  # 200 s of recording, 10,000 ticks
        ticks += [msgspec.structs.replace(t, ts=1_700_000_000.0 + second) for t in market.tick()]
    path = tmp_path / "ticks.jsonl"
    path.write_bytes(msgspec.json.Encoder().encode_lines(ticks))

    def flow_file(name: str, db: Path, speed: str, state: str | None = None) -> Path:
        f = tmp_path / f"{name}.py"
        f.write_text(REPLAY_FLOW.format(ticks=str(path), speed=speed, db=str(db),
                                        ckpt=str(tmp_path / f"{state or name}.ckpt")))
        return f

    # one uninterrupted run (its own offset file: --fresh ignores saved state)
    whole = tmp_path / "whole.db"
    proc = run_cli(str(flow_file("whole", whole, "None")), "--metrics-addr", "0", "--fresh", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (path.parent / "ticks.jsonl.offset").unlink()

    # the same replay paced at 40x (5 s), interrupted by SIGTERM, then resumed
    parts = tmp_path / "parts.db"
    target = flow_file("parts", parts, "40.0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.run", str(target), "--metrics-addr", "0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"sink\s+sqlite .* written=(\d+)", line)
            if m and int(m.group(1)) >= 500:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "stopping (signal SIGTERM)" in err
    with sqlite3.connect(parts) as conn:
        first = conn.execute("SELECT count(*) FROM ticks").fetchone()[0]
    # resumed with the same state; unpaced (the pacing only let the SIGTERM land mid-run)
    resumed = flow_file("resumed", parts, "None", state="parts")
    proc = run_cli(str(resumed), "--metrics-addr", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stderr

    def rows(db: Path) -> list[tuple]:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT source, symbol, ts, price FROM ticks ORDER BY 1, 2, 3").fetchall()

    assert 0 < first < len(rows(whole))  # really interrupted
    assert rows(parts) == rows(whole)


@pytest.mark.parametrize(("args", "says"), [
    (["--duration", "-1"], "argument --duration: must be a positive number of seconds, got -1"),
    (["--drain-timeout", "-5"], "argument --drain-timeout: must be a positive number of seconds"),
    (["--duration", "soon"], "'soon' is not a number of seconds"),
    (["--db", "/nonexistent/dir/x.db"], "argument --db: folder '/nonexistent/dir' does not exist"),
    (["--rate-budget", "http://127.0.0.1:6379"], "argument --rate-budget: rate budget "
     "'http://127.0.0.1:6379': expected redis://host:port/db"),
])
def test_bad_options_are_one_line_and_exit_2_before_anything_starts(tmp_path, args, says):
    done = run_cli(*args, "--metrics-addr", "0", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flows: error: ") and says in lines[0], done.stderr
    assert not list(tmp_path.iterdir())  # nothing ran: no database was made


def test_help_documents_every_option_the_target_forms_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z-]+)(.*)\n(?:\s{20,}(.*))?", out, re.MULTILINE)
    assert {o for o, *_ in options} >= {"--log-format", "--log-level", "--list", "--shard"}
    for option, same_line, next_line in options:
        helps = re.sub(r"^ ?\S*", "", same_line).strip() or next_line.strip()
        assert helps, f"{option} has no help text"
    levels = out.replace("(default: INFO)", "")
    for level in ("DEBUG", "INFO", "WARNING", "ERROR"):
        assert levels.count(level) == 1, f"{level} listed {levels.count(level)} times"
    assert "package.module:attr" in out and "path/to/flows.py" in out
    for code in ("0", "1", "2"):
        assert re.search(rf"^  {code}  \S", out, re.MULTILINE), f"exit code {code} not explained"


def test_log_level_in_any_case():
    # the parser only: main() would set up logging for the rest of the test session
    assert _parser().parse_args(["--log-level", "Warning"]).log_level == "WARNING"
    assert _parser().parse_args([]).log_level == "INFO"
