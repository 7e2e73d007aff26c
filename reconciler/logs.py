"""Structured logs: one JSON object per line (or text for a terminal), carrying region, epoch and component.

Context is bound once per component (:func:`component_logger`) and each call adds
its own fields (``log.info("relayed", extra={"fields": {...}})``). Values that look
like DSNs are redacted on the way out, as a last line of defence: secrets should
never be handed to a logger in the first place.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from .redact import scrub


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        context = getattr(record, "context", None)
        if isinstance(context, Mapping):
            doc.update(context)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            doc.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            doc["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            # the whole traceback as one field, so a crash stays one parseable line
            doc["traceback"] = self.formatException(record.exc_info)
        return scrub(json.dumps(doc, default=str, separators=(",", ":")))


class TextFormatter(logging.Formatter):
    """For a terminal: ``time LEVEL logger event key=value ...``, traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = {}
        for name in ("context", "fields"):
            more = getattr(record, name, None)
            if isinstance(more, Mapping):
                fields.update(more)
        pairs = " ".join(f"{k}={json.dumps(v, default=str) if not isinstance(v, str) or ' ' in v else v}"
                         for k, v in fields.items())
        line = f"{ts} {record.levelname:<7} {record.name} {record.getMessage()}" + (f" {pairs}" if pairs else "")
        if record.exc_info and record.exc_info[1] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class ComponentLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds the bound context (region, component, epoch) to every record."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra["context"] = dict(self.extra or {})
        kwargs["extra"] = extra
        return msg, kwargs

    def bind(self, **more: Any) -> None:
        assert isinstance(self.extra, dict)
        self.extra.update(more)


def component_logger(component: str, region: str, **context: Any) -> ComponentLogger:
    return ComponentLogger(
        logging.getLogger(f"reconciler.{component}"), {"region": region, "component": component, **context}
    )


def configure(level: str = "INFO", stream: Any = None, fmt: str = "json") -> None:
    """Route reconciler's loggers to ``stream``; ``fmt`` is json (one object a line) or text."""
    if fmt not in ("json", "text"):
        raise ValueError(f"unknown log format {fmt!r} (json or text)")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("reconciler")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
