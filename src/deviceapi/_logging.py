"""Process logging: one line per event, JSON or text (``--log-format``, ``-v``).

Loggers are named ``deviceapi.<part>`` (``logging.getLogger("deviceapi.cache")``). Context goes
in ``extra=`` under the stable keys of :data:`CONTEXT_KEYS`; only those keys are written, so a
log line's shape never depends on what a caller happened to pass::

    log.info("GPU marked unhealthy", extra={"gpu": name, "reason": "XidCritical"})

JSON: ``{"ts": "2025-01-01T00:00:00.123Z", "level": "info", "logger": "deviceapi.cache",
"msg": "GPU marked unhealthy", "gpu": "GPU-…", "reason": "XidCritical"}``.
Text: ``2025-01-01T00:00:00.123Z INFO deviceapi.cache GPU marked unhealthy gpu=GPU-… reason=…``.

An exception (``log.exception``, ``exc_info=``) goes under ``exc`` on the same line (escaped in
JSON, quoted in text), so even a traceback is one line.

Verbosity: 0 → ``deviceapi.*`` at INFO, other libraries (grpclib, trio-asyncio) at WARNING;
1 → ``deviceapi.*`` at DEBUG; 2 and more (trace) → everything at DEBUG, and the ``payload``
extra key (request/response bodies, full objects) is written. Below 2 a ``payload`` is dropped,
so a payload can never reach the log at the default verbosity, whoever logs it.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Final, Literal, TextIO

#: Context keys written when passed via ``extra=`` (in this order).
CONTEXT_KEYS: Final = (
    "gpu",
    "provider",
    "check",
    "resource_version",
    "watcher",
    "actor",
    "supervisor",
    "reason",
    "code",
    "method",
    "peer",
)
#: Written only at verbosity >= TRACE_VERBOSITY.
PAYLOAD_KEY: Final = "payload"
TRACE_VERBOSITY: Final = 2

LogFormat = Literal["json", "text"]

_OWN_LOGGER = "deviceapi"


def _timestamp(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _plain(value: object) -> object:
    """A JSON-safe value: numbers, bools, None and strings as they are, anything else str()."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class _Formatter(logging.Formatter):
    def __init__(self, *, payloads: bool) -> None:
        super().__init__()
        self._keys = (*CONTEXT_KEYS, PAYLOAD_KEY) if payloads else CONTEXT_KEYS

    def fields(self, record: logging.LogRecord) -> dict[str, object]:
        out: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in self._keys:
            if key in record.__dict__:
                out[key] = _plain(record.__dict__[key])
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return out


class JsonFormatter(_Formatter):
    """One JSON object per line with keys ts, level, logger, msg, then context keys."""

    def format(self, record: logging.LogRecord) -> str:
        # ensure_ascii: U+2028 and friends would split the line for some readers.
        return json.dumps(self.fields(record))


def _text_value(value: object) -> str:
    text = "null" if value is None else str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return json.dumps(text)


class TextFormatter(_Formatter):
    """``ts LEVEL logger msg key=value ...`` on one line (values quoted when needed)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = self.fields(record)
        msg = str(fields.pop("msg"))
        if not msg.isprintable():
            msg = json.dumps(msg)[1:-1]
        head = f"{fields.pop('ts')} {str(fields.pop('level')).upper()} {fields.pop('logger')} {msg}"
        tail = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        return f"{head} {tail}" if tail else head


class _DeviceApiHandler(logging.StreamHandler[TextIO]):
    """Marks the handler configure_logging installed, so reconfiguring replaces it."""


def configure_logging(
    format: LogFormat = "json",
    verbosity: int = 0,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install the process's log handler on the root logger and set levels; return the handler.

    Idempotent: a handler installed by an earlier call is removed first (other handlers, such
    as pytest's capture, are left alone). ``stream`` defaults to ``sys.stderr``.
    """
    if format not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', got {format!r}")
    if verbosity < 0:
        raise ValueError(f"verbosity must not be negative, got {verbosity}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _DeviceApiHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _DeviceApiHandler(sys.stderr if stream is None else stream)
    payloads = verbosity >= TRACE_VERBOSITY
    handler.setFormatter(
        JsonFormatter(payloads=payloads) if format == "json" else TextFormatter(payloads=payloads)
    )
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= TRACE_VERBOSITY else logging.WARNING)
    logging.getLogger(_OWN_LOGGER).setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    return handler
