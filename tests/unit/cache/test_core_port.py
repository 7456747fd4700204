"""The core's one port (cache/port.py): synchronous by construction, the transport's only way
in, and each call doing what the handlers rely on — over a real CacheStore and CacheOwner."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import outcome
import pytest
import trio
import trio.testing
from core_helpers import cond, status

import deviceapi
from deviceapi._app import core_settings
from deviceapi._config import Config
from deviceapi._errors import Unavailable
from deviceapi.cache._store import RegisterGpu, Result
from deviceapi.cache.cache_owner import CacheOwner
from deviceapi.cache.core import Core, Observer
from deviceapi.cache.port import CorePort
from deviceapi.otp import TrioReply
from deviceapi.proto.device.v1alpha1.gpu_pb2 import GpuSpec

SRC = Path(deviceapi.__file__).parent
#: What transport may import from the domain core: the port, and the vocabulary it speaks
#: (commands, states, events, subscriptions, errors).
PORT_VOCABULARY = {"deviceapi.cache.port", "deviceapi.cache._store", "deviceapi.cache.watcher",
                   "deviceapi.cache.readiness", "deviceapi.cache.ingest",
                   "deviceapi.cache.health"}


def register(i: int, provider: str = "p1") -> RegisterGpu:
    return RegisterGpu(f"GPU-{i:02x}", GpuSpec(), status(cond("Ready")), provider)


def test_every_port_method_is_synchronous() -> None:
    """An ``async def`` here would checkpoint inside a crossing and break one bridge mode."""
    public = [name for name, _ in inspect.getmembers(CorePort, inspect.isfunction)
              if not name.startswith("_")]
    assert {"submit", "read", "subscribe", "heartbeat", "writes_pending", "after_pending",
            "check_read", "unsubscribe", "touch"} <= set(public)
    for name in public:
        function = getattr(CorePort, name)
        assert not inspect.iscoroutinefunction(function), name
        assert not inspect.isasyncgenfunction(function), name


def _imports(path: Path) -> set[str]:
    """The absolute module names ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_transport_reaches_the_core_only_through_the_port() -> None:
    """Transport imports no core object (store, hub, gate, sessions, Core): only the port
    and the vocabulary; and it never imports trio_asyncio (that is the bridge's)."""
    offenders = []
    for path in sorted((SRC / "transport").glob("*.py")):
        for name in _imports(path):
            if name.startswith("deviceapi.cache.") and not any(
                    name == allowed or name.startswith(allowed + ".")
                    for allowed in PORT_VOCABULARY):
                offenders.append(f"{path.name}: {name}")
            if name.startswith("trio_asyncio"):
                offenders.append(f"{path.name}: {name}")
    assert offenders == []


async def test_port_calls_do_what_the_handlers_rely_on(
        autojump_clock: trio.testing.MockClock) -> None:
    config = Config(min_gpus=1, heartbeat_timeout=10, slow_subscriber_timeout=7)
    updates: list[str] = []
    core = Core.build(core_settings(config), Observer(on_update=updates.append))
    port = core.port
    assert port.slow_consumers.timeout == 7 and port.now() == trio.current_time()
    with pytest.raises(Unavailable):
        port.check_read()  # not READY yet
    assert not port.writes_pending()
    sub = port.subscribe(0)
    first: TrioReply[Result] = TrioReply()
    port.submit(register(1), first)
    assert port.writes_pending()  # queued, the owner has not run
    barrier: TrioReply[None] = TrioReply()
    port.after_pending(barrier)
    later: TrioReply[Result] = TrioReply()
    port.submit(register(2), later)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(CacheOwner(core.store, on_update=core.observer.on_update).run)
            await barrier.wait()
            assert first.done  # the write queued before the barrier is in
            assert (await first.wait()).created
            assert "GPU-01" in port.read().gpus
            await later.wait()
            nursery.cancel_scope.cancel()
    port.check_read()  # READY now: no error
    assert not port.writes_pending()
    assert updates == ["register", "register"]
    assert [d.event.gpu.metadata.name for d in sub.take(10)] == ["GPU-01", "GPU-02"]
    port.unsubscribe(sub)
    assert sub.end is not None and core.hub.statistics().active == 0


async def test_heartbeat_through_the_port_reads_the_core_clock(
        autojump_clock: trio.testing.MockClock) -> None:
    core = Core.build(core_settings(Config(heartbeat_timeout=10)))
    port = core.port
    assert port.heartbeat("p1") is None  # nothing masked
    await trio.sleep(10)
    [mask] = core.sessions.take_overdue(trio.current_time())  # overdue exactly at 10 s
    assert mask.provider == "p1"
    unmask = port.heartbeat("p1")  # its GPUs were masked: the heartbeat unmasks them
    assert unmask is not None and unmask.provider == "p1"


def test_a_reply_handed_to_after_pending_with_nothing_queued_resolves_at_once() -> None:
    class Recorded:
        result: outcome.Outcome[None] | None = None

        def resolve(self, result: outcome.Outcome[None]) -> None:
            self.result = result

    async def main() -> None:
        core = Core.build(core_settings(Config()))
        reply = Recorded()
        core.port.after_pending(reply)
        assert reply.result == outcome.Value(None)

    trio.run(main)
