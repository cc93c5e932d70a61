"""The FMP daily sync (examples/systems/fmp_daily_sync.py) over 19,205 symbols.

The system it replaces synced 19,205 symbols from Financial Modeling Prep in
18.3 minutes with 11,360 requests (its staleness filter skipping most
per-symbol calls). This runs the example as a user would, ``python -m
flows.run examples/systems/fmp_daily_sync.py`` in a subprocess, against
flows' exchange emulator (another subprocess, ``--stocks 19205``) and a
PostgreSQL server started for the run, three times:

1. ``fresh``: an empty state directory and empty tables: one bulk
   end-of-day call, then dividends and profiles for every symbol;
2. ``rerun``: at once, with the state of run 1: the staleness filter
   (``max_age`` 20 h) skips every per-symbol call;
3. ``resume``: a fresh sync SIGKILLed once its state files (checkpointed
   every 100 symbols) hold 90% of the per-symbol work, then run again: the
   time and calls the second run needs to finish.

Rate: FMP Premium's documented 750 calls a minute. A full fresh sync needs
``1 + 2 * N`` calls, so no client finishes it faster than the bound
``(1 + 2N) / 750`` minutes (51 minutes for N = 19,205). To keep the run
short the emulator's limit and the example's are both multiplied by
``--speedup`` (default 10: 7,500 a minute); every time is also shown at
the plan's rate ("at 750/min": the rerun's wall time, a run that makes
almost no calls, is taken as the fixed cost of starting up, and the rest
is multiplied by the speedup), which holds while the sync is bound by the
limit, not by CPU (the ``vs bound`` column says how close it came). The
baseline row is the bound itself, and the seed system's
published figures are shown beside it.

    python bench/daily_sync.py                       # N = 19,205, speedup 10 (~12 minutes)
    python bench/daily_sync.py --stocks 2000 --speedup 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import start_emulator, stop_process

EXAMPLE = ROOT / "examples" / "systems" / "fmp_daily_sync.py"
PLAN_PER_MINUTE = 750.0
SEED = {"requests": 11_360, "minutes": 18.3}
FMP_ENDPOINTS = ("eod-bulk", "dividends", "profile")


class Emulator:
    """``python -m flows.testing.emulator`` with the stock universe and the scaled FMP limit."""

    def __init__(self, stocks: int, per_minute: float) -> None:
        self.proc, self.url = start_emulator([
            "--assets", "5", "--stocks", str(stocks),
            "--rate-limit", f"fmp=limit={int(per_minute)},window=60"])
        self.control = httpx.Client(base_url=self.url, timeout=30.0)

    def reset(self) -> None:
        self.control.post("/_emulator/reset").raise_for_status()

    def requests(self) -> tuple[int, int]:
        """(FMP calls answered, of them refused with 429) since the last reset."""
        stats = self.control.get("/_emulator/stats").json()["fmp"]
        made = sum(stats[e]["requests"] for e in FMP_ENDPOINTS)
        return made, sum(stats[e]["refused"] for e in FMP_ENDPOINTS)

    def stop(self) -> None:
        stop_process(self.proc)
        if hasattr(self, "control"):
            self.control.close()


def start_sync(url: str, dsn: str, state: Path, per_minute: float, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLOWS_EXCHANGE_URL=url, FLOWS_PG_DSN=dsn,
               FLOWS_STATE_DIR=str(state), FMP_PER_MINUTE=str(per_minute))
    cmd = [sys.executable, "-m", "flows.run", str(EXAMPLE), "--metrics-addr", "0"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("a"))


def state_entries(state: Path) -> int:
    done = 0
    for name in ("dividends.state.json", "profiles.state.json"):
        try:
            done += len(json.loads((state / name).read_bytes()))
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    return done


def run_sync(em: Emulator, dsn: str, state: Path, per_minute: float, log: Path,
             kill_at: float | None = None, stocks: int = 0) -> dict[str, Any]:
    """Run the example once (SIGKILL it at ``kill_at`` of the per-symbol work)."""
    em.reset()
    state.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    proc = start_sync(em.url, dsn, state, per_minute, log)
    killed = False
    while proc.poll() is None:
        time.sleep(0.2)
        if kill_at is not None and state_entries(state) >= kill_at * 2 * stocks:
            proc.send_signal(signal.SIGKILL)
            killed = True
    proc.wait()
    elapsed = time.monotonic() - started
    made, refused = em.requests()
    if not killed and proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"the sync exited {proc.returncode}:\n{tail}")
    return {"seconds": elapsed, "requests": made, "refused": refused,
            "done": state_entries(state), "exit": proc.returncode}


def saved_line(log: Path) -> str:
    lines = [ln for ln in log.read_text().splitlines() if "saved by the staleness filter" in ln]
    return "; ".join(ln.split("source ", 1)[-1] for ln in lines[-2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stocks", type=int, default=19_205)
    parser.add_argument("--speedup", type=float, default=10.0,
                        help="multiply the plan's 750/min by this (default %(default)s)")
    args = parser.parse_args(argv)
    from flows.testing.postgres import start_postgres

    rate = PLAN_PER_MINUTE * args.speedup
    work = Path(tempfile.mkdtemp(prefix="daily_sync_"))
    pg = start_postgres()
    em = Emulator(args.stocks, rate)
    try:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            for table in ("eod_prices", "dividends", "profiles"):
                conn.execute(f"drop table if exists {table}")
        log = work / "sync.log"
        fresh = run_sync(em, pg.dsn, work / "a", rate, log)
        rerun = run_sync(em, pg.dsn, work / "a", rate, log)
        rerun_line = saved_line(log)
        killed = run_sync(em, pg.dsn, work / "b", rate, log, kill_at=0.9, stocks=args.stocks)
        resumed = run_sync(em, pg.dsn, work / "b", rate, log)
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            rows = {t: conn.execute(f"select count(*) from {t}").fetchone()[0]
                    for t in ("eod_prices", "dividends", "profiles")}
    finally:
        em.stop()
        pg.close()
        shutil.rmtree(work, ignore_errors=True)

    needed = 1 + 2 * args.stocks
    bound_min = needed / PLAN_PER_MINUTE

    fixed = rerun["seconds"]  # start-up, universe, connections: a run that makes ~no calls

    def row(name: str, r: dict[str, Any], note: str = "") -> str:
        # the calls' share of the time runs at the plan's rate; the fixed part does not
        at_plan = (fixed + max(r["seconds"] - fixed, 0.0) * args.speedup) / 60
        bound = r["requests"] / PLAN_PER_MINUTE
        ratio = f"{at_plan / bound:.2f}x" if bound > 0.05 else "-"
        return (f"| {name} | {r['requests']:,} | {needed - r['requests']:,} | {r['refused']} | "
                f"{r['seconds']:.1f} s | {at_plan:.1f} min | {ratio} | {note} |")

    print(f"FMP daily sync, {args.stocks:,} symbols, plan rate {PLAN_PER_MINUTE:.0f}/min "
          f"(run at {rate:,.0f}/min, speedup {args.speedup:g}); bound for a full sync "
          f"{needed:,} calls / {PLAN_PER_MINUTE:.0f} = {bound_min:.1f} min\n")
    print("| run | calls | saved vs full | 429s | wall | at 750/min | vs bound | note |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| bound (baseline) | {needed:,} | 0 | 0 | | {bound_min:.1f} min | 1.00x | calls / rate |")
    if args.stocks == 19_205:
        print(f"| seed system | {SEED['requests']:,} | {needed - SEED['requests']:,} | | | "
              f"{SEED['minutes']} min | | as published |")
    print(row("fresh", fresh))
    print(row("rerun (staleness filter)", rerun, rerun_line))
    print(row("killed at 90%", killed, f"{killed['done']:,} symbol fetches checkpointed"))
    print(row("resume after SIGKILL", resumed, "time to finish"))
    print(f"\nrows stored: {rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
