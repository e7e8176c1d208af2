"""A fake OpenAI-compatible chat completions server, for tests and benchmarks.

It is a real HTTP peer on loopback, run by uvicorn in a thread of the test process, so a
test can both steer it and read its call log directly. The last user message may carry
directives:

- ``[hang]``: hold the answer until ``release()`` is called (or a minute passes);
- ``[fail:CODE]``: answer every attempt with HTTP CODE;
- ``[fail-once:CODE]``: answer the first attempt at this message with HTTP CODE;
- ``[delay:SECONDS]``: wait before answering;
- ``[slow:SECONDS]``: when streaming, wait this long before each word after the first;
- ``[malformed]``: answer 200 with a web page, streamed or not, as a base URL that points
  at a web server would;
- ``[echo-key:CODE]``: answer HTTP CODE with an error that quotes the request's
  ``Authorization`` header, as some providers do with a key they refuse;
- ``[nth]``: end the reply with `` (take N)``, N counting the calls with this message,
  so that a regenerated reply differs from the one before (``take_for``).

``GET /v1/models`` lists the one model. A provider made with ``api_key`` refuses (401)
requests that do not carry that key, on both routes.

The reply is ``"Arr! You said: <message>"``, streamed word by word when asked to stream.

``faults`` (a ``Faults``) makes it misbehave at random, at a given rate: answer 500,
answer 429 with ``Retry-After``, hang past the client's timeout, or drop the connection in
the middle of a streamed reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

_DIRECTIVE = re.compile(
    r"\[(hang|fail|fail-once|delay|slow|malformed|echo-key|nth)(?::([0-9.]+))?\]"
)


@dataclass
class Call:
    messages: list[dict[str, Any]]
    stream: bool
    at: float = field(default_factory=time.time)
    fault: str | None = None
    body: dict[str, Any] = field(default_factory=dict)
    authorization: str | None = None

    @property
    def last_user(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")


@dataclass
class Faults:
    """Misbehave on a fixed share of calls (``rate``, in tenths), taking turns at the kinds,
    so that a test sees every kind, at the stated rate, whatever the order of its calls."""

    rate: float
    kinds: tuple[str, ...] = ("500", "429", "timeout", "drop")
    hang_seconds: float = 5.0
    dealt: Counter[str] = field(default_factory=Counter)
    calls: int = 0

    def draw(self) -> str | None:
        self.calls += 1
        faulty = round(self.rate * 10)
        # Spread the faulty calls over each ten: rate 0.3 fails calls 1, 4 and 7 of ten.
        if faulty == 0 or (self.calls - 1) % 10 not in {(i * 10) // faulty for i in range(faulty)}:
            return None
        kind = self.kinds[sum(self.dealt.values()) % len(self.kinds)]
        self.dealt[kind] += 1
        return kind


@dataclass
class Limits:
    """A provider's limits, kept as a real one keeps them: requests in flight at once, and
    requests admitted in any ``window`` seconds; above either, 429 with ``Retry-After``
    (whole seconds, as HTTP has them: until the oldest admitted request leaves the window,
    or one second for a full house). Refused requests count against neither."""

    concurrency: int | None = None
    per_minute: int | None = None
    window: float = 60.0
    in_flight: int = 0
    most_in_flight: int = 0
    admitted: list[float] = field(default_factory=list)
    refused: int = 0
    refused_busy: int = 0  # of ``refused``: over ``concurrency``

    def admit(self) -> float | None:
        """None if the request is admitted; otherwise the seconds to ask it to wait."""
        now = time.monotonic()
        if self.concurrency is not None and self.in_flight >= self.concurrency:
            self.refused += 1
            self.refused_busy += 1
            return 1.0
        if self.per_minute is not None:
            recent = [at for at in self.admitted if at > now - self.window]
            if len(recent) >= self.per_minute:
                self.refused += 1
                return max(1.0, math.ceil(recent[-self.per_minute] + self.window - now))
        self.admitted.append(now)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return None

    def most_in_any_window(self) -> int:
        """The most requests admitted in any ``window`` seconds."""
        times = sorted(self.admitted)
        most, start = 0, 0
        for end, at in enumerate(times):
            while times[start] <= at - self.window:
                start += 1
            most = max(most, end - start + 1)
        return most


class DroppedConnection(Exception):
    """Raised inside a streamed response: uvicorn then cuts the connection short."""


def reply_for(message: str) -> str:
    return f"Arr! You said: {message}"


def take_for(message: str, take: int) -> str:
    """The reply to an ``[nth]`` message the ``take``-th time the model is asked it."""
    return f"{reply_for(message)} (take {take})"


def answered(texts: list[str]) -> list[tuple[str, str, str]]:
    """A conversation's messages, as ``tests.api_client.stored`` gives them, once each of
    ``texts`` was answered, in order."""
    return [
        pair
        for text in texts
        for pair in (("user", text, "complete"), ("assistant", reply_for(text), "complete"))
    ]


def word_ends(reply: str) -> list[int]:
    """Where each piece of a streamed reply ends: a word each, with the space before it."""
    ends, offset = [], 0
    for index, word in enumerate(reply.split(" ")):
        offset += len(word) + (1 if index else 0)
        ends.append(offset)
    return ends


class FakeProvider:
    def __init__(self, latency: float = 0.0, api_key: str | None = None) -> None:
        self.latency = latency
        self.api_key = api_key
        self.calls: list[Call] = []
        self.faults: Faults | None = None
        self.limits: Limits | None = None
        self._released = threading.Event()
        self._failed_once: set[str] = set()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def hold(self) -> None:
        """Make ``[hang]`` messages wait again until the next ``release()``."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def calls_for(self, text: str) -> list[Call]:
        return [call for call in self.calls if call.last_user == text]

    def remembered(self, follow_up: str) -> list[str]:
        """What the model was shown before ``follow_up`` (asked once): the conversation as
        its memory holds it."""
        (call,) = self.calls_for(follow_up)
        return [m["content"] for m in call.messages[1:-1]]

    def _refused(self, request: Request) -> Response | None:
        if self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}":
            return None
        return JSONResponse(
            {"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}}, 401
        )

    async def _models(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        return JSONResponse(
            {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "fake"}]}
        )

    async def _completions(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        body = await request.json()
        call = Call(
            messages=body["messages"],
            stream=bool(body.get("stream")),
            body=body,
            authorization=request.headers.get("authorization"),
        )
        self.calls.append(call)
        limits = self.limits
        if limits is not None:
            if (wait := limits.admit()) is not None:
                call.fault = "limit"
                return JSONResponse(
                    {"error": {"message": "Rate limit reached.", "type": "rate_limit"}},
                    429,
                    headers={"Retry-After": str(int(wait))},
                )
            finished = [False]

            def done() -> None:
                if not finished[0]:
                    finished[0] = True
                    limits.in_flight -= 1

            try:
                response = await self._answer(call, body, done)
            except BaseException:
                done()
                raise
            if not isinstance(response, StreamingResponse):
                done()
            return response
        return await self._answer(call, body, lambda: None)

    async def _answer(self, call: Call, body: dict[str, Any], done: Callable[[], None]) -> Response:
        text = call.last_user
        for name, argument in _DIRECTIVE.findall(text):
            if name == "hang":
                await asyncio.to_thread(self._released.wait, 60)
            elif name == "delay":
                await asyncio.sleep(float(argument))
            elif name == "fail":
                return _failure(int(argument))
            elif name == "malformed":
                return HTMLResponse("<html><body>Welcome to nginx!</body></html>")
            elif name == "echo-key":
                message = f"Refused the request with Authorization: {call.authorization}"
                return JSONResponse({"error": {"message": message}}, int(argument))
            elif name == "fail-once" and text not in self._failed_once:
                self._failed_once.add(text)
                return _failure(int(argument))
        fault = self.faults.draw() if self.faults is not None else None
        call.fault = fault
        if fault in ("500", "429"):
            return _failure(int(fault))
        if fault == "timeout":
            assert self.faults is not None
            await asyncio.sleep(self.faults.hang_seconds)
        if fault == "drop" and not call.stream:
            raise DroppedConnection
        if self.latency:
            await asyncio.sleep(self.latency)
        content = reply_for(text)
        if "[nth]" in text:
            content = take_for(text, len(self.calls_for(text)))
        model = body.get("model", "fake")
        if call.stream:
            pause = next(
                (float(arg) for name, arg in _DIRECTIVE.findall(text) if name == "slow"), 0
            )
            return StreamingResponse(
                self._chunks(content, model, pause, drop=fault == "drop", done=done),
                media_type="text/event-stream",
            )
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def _chunks(
        self,
        content: str,
        model: str,
        pause: float,
        *,
        drop: bool = False,
        done: Callable[[], None] = lambda: None,
    ) -> AsyncIterator[str]:
        try:
            async for chunk in self._pieces(content, model, pause, drop=drop, finish=done):
                yield chunk
        finally:
            done()

    async def _pieces(
        self, content: str, model: str, pause: float, *, drop: bool, finish: Callable[[], None]
    ) -> AsyncIterator[str]:
        words = content.split(" ")
        for index, word in enumerate(words):
            if index and pause:
                await asyncio.sleep(pause)
            if drop and index == min(2, len(words) - 1):
                raise DroppedConnection
            piece = word if index == 0 else " " + word
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
        last = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        # Out of flight once the reply is written, before the client can have read it.
        finish()
        yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    def start(self) -> FakeProvider:
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._completions, methods=["POST"]),
                Route("/v1/models", self._models),
            ]
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake provider did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)


def _failure(code: int) -> JSONResponse:
    headers = {"Retry-After": "1"} if code == 429 else None
    return JSONResponse({"error": {"message": "fake failure"}}, code, headers=headers)


def main() -> None:
    """Run the fake provider on its own, as benchmarks do: ``python -m tests.fake_provider``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--concurrency", type=int, help="requests in flight at once")
    parser.add_argument("--per-minute", type=int, help="requests a minute")
    args = parser.parse_args()
    fake = FakeProvider(latency=args.latency).start()
    if args.concurrency or args.per_minute:
        fake.limits = Limits(args.concurrency, args.per_minute)
    print(fake.base_url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


if __name__ == "__main__":
    main()
