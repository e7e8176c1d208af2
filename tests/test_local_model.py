"""The embedded default: the real SmolLM2 model in a llama.cpp child process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import psutil
from llama_cpp import Llama
from playwright.sync_api import Browser, Page, expect

from parley.config import Settings
from tests.conftest import ParleyServer, unique
from tests.test_web import Watched, say, sign_in


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
        usage = http.get("/api/usage").json()
    assert times["model_cpu_time"] > 0
    assert times["cpu_time"] > 0
    # The model's CPU is priced apart; "by CPU time" is Parley's own.
    costs = usage["costs"]
    assert costs["cpu_billed"] == usage["cpu_time"] * costs["price_cpu_second"]
    assert costs["model_cpu_billed"] == usage["model_cpu_time"] * costs["price_cpu_second"]
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


def shown(page: Page, *selectors: str) -> list[float]:
    """The figures the page shows at one moment ("$0.000018", "0.750 s"), as numbers."""
    texts = page.evaluate(
        "(selectors) => selectors.map((s) => document.querySelector(s).textContent)",
        list(selectors),
    )
    return [float(text.removeprefix("$").removesuffix(" s").replace(",", "")) for text in texts]


def test_the_usage_panel_on_the_embedded_default(
    browser: Browser, make_server: Callable[..., ParleyServer]
) -> None:
    """The headline is Parley's own comparison: billed by CPU time, its work costs less
    than billed by request duration. The model's compute is shown apart."""
    local = make_server(
        local_model=True, PARLEY_MAX_REPLY_TOKENS="200", PARLEY_TEMPERATURE="0"
    ).start()
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    watched = Watched(page, local.url)
    try:
        sign_in(page, local)
        questions = ["Write a long story about a pirate ship.", "Tell me about the sea."]
        for number, question in enumerate(questions, start=1):
            expect(page.locator("#send")).to_be_visible()  # the page is done with a reply
            say(page, question)
            # expect() waits 5 s by default: a real model on busy cores can take longer.
            answer = page.locator(".message.assistant").nth(number - 1)
            expect(answer).to_have_attribute("data-status", "complete", timeout=180_000)
        page.wait_for_timeout(2_000)  # the panel reads the figures every second
        cpu_billed, duration_billed = shown(page, "#cost-cpu", "#cost-duration")
        assert 0 < cpu_billed < duration_billed
        expect(page.locator("#verdict")).to_contain_text("less")
        # The model's compute, apart from that comparison, and said why.
        expect(page.locator("#model-cpu")).to_be_visible()
        model_seconds, model_billed = shown(page, "#model-cpu-time", "#cost-model")
        assert model_seconds > 0 and model_billed > 0
        expect(page.locator("#model-note")).to_contain_text("not in the comparison")
        expect(page.locator("#legend-model")).to_be_visible()
        expect(page.locator("#usage-chart polyline")).to_have_count(3)
        assert watched.errors == []
        assert watched.foreign_requests == []
    finally:
        context.close()
