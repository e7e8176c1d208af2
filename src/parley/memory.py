"""Conversation memory: a one-node LangGraph graph with a database checkpointer.

Each conversation is one checkpointer thread. A turn hands the graph what the model is
to be shown: the messages of the turn's branch before it (read from Parley's tables,
where edits and regenerated replies make branches) and the user message it answers. The
node shows the model that window and remembers it with the reply, in place of whatever
the thread held before, so the model only ever sees the branch the turn is on.

Messages carry ids derived from turn ids, so asking again for a turn that the graph
already answered (a DBOS step re-run after a crash) finds its reply in the checkpoint
and does not call the model a second time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AnyMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    trim_messages,
)
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.graph.message import REMOVE_ALL_MESSAGES
from langgraph.graph.state import CompiledStateGraph

from parley.config import Settings
from parley.store import Said

# LangGraph's tables on PostgreSQL live in a schema of their own, apart from ours and DBOS's.
POSTGRES_SCHEMA = "langgraph"
# Any fixed number, apart from the migrations' own.
_SETUP_LOCK_ID = 7_305_214_882


class ReplySink(Protocol):
    """Where a streamed reply's pieces go as the model writes them."""

    async def token(self, text: str) -> None: ...

    @property
    def stopped(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Reply:
    text: str
    stopped: bool = False


@dataclass(frozen=True, slots=True)
class _Asking:
    """How the turn being answered asks: where its pieces go, which model, with which
    instructions (None: the memory's own)."""

    sink: ReplySink | None
    model: BaseChatModel | None
    system_prompt: str | None


# The turn being answered. A context variable rather than graph config, so that none of
# it reaches the checkpointer (which stores config values with checkpoints).
_asking: ContextVar[_Asking | None] = ContextVar("parley_asking", default=None)


class TurnState(MessagesState):
    # What the turn shows the model: its branch's messages and the one it answers. Handed
    # in by each run, and emptied by the node, so the checkpoint keeps one copy.
    prompt: list[AnyMessage]


def shown(messages: Sequence[Said]) -> list[AnyMessage]:
    """Messages of a branch as the model is shown them, with their turns' ids."""
    return [
        HumanMessage(m.content, id=user_message_id(m.turn_id))
        if m.role == "user"
        else AIMessage(m.content, id=reply_message_id(m.turn_id))
        for m in messages
    ]


def user_message_id(turn_id: str) -> str:
    return f"{turn_id}:user"


def reply_message_id(turn_id: str) -> str:
    return f"{turn_id}:assistant"


def _count(messages: list[AnyMessage]) -> int:
    """The window's size in messages. A function rather than ``len``: ``trim_messages``
    inspects its counter's signature on every call, and a builtin's costs it 0.2 ms."""
    return len(messages)


class Memory:
    def __init__(
        self,
        model: BaseChatModel,
        checkpointer: BaseCheckpointSaver[Any],
        *,
        system_prompt: str,
        max_messages: int,
        guard: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.model = model
        # Awaited before the graph writes a reply to its checkpoint: returns while this
        # process may still write its turns (``parley.cluster``), so that a process whose
        # turns were taken over while it was paused never overwrites the memory written
        # by the process that took them.
        self.guard = guard
        self.system_prompt = system_prompt
        self.max_messages = max_messages
        self.checkpointer = checkpointer
        self.graph = self._build(checkpointer)

    def _build(self, checkpointer: BaseCheckpointSaver[Any]) -> CompiledStateGraph[Any]:
        async def call_model(state: TurnState, config: RunnableConfig) -> dict[str, Any]:
            reply_id = reply_message_id(config["configurable"]["turn_id"])
            asking = _asking.get() or _Asking(None, None, None)
            sink = asking.sink
            if state["messages"] and state["messages"][-1].id == reply_id:
                # Answered by an earlier run (a crash, or a failure to store the reply,
                # came after the model finished): the checkpoint holds the reply, so the
                # model is not asked again. This run's stream opened with a reset, so it
                # gets the remembered text, or its readers would be left with none.
                if sink is not None and (remembered := state["messages"][-1].text):
                    await sink.token(remembered)
                return {"prompt": []}
            window = self._window(state.get("prompt") or [])
            model = asking.model or self.model
            prompt = [SystemMessage(asking.system_prompt or self.system_prompt), *window]
            # Memory keeps what the model was shown and its reply, in place of what it
            # held (the visible history is in Parley's own tables), so that a checkpoint,
            # read and written whole on every turn, stays the same size however long the
            # chat, and holds nothing of another branch.
            forgotten = RemoveMessage(id=REMOVE_ALL_MESSAGES)
            if sink is None:
                text = (await model.ainvoke(prompt)).text
                await self._guard()
                return {
                    "messages": [forgotten, *window, AIMessage(content=text, id=reply_id)],
                    "prompt": [],
                }
            parts: list[str] = []
            stopped = False
            async for chunk in model.astream(prompt):
                if sink.stopped:
                    # Leaving the loop closes the provider's stream, ending its generation.
                    stopped = True
                    break
                if piece := chunk.text:
                    parts.append(piece)
                    await sink.token(piece)
            if stopped and not parts:
                return {"messages": [forgotten, *window], "prompt": []}
            await self._guard()
            # What the user saw is what the model remembers, a stopped reply included.
            return {
                "messages": [
                    forgotten,
                    *window,
                    AIMessage(
                        content="".join(parts),
                        id=reply_id,
                        response_metadata={"stopped": stopped},
                    ),
                ],
                "prompt": [],
            }

        builder = StateGraph(TurnState)
        builder.add_node("model", call_model)
        builder.add_edge(START, "model")
        return builder.compile(checkpointer=checkpointer)

    async def _guard(self) -> None:
        if self.guard is not None:
            await self.guard()

    def _window(self, messages: list[AnyMessage]) -> list[AnyMessage]:
        """The latest messages, starting on a user message, that the model is shown."""
        return trim_messages(
            messages,
            max_tokens=self.max_messages,
            token_counter=_count,
            strategy="last",
            start_on="human",
        )

    @staticmethod
    def _config(conversation_id: str, turn_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": conversation_id, "turn_id": turn_id}}

    async def reply(
        self,
        conversation_id: str,
        turn_id: str,
        text: str,
        *,
        history: Sequence[AnyMessage] = (),
        asked_in: str | None = None,
        sink: ReplySink | None = None,
        model: BaseChatModel | None = None,
        system_prompt: str | None = None,
    ) -> Reply:
        """The model's answer to ``text`` after ``history`` (the messages before it on
        the turn's branch, oldest first; see ``shown``), remembered with them.

        ``asked_in``: the turn that stored ``text`` when it is not this one (a
        regenerated reply answers an earlier turn's message). With a ``sink``, the answer
        is streamed into it and stops when it says so. ``model`` and ``system_prompt``
        replace the memory's own for this turn.
        """
        question = HumanMessage(text, id=user_message_id(asked_in or turn_id))
        token = _asking.set(_Asking(sink, model, system_prompt))
        try:
            result = await self.graph.ainvoke(
                {"prompt": [*history, question]},
                self._config(conversation_id, turn_id),
                # One checkpoint write, when the graph is done: the DBOS step around this
                # call is what makes the turn durable, and a re-run recomputes a lost run.
                durability="exit",
            )
        finally:
            _asking.reset(token)
        if not result["messages"]:
            return Reply("", stopped=True)
        last = result["messages"][-1]
        if last.id != reply_message_id(turn_id):
            return Reply("", stopped=True)  # stopped before the model wrote anything
        return Reply(last.text, stopped=bool(last.response_metadata.get("stopped")))

    async def reply_so_far(self, conversation_id: str, turn_id: str) -> str:
        """This turn's reply as the model's memory holds it ("" when there is none)."""
        for message in reversed(await self.messages(conversation_id)):
            if message.id == reply_message_id(turn_id):
                return message.text
        return ""

    async def delete(self, conversation_id: str) -> None:
        """Forget a conversation entirely."""
        await self.checkpointer.adelete_thread(conversation_id)

    async def forget(self, conversation_id: str, turn_id: str) -> None:
        """Drop a failed turn's user message, so the next turn does not see it unanswered."""
        config = self._config(conversation_id, turn_id)
        state = await self.graph.aget_state(config)
        ids = {message.id for message in state.values.get("messages", [])}
        removals = [
            RemoveMessage(id=message_id)
            for message_id in (user_message_id(turn_id), reply_message_id(turn_id))
            if message_id in ids
        ]
        # What it was to be shown (the node empties it once it has run) goes as well.
        prompt = state.values.get("prompt") or []
        if removals or prompt:
            await self.graph.aupdate_state(
                config, {"messages": removals, "prompt": []}, as_node="model"
            )

    async def messages(self, conversation_id: str) -> list[AnyMessage]:
        state = await self.graph.aget_state({"configurable": {"thread_id": conversation_id}})
        return list(state.values.get("messages", []))


async def _try_lock(conn: Any) -> bool:
    row = await (
        await conn.execute("SELECT pg_try_advisory_lock(%s)", (_SETUP_LOCK_ID,))
    ).fetchone()
    return bool(row and row[0])


@asynccontextmanager
async def open_checkpointer(settings: Settings) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    if settings.uses_postgres:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg import AsyncConnection
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        conninfo = settings.memory_database
        # A pool, not the saver's single connection: hundreds of turns read and write
        # checkpoints at once.
        statement_ms = round(settings.db_statement_timeout * 1000)
        async with AsyncConnectionPool(
            conninfo,
            min_size=2,
            max_size=settings.pool_sizes.memory,
            open=False,
            timeout=settings.db_timeout,
            kwargs={
                "autocommit": True,
                "prepare_threshold": 0,
                "row_factory": dict_row,
                "connect_timeout": max(1, round(settings.db_timeout)),
                "application_name": "parley-memory",
                "options": f"-c search_path={POSTGRES_SCHEMA} -c statement_timeout={statement_ms}",
            },
        ) as pool:
            saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
            async with await AsyncConnection.connect(conninfo, autocommit=True) as conn:
                # The saver's set-up is not safe to run twice at once: processes starting
                # together take turns (the lock goes with this connection). Asked for
                # again and again rather than waited for: a statement waiting on the lock
                # is a transaction, which the set-up's CREATE INDEX CONCURRENTLY would
                # wait for in turn.
                while not await _try_lock(conn):  # noqa: ASYNC110 (a lock in another process)
                    await asyncio.sleep(0.1)
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {POSTGRES_SCHEMA}")
                await saver.setup()
            yield saver
    else:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        async with AsyncSqliteSaver.from_conn_string(settings.memory_database) as saver:
            await saver.setup()
            yield saver


@asynccontextmanager
async def open_memory(
    settings: Settings,
    model: BaseChatModel,
    guard: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[Memory]:
    async with open_checkpointer(settings) as checkpointer:
        yield Memory(
            model,
            checkpointer,
            system_prompt=settings.system_prompt,
            max_messages=settings.memory_max_messages,
            guard=guard,
        )
