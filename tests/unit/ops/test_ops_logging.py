"""configure_logging: one line per event, stable JSON keys, text shape, verbosity, idempotence."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from deviceapi._logging import CONTEXT_KEYS, configure_logging

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after each test."""
    root = logging.getLogger()
    own = logging.getLogger("deviceapi")
    handlers, root_level, own_level = list(root.handlers), root.level, own.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(root_level)
    own.setLevel(own_level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_json_lines_parse_and_carry_context_keys() -> None:
    out = io.StringIO()
    configure_logging("json", 0, out)
    log = logging.getLogger("deviceapi.cache")
    context = {
        "gpu": "GPU-0a1b", "provider": "nvml", "check": "GpuMemWatch", "resource_version": 42,
        "watcher": 7, "actor": "cache_owner", "supervisor": "core", "reason": "XidCritical",
        "code": "ABORTED", "method": "/nvidia.device.v1alpha1.GpuService/UpdateGpu",
        "peer": "unix:",
    }
    log.info("GPU marked unhealthy", extra=context)
    log.warning("second\nline \u2028 of one event", extra={"gpu": "GPU-1", "unrelated": "x"})
    written = lines(out)
    assert len(written) == 2
    first, second = (json.loads(line) for line in written)
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert re.fullmatch(TS, first["ts"])
    assert (first["level"], first["logger"], first["msg"]) == (
        "info", "deviceapi.cache", "GPU marked unhealthy")
    assert {k: first[k] for k in CONTEXT_KEYS} == context
    assert first["resource_version"] == 42  # numbers stay numbers
    assert second["msg"] == "second\nline \u2028 of one event"
    assert "unrelated" not in second  # only the stable keys are written
    assert set(CONTEXT_KEYS) == set(context)


def test_exception_stays_on_one_line() -> None:
    out = io.StringIO()
    configure_logging("json", 0, out)
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("deviceapi.x").exception("failed", extra={"actor": "watcher"})
    (line,) = lines(out)
    record = json.loads(line)
    assert record["level"] == "error"
    assert "ValueError: bad" in record["exc"]
    assert record["actor"] == "watcher"


def test_text_format_shape() -> None:
    out = io.StringIO()
    configure_logging("text", 0, out)
    log = logging.getLogger("deviceapi.watcher")
    log.info("watcher evicted", extra={"watcher": 3, "reason": "queue full", "resource_version": 9})
    log.info("multi\nline")
    try:
        raise KeyError("k")
    except KeyError:
        log.exception("oops")
    first, second, third = lines(out)
    assert re.fullmatch(
        TS + r' INFO deviceapi\.watcher watcher evicted '
        r'resource_version=9 watcher=3 reason="queue full"',
        first,
    )
    assert second.endswith(" INFO deviceapi.watcher multi\\nline")
    assert re.fullmatch(TS + r' ERROR deviceapi\.watcher oops exc="Traceback.*KeyError.*"', third)


def test_verbosity_levels_and_third_party_noise() -> None:
    out = io.StringIO()
    configure_logging("json", 0, out)
    ours, theirs = logging.getLogger("deviceapi.http"), logging.getLogger("grpclib.server")
    ours.debug("hidden")
    ours.info("shown")
    theirs.info("library chatter")
    theirs.error("library error")
    assert [json.loads(line)["msg"] for line in lines(out)] == ["shown", "library error"]

    out = io.StringIO()
    configure_logging("json", 1, out)
    ours.debug("debug shown")
    theirs.debug("library debug hidden")
    assert [json.loads(line)["msg"] for line in lines(out)] == ["debug shown"]

    out = io.StringIO()
    configure_logging("json", 2, out)
    theirs.debug("library debug shown")
    assert [json.loads(line)["msg"] for line in lines(out)] == ["library debug shown"]


@pytest.mark.parametrize(("verbosity", "written"), [(0, False), (1, False), (2, True)])
def test_payloads_only_at_trace_verbosity(verbosity: int, written: bool) -> None:
    for fmt in ("json", "text"):
        out = io.StringIO()
        configure_logging(fmt, verbosity, out)
        logging.getLogger("deviceapi.grpc").warning(
            "request", extra={"method": "CreateGpu", "payload": {"secret": "s3cr3t"}}
        )
        assert ("s3cr3t" in out.getvalue()) is written, (fmt, out.getvalue())
        assert "CreateGpu" in out.getvalue()


def test_reconfiguring_replaces_our_handler_only() -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    first, second = io.StringIO(), io.StringIO()
    h1 = configure_logging("json", 0, first)
    h2 = configure_logging("text", 0, second)
    assert h1 not in root.handlers
    assert h2 in root.handlers
    assert foreign in root.handlers
    logging.getLogger("deviceapi.app").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", 0, io.StringIO())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="verbosity"):
        configure_logging("json", -1, io.StringIO())
