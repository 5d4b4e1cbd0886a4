"""Structured JSON logs with the request id and trace id of the request being handled.

Records carry only the message Bastion formats (ids, names, counts, exception types): never prompt or completion
text, never keys or tokens. The request id comes from a context variable the gateway sets per request; the trace
id from the current OpenTelemetry span, when tracing is on.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

from opentelemetry import trace

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("bastion_request_id", default=None)
_HANDLER_FLAG = "_bastion_json"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, trace_id, span_id, exception type."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            data["request_id"] = rid
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            data["trace_id"] = format(ctx.trace_id, "032x")
            data["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info and record.exc_info[0] is not None:
            data["exception"] = record.exc_info[0].__name__  # the type only: a message or frame could quote a prompt
        return json.dumps(data, ensure_ascii=False)


def configure_logging(level: str | int = "INFO", logger: str = "bastion") -> logging.Logger:
    """JSON lines on stderr for Bastion's loggers (idempotent; other libraries' loggers are left as they are)."""
    target = logging.getLogger(logger)
    target.setLevel(level if isinstance(level, int) else level.upper())
    if not any(getattr(h, _HANDLER_FLAG, False) for h in target.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        setattr(handler, _HANDLER_FLAG, True)
        target.addHandler(handler)
    target.propagate = False
    return target
