"""What a turn costs in each library Parley is built on, each driven alone as a turn drives it.

A ``POST /chat`` turn passes through the parts the issue prescribes. Here each runs with
nothing of the rest around it, and its CPU per turn is measured, so that their sum is the
least a turn can cost with these libraries, whatever the code around them does:

- **HTTP**: uvicorn (httptools, uvloop) and FastAPI answering a ``POST /chat`` whose body
  Parley's own request model checks, with Parley's reply model; in a child process, whose
  CPU is read with psutil;
- **DBOS**: a workflow of one async step that returns at once, under its own workflow id,
  started and awaited as Parley's turns are, with Parley's DBOS configuration;
- **LangGraph**: Parley's graph and checkpointer (``parley.memory``) with the model
  stubbed out: the checkpoint read, the graph's run and the checkpoint write, in chats
  that each round starts anew and that grow to 20 messages;
- **the model client**: Parley's ``ChatOpenAI`` (``parley.llm.make_chat_model``), one
  reply to a prompt of the system message and a 40-message window, from the fake provider
  answering at once (in a child process);
- **the store**: Parley's two transactions of a turn (``Store.begin_turn`` and
  ``Store.finish_reply``), SQLAlchemy's asyncio layer on asyncpg or aiosqlite.

A last line, not in the sum, runs LangGraph's part with the real model client instead
of the stub: what it costs above the two parts apart is what they cost where they meet
(the model's run inside the graph's, with its callbacks and configuration).

Each part runs ``--turns`` turns, one at a time (the least it costs) and then 50 at a time
(as in the issue's CPU target, where 50 clients chat at once), on uvloop as Parley does. CPU
is this process's, all threads, less its idle rate (DBOS's pollers) over the same time.
Rounds alternate the parts, and the median round of each is reported.

    .venv/bin/python bench/floor.py [--database-url URL] [--turns 500] [--concurrency 1 50]
                                    [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx2
import psutil
import uvicorn
import uvloop
from dbos import DBOS, SetWorkflowID
from fastapi import FastAPI
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage

from _support import add_database_argument, cpu_seconds, fake_provider, free_port, storage
from parley.api.seed import ChatMessage, ChatRequest
from parley.app import dbos_config
from parley.config import Settings
from parley.llm import open_chat_model
from parley.memory import Memory, open_checkpointer
from parley.store import Store, migrate, seed_conversation_id

# A part's turn: (the worker's index, the turn's index) -> done.
Turn = Callable[[int, int], Awaitable[object]]
HTTP = "HTTP: uvicorn and FastAPI"
# Not a part of the sum: two parts together, to show what they cost where they meet.
TOGETHER = "LangGraph and the model client, together"


async def _nothing(text: str) -> str:
    return text


@DBOS.workflow()
async def bare_turn(text: str) -> str:
    return await DBOS.run_step_async({"name": "answer"}, _nothing, text)


class _AnswersAtOnce:
    """The model, for the LangGraph part: no client, no request, just the reply."""

    async def ainvoke(self, prompt: list[AnyMessage]) -> AIMessage:
        return AIMessage("Arr! You said it.")


async def run_turns(turn: Turn, turns: int, concurrency: int, idle_rate: float) -> float:
    """CPU milliseconds per turn of ``turns`` turns, ``concurrency`` at a time."""

    async def worker(index: int) -> None:
        for number in range(turns // concurrency):
            await turn(index, number)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    used = time.process_time() - cpu - idle_rate * (time.perf_counter() - wall)
    return used / turns * 1000


async def chat(body: ChatRequest) -> ChatMessage:
    return ChatMessage(content=body.message, isUser=False)


def http_server(port: int) -> None:
    """The HTTP part's server (run in a child process): FastAPI's answer to a chat POST."""
    app = FastAPI()
    app.post("/chat")(chat)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=75)


@contextlib.asynccontextmanager
async def http_part() -> AsyncIterator[tuple[Turn, Callable[[], float]]]:
    """The HTTP part's turn, and the CPU seconds its server has used."""
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--http-server", str(port)])  # noqa: ASYNC220 (returns at once)
    url = f"http://127.0.0.1:{port}"
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    try:
        async with httpx2.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
            for _ in range(100):
                with contextlib.suppress(httpx2.TransportError):
                    await http.get("/docs")
                    break
                await asyncio.sleep(0.1)

            async def turn(worker: int, number: int) -> None:
                body = {"message": f"turn {number}", "username": f"load-{worker}"}
                (await http.post("/chat", json=body)).raise_for_status()

            yield turn, lambda: cpu_seconds(psutil.Process(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=10)


def window(size: int) -> list[AnyMessage]:
    """A chat's latest ``size`` messages, as the benchmark's chats have them."""
    messages: list[AnyMessage] = []
    for number in range(size // 2):
        messages.append(HumanMessage(f"turn {number}"))
        messages.append(AIMessage(f"Arr! You said: turn {number}"))
    return messages


async def measure(
    settings: Settings, args: argparse.Namespace
) -> dict[int, dict[str, list[float]]]:
    await migrate(settings)
    store = Store.from_settings(settings)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(store.close)
        model = await stack.enter_async_context(open_chat_model(settings))
        checkpointer = await stack.enter_async_context(open_checkpointer(settings))
        memory, memory_with_model = (
            Memory(
                answers,  # type: ignore[arg-type]
                checkpointer,
                system_prompt=settings.system_prompt,
                max_messages=settings.memory_max_messages,
            )
            for answers in (_AnswersAtOnce(), model)
        )
        http_turn, http_cpu = await stack.enter_async_context(http_part())
        DBOS(config=dbos_config(settings))
        DBOS.launch()
        stack.callback(DBOS.destroy)

        prompt = [SystemMessage(settings.system_prompt), *window(settings.memory_max_messages)]
        run = uuid.uuid4().hex[:8]  # the conversations of each round are new

        async def dbos_turn(worker: int, number: int) -> None:
            with SetWorkflowID(f"turn-{uuid.uuid4()}"):
                handle = await DBOS.start_workflow_async(bare_turn, f"turn {number}")
            await handle.get_result()

        async def graph_turn(worker: int, number: int) -> None:
            await memory.reply(f"{run}-{worker}", str(uuid.uuid4()), f"turn {number}")

        async def together_turn(worker: int, number: int) -> None:
            await memory_with_model.reply(f"{run}-m{worker}", str(uuid.uuid4()), f"turn {number}")

        async def model_turn(worker: int, number: int) -> None:
            await model.ainvoke(prompt)

        async def store_turn(worker: int, number: int) -> None:
            owner = f"{run}-{worker}"
            turn_id = f"turn-{uuid.uuid4()}"
            await store.begin_turn(
                owner=owner,
                conversation_id=seed_conversation_id(owner),
                turn_id=turn_id,
                content=f"turn {number}",
                create_conversation=True,
            )
            await store.finish_reply(turn_id, content="Arr! You said it.", status="complete")

        parts: dict[str, Turn] = {
            "DBOS: a workflow of one step": dbos_turn,
            "LangGraph: the graph and its checkpoint": graph_turn,
            "model client: one reply (ChatOpenAI)": model_turn,
            "store: Parley's two transactions": store_turn,
            TOGETHER: together_turn,
        }
        warm_up = max(args.concurrency)
        for turn in [http_turn, *parts.values()]:  # connections, caches, first queries
            await run_turns(turn, warm_up * 2, warm_up, 0.0)
        before = time.process_time()
        await asyncio.sleep(3)
        idle = (time.process_time() - before) / 3

        # results[concurrency][part]: the rounds' CPU milliseconds per turn
        results: dict[int, dict[str, list[float]]] = {}
        for concurrency in args.concurrency:
            found = results[concurrency] = {HTTP: [], **{name: [] for name in parts}}
            for _ in range(args.rounds):
                run = uuid.uuid4().hex[:8]
                served = http_cpu()
                await run_turns(http_turn, args.turns, concurrency, 0.0)
                found[HTTP].append((http_cpu() - served) / args.turns * 1000)
                for name, turn in parts.items():
                    found[name].append(await run_turns(turn, args.turns, concurrency, idle))
    return results


def main() -> None:
    if sys.argv[1:2] == ["--http-server"]:
        http_server(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_database_argument(parser)
    parser.add_argument("--turns", type=int, default=500, help="turns a part, each round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if any(args.turns % concurrency for concurrency in args.concurrency):
        parser.error("--turns must be a multiple of every --concurrency")

    env, storage_name = storage(args.database_url)
    print(f"storage: {storage_name}; {args.turns} turns a part, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as data_dir, fake_provider() as base_url:
        settings = Settings(
            data_dir=Path(data_dir),
            database_url=env.get("PARLEY_DATABASE_URL"),
            openai_base_url=base_url,
            log_level="warning",
            _env_file=None,  # type: ignore[call-arg]
        )
        # On uvloop, as Parley runs under uvicorn.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(measure(settings, args))
    for concurrency, parts in results.items():
        print(f"\n{concurrency} at a time: CPU per turn (median round; the rounds)")
        total = 0.0
        for name, rounds in parts.items():
            median = statistics.median(rounds)
            spread = ", ".join(f"{value:.2f}" for value in rounds)
            line = f"  {name:42} {median:6.2f} ms  ({spread})"
            if name == TOGETHER:
                together = line
            else:
                total += median
                print(line)
        print(f"  {'in all':42} {total:6.2f} ms  (the issue's target for a whole turn: 5 ms)")
        print(together)


if __name__ == "__main__":
    main()
