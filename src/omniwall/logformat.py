"""Log output of the daemons (`omniwall manager`, `omniwall agent`): `text` (one human line per record,
the default) or `json` (one JSON object per line, for journald/Loki/Elasticsearch pipelines that parse
fields instead of grepping).

JSON fields: `time` (RFC 3339, UTC, milliseconds), `level`, `logger`, `message`, and `exception` when
the record carries a traceback. Extra attributes passed with `log.info(..., extra={...})` are added as
they are (stringified when not JSON-serializable).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# LogRecord attributes that are not "extra" fields
# (color_message: uvicorn's ANSI-coloured copy of the message)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def check_format(fmt: str, field: str = "--log-format") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"{field}: {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


_active = "text"


def setup_logging(fmt: str = "text", level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Configure the root logger once for a daemon process (replaces handlers set before)."""
    check_format(fmt)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    global _active
    _active = fmt


def adopt(*names: str) -> None:
    """In JSON mode, send these libraries' loggers (uvicorn's, which set up handlers of their own)
    through the root handler, so every line of the process has one format."""
    if _active != "json":
        return
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
