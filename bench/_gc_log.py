"""The full (generation-2) collections of a server under measurement, for the bench to read.

A full collection stops the event loop for as long as it walks the heap, and every watcher
waits meanwhile: a storm's p99 is that stall when one falls inside it. The watcher processes
report theirs in-process (``_workers._GcPauses``); the servers are separate programs, so the
bench starts them through this module, which appends one line per full collection to the file
named by ``$BENCH_GC_LOG``: ``<CLOCK_MONOTONIC start> <seconds> <objects collected>``.

``python -m bench._gc_log ARGS…`` runs ``python -m deviceapi ARGS…`` (the server itself,
unchanged) with the log installed; :func:`install` is what the floor servers call.
"""

from __future__ import annotations

import gc
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

ENV = "BENCH_GC_LOG"


def install(path: str | None = None) -> None:
    """Log this process's full collections to ``path`` (default ``$BENCH_GC_LOG``; neither:
    nothing)."""
    path = path or os.environ.get(ENV)
    if not path:
        return
    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    started = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started[0] = time.monotonic()
        else:
            out.write(f"{started[0]:.6f} {time.monotonic() - started[0]:.6f} "
                      f"{info.get('collected', 0)}\n")

    gc.callbacks.append(on_gc)


def _records(path: Path) -> list[tuple[float, float, int]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [(float(f[0]), float(f[1]), int(f[2])) for f in map(str.split, lines) if len(f) == 3]


def read(path: Path, begin: float, end: float) -> list[tuple[float, float]]:
    """The full collections that started in [begin, end]: (seconds after begin, pause)."""
    return [(start - begin, pause) for start, pause, _ in _records(path) if begin <= start <= end]


def collected(path: Path) -> list[int]:
    """Objects each full collection freed (what was left in reference cycles)."""
    return [n for _, _, n in _records(path)]


def main() -> None:
    install()
    sys.argv = ["deviceapi", *sys.argv[1:]]
    runpy.run_module("deviceapi", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
