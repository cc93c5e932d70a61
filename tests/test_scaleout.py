"""Scale-out end to end: sharded pollers -> Redis Streams -> a consumer group of
writers -> PostgreSQL, with one writer SIGKILLed mid-run. Real processes,
real servers; every tick must be stored exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg")
redis = pytest.importorskip("redis")

from flows.testing.postgres import PG_BIN, start_postgres
from flows.testing.redis import RedisServer, redis_server_path

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (Path(PG_BIN) / "postgres").exists() or redis_server_path() is None,
    reason="needs PostgreSQL 15 and redis-server (Debian packages postgresql, redis-server)",
)

POLLER = """
import os
from flows import Flow
from sources.synthetic import SyntheticMarket
from sinks.redis import RedisStreamSink

flow = Flow(
    "poller",
    sources=[SyntheticMarket(symbols=200, interval=0.02, limit=2000, seed=7, name="market")],
    sinks=[RedisStreamSink(os.environ["REDIS_URL"], stream="ticks", flush_interval=0.05)],
)
"""

WRITER = """
import os
from flows import Flow
from sources.redis import RedisStreamSource
from sinks.postgres import PostgresSink

flow = Flow(
    "writer",
    sources=[RedisStreamSource(os.environ["REDIS_URL"], stream="ticks", group="writers",
                               consumer=os.environ["CONSUMER"], block=0.2, claim_idle=1.0,
                               batch_size=200)],
    sinks=[PostgresSink(os.environ["PG_DSN"], flush_interval=0.3, batch_size=5000)],
)
"""


@pytest.fixture(scope="module")
def servers():
    pg = start_postgres()
    rs = RedisServer().start()
    try:
        yield pg, rs
    finally:
        rs.stop()
        pg.close()


def spawn(tmp_path: Path, name: str, code: str, *args: str, **env: str) -> subprocess.Popen:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "flows.run", str(path), "--metrics-addr", "0", *args],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        )


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll another process's state (external: no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sharded_pollers_and_a_writer_group_store_every_tick_once(tmp_path, servers):
    import psycopg

    pg, rs = servers
    env = {"REDIS_URL": rs.url, "PG_DSN": pg.dsn}
    client = redis.Redis.from_url(rs.url)
    writers = {
        c: spawn(tmp_path, f"writer-{c}", WRITER, CONSUMER=c, **env) for c in ("w1", "w2")
    }
    pollers: list[subprocess.Popen] = []
    try:
        def consumers() -> set[bytes]:
            try:
                return {c["name"] for c in client.xinfo_consumers("ticks", "writers")}
            except redis.ResponseError:
                return set()  # no group yet

        # the pollers end within a second: both writers must be reading by then
        wait_until(lambda: consumers() == {b"w1", b"w2"}, 60, "both writers to join the group")
        pollers += [spawn(tmp_path, f"poller-{k}", POLLER, "--shard", f"{k}/2", **env) for k in (0, 1)]
        def w1_holds_pending() -> bool:
            try:
                consumers = client.xinfo_consumers("ticks", "writers")
            except redis.ResponseError:
                return False
            return any(c["name"] == b"w1" and c["pending"] > 0 for c in consumers)

        wait_until(w1_holds_pending, 30, "writer w1 to hold pending entries")
        writers["w1"].send_signal(signal.SIGKILL)
        writers["w1"].wait(10)
        for p in pollers:
            assert p.wait(60) == 0, (tmp_path / "poller-0.log").read_text()
        produced = client.xlen("ticks")
        assert produced == 2 * 2000

        def stored() -> int:
            with psycopg.connect(pg.dsn) as conn:
                try:
                    return conn.execute("SELECT count(*) FROM ticks").fetchone()[0]
                except psycopg.errors.UndefinedTable:
                    return 0  # no writer has flushed yet

        wait_until(lambda: stored() >= produced, 60, "the table to hold every tick")
        writers["w2"].send_signal(signal.SIGTERM)
        assert writers["w2"].wait(30) == 0, (tmp_path / "writer-w2.log").read_text()
    finally:
        for p in [*writers.values(), *pollers]:
            if p.poll() is None:
                p.kill()
                p.wait()
    entries = client.xrange("ticks")
    # w2 reclaimed what the killed w1 held and acked it after writing
    assert client.xpending("ticks", "writers")["pending"] == 0
    client.close()
    import msgspec

    from flows import Tick

    sent = {(t.source, t.symbol, t.ts) for t in (msgspec.json.decode(f[b"t"], type=Tick) for _, f in entries)}
    with psycopg.connect(pg.dsn) as conn:
        rows = conn.execute("SELECT source, symbol, ts FROM ticks").fetchall()
    assert len(rows) == len(set(rows)) == len(sent)
    assert set(rows) == sent
    assert "drained" in (tmp_path / "writer-w2.log").read_text()
