"""The model client alone: CPU per streamed reply and per piece, as Parley configures it.

A streamed reply costs Parley CPU for every piece the provider sends; this isolates the
client's part (LangChain's ``ChatOpenAI``, the OpenAI SDK and its HTTP transport) from the
rest of a turn. Starts the fake provider, which sends each reply as 50 pieces a few
milliseconds apart (so that, as from a real model, each piece is a read of its own), and
streams ``--replies`` replies, ``--concurrency`` at a time, through two clients in turn:

- **Parley**: ``parley.llm.make_chat_model``, as the service uses it;
- **LangChain's defaults**: ``ChatOpenAI`` on the SDK's default HTTP client (httpx2), with
  LangChain's per-piece timeout, and the same request path as Parley's otherwise.

CPU is this process's own (the provider runs in a child process). Rounds alternate
between the two so that the machine's drift touches both; the median round is reported.

    .venv/bin/python bench/model_client.py [--replies 400] [--concurrency 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from _support import fake_provider
from parley.config import Settings
from parley.llm import UntransformedCompletions, aclose_chat_model, make_chat_model

PIECES = 50
PROMPT = [
    SystemMessage("You are a pirate."),
    HumanMessage("[slow:0.004] " + " ".join(f"w{i}" for i in range(PIECES - 1))),
]


def langchain_defaults(settings: Settings) -> ChatOpenAI:
    model = ChatOpenAI(
        model=settings.model_name,
        api_key="unused",
        base_url=settings.openai_base_url,
        timeout=settings.llm_timeout,
        max_retries=0,
    )
    model.async_client = UntransformedCompletions(model.root_async_client)
    return model


async def one_round(model: ChatOpenAI, replies: int, concurrency: int) -> tuple[float, int]:
    """CPU seconds spent streaming ``replies`` replies, and the pieces they came in."""

    async def reply() -> int:
        return sum([1 async for chunk in model.astream(PROMPT) if chunk.text])

    pieces = 0
    started = time.process_time()
    for _ in range(replies // concurrency):
        pieces += sum(await asyncio.gather(*(reply() for _ in range(concurrency))))
    return time.process_time() - started, pieces


async def measure(
    clients: dict[str, Callable[[Settings], ChatOpenAI]],
    settings: Settings,
    args: argparse.Namespace,
) -> None:
    models = {name: make(settings) for name, make in clients.items()}
    try:
        for model in models.values():  # warm-up: connections, imports, caches
            await one_round(model, args.concurrency, args.concurrency)
        rounds: dict[str, list[tuple[float, int]]] = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                rounds[name].append(await one_round(model, args.replies, args.concurrency))
    finally:
        for model in models.values():
            await aclose_chat_model(model)
    for name, results in rounds.items():
        cpu, pieces = sorted(results)[len(results) // 2]
        per_reply = cpu / args.replies * 1000
        per_piece = cpu / pieces * 1e6
        spread = [f"{c / args.replies * 1000:.2f}" for c, _ in results]
        print(f"{name}:")
        print(f"  {per_reply:.2f} ms CPU per {PIECES}-piece reply, {per_piece:.0f} µs per piece")
        print(f"  rounds: {', '.join(spread)} ms per reply")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with fake_provider() as base_url:
        settings = Settings(openai_base_url=base_url, _env_file=None)  # type: ignore[call-arg]
        print(f"{args.replies} streamed replies of {PIECES} pieces, {args.concurrency} at a time")
        clients = {"Parley": make_chat_model, "LangChain's defaults": langchain_defaults}
        asyncio.run(measure(clients, settings, args))


if __name__ == "__main__":
    main()
