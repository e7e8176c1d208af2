"""The store's and the memory's writes are idempotent on the turn id: a step re-run
after a crash stores nothing twice and does not ask the model again."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from sqlalchemy.ext.asyncio import create_async_engine

from parley.config import Settings
from parley.llm import open_chat_model
from parley.memory import open_memory
from parley.store import (
    ConversationBusy,
    ConversationNotFound,
    ReplyFlags,
    Store,
    ensure_postgres_database,
    is_transient,
    messages,
    migrate,
    seed_conversation_id,
)
from tests.conftest import BACKENDS, unique
from tests.fake_provider import FakeProvider, reply_for


@pytest.fixture
async def settings(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, provider: FakeProvider
) -> Settings:
    database_url = None
    if backend == "postgres":
        database_url = request.getfixturevalue("postgres_databases").new_url()
        await ensure_postgres_database(database_url)
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        openai_base_url=provider.base_url,
        _env_file=None,
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    await migrate(settings)
    chat_store = Store.from_settings(settings)
    yield chat_store
    await chat_store.close()


pytestmark = pytest.mark.parametrize("backend", BACKENDS)


async def test_writing_a_turn_twice_stores_it_once(store: Store) -> None:
    owner = unique()
    conversation = seed_conversation_id(owner)
    for attempt in range(2):
        new = await store.begin_turn(
            owner=owner,
            conversation_id=conversation,
            turn_id="t1",
            content="hi",
            create_conversation=True,
        )
        assert new is (attempt == 0)
        await store.finish_reply("t1", content="ahoy", status="complete")
    stored = await store.messages(conversation, limit=10)
    assert [(m.role, m.content, m.status) for m in stored] == [
        ("user", "hi", "complete"),
        ("assistant", "ahoy", "complete"),
    ]
    # The first message names the conversation.
    (listed,) = await store.conversations(owner, limit=10)
    assert listed.title == "hi"


async def test_one_reply_at_a_time_per_conversation(store: Store) -> None:
    owner = unique()
    conversation = (await store.create_conversation(owner)).id
    await store.begin_turn(owner=owner, conversation_id=conversation, turn_id="a", content="1")
    with pytest.raises(ConversationBusy) as busy:
        await store.begin_turn(owner=owner, conversation_id=conversation, turn_id="b", content="2")
    assert busy.value.turn_id == "a"
    # Nothing of the refused turn was stored; the running one may begin again harmlessly.
    await store.begin_turn(owner=owner, conversation_id=conversation, turn_id="a", content="1")
    assert [m.turn_id for m in await store.messages(conversation, limit=10)] == ["a", "a"]
    await store.finish_reply("a", content="done", status="complete")
    await store.begin_turn(owner=owner, conversation_id=conversation, turn_id="b", content="2")
    assert len(await store.messages(conversation, limit=10)) == 4


async def test_a_conversation_is_only_its_owners(store: Store) -> None:
    owner, other = unique(), unique()
    conversation = (await store.create_conversation(owner, "Mine")).id
    with pytest.raises(ConversationNotFound):
        await store.begin_turn(owner=other, conversation_id=conversation, turn_id="x", content="hi")
    with pytest.raises(ConversationNotFound):
        await store.conversation(other, conversation)
    with pytest.raises(ConversationNotFound):
        await store.update_conversation(other, conversation, title="Theirs")
    with pytest.raises(ConversationNotFound):
        await store.delete_conversation(other, conversation)
    assert (await store.conversation(owner, conversation)).title == "Mine"
    assert await store.messages(conversation, limit=10) == []


async def test_model_runs_count_epochs_and_see_what_other_processes_ask(store: Store) -> None:
    owner = unique()
    conversation = (await store.create_conversation(owner)).id
    await store.begin_turn(owner=owner, conversation_id=conversation, turn_id="t", content="hi")
    assert (await store.start_model_run("t")).epoch == 1
    assert await store.reply_flags(["t", "gone"]) == ReplyFlags(stopped={"gone"}, followed=set())
    await store.follow_elsewhere("t")
    assert (await store.reply_flags(["t"])).followed == {"t"}
    await store.request_stop("t")
    started = await store.start_model_run("t")
    assert (started.epoch, started.stop_requested) == (2, True)
    stopped = await store.finish_reply("t", content="", status="stopped")
    assert stopped is not None and (stopped.epochs, stopped.status) == (2, "stopped")
    await store.delete_conversation(owner, conversation)
    assert (await store.reply_flags(["t"])).stopped == {"t"}  # a deleted turn is stopped too
    assert await store.finish_reply("t", content="late", status="complete") is None


async def test_message_pages_walk_back_in_time(store: Store) -> None:
    owner = unique()
    conversation = (await store.create_conversation(owner)).id
    for index in range(5):
        turn = f"p{index}"
        await store.begin_turn(
            owner=owner, conversation_id=conversation, turn_id=turn, content=str(index)
        )
        await store.finish_reply(turn, content=f"r{index}", status="complete")
    latest = await store.messages(conversation, limit=4)
    assert [m.content for m in latest] == ["3", "r3", "4", "r4"]
    earlier = await store.messages(conversation, limit=4, before=latest[0].id)
    assert [m.content for m in earlier] == ["1", "r1", "2", "r2"]


async def test_history_reads_use_the_conversation_index(store: Store) -> None:
    query = (
        sa.select(messages.c.content)
        .where(messages.c.conversation_id == "x")
        .order_by(messages.c.id)
    )
    async with store.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            compiled = query.compile(conn.sync_engine, compile_kwargs={"literal_binds": True})
            plan = (await conn.execute(sa.text(f"EXPLAIN QUERY PLAN {compiled}"))).all()
            assert "ix_messages_conversation_id" in str(plan)
        else:
            await conn.execute(sa.text("SET enable_seqscan = off"))
            compiled = query.compile(conn.sync_engine, compile_kwargs={"literal_binds": True})
            plan = (await conn.execute(sa.text(f"EXPLAIN {compiled}"))).all()
            assert "ix_messages_conversation_id" in str(plan)


async def test_migrating_twice_is_harmless(settings: Settings, store: Store) -> None:
    await migrate(settings)
    assert await store.history_json("none") == b"[]"


async def test_a_pool_with_no_free_connection_is_a_transient_error(
    settings: Settings, store: Store
) -> None:
    """Overload (every pooled connection busy) is retried in steps and answered 503."""
    engine = create_async_engine(
        settings.store_database_url(), pool_size=1, max_overflow=0, pool_timeout=0.1
    )
    busy = Store(engine)
    try:
        async with engine.connect():
            with pytest.raises(sa.exc.TimeoutError) as raised:
                await busy.history_json("any")
        assert is_transient(raised.value)
        assert await busy.history_json("any") == b"[]"  # and it passes
    finally:
        await engine.dispose()


async def test_history_json_is_the_examples_list_oldest_first(store: Store) -> None:
    owner = unique()
    conversation = seed_conversation_id(owner)
    tricky = 'quotes " and \\ backslash,\nnew line, </script>, ünïcödé 🦜'
    for index, text in enumerate(["first", tricky, "third"]):
        turn = f"{owner}-{index}"
        await store.begin_turn(
            owner=owner,
            conversation_id=conversation,
            turn_id=turn,
            content=text,
            create_conversation=True,
        )
        # The last reply stays empty (being written): /history leaves it out.
        if index < 2:
            await store.finish_reply(turn, content=f"re: {text}", status="complete")
    assert json.loads(await store.history_json(conversation)) == [
        {"content": "first", "isUser": True},
        {"content": "re: first", "isUser": False},
        {"content": tricky, "isUser": True},
        {"content": f"re: {tricky}", "isUser": False},
        {"content": "third", "isUser": True},
    ]


async def test_answering_a_turn_twice_asks_the_model_once(
    settings: Settings, provider: FakeProvider
) -> None:
    question = unique("question")
    async with open_chat_model(settings) as model, open_memory(settings, model) as memory:
        first = await memory.reply("conv", "turn-1", question)
        again = await memory.reply("conv", "turn-1", question)
        remembered = await memory.messages("conv")
    assert first.text == again.text == reply_for(question)
    assert len(provider.calls_for(question)) == 1
    assert [(m.type, m.text) for m in remembered] == [
        ("human", question),
        ("ai", reply_for(question)),
    ]


async def test_forgetting_a_failed_turn_leaves_the_rest(
    settings: Settings, provider: FakeProvider
) -> None:
    kept, failed = unique("kept"), unique("[fail:400] failed")
    async with open_chat_model(settings) as model, open_memory(settings, model) as memory:
        first = await memory.reply("conv", "turn-1", kept)
        asked = [HumanMessage(kept, id="turn-1:user"), AIMessage(first.text, id="turn-1:assistant")]
        with pytest.raises(Exception, match="400"):
            await memory.reply("conv", "turn-2", failed, history=asked)
        await memory.forget("conv", "turn-2")
        await memory.forget("conv", "turn-2")  # nothing left to forget: no error
        remembered = await memory.messages("conv")
        state = await memory.graph.aget_state({"configurable": {"thread_id": "conv"}})
    assert [m.text for m in remembered] == [kept, reply_for(kept)]
    # Nothing of the failed turn is kept anywhere in the conversation's state.
    assert failed not in repr(state.values)


async def test_the_model_sees_and_memory_keeps_a_bounded_window(
    settings: Settings, provider: FakeProvider
) -> None:
    settings.memory_max_messages = 4
    async with open_chat_model(settings) as model, open_memory(settings, model) as memory:
        texts = [unique(f"m{i}") for i in range(5)]
        history: list[AnyMessage] = []
        for index, text in enumerate(texts):
            reply = await memory.reply("conv", f"turn-{index}", text, history=history)
            history += [
                HumanMessage(text, id=f"turn-{index}:user"),
                AIMessage(reply.text, id=f"turn-{index}:assistant"),
            ]
        remembered = [m.text for m in await memory.messages("conv")]
    (call,) = provider.calls_for(texts[-1])
    shown = [m["content"] for m in call.messages]
    assert shown[0].startswith("You talk like a pirate")
    # The last four messages, less the reply that would open the window.
    assert shown[1:] == [texts[3], reply_for(texts[3]), texts[4]]
    # Older turns are gone from memory (not from history): the checkpoint stays small.
    assert remembered == [texts[3], reply_for(texts[3]), texts[4], reply_for(texts[4])]


class StopAfter:
    """A sink that keeps the pieces it is given and asks to stop after some of them."""

    def __init__(self, pieces: int) -> None:
        self.limit = pieces
        self.pieces: list[str] = []

    async def token(self, text: str) -> None:
        self.pieces.append(text)

    @property
    def stopped(self) -> bool:
        return len(self.pieces) >= self.limit


async def test_a_streamed_turn_answered_again_gives_its_sink_the_remembered_reply(
    settings: Settings, provider: FakeProvider
) -> None:
    """A step's second run streams the reply the checkpoint holds, without the model."""
    question = unique("question")
    first, again = StopAfter(1000), StopAfter(1000)
    async with open_chat_model(settings) as model, open_memory(settings, model) as memory:
        await memory.reply("conv", "turn-1", question, sink=first)
        reply = await memory.reply("conv", "turn-1", question, sink=again)
    assert "".join(first.pieces) == reply.text == reply_for(question)
    assert again.pieces == [reply_for(question)]
    assert len(provider.calls_for(question)) == 1


async def test_a_stopped_reply_is_remembered_as_far_as_it_went(
    settings: Settings, provider: FakeProvider
) -> None:
    question = unique("tell me a long tale")
    sink = StopAfter(3)
    async with open_chat_model(settings) as model, open_memory(settings, model) as memory:
        reply = await memory.reply("conv", "turn-1", question, sink=sink)
        remembered = await memory.messages("conv")
        so_far = await memory.reply_so_far("conv", "turn-1")
    assert reply.stopped
    assert reply.text == "".join(sink.pieces) == "Arr! You said:"
    assert reply_for(question).startswith(reply.text)
    assert [m.text for m in remembered] == [question, reply.text]
    assert so_far == reply.text
    (call,) = provider.calls_for(question)
    assert call.stream


async def test_a_finished_reply_is_never_overwritten(store: Store) -> None:
    """A reply failed as an orphan, or finished by an earlier run of the step, stays as
    it is when a late run finishes it again."""
    owner = unique()
    conversation = (await store.create_conversation(owner)).id
    await store.begin_turn(owner=owner, conversation_id=conversation, turn_id="o", content="1")
    await store.fail_orphan("o", "The turn was interrupted.")
    late = await store.finish_reply("o", content="too late", status="complete")
    assert late is not None
    assert (late.status, late.content, late.error) == ("failed", "", "The turn was interrupted.")
    await store.begin_turn(owner=owner, conversation_id=conversation, turn_id="p", content="2")
    await store.finish_reply("p", content="first", status="complete")
    again = await store.finish_reply("p", content="second", status="stopped")
    assert again is not None and (again.status, again.content) == ("complete", "first")


async def test_a_turn_that_cannot_start_is_failed_and_ends_its_readers(
    store: Store, settings: Settings
) -> None:
    """No DBOS runs in this process, so starting the workflow fails: the reply must not
    stay "being written", nor its readers wait for ever."""
    from parley import streams, turns
    from parley.usage import UsageMeter

    async def alive() -> None:
        return None

    turns.install(
        turns.Services(
            store=store,
            memory=None,  # type: ignore[arg-type]
            usage=UsageMeter(),
            settings=settings,
            models=None,  # type: ignore[arg-type]
            alive=alive,
        )
    )
    try:
        owner = unique()
        conversation = (await store.create_conversation(owner)).id
        await store.begin_turn(owner=owner, conversation_id=conversation, turn_id="s", content="1")
        streams.expect("s")
        live = streams.live_turn("s")
        assert live is not None
        with pytest.raises(Exception):  # noqa: B017 (whatever DBOS raises)
            await turns._start_workflow("s", conversation, True, owner=owner, new=True)
        assert live.events and live.events[-1].type == "error"
        assert streams.live_turn("s") is None
        reply = await store.message("s", "assistant")
        assert reply is not None and reply.status == "failed"
    finally:
        turns.install(None)


async def test_queue_rounds_go_round_robin_over_users(store: Store) -> None:
    """A user's unfinished turns take rounds 1, 2, 3...; another user joins the lowest
    round still unfinished; a finished turn's round frees the ones after it."""
    heavy, light = unique("heavy"), unique("light")

    async def queued(owner: str, turn_id: str) -> int:
        conversation = str(uuid.uuid4())
        await store.begin_turn(
            owner=owner,
            conversation_id=conversation,
            turn_id=turn_id,
            content="hi",
            create_conversation=True,
        )
        return await store.queue_round(turn_id, owner)

    assert [await queued(heavy, f"h{i}") for i in range(4)] == [1, 2, 3, 4]
    assert await queued(light, "l1") == 1
    assert await queued(light, "l2") == 2
    # The heavy user's first two are answered: the lowest unfinished round is now 1 (the
    # light user's), then 3 once that is answered too.
    await store.finish_reply("h0", content="a", status="complete")
    await store.finish_reply("h1", content="a", status="complete")
    assert await queued(heavy, "h5") == 5
    await store.finish_reply("l1", content="a", status="complete")
    await store.finish_reply("l2", content="a", status="complete")
    newcomer = unique("newcomer")
    assert await queued(newcomer, "n1") == 3  # joins the round being served


async def test_one_owners_turns_queued_at_once_get_rounds_of_their_own(store: Store) -> None:
    owner = unique("burst")
    turn_ids = [f"{owner}-{i}" for i in range(12)]
    for turn_id in turn_ids:
        await store.begin_turn(
            owner=owner,
            conversation_id=str(uuid.uuid4()),
            turn_id=turn_id,
            content="hi",
            create_conversation=True,
        )
    rounds = await asyncio.gather(*(store.queue_round(t, owner) for t in turn_ids))
    assert sorted(rounds) == list(range(1, 13))
