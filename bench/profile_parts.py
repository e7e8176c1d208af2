"""Where Parley's CPU goes, from a py-spy profile: each sample counted once, under a part.

Record Parley (its process id is the ``parley serve`` child of a benchmark) while a
benchmark runs, with py-spy (not one of Parley's dependencies: ``.venv/bin/pip install
py-spy``), then read the raw profile:

    .venv/bin/py-spy record --pid PID --duration 20 --rate 200 --gil --format raw -o turn.txt
    .venv/bin/python bench/profile_parts.py turn.txt [--per-turn-ms 31.0] [--show PART]

Each sample goes to the innermost library its stack is in. SQLAlchemy and psycopg count
as DBOS in a worker thread (DBOS runs its synchronous engine there), and on the event
loop as Parley's store (SQLAlchemy, asyncpg) or the LangGraph checkpoint (psycopg).
``--per-turn-ms`` (the benchmark's CPU per turn) turns shares into milliseconds;
``--show`` lists the functions a part's samples were in.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_FRAME_FILE = re.compile(r"\(([^()]*?)(?::\d+)?\)$")

# Innermost first: the first prefix a frame's file matches names its part.
_PARTS = [
    (("asyncpg/",), "store: asyncpg"),
    (("langgraph/checkpoint",), "checkpoint: saver"),
    (("parley/store",), "store: Parley's code"),
    (("langgraph/", "pregel/"), "graph (LangGraph)"),
    (
        ("langchain", "openai/", "aiohttp/", "multidict", "yarl", "jiter"),
        "model client (LangChain, OpenAI SDK, aiohttp)",
    ),
    (("uvicorn/", "fastapi/", "starlette/", "httptools", "h11", "anyio/"), "HTTP"),
    (("pydantic",), "pydantic (not otherwise placed)"),
    (("parley/",), "Parley's code"),
    (("psutil",), "usage sampler"),
]


def part_of(stack: str) -> str:
    in_thread = "Thread._bootstrap" in stack
    for frame in reversed(stack.split(";")):
        match = _FRAME_FILE.search(frame)
        path = match.group(1) if match else ""
        if path.startswith(("sqlalchemy/", "greenlet")):
            return "DBOS (worker threads)" if in_thread else "store: SQLAlchemy"
        if path.startswith("psycopg"):
            return "DBOS (worker threads)" if in_thread else "checkpoint: psycopg"
        if path.startswith("dbos/"):
            return "DBOS (worker threads)" if in_thread else "DBOS (event loop)"
        for prefixes, part in _PARTS:
            if path.startswith(prefixes):
                return part
    return "other threads" if in_thread else "event loop and the rest"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="py-spy's raw output (--format raw)")
    parser.add_argument("--per-turn-ms", type=float, help="the benchmark's CPU per turn")
    parser.add_argument("--show", metavar="PART", help="list the functions of one part")
    args = parser.parse_args()

    parts: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    with open(args.profile) as lines:
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            samples = int(count)
            part = part_of(stack)
            parts[part] += samples
            if part == args.show:
                functions[stack.split(";")[-1]] += samples
    total = sum(parts.values())
    for part, samples in parts.most_common():
        share = samples / total
        ms = f"{share * args.per_turn_ms:6.1f} ms" if args.per_turn_ms else ""
        print(f"{share:6.1%} {ms}  {part}")
    for function, samples in functions.most_common(25):
        print(f"    {samples / total:6.2%}  {function}")


if __name__ == "__main__":
    main()
