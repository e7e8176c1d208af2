"""Generation speed of the embedded model: through Parley against llama.cpp in-process.

Starts ``parley serve`` on the embedded default (SmolLM2 in a llama.cpp child process),
then, on the same prompt, with greedy decoding and the same threads and context, times:

- Parley's path: ``POST /chat`` (HTTP, the DBOS workflow, LangGraph, ChatOpenAI, the
  child's OpenAI-compatible server), reply tokens counted with the model's tokenizer;
- the direct path: ``llama_cpp.Llama.create_chat_completion`` in this process.

The two paths take turns, one request at a time, so neither competes with the other for
the two cores. Prints tokens/s for each (median of the rounds) and their ratio.

    .venv/bin/python bench/local_model.py [--rounds 5] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from parley.config import DEFAULT_SYSTEM_PROMPT, Settings

PROMPT = "Tell me a story about a pirate ship and its crew."


def start_parley(data_dir: Path, port: int, max_tokens: int, threads: int) -> subprocess.Popen:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DATABASE_URL")
    }
    env |= {
        "PARLEY_TEMPERATURE": "0",
        "PARLEY_MAX_REPLY_TOKENS": str(max_tokens),
        "PARLEY_MODEL_THREADS": str(threads),
        "PARLEY_LOG_LEVEL": "warning",
    }
    parley = Path(sys.executable).with_name("parley")
    process = subprocess.Popen(
        [str(parley), "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/times", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("parley did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    from llama_cpp import Llama

    settings = Settings()
    model_path = settings.local_model_path
    threads, context = settings.model_threads, settings.model_context

    with tempfile.TemporaryDirectory() as data_dir:
        parley = start_parley(Path(data_dir), args.port, args.max_tokens, threads)
        try:
            direct = Llama(
                model_path=str(model_path), n_ctx=context, n_threads=threads, verbose=False
            )
            messages = [
                {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": PROMPT},
            ]
            via_parley: list[float] = []
            in_process: list[float] = []
            token_counts: set[tuple[int, int]] = set()
            with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=300) as http:
                # One untimed turn each: the first request warms caches on both sides.
                http.post("/chat", json={"message": PROMPT, "username": "warm-up"})
                direct.create_chat_completion(messages, max_tokens=8, temperature=0)
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    response = http.post(
                        "/chat", json={"message": PROMPT, "username": f"bench-{uuid.uuid4()}"}
                    )
                    elapsed = time.perf_counter() - started
                    response.raise_for_status()
                    reply = response.json()["content"]
                    parley_tokens = len(direct.tokenize(reply.encode(), add_bos=False))
                    via_parley.append(parley_tokens / elapsed)

                    started = time.perf_counter()
                    completion = direct.create_chat_completion(
                        messages, max_tokens=args.max_tokens, temperature=0
                    )
                    elapsed = time.perf_counter() - started
                    direct_tokens = completion["usage"]["completion_tokens"]
                    in_process.append(direct_tokens / elapsed)
                    token_counts.add((parley_tokens, direct_tokens))
        finally:
            parley.terminate()
            parley.wait(timeout=30)

    parley_rate, direct_rate = statistics.median(via_parley), statistics.median(in_process)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"model:     {model_path.name}, {threads} threads, context {context}")
    print(f"machine:   {machine}")
    print(f"prompt:    {PROMPT!r}, greedy, at most {args.max_tokens} tokens, {args.rounds} rounds")
    print(f"tokens:    (Parley, direct) per round: {sorted(token_counts)}")
    print(f"Parley:    {parley_rate:7.1f} tokens/s  (rounds: {_rounds(via_parley)})")
    print(f"direct:    {direct_rate:7.1f} tokens/s  (rounds: {_rounds(in_process)})")
    print(f"ratio:     {parley_rate / direct_rate:.2f}  (target: 0.90 or more)")


def _rounds(rates: list[float]) -> str:
    return ", ".join(f"{rate:.1f}" for rate in rates)


if __name__ == "__main__":
    main()
