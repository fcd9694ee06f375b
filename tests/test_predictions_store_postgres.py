"""The SQL store's contract on a real PostgreSQL server: every test of the SQLite suite
(tests/unit/test_predictions_store.py), each on a fresh database, plus races between replicas:
four claimers in one process on PostgreSQL, and two processes on one database (PostgreSQL and
a SQLite file: the fast tier may not start processes)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.predictions.store import SqlStore, open_store
from tests.fixtures_postgres import PostgresServer
from tests.stack import ROOT
from tests.unit import test_predictions_store as suite
from tests.unit.test_predictions_store import OpenStore, new, render

# The suite's tests and fixtures, run here with `store_url` pointing at PostgreSQL.
globals().update({name: value for name, value in vars(suite).items() if name.startswith("test_")})
open_at = suite.open_at
store = suite.store


@pytest.fixture
def store_url(postgres_server: PostgresServer) -> str:
    # Sessions in a zone half an hour off UTC: times must still come back as the same UTC instants.
    return postgres_server.create_database("store", timezone="Asia/Kolkata")


async def test_store_runs_on_postgresql_in_another_time_zone(store: SqlStore) -> None:
    assert store.dialect == "postgresql"
    async with store.engine.connect() as conn:
        assert (await conn.execute(sa.text("SHOW timezone"))).scalar_one() == "Asia/Kolkata"


async def test_four_replicas_claim_fifty_predictions_each_exactly_once(open_at: OpenStore) -> None:
    replicas = [await open_at() for _ in range(4)]
    created = [(await replicas[0].create(new(webhook="https://hook.example/x"), 0, 0)).id for _ in range(50)]
    claims: Counter[str] = Counter()
    per_replica: Counter[int] = Counter()

    async def claimer(index: int) -> None:
        while True:
            got = await replicas[index].claim(f"replica-{index}", 30, 2, 3)
            if not got:
                return
            claims.update(p.id for p in got)
            per_replica[index] += len(got)
            await asyncio.sleep(0)

    await asyncio.gather(*(claimer(i) for i in range(4)))
    assert sorted(claims) == sorted(created)
    assert set(claims.values()) == {1}
    # SKIP LOCKED lets the replicas work side by side instead of queueing on one another.
    assert len(per_replica) > 1

    sent: Counter[str] = Counter()

    async def sender(index: int) -> None:
        while True:
            due = await replicas[index].due_deliveries(f"sender-{index}", 5, 30)
            if not due:
                return
            sent.update(d.id for d in due)
            for d in due:
                await replicas[index].delivered(d.id)

    await asyncio.gather(*(sender(i) for i in range(4)))
    assert len(sent) == 50 and set(sent.values()) == {1}
    assert await replicas[1].due_deliveries("late", 100, 30) == []
    assert await replicas[2].purge(datetime.now(UTC)) == 0


CLAIMER = """
import asyncio, json, sys
from services.predictions.store import open_store

async def main() -> None:
    store = await open_store(sys.argv[1], lambda p: "{}")
    print("ready", flush=True)
    sys.stdin.readline()
    got = []
    while batch := await store.claim(sys.argv[2], 30, 2, 3):
        got += [p.id for p in batch]
        await asyncio.sleep(0.001)
    await store.close()
    print(json.dumps(got), flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_two_processes_on_one_database_claim_each_prediction_once(
    backend: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/predictions.db"
    else:
        url = postgres_server.create_database("procs")
    store = await open_store(url, render)
    try:
        created = [(await store.create(new(), 0, 0)).id for _ in range(150)]
    finally:
        await store.close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLAIMER,
            url,
            f"proc-{i}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert (await asyncio.wait_for(process.stdout.readline(), 60)).strip() == b"ready"
        # Both start claiming at once, so that their transactions interleave.
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()
        outputs = [await asyncio.wait_for(process.communicate(), 120) for process in processes]
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    per_process = [json.loads(stdout.decode().strip().splitlines()[-1]) for stdout, _ in outputs]
    assert sorted(pid for got in per_process for pid in got) == sorted(created)
    assert all(per_process), f"one process claimed nothing: {[len(got) for got in per_process]}"
