"""The FastAPI application: its parts are started in the lifespan, in dependency order."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import ipaddress
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import psycopg
import sqlalchemy as sa
from dbos import DBOS, DBOSConfig
from fastapi import FastAPI, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from parley import __version__, deletion, pacing, store, streams, turns
from parley.accounts import AccountLimits, Accounts, session_secret
from parley.api import archive, auth, conversations, health, models, search, seed, usage
from parley.api.bodies import validation_failed
from parley.cluster import Cluster, for_settings
from parley.config import Settings
from parley.llm import LocalModelServer, open_chat_model, open_models
from parley.memory import open_memory
from parley.usage import UsageMeter

WEB_DIR = Path(__file__).parent / "web"
logger = logging.getLogger("parley")


def asset_version() -> str:
    """A digest of the page's files: part of their URLs, so caches never serve stale ones."""
    digest = hashlib.sha256()
    for path in sorted(WEB_DIR.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class CachedStaticFiles(StaticFiles):
    """Static files, cached for a year when their URL is versioned (``?v=`` or a vendored
    library whose file name carries its version), revalidated otherwise."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        versioned = b"v=" in scope.get("query_string", b"") or "/vendor/" in scope["path"]
        response.headers["Cache-Control"] = (
            "public, max-age=31536000, immutable" if versioned else "no-cache"
        )
        return response


# Every response carries this policy: the page's own scripts and styles only, no inline
# script, nothing from elsewhere, never in a frame. The interactive API docs (/docs) are
# Parley's own page too, with Swagger UI vendored in web/vendor.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    """Adds the security headers to every response (a plain ASGI middleware, so that
    streamed responses get them too). It wraps the whole application (see ``ParleyApp``),
    so that the answers of the layers outside the routes (413 for a body too large, 500,
    400 for a host name refused) get them as well."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost") or name == "[::1]":
        return True
    try:
        return ipaddress.IPv4Address(name).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a Host header, lower case, without its port or a final dot."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[: host.find("]") + 1] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host[:-1] if host.endswith(".") else host


class AllowedHosts:
    """Refuses requests whose Host header names a host not allowed (400, JSON).

    Open mode answers only loopback names (``localhost``, ``*.localhost``, 127.0.0.0/8,
    ``[::1]``) and those in PARLEY_ALLOWED_HOSTS: a web page elsewhere can point a name of
    its own at 127.0.0.1 (DNS rebinding) and make the user's browser read and write chats,
    and such a request names the page's host. Accounts mode accepts any name unless
    PARLEY_ALLOWED_HOSTS is set.
    """

    def __init__(self, app: ASGIApp, allowed: list[str] | None, any_host: bool) -> None:
        self.app = app
        listed = allowed or []
        self.any_host = (any_host and allowed is None) or "*" in listed
        self.names = frozenset(name for name in listed if not name.startswith("*."))
        self.suffixes = tuple(name[1:] for name in listed if name.startswith("*."))

    def allows(self, name: str) -> bool:
        return (
            self.any_host
            or _is_loopback(name)
            or name in self.names
            or (bool(self.suffixes) and name.endswith(self.suffixes))
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any_host:  # Parley has no WebSocket routes
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"host"), b"")
        name = host_name(header.decode("latin-1"))
        if self.allows(name):
            await self.app(scope, receive, send)
            return
        refusal = JSONResponse(
            {
                "detail": f"The host name {name!r} is not served here; list it in "
                "PARLEY_ALLOWED_HOSTS (open mode answers only loopback names: localhost, "
                "127.0.0.1, [::1])."
            },
            status_code=status.HTTP_400_BAD_REQUEST,
        )
        await refusal(scope, receive, send)


class ParleyApp(FastAPI):
    """FastAPI, with the host check and the security headers outside everything else,
    FastAPI's own outer layers (its 500s, the body-size limit's 413) included."""

    def build_middleware_stack(self) -> ASGIApp:
        settings: Settings = self.state.settings
        return SecurityHeaders(
            AllowedHosts(
                super().build_middleware_stack(),
                settings.allowed_host_names,
                any_host=settings.auth == "accounts",
            )
        )


def dbos_config(settings: Settings, executor_id: str = "local") -> DBOSConfig:
    """DBOS's configuration for this process (also used by ``bench/floor.py``)."""
    config: DBOSConfig = {
        "name": "parley",
        "system_database_url": settings.dbos_database_url,
        "executor_id": executor_id,
        # Recovery resumes only the workflows of the running version: the version of the
        # turn workflow's shape, not of the package, so that turns survive an upgrade
        # that leaves that shape alone (see ``turns.TURN_WORKFLOW_VERSION``).
        "application_version": turns.TURN_WORKFLOW_VERSION,
        "log_level": settings.log_level.upper(),
        # DBOS's notifier thread wakes this often to send what stream writes and finished
        # workflows have queued; at its default of 10 ms it is a large part of an idle
        # Parley's CPU. Readers in other processes hear of a write up to this much later,
        # on top of the writer's frame (PARLEY_STREAM_FLUSH_SECONDS).
        "notification_coalesce_sec": 0.05,
        "db_engine_kwargs": {
            "connect_args": {
                "application_name": "parley-dbos",
                "connect_timeout": max(1, round(settings.db_timeout)),
            },
            "pool_timeout": settings.db_timeout,
            # DBOS's default pings the database before each of a turn's four transactions,
            # doubling its round trips. A connection that died (a database restart) fails
            # its statement instead, which DBOS retries on a fresh one; the restart test
            # covers it.
            "pool_pre_ping": False,
        },
    }
    if settings.uses_postgres:
        config["sys_db_pool_size"] = settings.pool_sizes.dbos
    return config


def _take_over(cluster: Cluster) -> Callable[[list[str]], Awaitable[None]]:
    async def take_over(executor_ids: list[str]) -> None:
        await turns.take_over(executor_ids, frozenset(await cluster.live_versions()))

    return take_over


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            await store.migrate(settings)
            chat_store = store.Store.from_settings(settings)
            stack.push_async_callback(chat_store.close)
            # This process's executor id, claimed before DBOS starts with it; released
            # (last, after DBOS has stopped) so that others take over what is left.
            cluster = for_settings(settings, turns.TURN_WORKFLOW_VERSION, chat_store.engine)
            if cluster.engine is not chat_store.engine:
                stack.push_async_callback(cluster.engine.dispose)
            executor_id = await cluster.join()
            stack.push_async_callback(cluster.leave)
            membership = asyncio.create_task(cluster.run())
            stack.callback(membership.cancel)
            app.state.cluster = cluster
            if settings.auth == "accounts":
                app.state.accounts = Accounts(
                    chat_store.engine,
                    session_secret(settings),
                    AccountLimits.from_settings(settings),
                )

            usage = app.state.usage
            # Its figures go to the database for every process to count; the last ones at
            # shutdown, once the turns in flight have finished.
            usage.share(chat_store.engine)
            stack.push_async_callback(usage.close)
            base_url = None
            if not settings.provider_configured:
                local_model = LocalModelServer(settings, settings.data_dir / "model-server.log")
                await local_model.start()
                stack.push_async_callback(local_model.stop)
                app.state.local_model = local_model
                usage.model_cpu = local_model.cpu_seconds
                base_url = local_model.base_url
            model = await stack.enter_async_context(open_chat_model(settings, base_url))
            chat_models = await stack.enter_async_context(open_models(settings, model))
            app.state.models = chat_models
            memory = await stack.enter_async_context(
                open_memory(settings, model, guard=cluster.ensure_alive)
            )
            turns.install(
                turns.Services(
                    store=chat_store,
                    memory=memory,
                    usage=usage,
                    settings=settings,
                    models=chat_models,
                    alive=cluster.ensure_alive,
                )
            )
            stack.callback(turns.install, None)

            DBOS(config=dbos_config(settings, executor_id))
            # Launched from the server's own event loop, so that turns DBOS recovers run
            # on this loop, beside the database pools they use. DBOS resumes this
            # executor's own unfinished turns as it starts.
            DBOS.launch()
            stack.callback(DBOS.destroy)
            # Its turns of an earlier version DBOS did not resume: this version's now, or
            # ended if this version cannot finish them.
            await turns.adopt_turns([executor_id])
            await turns.end_turns_of_other_versions(executor_id)
            await pacing.open_queue(settings)
            pacing.gate().announce = chat_store.announce_pause
            stack.callback(pacing.close)
            take_over = _take_over(cluster)
            if executor_id.endswith("/0"):
                # Releases before executor ids had slots ran as "local" (or as the name
                # alone): those turns are this replica's own to resume.
                await take_over([settings.executor_id or "local"])
            logger.info("executor %s", executor_id)
            # On shutdown, turns in flight get a moment to finish (on this loop, so before
            # DBOS stops); the rest are taken over by other processes (``cluster.leave``)
            # or resume at this one's next start, from their last step.
            stack.push_async_callback(turns.drain, settings.shutdown_grace_seconds)

            sampler = asyncio.create_task(usage.run())
            stack.callback(sampler.cancel)
            reply_watcher = asyncio.create_task(
                streams.watch_replies(chat_store.reply_flags, settings.stop_poll_seconds)
            )
            stack.callback(reply_watcher.cancel)
            if settings.uses_postgres:  # hears the same requests at once; SQLite needs none
                listener = asyncio.create_task(
                    streams.listen(settings.memory_database, connect_timeout=settings.db_timeout)
                )
                stack.callback(listener.cancel)
            deletions = asyncio.create_task(deletion.sweep(chat_store, memory))
            stack.callback(deletions.cancel)
            cluster.cover_for_others(take_over, turns.executors_with_old_turns)
            # The libraries loaded so far are some hundreds of thousands of objects that
            # live as long as the process. Frozen, the cyclic garbage collector stops
            # walking them on every full collection, which otherwise stalls the event
            # loop for a tenth of a second now and then.
            gc.freeze()
            logger.info("Parley is ready")
            yield

    app = ParleyApp(
        title="Parley",
        version=__version__,
        summary="A durable LLM chat service.",
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
        # /docs is a page of Parley's own (below); ReDoc would load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.usage = UsageMeter()
    app.state.local_model = None
    app.state.accounts = None
    app.state.provider_check = None
    app.state.import_gate = archive.ImportGate()
    app.include_router(seed.router)
    app.include_router(conversations.router)
    app.include_router(models.router)
    app.include_router(search.router)
    app.include_router(archive.router)
    app.include_router(archive.imports, max_body_size=settings.max_import_bytes)
    app.include_router(usage.router)
    app.include_router(health.router)
    app.include_router(auth.router)
    app.include_router(auth.admin)
    app.mount("/static", CachedStaticFiles(directory=WEB_DIR), name="static")
    version = asset_version()
    page = (WEB_DIR / "index.html").read_text().replace("{{version}}", version)
    docs_page = (WEB_DIR / "docs.html").read_text().replace("{{version}}", version)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        # Revalidated every time, so a new release's assets (new version in their URLs)
        # are picked up at once, while the assets themselves are cached for good.
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """The interactive API docs: Swagger UI, served from the package."""
        return HTMLResponse(docs_page, headers={"Cache-Control": "no-cache"})

    app.add_exception_handler(RequestValidationError, validation_failed)

    async def database_unavailable(_request: Request, error: Exception) -> JSONResponse:
        if not store.is_transient(error):
            raise error
        reason = str(getattr(error, "orig", error))
        if any(sign in reason for sign in ("disk is full", "readonly", "read-only", "disk I/O")):
            detail = "Parley's storage is full or cannot be written; try again later."
        else:
            detail = "The database is unavailable; try again shortly."
        logger.error("%s (%s)", detail, reason)
        return JSONResponse(
            {"detail": detail},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        )

    async def owner_gone(_request: Request, _error: Exception) -> JSONResponse:
        # Signed in a moment before an admin removed the account.
        return JSONResponse({"detail": "Sign in first."}, status_code=401)

    app.add_exception_handler(store.OwnerGone, owner_gone)

    for database_error in (
        sa.exc.DBAPIError,
        sa.exc.TimeoutError,  # no pooled connection came free in time: overload
        psycopg.Error,
        sqlite3.Error,
        ConnectionError,
    ):
        app.add_exception_handler(database_error, database_unavailable)  # type: ignore[arg-type]

    return app
