"""The chat model: any OpenAI-compatible endpoint, or the embedded local model.

There is one code path for every model: ``ChatOpenAI``. With no provider configured, the
embedded model is a llama.cpp server (``llama-cpp-python[server]``) that Parley runs as a
child process on a free loopback port and points ``ChatOpenAI`` at. Being a separate
process also keeps the service's own CPU figure apart from the model's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import email.utils
import logging
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import psutil
from langchain_openai import ChatOpenAI

from parley.config import ModelChoice, Settings
from parley.redaction import keep_secret, redact

logger = logging.getLogger("parley.llm")

# A connection that breaks in the middle of a streamed reply surfaces as the HTTP
# client's own error (the OpenAI client uses httpx2), not as an OpenAI one.
TRANSPORT_ERRORS = (httpx.TransportError, httpx2.TransportError)


class MalformedReply(Exception):
    """The provider answered, but not with a chat completion: a base URL that points at a
    web page, say, or a server that speaks another protocol."""


# What the model client raises when the provider, not Parley, is at fault.
PROVIDER_ERRORS = (
    openai.APIConnectionError,
    openai.APIStatusError,
    MalformedReply,
    *TRANSPORT_ERRORS,
)
# Where a model of PARLEY_MODELS without a base URL is asked.
OPENAI_API_URL = "https://api.openai.com/v1"
# The longest Retry-After Parley honours; a provider asking for more gets a failed attempt.
MAX_RETRY_AFTER = 60.0


class UntransformedCompletions:
    """``chat.completions`` for ``ChatOpenAI``, without the OpenAI SDK's request transform.

    The SDK's ``create`` walks every message of every request against its typed-dict
    annotations, to apply key renames and formats that chat messages never have: 0.18 ms
    per message, 7.5 ms for a 40-message prompt, about a quarter of a turn's CPU
    (openai/openai-python#3616). This sends the same body through the client's public
    ``post``, so requests, errors, timeouts and auth are the SDK's own.
    ``tests/test_llm.py`` checks that the transform would not have changed what is sent.

    Replies come back as the provider's JSON, not as the SDK's models: ``ChatOpenAI``
    turns a model back into a dict (``model_dump``) before it reads it, and building a
    model walks its type annotations, for every piece of a streamed reply: together
    about a third of the client's CPU per piece (``bench/model_client.py``).
    """

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self._client = client
        # LangChain asks for the raw response of a non-streamed reply, then parses it.
        self.with_raw_response = _Parsing(self)

    async def create(
        self,
        *,
        extra_headers: Mapping[str, str] | None = None,
        extra_query: Mapping[str, object] | None = None,
        extra_body: Mapping[str, object] | None = None,
        timeout: float | httpx2.Timeout | None = None,  # noqa: ASYNC109 (the SDK's own name)
        **body: Any,
    ) -> Any:
        options: openai.RequestOptions = {}
        if extra_headers:
            options["headers"] = extra_headers
        if extra_query:
            options["params"] = extra_query
        if extra_body:
            options["extra_json"] = extra_body
        if timeout is not None:
            options["timeout"] = timeout
        reply = await self._client.post(
            "/chat/completions",
            body=body,
            options=options,
            cast_to=object,
            stream=bool(body.get("stream")),
            stream_cls=openai.AsyncStream[object],
        )
        if isinstance(reply, openai.AsyncStream):
            return _CheckedStream(reply)
        if not _is_completion(reply):
            raise MalformedReply(f"not a chat completion: {_preview(reply)}")
        return reply


# ChatOpenAI reads a reply with plain indexing; these are the keys it indexes, so that a
# reply without them fails the turn with a clear error instead of a KeyError.
def _is_completion(reply: object) -> bool:
    choices = reply.get("choices") if isinstance(reply, dict) else None
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(
            isinstance(choice, dict) and isinstance(choice.get("message"), dict)
            for choice in choices
        )
    )


def _is_chunk(piece: object) -> bool:
    choices = piece.get("choices", []) if isinstance(piece, dict) else None
    return isinstance(choices, list) and all(
        isinstance(choice, dict) and "delta" in choice and isinstance(choice["delta"], dict | None)
        for choice in choices
    )


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "..."


class _CheckedStream:
    """A streamed reply whose pieces are checked as they come; one with no piece at all
    (an HTML page has no events) is malformed too."""

    def __init__(self, stream: openai.AsyncStream[Any]) -> None:
        self._stream = stream

    async def __aenter__(self) -> _CheckedStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stream.close()

    async def __aiter__(self) -> AsyncIterator[Any]:
        pieces = 0
        async for piece in self._stream:
            if not _is_chunk(piece):
                raise MalformedReply(f"not a chat completion chunk: {_preview(piece)}")
            pieces += 1
            yield piece
        if not pieces:
            raise MalformedReply("a streamed reply without a single piece")


class _Parsing:
    def __init__(self, completions: UntransformedCompletions) -> None:
        self._completions = completions

    async def create(self, **request: Any) -> _Parsed:
        return _Parsed(await self._completions.create(**request))


@dataclass(frozen=True, slots=True)
class _Parsed:
    value: Any

    def parse(self) -> Any:
        return self.value


def make_chat_model(
    settings: Settings, base_url: str | None = None, *, choice: ModelChoice | None = None
) -> ChatOpenAI:
    """The model client: the default model (``base_url`` points it at the embedded
    model's server), or ``choice``, one of ``PARLEY_MODELS``.

    It holds an HTTP connection pool: close it with ``aclose_chat_model`` (or use
    ``open_chat_model``).
    """
    secret = choice.api_key if choice is not None else settings.openai_api_key
    api_key = secret.get_secret_value() if secret else None
    keep_secret(api_key)  # kept out of error texts (describe) and the log
    if choice is not None:
        # Spelled out: left unset, the client would read OPENAI_BASE_URL, the default
        # model's provider, and send it this model's key.
        base_url = choice.base_url or OPENAI_API_URL
    model = ChatOpenAI(
        model=choice.provider_model if choice is not None else settings.model_name,
        # Local OpenAI-compatible servers accept any key, but the client insists on one.
        api_key=api_key or "unused",
        base_url=base_url or (settings.openai_base_url if choice is None else None),
        timeout=settings.llm_timeout,
        temperature=settings.temperature,
        max_completion_tokens=settings.reply_token_limit,
        # llama.cpp's server reads only the older name of the limit (OpenAI rejects a
        # request that carries both, so only the embedded model is sent it).
        extra_body={"max_tokens": settings.reply_token_limit}
        if base_url and choice is None and settings.reply_token_limit
        else None,
        # Retries belong to the DBOS step around the call, where they are durable and
        # visible; the client retrying inside a step would multiply them.
        max_retries=0,
        # The SDK's aiohttp transport: a streamed reply's pieces cost the client about a
        # fifth less CPU than on its default HTTP client (bench/model_client.py).
        http_async_client=openai.DefaultAioHttpClient(
            # The SDK's limits, but idle connections are dropped before the 5 s after
            # which uvicorn-based providers (vLLM, llama.cpp's server) close theirs:
            # reusing one the server is closing fails the request, and aiohttp does not
            # look before it reuses.
            limits=httpx2.Limits(
                max_connections=openai.DEFAULT_CONNECTION_LIMITS.max_connections,
                max_keepalive_connections=openai.DEFAULT_CONNECTION_LIMITS.max_keepalive_connections,
                keepalive_expiry=4.0,
            )
        ),
        # LangChain's own per-piece timeout wraps every piece in a task of its own; the
        # client's read timeout (``timeout`` above) already bounds a stalled stream.
        stream_chunk_timeout=None,
    )
    model.async_client = UntransformedCompletions(model.root_async_client)
    return model


async def aclose_chat_model(model: ChatOpenAI) -> None:
    await model.root_async_client.close()


@contextlib.asynccontextmanager
async def open_chat_model(
    settings: Settings, base_url: str | None = None
) -> AsyncIterator[ChatOpenAI]:
    model = make_chat_model(settings, base_url)
    try:
        yield model
    finally:
        await aclose_chat_model(model)


@dataclass(frozen=True, slots=True)
class Models:
    """The models conversations may use, by name: the default first."""

    default: str
    clients: dict[str, ChatOpenAI]

    @property
    def names(self) -> list[str]:
        return list(self.clients)

    def client(self, name: str | None) -> ChatOpenAI:
        """The model called ``name``; the default one for None, or for a name no longer
        configured (a conversation keeps its choice across a change of settings)."""
        return self.clients.get(name or self.default) or self.clients[self.default]


@contextlib.asynccontextmanager
async def open_models(settings: Settings, default: ChatOpenAI) -> AsyncIterator[Models]:
    """``default`` and a client for each of ``PARLEY_MODELS``, closed on exit."""
    clients = {settings.model_name: default}
    try:
        for choice in settings.models:
            clients[choice.name] = make_chat_model(settings, choice=choice)
        yield Models(settings.model_name, clients)
    finally:
        for client in clients.values():
            if client is not default:
                await aclose_chat_model(client)


def is_retryable(error: BaseException) -> bool:
    """Whether asking again may succeed: network trouble, overload, server faults."""
    if isinstance(error, (openai.APIConnectionError, *TRANSPORT_ERRORS)):  # and timeouts
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in (408, 409, 429) or error.status_code >= 500
    return False


def retry_after(error: BaseException) -> float | None:
    """The seconds the provider asked for before the next request (``Retry-After``, in
    seconds or as an HTTP date), if it asked; at most ``MAX_RETRY_AFTER``."""
    if not isinstance(error, openai.APIStatusError):
        return None
    value = error.response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def pause_before_retry(error: BaseException, interval: float) -> float:
    """Seconds to wait, on top of the step's exponential backoff, before the next attempt.

    The provider's ``Retry-After`` when it gave one; otherwise random jitter up to one
    interval, so that turns failed by one outage do not all retry at the same instant.
    """
    asked = retry_after(error)
    return asked if asked is not None else random.uniform(0, interval)


def describe(error: BaseException) -> str:
    """A one-line account of a provider failure, without secrets or stack traces.

    A provider's own explanation is passed on, with the API key (and anything shaped like
    one) removed: some providers echo the request's credentials in their errors.
    """
    if isinstance(error, MalformedReply):
        return "The model provider's answer was not a chat completion."
    if isinstance(error, openai.APITimeoutError):
        return "The model provider did not answer in time."
    if isinstance(error, openai.APIConnectionError):
        return "The model provider could not be reached."
    if isinstance(error, TRANSPORT_ERRORS):
        return "The connection to the model provider broke off."
    if isinstance(error, openai.AuthenticationError):
        return "The model provider refused Parley's credentials."
    if isinstance(error, openai.RateLimitError):
        return "The model provider is rate-limiting requests; try again shortly."
    if isinstance(error, openai.APIStatusError):
        text = f"The model provider answered with an error (HTTP {error.status_code})"
        if error.status_code < 500 and isinstance(error.body, dict):
            # A provider's explanation of a refused request (too long for the model's
            # context, say) helps the user, once any key echoed in it is removed (before
            # it is cut short, so that no part of a key is left).
            detail = error.body.get("message") or error.body.get("error")
            if isinstance(detail, dict):
                detail = detail.get("message")
            if isinstance(detail, str) and detail.strip():
                return f"{text}: {redact(detail.strip())[:200]}"
        return text + "."
    return "The model provider failed."


# --- The embedded model ----------------------------------------------------------------


class LocalModelServer:
    """A llama.cpp OpenAI-compatible server in a child process, kept alive while Parley runs.

    Started before Parley accepts chats and health-checked; restarted on the same port if
    it dies, so a turn in flight fails one attempt and its step retry finds the new one;
    stopped with Parley. The child also asks the kernel to end it if Parley dies first
    (``PR_SET_PDEATHSIG``), so even a SIGKILL of Parley leaves no orphan.
    """

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.model_path = settings.local_model_path
        self.alias = settings.model_name
        self.threads = settings.model_threads
        self.context = settings.model_context
        self.log_path = log_path
        self.port = _free_port()
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self._cpu_of_ended = 0.0  # CPU seconds of children that have exited
        self._cpu_last: tuple[int, float] | None = None  # (pid, last reading)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # Loading a model from a cold disk can take a while; a 135M one takes under a second.
    startup_seconds = 120.0

    async def start(self) -> None:
        await self._spawn()
        self._watchdog = asyncio.create_task(self._watch(), name="parley-model-watchdog")

    async def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-c",
            "from parley.llm import run_child; run_child()",
            "--model", str(self.model_path),
            "--model_alias", self.alias,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_threads", str(self.threads),
            "--n_ctx", str(self.context),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PARLEY_PARENT_PID": str(os.getpid())},
            )
        try:
            async with asyncio.timeout(self.startup_seconds):
                await self._wait_healthy()
        except TimeoutError:
            self._process.kill()
            raise RuntimeError(
                f"the embedded model server did not start; see {self.log_path}"
            ) from None
        logger.info("embedded model ready (pid %s, port %s)", self._process.pid, self.port)

    async def _wait_healthy(self) -> None:
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                assert self._process is not None
                if self._process.returncode is not None:
                    raise RuntimeError(
                        f"the embedded model server exited with code "
                        f"{self._process.returncode}; see {self.log_path}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.base_url}/models")).status_code == 200:
                        return
                await asyncio.sleep(0.1)

    async def _watch(self) -> None:
        backoff = 0.5
        while not self._stopping:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            self._account_exit()
            logger.warning("embedded model server exited (code %s); restarting", code)
            started = time.monotonic()
            try:
                await self._spawn()
                self.restarts += 1
            except RuntimeError as error:
                logger.error("%s; retrying in %.1f s", error, backoff)
                await asyncio.sleep(backoff)
            # A server that dies at once again is not restarted in a tight loop.
            backoff = 0.5 if time.monotonic() - started > 30 else min(backoff * 2, 30)

    def _account_exit(self) -> None:
        if self._cpu_last is not None:
            self._cpu_of_ended += self._cpu_last[1]
            self._cpu_last = None

    def cpu_seconds(self) -> float:
        """CPU seconds used by the model's processes since Parley started, restarts included.

        A process that died gives what was last read of it: at most one sampling interval
        of its CPU goes uncounted.
        """
        pid = self.pid
        if pid is not None and self._process is not None and self._process.returncode is None:
            try:
                times = psutil.Process(pid).cpu_times()
                self._cpu_last = (pid, times.user + times.system)
            except psutil.Error:
                pass
        return self._cpu_of_ended + (self._cpu_last[1] if self._cpu_last else 0.0)

    async def stop(self) -> None:
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except TimeoutError:
            process.kill()
            await process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_PR_SET_PDEATHSIG = 1


def run_child() -> None:
    """The embedded model server's entry point, run in the child process."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died before the request above took effect.
        if str(os.getppid()) != os.environ.get("PARLEY_PARENT_PID"):
            sys.exit(1)
    from llama_cpp.server.__main__ import main

    sys.argv[0] = "parley-model-server"
    main()
