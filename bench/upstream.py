"""``python -m bench.upstream``: the upstream server's k6 load test, run against deviceapi.

Upstream's newest branch load-tests its device API server with k6: *writers* Get a GPU, then
UpdateGpuStatus with the resource version they read, retrying on ABORTED; *readers* Get and
List; at 16, 256 and 512 GPUs. Its thresholds: create/get/update_status p95 < 15 ms and p99 <
30 ms, list p95 < 20 ms and p99 < 40 ms, 99.9 % of checks passing. Issue 15's target is one
third of each (p95 ≤ 5 ms, list p95 ≤ 6.7 ms, ...), on this 2-core machine, clients included.

Per size, on a fresh server (``--min-gpus N``, so READY follows the creates):

1. *create*: the virtual users create the N GPUs (CreateGpu), all at once, split between them;
2. *mix*: for ``--seconds``, every writer VU loops Get → UpdateGpuStatus(version) on a random
   GPU (on ABORTED: Get again and retry, at most ``MAX_TRIES`` times), every reader VU loops
   Get on a random GPU, then List. No think time: closed loops, so the server is the
   bottleneck (its CPU is reported next to the latencies to show it).

Checks, one per call (as k6 counts them): the call answered OK, and Get found the GPU, List
returned all N, a writer's update was applied within ``MAX_TRIES``. ABORTED answers are
retries, counted apart, not failed checks: the workload provokes them (writers collide on the
same GPUs, most at 16).

VUs run as asyncio tasks in ``--procs`` client processes, each VU with its own connection;
latencies are per call, measured in the client from request to reply. The client side is
pluggable (``--api``, :mod:`bench.upstream_clients`): ``device`` drives SPEC §1 on
``--unix-socket``; ``nvsentinel`` drives SPEC §7.1 (upstream's own API) on
``--nvsentinel-api-socket``.

Prints a table per size, writes ``bench/results/upstream-<time>.json`` (and
``upstream-latest.json``) and, with matplotlib, ``upstream-<time>.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from grpclib.exceptions import GRPCError, StreamTerminatedError

from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.providers.sim import simulated_gpu_names

from ._common import cpu_seconds, machine_busy_seconds, percentile
from .upstream_clients import APIS, Aborted, UpstreamApi

RESULTS = Path(__file__).resolve().parent / "results"
OPERATIONS = ("create", "get", "update_status", "list")
#: Upstream's k6 thresholds, ms: (p95, p99).
THRESHOLDS = {"create": (15.0, 30.0), "get": (15.0, 30.0), "update_status": (15.0, 30.0),
              "list": (20.0, 40.0)}
CHECKS_THRESHOLD = 0.999
#: Issue 15: a third of upstream's thresholds.
TARGET_FRACTION = 1 / 3
#: A writer gives up on an update after this many ABORTED answers (a failed check).
MAX_TRIES = 10


@dataclasses.dataclass(frozen=True)
class Config:
    gpus: tuple[int, ...] = (16, 256, 512)
    #: Client processes, and writer / reader VUs in each: 2 VUs already keep the server at
    #: about 95 % of a core on this machine (the clients are Python too); more VUs only queue.
    procs: int = 1
    writers: int = 1
    readers: int = 1
    seconds: float = 6.0
    #: Of the mix, seconds at the start whose calls are not counted (connections warming up).
    warmup_s: float = 1.0
    api: str = "device"
    bridge: str = ""

    @property
    def vus(self) -> int:
        return self.procs * (self.writers + self.readers)


# -- the VU processes ------------------------------------------------------------------------


def _status(vu: int, iteration: int) -> pb.GpuStatus:
    """A writer's status: one Ready condition whose message changes every iteration (every
    write is a real change, with a new version)."""
    return pb.GpuStatus(conditions=[pb.Condition(
        type="Ready", status="True", reason="LoadTest",
        message=f"vu {vu} iteration {iteration}")])


class _Tally:
    """One process's latencies (seconds, per operation), checks and retries."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {op: [] for op in OPERATIONS}
        self.checks = {"pass": 0, "fail": 0}
        self.failures: dict[str, int] = {}
        self.aborted = 0
        self.counting = True

    def record(self, op: str, seconds: float) -> None:
        if self.counting:
            self.latencies[op].append(seconds)

    def check(self, ok: bool, what: str = "") -> None:
        if not self.counting:
            return
        self.checks["pass" if ok else "fail"] += 1
        if not ok:
            self.failures[what] = self.failures.get(what, 0) + 1


async def _writer(api: UpstreamApi, vu: int, names: list[str], tally: _Tally,
                  deadline: float) -> None:
    rng = random.Random(vu)
    iteration = 0
    while time.monotonic() < deadline:
        name = rng.choice(names)
        iteration += 1
        for _ in range(MAX_TRIES):
            t = time.perf_counter()
            try:
                version = await api.get(name)
            except (GRPCError, StreamTerminatedError, OSError) as exc:
                tally.check(False, f"get: {type(exc).__name__}")
                break
            tally.record("get", time.perf_counter() - t)
            tally.check(bool(version), "get: no version")
            t = time.perf_counter()
            try:
                await api.update_status(name, _status(vu, iteration), version)
            except Aborted:
                tally.record("update_status", time.perf_counter() - t)
                if tally.counting:
                    tally.aborted += 1
                continue
            except (GRPCError, StreamTerminatedError, OSError) as exc:
                tally.check(False, f"update_status: {type(exc).__name__}")
                break
            tally.record("update_status", time.perf_counter() - t)
            tally.check(True)
            break
        else:
            tally.check(False, f"update_status: still ABORTED after {MAX_TRIES} tries")


async def _reader(api: UpstreamApi, vu: int, names: list[str], tally: _Tally,
                  deadline: float) -> None:
    rng = random.Random(-vu)
    while time.monotonic() < deadline:
        t = time.perf_counter()
        try:
            version = await api.get(rng.choice(names))
            tally.record("get", time.perf_counter() - t)
            tally.check(bool(version), "get: no version")
        except (GRPCError, StreamTerminatedError, OSError) as exc:
            tally.check(False, f"get: {type(exc).__name__}")
        t = time.perf_counter()
        try:
            count = await api.list()
            tally.record("list", time.perf_counter() - t)
            tally.check(count == len(names), f"list: {count} of {len(names)}")
        except (GRPCError, StreamTerminatedError, OSError) as exc:
            tally.check(False, f"list: {type(exc).__name__}")


async def _create(api: UpstreamApi, names: list[str], tally: _Tally) -> None:
    if names:
        await _connect(api, names[0])
    for name in names:
        t = time.perf_counter()
        try:
            await api.create(name, _status(0, 0))
        except (GRPCError, StreamTerminatedError, OSError) as exc:
            tally.check(False, f"create: {type(exc).__name__}")
            continue
        tally.record("create", time.perf_counter() - t)
        tally.check(True)


async def _connect(api: UpstreamApi, name: str, timeout: float = 30.0) -> None:
    """Connect before the clock starts. The health port answers before the gRPC socket
    exists, so retry until a call gets any gRPC answer (UNAVAILABLE before READY, NOT_FOUND)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await api.get(name)
            return
        except (GRPCError, StreamTerminatedError):
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


async def _warm(tally: _Tally, seconds: float) -> None:
    """Start counting once the connections are warm."""
    await asyncio.sleep(seconds)
    tally.counting = True


async def _vu_main(conn: Connection, options: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    apis = [APIS[options["api"]](options["socket"])
            for _ in range(options["writers"] + options["readers"])]
    try:
        conn.send({"hello": True})
        while (command := await loop.run_in_executor(None, conn.recv))["cmd"] != "exit":
            tally = _Tally()
            if command["cmd"] == "create":
                names = command["names"]
                await asyncio.gather(*(_create(api, names[i::len(apis)], tally)
                                       for i, api in enumerate(apis)))
            elif command["cmd"] == "mix":
                names = command["names"]
                deadline = time.monotonic() + command["seconds"]
                base = command["vu_base"]
                tally.counting = False
                await asyncio.gather(
                    _warm(tally, command["warmup_s"]),
                    *(_writer(api, base + i, names, tally, deadline)
                      for i, api in enumerate(apis[:options["writers"]])),
                    *(_reader(api, base + options["writers"] + i, names, tally, deadline)
                      for i, api in enumerate(apis[options["writers"]:])))
            conn.send({"latencies": tally.latencies, "checks": tally.checks,
                       "failures": tally.failures, "aborted": tally.aborted})
    finally:
        for api in apis:
            api.close()


def _vu_process(conn: Connection, options: dict[str, Any]) -> None:
    """Process entry point (``multiprocessing`` target)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_vu_main(conn, options))


class _Procs:
    """The VU processes of one size, and their pipes."""

    def __init__(self, config: Config, socket: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(config.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_vu_process, daemon=True, args=(child, {
                "api": config.api, "socket": socket,
                "writers": config.writers, "readers": config.readers}))
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    async def started(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, _recv, p) for p in self.pipes))

    async def call(self, commands: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        for pipe, command in zip(self.pipes, commands, strict=True):
            pipe.send(command)
        async with asyncio.timeout(timeout):
            return await asyncio.gather(*(loop.run_in_executor(None, _recv, p)
                                          for p in self.pipes))

    async def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send({"cmd": "exit"})
        for proc in self.procs:
            await asyncio.get_running_loop().run_in_executor(None, proc.join, 5)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
        for pipe in self.pipes:
            pipe.close()


def _recv(pipe: Connection) -> dict[str, Any]:
    if not pipe.poll(120):
        raise RuntimeError("a VU process did not answer in 120 s")
    reply: dict[str, Any] = pipe.recv()
    return reply


# -- the coordinator -------------------------------------------------------------------------


def _summary_ms(values: list[float]) -> dict[str, float]:
    return {"n": len(values),
            **{f"p{q}": percentile(values, q) * 1000 for q in (50, 95, 99)},
            "max": max(values) * 1000 if values else math.nan}


def _merge(replies: list[dict[str, Any]]) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    checks = {"pass": 0, "fail": 0}
    failures: dict[str, int] = {}
    for reply in replies:
        for op, values in reply["latencies"].items():
            latencies[op] += values
        for key in checks:
            checks[key] += reply["checks"][key]
        for what, n in reply["failures"].items():
            failures[what] = failures.get(what, 0) + n
    return {"latencies": latencies, "checks": checks, "failures": failures,
            "aborted": sum(r["aborted"] for r in replies)}


async def run_size(config: Config, gpus: int, workdir: Path, log: Path) -> dict[str, Any]:
    """One size on a fresh server: create, then the mix; latencies, checks, CPU."""
    from .run import Sizes, start_server  # the same server command line as make bench

    sizes = dataclasses.replace(Sizes(), gpus=gpus, watchers=16,
                                bridge=config.bridge)
    extra: list[str] = []
    target = ""
    if config.api == "nvsentinel":
        socket_dir = workdir / f"size-{gpus}"
        os.makedirs(socket_dir, exist_ok=True)
        target = str(socket_dir / "nvsentinel.sock")
        extra = ["--nvsentinel-api-socket", target]
    server = await start_server(workdir, f"size-{gpus}", sizes, log, *extra)
    if config.api != "nvsentinel":
        target = server.socket
    procs = _Procs(config, target)
    try:
        await procs.started()
        await server.wait_listening()
        names = simulated_gpu_names(gpus, seed=gpus)
        share = [names[i::config.procs] for i in range(config.procs)]
        t = time.monotonic()
        created = _merge(await procs.call(
            [{"cmd": "create", "names": s} for s in share], 120))
        create_s = time.monotonic() - t
        try:
            await server.wait_ready(timeout=30)
        except TimeoutError:
            raise RuntimeError(f"not READY after creating {gpus} GPUs: {created['checks']}, "
                               f"{created['failures']}") from None
        load0 = os.getloadavg()
        cpu0, machine0, t0 = cpu_seconds(server.pid), machine_busy_seconds(), time.monotonic()
        mixed = _merge(await procs.call([
            {"cmd": "mix", "names": names, "seconds": config.seconds,
             "warmup_s": config.warmup_s,
             "vu_base": i * (config.writers + config.readers)}
            for i in range(config.procs)], config.seconds + 120))
        wall = time.monotonic() - t0
        server_cpu = (cpu_seconds(server.pid) - cpu0) / wall * 100
        machine_cpu = (machine_busy_seconds() - machine0) / wall * 100
        load1 = os.getloadavg()
    finally:
        await procs.close()
        await server.stop()
    latencies = mixed["latencies"]
    latencies["create"] = created["latencies"]["create"]
    checks = {k: mixed["checks"][k] + created["checks"][k] for k in ("pass", "fail")}
    counted_s = config.seconds - config.warmup_s
    ops = {op: _summary_ms(values) for op, values in latencies.items()}
    for op in ("get", "update_status", "list"):
        ops[op]["per_s"] = len(latencies[op]) / counted_s
    return {
        "gpus": gpus, "operations": ops,
        "checks": checks,
        "check_rate": checks["pass"] / max(1, checks["pass"] + checks["fail"]),
        "failures": {**created["failures"], **mixed["failures"]},
        "aborted_retries": mixed["aborted"],
        "create_s": create_s,
        "server_cpu_percent": server_cpu, "machine_cpu_percent": machine_cpu,
        "loadavg": {"before": load0, "after": load1},
    }


def verdicts(size: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per operation: upstream's thresholds and issue 15's targets (a third), met or not."""
    out: dict[str, dict[str, Any]] = {}
    for op, (p95, p99) in THRESHOLDS.items():
        s = size["operations"][op]
        out[op] = {
            "upstream": bool(s["p95"] < p95 and s["p99"] < p99),
            "target": bool(s["p95"] <= p95 * TARGET_FRACTION
                           and s["p99"] <= p99 * TARGET_FRACTION),
        }
    out["checks"] = {"upstream": size["check_rate"] >= CHECKS_THRESHOLD,
                     "target": size["check_rate"] >= CHECKS_THRESHOLD}
    return out


def table(results: dict[str, Any]) -> str:
    c = results["config"]
    lines = [f"upstream's k6 workload, --api {c['api']}: {c['procs']} processes x "
             f"({c['writers']} writers + {c['readers']} readers) = {c['vus']} VUs, "
             f"{c['seconds']:g} s per size ({c['warmup_s']:g} s warm-up not counted)", ""]
    header = ("GPUs", "operation", "n", "per s", "p50 ms", "p95 ms", "p99 ms",
              "upstream p95/p99", "target (1/3)", "verdict")
    rows: list[tuple[str, ...]] = []
    for size in results["sizes"]:
        v = verdicts(size)
        for op in OPERATIONS:
            s = size["operations"][op]
            p95, p99 = THRESHOLDS[op]
            verdict = ("met" if v[op]["target"] else
                       "upstream's only" if v[op]["upstream"] else "MISSED")
            rows.append((str(size["gpus"]), op, str(s["n"]),
                         f"{s['per_s']:.0f}" if "per_s" in s else "",
                         f"{s['p50']:.2f}", f"{s['p95']:.2f}", f"{s['p99']:.2f}",
                         f"< {p95:g} / < {p99:g}",
                         f"≤ {p95 * TARGET_FRACTION:.1f} / ≤ {p99 * TARGET_FRACTION:.1f}",
                         verdict))
        ch = size["checks"]
        rows.append((str(size["gpus"]), "checks passed", str(ch["pass"] + ch["fail"]), "",
                     f"{size['check_rate'] * 100:.3f} %", "", "", "≥ 99.9 %", "≥ 99.9 %",
                     "met" if v["checks"]["target"] else "MISSED"))
        load = size["loadavg"]["before"]
        rows.append((str(size["gpus"]), "ABORTED retries / server CPU % / machine CPU %",
                     str(size["aborted_retries"]), "",
                     f"{size['server_cpu_percent']:.0f} %",
                     f"{size['machine_cpu_percent']:.0f} %", "",
                     f"load {load[0]:.2f}", "", ""))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(OPERATIONS), figsize=(13, 3.8), sharey=False)
    sizes = results["sizes"]
    for ax, op in zip(axes, OPERATIONS, strict=True):
        labels = [str(s["gpus"]) for s in sizes]
        x = range(len(sizes))
        for offset, q, color in ((-0.27, "p50", "#9c9"), (0, "p95", "#69c"),
                                 (0.27, "p99", "#c63")):
            ax.bar([i + offset for i in x], [s["operations"][op][q] for s in sizes],
                   width=0.27, color=color, label=q)
        p95, p99 = THRESHOLDS[op]
        ax.axhline(p95 * TARGET_FRACTION, color="#69c", linestyle="--", linewidth=0.9,
                   label="target p95 (1/3)")
        ax.axhline(p99 * TARGET_FRACTION, color="#c63", linestyle="--", linewidth=0.9,
                   label="target p99 (1/3)")
        ax.axhline(p95, color="#69c", linestyle=":", linewidth=0.9, label="upstream p95")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels)
        ax.set_xlabel("GPUs")
        ax.set_title(op)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[-1].legend(fontsize=7)
    c = results["config"]
    fig.suptitle(f"upstream's k6 workload on deviceapi ({c['vus']} VUs, --api {c['api']}; "
                 f"2-core VM, clients on the same machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


async def amain(config: Config) -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = RESULTS / f"upstream-{stamp}"
    log = stem.with_suffix(".log")
    workdir = Path(tempfile.mkdtemp(prefix="deviceapi-upstream-"))
    started = time.monotonic()
    results: dict[str, Any] = {"config": {**dataclasses.asdict(config), "vus": config.vus},
                               "thresholds": THRESHOLDS, "sizes": []}
    try:
        for gpus in config.gpus:
            print(f"[{time.monotonic() - started:6.1f}s] {gpus} GPUs ...", flush=True)
            size = await run_size(config, gpus, workdir, log)
            results["sizes"].append(size)
            ops = size["operations"]
            print("  " + "; ".join(f"{op} p95 {ops[op]['p95']:.2f} p99 {ops[op]['p99']:.2f}"
                                    for op in OPERATIONS)
                  + f"; server {size['server_cpu_percent']:.0f}% CPU", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    from .run import machine

    results["machine"] = machine()
    results["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["wall_s"] = time.monotonic() - started
    results["verdicts"] = {str(s["gpus"]): verdicts(s) for s in results["sizes"]}
    results["plot"] = plot(results, stem.with_suffix(".png"))
    text = json.dumps(results, indent=1, default=str)
    stem.with_suffix(".json").write_text(text)
    (RESULTS / "upstream-latest.json").write_text(text)
    print()
    print(table(results))
    print(f"\nwall time {results['wall_s']:.0f} s; results: {stem.with_suffix('.json')}")
    print(f"plot: {results['plot'] or 'skipped (matplotlib is not installed)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=lambda v: tuple(int(x) for x in v.split(",")),
                        help="comma list of sizes (default 16,256,512)")
    parser.add_argument("--procs", type=int, help="VU processes (default 1)")
    parser.add_argument("--writers", type=int, help="writer VUs per process (default 1)")
    parser.add_argument("--readers", type=int, help="reader VUs per process (default 1)")
    parser.add_argument("--seconds", type=float, help="mix duration per size (default 6)")
    parser.add_argument("--api", choices=sorted(APIS), default="device",
                        help="the wire API the VUs speak (nvsentinel: SPEC §7.1, see "
                             "bench/upstream_clients.py)")
    parser.add_argument("--bridge", choices=("trio-asyncio", "guest"),
                        help="the server's --bridge (default: the server's default)")
    parser.add_argument("--report", metavar="JSON", help="print a saved run's table; run nothing")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print(table(results))
        return 0
    config = Config(api=args.api, bridge=args.bridge or "")
    for field in ("gpus", "procs", "writers", "readers", "seconds"):
        if getattr(args, field):
            config = dataclasses.replace(config, **{field: getattr(args, field)})
    return asyncio.run(amain(config))


if __name__ == "__main__":
    sys.exit(main())
