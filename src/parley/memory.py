"""Conversation memory: a one-node LangGraph graph with a database checkpointer.

Each conversation is one checkpointer thread. Messages carry ids derived from the turn
id, so asking again for a turn that the graph already answered (a DBOS step re-run after
a crash) replaces rather than appends, and does not call the model a second time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
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
from langgraph.graph.state import CompiledStateGraph

from parley.config import Settings

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


# The sink of the turn being answered. A context variable rather than graph config, so
# that it never reaches the checkpointer (which stores config values with checkpoints).
_sink: ContextVar[ReplySink | None] = ContextVar("parley_reply_sink", default=None)


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
        async def call_model(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
            reply_id = reply_message_id(config["configurable"]["turn_id"])
            sink = _sink.get()
            if state["messages"] and state["messages"][-1].id == reply_id:
                # Answered by an earlier run (a crash, or a failure to store the reply,
                # came after the model finished): the checkpoint holds the reply, so the
                # model is not asked again. This run's stream opened with a reset, so it
                # gets the remembered text, or its readers would be left with none.
                if sink is not None and (remembered := state["messages"][-1].text):
                    await sink.token(remembered)
                return {}
            window = self._window(state["messages"])
            prompt = [SystemMessage(self.system_prompt), *window]
            # Memory keeps what the model will be shown next time and nothing older (the
            # visible history is in Parley's own tables), so that a checkpoint, read and
            # written whole on every turn, stays the same size however long the chat.
            shown = {message.id for message in window}
            forgotten = [
                RemoveMessage(id=message.id)
                for message in state["messages"]
                if message.id not in shown and message.id is not None
            ]
            if sink is None:
                text = (await self.model.ainvoke(prompt)).text
                await self._guard()
                return {"messages": [*forgotten, AIMessage(content=text, id=reply_id)]}
            parts: list[str] = []
            stopped = False
            async for chunk in self.model.astream(prompt):
                if sink.stopped:
                    # Leaving the loop closes the provider's stream, ending its generation.
                    stopped = True
                    break
                if piece := chunk.text:
                    parts.append(piece)
                    await sink.token(piece)
            if stopped and not parts:
                return {}
            await self._guard()
            # What the user saw is what the model remembers, a stopped reply included.
            return {
                "messages": [
                    *forgotten,
                    AIMessage(
                        content="".join(parts),
                        id=reply_id,
                        response_metadata={"stopped": stopped},
                    ),
                ]
            }

        builder = StateGraph(MessagesState)
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
        self, conversation_id: str, turn_id: str, text: str, sink: ReplySink | None = None
    ) -> Reply:
        """The model's answer to ``text`` in this conversation, remembered with it.

        With a ``sink``, the answer is streamed into it and stops when it says so.
        """
        token = _sink.set(sink)
        try:
            result = await self.graph.ainvoke(
                {"messages": [HumanMessage(text, id=user_message_id(turn_id))]},
                self._config(conversation_id, turn_id),
                # One checkpoint write, when the graph is done: the DBOS step around this
                # call is what makes the turn durable, and a re-run recomputes a lost run.
                durability="exit",
            )
        finally:
            _sink.reset(token)
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
        if removals:
            await self.graph.aupdate_state(config, {"messages": removals}, as_node="model")

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
