"""The ``parley`` command: ``serve``, ``migrate`` and ``--version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from parley import __version__, logs
from parley.config import ConfigurationError, Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("host", "port", "data_dir", "workers")
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(settings: Settings, insecure_open: bool = False) -> None:
    settings.check_provider()
    settings.check_workers()
    public = not (settings.host in LOOPBACK or settings.host.startswith("127."))
    if public and settings.auth == "open" and not insecure_open:
        raise ConfigurationError(
            f"refusing to listen on {settings.host} in open mode, where anyone who can "
            "reach the port can read every chat: set PARLEY_AUTH=accounts, or pass "
            "--insecure-open if that is really what you want"
        )

    import uvicorn

    from parley import cluster, turns
    from parley.app import create_app

    asyncio.run(cluster.check_free(settings, turns.TURN_WORKFLOW_VERSION))

    workers = settings.worker_count
    banner = {
        "model": settings.describe_model(),
        "data": settings.describe_database(),
        "serving": f"http://{settings.host}:{settings.port}"
        + (f" ({workers} worker processes)" if workers > 1 else ""),
    }
    if settings.log_format == "json":  # every line of output stays machine-readable
        logging.getLogger("parley").warning(
            "Parley %s; %s", __version__, "; ".join(f"{k}: {v}" for k, v in banner.items())
        )
    else:
        print(f"Parley {__version__}")
        for name, value in banner.items():
            print(f"  {name + ':':9} {value}", flush=True)
    if settings.auth == "open":
        logging.getLogger("parley").warning(
            "open mode: no passwords; anyone who can reach %s can read every chat",
            banner["serving"],
        )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": None,  # logs.setup() has configured logging, uvicorn's included
        # Connections left open by clients (reply streams) must not hold a shutdown back.
        "timeout_graceful_shutdown": 5,
        # uvicorn's default of 5 s equals httpx's own idle expiry, so a client that waits
        # about 5 s between requests can send one on a connection as it is closed, and get
        # a read error; nginx's default is 75 s.
        "timeout_keep_alive": 75,
    }
    if workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    # Several processes on one socket, under uvicorn's supervisor, which replaces a worker
    # that dies or stops answering. Each worker reads its settings from the environment,
    # so the command line's are passed on there.
    # The database and Parley's tables are made once, here, rather than by every worker
    # at once (the workers still check, under a lock, as replicas do).
    migrate_database(settings)
    for name in ("host", "port", "data_dir"):
        os.environ[f"PARLEY_{name.upper()}"] = str(getattr(settings, name))
    os.environ["PARLEY_WORKERS"] = str(workers)
    uvicorn.run("parley.cli:worker_app", factory=True, workers=workers, **options)


def worker_app() -> Any:
    """The application of one of ``parley serve --workers``'s processes."""
    from parley.app import create_app

    settings = Settings()
    logs.setup(settings)
    os.umask(0o077)
    return create_app(settings)


def migrate_database(settings: Settings) -> None:
    from parley.store import migrate as run_migrations

    asyncio.run(run_migrations(settings))


def migrate(settings: Settings) -> None:
    migrate_database(settings)
    print(f"Migrated {settings.describe_database()}")


def keep_data_private(settings: Settings) -> None:
    """Make what Parley writes readable by its own user only: files it creates from now
    on (umask 077), and the data directory and the files already in it (the chats, the
    session secret, the logs), which earlier versions left readable by everyone."""
    os.umask(0o077)
    data_dir = settings.data_dir
    if not data_dir.is_dir():
        return
    try:
        data_dir.chmod(0o700)
        for path in data_dir.iterdir():
            if path.is_file() and not path.is_symlink():
                path.chmod(0o600)
    except OSError as error:  # not ours to change, say: Parley still runs
        logging.getLogger("parley").warning(
            "could not make %s private to this user: %s", data_dir, error
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley", description="Parley: a durable LLM chat service."
    )
    parser.add_argument("--version", action="version", version=f"parley {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve",
        help="run the chat service",
        description="Run the chat service (migrating the database first).",
    )
    serve_parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve_parser.add_argument(
        "--data-dir", type=Path, help="where the SQLite files live (default ./parley-data)"
    )
    serve_parser.add_argument(
        "--workers",
        type=int,
        help="processes serving on the port (default: one per core on PostgreSQL with a "
        "model provider, otherwise 1)",
    )
    serve_parser.add_argument(
        "--insecure-open",
        action="store_true",
        help="allow open mode (no passwords) on a non-loopback address",
    )
    serve_parser.set_defaults(run=serve)

    migrate_parser = commands.add_parser(
        "migrate",
        help="apply database migrations and exit",
        description="Create or upgrade Parley's tables, then exit.",
    )
    migrate_parser.add_argument(
        "--data-dir", type=Path, help="where the SQLite files live (default ./parley-data)"
    )
    migrate_parser.set_defaults(run=migrate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
        logs.setup(settings)
        keep_data_private(settings)
        if args.run is serve:
            serve(settings, insecure_open=args.insecure_open)
        else:
            args.run(settings)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}"
            for e in error.errors()
        )
        sys.exit(f"parley: invalid settings: {problems}")
    except ConfigurationError as error:
        sys.exit(f"parley: {error}")
    except SettingsError as error:  # a value that is not JSON where JSON is expected
        sys.exit(f"parley: invalid settings: {error} (it must be JSON)")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
