"""The embedded default: the real SmolLM2 model in a llama.cpp child process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import psutil
from llama_cpp import Llama

from parley.config import Settings
from tests.conftest import ParleyServer, unique


def tokenizer() -> Llama:
    return Llama(model_path=str(Settings().local_model_path), vocab_only=True, verbose=False)


def model_process(server: ParleyServer) -> psutil.Process:
    (child,) = psutil.Process(server.pid).children()
    return child


def test_parley_chats_with_the_real_model_with_no_configuration(
    make_server: Callable[..., ParleyServer],
) -> None:
    server = make_server(
        local_model=True, PARLEY_MAX_REPLY_TOKENS="48", PARLEY_TEMPERATURE="0"
    ).start()
    user, question = unique(), "Write a long story about a pirate ship."
    with server.client(timeout=120) as http:
        response = http.post("/chat", json={"message": question, "username": user})
        assert response.status_code == 200
        reply = response.json()["content"]
        assert reply.strip()
        # The reply limit reaches llama.cpp: a long story is cut at 48 tokens.
        assert 30 <= len(tokenizer().tokenize(reply.encode(), add_bos=False)) <= 49
        assert http.get(f"/history/{user}").json() == [
            {"content": question, "isUser": True},
            {"content": reply, "isUser": False},
        ]
        times = http.get("/times").json()
    assert times["model_cpu_time"] > 0
    assert times["cpu_time"] > 0
    assert (server.data_dir / "model-server.log").stat().st_size > 0


def test_a_killed_model_process_is_restarted_and_the_turn_completes(
    make_server: Callable[..., ParleyServer],
) -> None:
    server = make_server(
        local_model=True,
        PARLEY_MAX_REPLY_TOKENS="400",
        PARLEY_TEMPERATURE="0",
        PARLEY_LLM_RETRY_INTERVAL="0.5",
        PARLEY_LLM_ATTEMPTS="6",
    ).start()
    first = model_process(server)
    idle_cpu = sum(first.cpu_times()[:2])
    user = unique()
    outcome: dict[str, httpx.Response] = {}

    def ask() -> None:
        with server.client(timeout=180) as http:
            outcome["response"] = http.post(
                "/chat",
                json={"message": "Write a long story about a pirate ship.", "username": user},
            )

    request = threading.Thread(target=ask)
    request.start()
    # Kill the model once it is visibly generating this turn's answer.
    deadline = time.monotonic() + 60
    while sum(first.cpu_times()[:2]) < idle_cpu + 0.3:
        assert time.monotonic() < deadline, "the model never started generating"
        time.sleep(0.02)
    assert "response" not in outcome
    first.kill()
    request.join(timeout=180)

    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert response.json()["content"].strip()
    second = model_process(server)
    assert second.pid != first.pid
    with server.client() as http:
        history = http.get(f"/history/{user}").json()
    assert [m["isUser"] for m in history] == [True, False]
    assert "restarting" in server.log()


def test_no_model_process_outlives_parley(make_server: Callable[..., ParleyServer]) -> None:
    server = make_server(local_model=True).start()
    child = model_process(server)
    server.stop()
    child.wait(timeout=10)  # raises if it is still running

    server.start()
    child = model_process(server)
    server.kill()  # SIGKILL: Parley cannot stop it; the kernel's parent-death signal does
    child.wait(timeout=10)
