"""Logging: lines for people, or one JSON object per line (``PARLEY_LOG_FORMAT=json``).

Every record logged while a turn runs (in its workflow, its steps, the model call) carries
the turn's id, so one turn's story can be picked out of a busy log.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from parley.config import Settings
from parley.redaction import keep_secret, redact


def current_turn() -> str | None:
    """The id of the turn whose code is running, if any (its DBOS workflow id)."""
    try:
        from dbos import DBOS

        return DBOS.workflow_id
    except Exception:  # DBOS not started (``parley migrate``, tests of parts)
        return None


class TurnIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "turn_id", None) is None:
            record.turn_id = current_turn()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        turn = getattr(record, "turn_id", None)
        return f"{line} [{turn}]" if turn else line


class Redacting(logging.Formatter):
    """Another formatter's lines, with the API key and key-shaped text removed (errors
    that echo a provider's answer can carry them; see ``parley.redaction``)."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__()
        self.formatter = formatter

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.formatter.format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if turn := getattr(record, "turn_id", None):
            entry["turn_id"] = turn
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup(settings: Settings) -> None:
    """Send every logger's records (Parley's, uvicorn's, DBOS's) to stderr, one format."""
    if settings.openai_api_key is not None:
        keep_secret(settings.openai_api_key.get_secret_value())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        Redacting(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    )
    handler.addFilter(TurnIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("alembic", "httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # DBOS gives its logger a console handler of its own unless it already has one.
    dbos = logging.getLogger("dbos")
    dbos.handlers[:] = [handler]
    dbos.propagate = False
