"""Conversation memory: a one-node LangGraph graph with a database checkpointer.

Each conversation is one checkpointer thread. Messages carry ids derived from the turn
id, so asking again for a turn that the graph already answered (a DBOS step re-run after
a crash) replaces rather than appends, and does not call the model a second time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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


def user_message_id(turn_id: str) -> str:
    return f"{turn_id}:user"


def reply_message_id(turn_id: str) -> str:
    return f"{turn_id}:assistant"


class Memory:
    def __init__(
        self,
        model: BaseChatModel,
        checkpointer: BaseCheckpointSaver[Any],
        *,
        system_prompt: str,
        max_messages: int,
    ) -> None:
        self.model = model
        self.system_prompt = system_prompt
        self.max_messages = max_messages
        self.graph = self._build(checkpointer)

    def _build(self, checkpointer: BaseCheckpointSaver[Any]) -> CompiledStateGraph[Any]:
        async def call_model(state: MessagesState, config: RunnableConfig) -> dict[str, Any]:
            reply_id = reply_message_id(config["configurable"]["turn_id"])
            if state["messages"] and state["messages"][-1].id == reply_id:
                return {}  # answered before a crash: the checkpoint already holds the reply
            response = await self.model.ainvoke(
                [SystemMessage(self.system_prompt), *self._window(state["messages"])]
            )
            return {"messages": [AIMessage(content=response.text, id=reply_id)]}

        builder = StateGraph(MessagesState)
        builder.add_node("model", call_model)
        builder.add_edge(START, "model")
        return builder.compile(checkpointer=checkpointer)

    def _window(self, messages: list[AnyMessage]) -> list[AnyMessage]:
        """The latest messages, starting on a user message, that the model is shown."""
        return trim_messages(
            messages,
            max_tokens=self.max_messages,
            token_counter=len,
            strategy="last",
            start_on="human",
        )

    @staticmethod
    def _config(conversation_id: str, turn_id: str) -> RunnableConfig:
        return {"configurable": {"thread_id": conversation_id, "turn_id": turn_id}}

    async def reply(self, conversation_id: str, turn_id: str, text: str) -> str:
        """The model's answer to ``text`` in this conversation, remembered with it."""
        result = await self.graph.ainvoke(
            {"messages": [HumanMessage(text, id=user_message_id(turn_id))]},
            self._config(conversation_id, turn_id),
        )
        return result["messages"][-1].text

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


@asynccontextmanager
async def open_checkpointer(settings: Settings) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    if settings.uses_postgres:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg import AsyncConnection
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        conninfo = settings.memory_database
        async with await AsyncConnection.connect(conninfo, autocommit=True) as conn:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {POSTGRES_SCHEMA}")
        # A pool, not the saver's single connection: hundreds of turns read and write
        # checkpoints at once.
        async with AsyncConnectionPool(
            conninfo,
            min_size=2,
            max_size=20,
            open=False,
            kwargs={
                "autocommit": True,
                "prepare_threshold": 0,
                "row_factory": dict_row,
                "options": f"-c search_path={POSTGRES_SCHEMA}",
            },
        ) as pool:
            saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
            await saver.setup()
            yield saver
    else:
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        async with AsyncSqliteSaver.from_conn_string(settings.memory_database) as saver:
            await saver.setup()
            yield saver


@asynccontextmanager
async def open_memory(settings: Settings, model: BaseChatModel) -> AsyncIterator[Memory]:
    async with open_checkpointer(settings) as checkpointer:
        yield Memory(
            model,
            checkpointer,
            system_prompt=settings.system_prompt,
            max_messages=settings.memory_max_messages,
        )
