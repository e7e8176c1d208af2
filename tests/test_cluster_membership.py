"""Executor ids, heartbeats and takeovers (``parley.cluster``), in-process against the real
databases: the decisions that must hold when many processes make them at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from parley.cluster import EXIT_TAKEN_OVER, Cluster, ExecutorIdInUse, executors
from parley.config import Settings
from parley.llm import open_chat_model
from parley.memory import open_memory
from parley.store import migrate
from tests.conftest import BACKENDS, unique
from tests.fake_provider import reply_for
from tests.test_store_and_memory import settings  # noqa: F401 (a fixture)


@pytest.fixture
async def migrated(settings: Settings) -> Settings:  # noqa: F811 (the fixture)
    await migrate(settings)
    return settings


@pytest.fixture
async def engine(migrated: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(migrated.store_database_url())
    yield engine
    await engine.dispose()


@pytest.fixture
def live_pids() -> Iterator[list[int]]:
    """Processes that stay alive through the test: each stands for a Parley process."""
    sleepers = [subprocess.Popen(["sleep", "120"]) for _ in range(20)]
    yield [sleeper.pid for sleeper in sleepers]
    for sleeper in sleepers:
        sleeper.kill()
        sleeper.wait()


def exited_pid() -> int:
    """The pid of a process that has come and gone."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    return gone.pid


class TakenOver(Exception):
    pass


def taken_over() -> None:
    raise TakenOver


def member(engine: AsyncEngine, pid: int, *, name: str = "replica", one: bool = False) -> Cluster:
    cluster = Cluster(
        engine,
        name=name,
        version="turns-2",
        dead_after=60,
        one_process=one,
        on_taken_over=taken_over,
    )
    cluster.pid = pid
    return cluster


async def make_stale(engine: AsyncEngine, cluster: Cluster) -> None:
    """As if ``cluster``'s process had been silent for longer than the limit."""
    async with engine.begin() as conn:
        await conn.execute(
            executors.update()
            .where(executors.c.executor_id == cluster.executor_id)
            .values(heartbeat_at=executors.c.heartbeat_at - 1000)
        )
    cluster._last_beat -= 1000


@pytest.mark.parametrize("backend", ["postgres"])
async def test_twenty_processes_starting_at_once_get_twenty_ids(
    engine: AsyncEngine, live_pids: list[int]
) -> None:
    members = [member(engine, pid) for pid in live_pids]
    ids = await asyncio.gather(*(cluster.join() for cluster in members))
    assert sorted(ids) == sorted(f"replica/{slot}" for slot in range(20))
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(executors.c.executor_id, executors.c.pid))).all()
    assert {(row.executor_id, row.pid) for row in rows} == {
        (cluster.executor_id, cluster.pid) for cluster in members
    }


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_admits_one_process_of_many_starting_at_once(
    engine: AsyncEngine, live_pids: list[int]
) -> None:
    members = [member(engine, pid, one=True) for pid in live_pids[:8]]
    outcomes = await asyncio.gather(
        *(cluster.join() for cluster in members), return_exceptions=True
    )
    assert [outcome for outcome in outcomes if isinstance(outcome, str)] == ["replica/0"]
    assert all(isinstance(o, ExecutorIdInUse) for o in outcomes if not isinstance(o, str))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_slot_whose_process_exited_is_taken_again_at_once(
    engine: AsyncEngine, live_pids: list[int]
) -> None:
    first = member(engine, exited_pid())
    assert await first.join() == "replica/0"
    # Same host, its process gone: the slot is free without waiting for the limit.
    again = member(engine, live_pids[0])
    assert await again.join() == "replica/0"
    # Its former holder, were it still running, would find its row taken.
    assert not await first.beat()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_name_held_on_another_host_is_refused(
    engine: AsyncEngine, live_pids: list[int]
) -> None:
    elsewhere = member(engine, live_pids[0], name="shared")
    elsewhere.host = "another-machine"
    await elsewhere.join()
    here = member(engine, live_pids[1], name="shared")
    with pytest.raises(ExecutorIdInUse, match="in use by a live process on host"):
        await here.join()
    # Once that process has been silent past the limit, the name is free.
    await make_stale(engine, elsewhere)
    assert await here.join() == "shared/0"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_dead_process_is_claimed_by_exactly_one_survivor(
    engine: AsyncEngine, live_pids: list[int]
) -> None:
    dead, *survivors = [member(engine, pid) for pid in live_pids[:11]]
    await dead.join()
    for survivor in survivors:
        await survivor.join()
    assert await asyncio.gather(*(s.claim_dead() for s in survivors)) == [[]] * 10
    await make_stale(engine, dead)
    claims = await asyncio.gather(*(s.claim_dead() for s in survivors))
    assert sorted(claims) == [[]] * 9 + [[dead.executor_id]]


# The process whose turns are taken over, run as a process of its own: it must exit
# before the graph writes anything, which a test cannot watch from inside.
PAUSED_PROCESS = """
import asyncio, sys
from parley.cluster import Cluster, executors
from parley.config import Settings
from parley.llm import open_chat_model
from parley.memory import open_memory

async def main():
    settings = Settings()
    from parley.cluster import engine_for
    paused = Cluster(engine_for(settings), name="paused", version="turns-2", dead_after=60,
                     one_process=False)
    survivor = Cluster(engine_for(settings), name="survivor", version="turns-2",
                       dead_after=60, one_process=False)
    await paused.join()
    await survivor.join()
    async with open_chat_model(settings) as model, open_memory(
        settings, model, guard=paused.ensure_alive
    ) as memory:
        await memory.reply(sys.argv[1], "turn-1", "one")
        assert paused.lease_valid()
        # Silent past the limit (as if paused), and taken over meanwhile:
        async with paused.engine.begin() as conn:
            await conn.execute(executors.update().values(heartbeat_at=0.0)
                               .where(executors.c.executor_id == paused.executor_id))
        paused._last_beat -= 1000
        assert await survivor.claim_dead() == [paused.executor_id]
        await memory.reply(sys.argv[1], "turn-2", "two")
    print("wrote the second turn")

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_process_whose_turns_were_taken_over_exits_before_writing_memory(
    migrated: Settings,
) -> None:
    """The fence: once its lease has lapsed and its row is gone, the process exits as
    the model's reply comes, and the memory holds nothing of that turn (not even its
    question, which a stale checkpoint written now would put over later turns)."""
    conversation = unique("conversation")
    env = {
        **os.environ,
        "PARLEY_DATA_DIR": str(migrated.data_dir),
        "OPENAI_BASE_URL": migrated.openai_base_url or "",
    }
    if migrated.database_url:
        env["DATABASE_URL"] = migrated.database_url
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PAUSED_PROCESS,
        conversation,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await child.communicate()
    assert child.returncode == EXIT_TAKEN_OVER, output.decode()
    async with open_chat_model(migrated) as model, open_memory(migrated, model) as memory:
        assert [m.text for m in await memory.messages(conversation)] == [
            "one",
            reply_for("one"),
        ]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_lapsed_lease_is_renewed_when_the_row_is_still_ours(
    engine: AsyncEngine, live_pids: list[int]
) -> None:
    cluster = member(engine, live_pids[0])
    await cluster.join()
    cluster._last_beat -= 1000
    assert not cluster.lease_valid()
    await asyncio.gather(*(cluster.ensure_alive() for _ in range(20)))
    assert cluster.lease_valid()
