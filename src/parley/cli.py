"""The ``parley`` command: ``serve``, ``migrate`` and ``--version``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from parley import __version__
from parley.config import ConfigurationError, Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("host", "port", "data_dir")
        if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def serve(settings: Settings) -> None:
    settings.check_provider()

    import uvicorn

    from parley.app import create_app

    print(f"Parley {__version__}")
    print(f"  model:    {settings.describe_model()}")
    print(f"  data:     {settings.describe_database()}")
    print(f"  serving:  http://{settings.host}:{settings.port}", flush=True)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Connections left open by clients must not hold a shutdown back for long.
        timeout_graceful_shutdown=10,
    )


def migrate(settings: Settings) -> None:
    from parley.store import migrate as run_migrations

    asyncio.run(run_migrations(settings))
    print(f"Migrated {settings.describe_database()}")


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
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = _settings(args)
        args.run(settings)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}"
            for e in error.errors()
        )
        sys.exit(f"parley: invalid settings: {problems}")
    except ConfigurationError as error:
        sys.exit(f"parley: {error}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
