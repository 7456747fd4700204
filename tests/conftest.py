"""Root test configuration: leak checks after every test (habit 8: nothing outlives a test).

- file descriptors: every fd opened during a test must be closed by its end. Only what a test
  could own is checked (sockets, pipes, regular files); character devices and anonymous inodes
  (epoll/eventfd of process-wide pollers that some libraries, e.g. grpc core, create once and
  keep) are not, nor are pytest's and hypothesis's own cache files. Before failing, a garbage
  collection gets a chance to close what is merely unreferenced;
- child processes: none may be left running (``/proc/self/task/*/children``);
- trio system tasks (trio tests only): none spawned during the test body may still be alive
  when it returns (a structured test cannot leak any other kind of task: trio waits for it, so
  the test would hang into its ``fail_after`` instead).

A test that must keep something open on purpose can be marked ``@pytest.mark.no_leak_check``.

``--bridge guest`` runs every trio test with trio as a guest of a native asyncio loop (the
server's default, ``--bridge guest``) instead of pytest-trio's plain ``trio.run`` under
trio-asyncio (``--bridge trio-asyncio``, this option's default): the same tests, the other
arrangement of the two loops. Server processes the tests start follow the option too
(``DEVICE_API_BRIDGE``). ``make test`` runs both. (In guest mode only trio's clock is virtual;
asyncio's timers run on real time.)
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from inspect import iscoroutinefunction

import pytest
import trio

_IGNORED_TARGET_PREFIXES = ("/dev/", "anon_inode:", "/proc/")
_IGNORED_TARGET_PARTS = ("/.pytest_cache/", "/.hypothesis/", "/__pycache__/")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bridge", choices=("trio-asyncio", "guest"), default="trio-asyncio",
                     help="how trio tests host asyncio (the server's --bridge)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_leak_check: skip the fd/process/task leak checks")
    # Server processes the tests start use the same arrangement.
    os.environ["DEVICE_API_BRIDGE"] = config.getoption("--bridge")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--bridge guest``, hand every trio test pytest-trio's runner hook a guest run."""
    if config.getoption("--bridge") != "guest":
        return
    for item in items:
        if item.get_closest_marker("trio") is not None:
            item.add_marker(pytest.mark.trio(run=_run_as_guest), append=False)


def _run_as_guest(fn: Callable[[], Awaitable[object]], *,
                  clock: trio.abc.Clock | None = None,
                  instruments: Sequence[trio.abc.Instrument] = ()) -> object:
    from deviceapi import _bridge

    return _bridge.run(fn, mode="guest", clock=clock, instruments=instruments)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Wrap trio tests (before pytest-trio does) to check for leftover system tasks.

    An autouse async fixture cannot do this: pytest-trio only runs the fixtures a test names.
    """
    func = getattr(item, "obj", None)
    if (
        isinstance(item, pytest.Function)
        and iscoroutinefunction(func)
        and not hasattr(func, "hypothesis")
        and not item.get_closest_marker("no_leak_check")
    ):
        item.obj = _checking_system_tasks(func)
    yield


def _checking_system_tasks(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def checked(**kwargs: object) -> None:
        before = _system_tasks()
        await test(**kwargs)
        leftover = sorted(task.name for task in _system_tasks() - before)
        assert not leftover, f"trio system tasks left running by the test: {leftover}"

    return checked


def _open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile, or the listing's own directory fd
            continue
    return fds


def _checked(target: str) -> bool:
    if target.startswith(_IGNORED_TARGET_PREFIXES):
        return False
    return not any(part in target for part in _IGNORED_TARGET_PARTS)


def _new_fds(before: dict[int, str]) -> dict[int, str]:
    return {
        fd: target
        for fd, target in _open_fds().items()
        if before.get(fd) != target and _checked(target)
    }


def _children() -> set[int]:
    pids: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.update(int(pid) for pid in f.read().split())
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped by whoever spawned it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(autouse=True)
def _no_leaked_fds_or_processes(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("no_leak_check") or not sys.platform.startswith("linux"):
        yield
        return
    fds_before = _open_fds()
    children_before = _children()
    yield
    leaked = _new_fds(fds_before)
    if leaked:
        gc.collect()
        leaked = _new_fds(fds_before)
    assert not leaked, f"file descriptors left open by the test: {leaked}"
    orphans = {pid for pid in _children() - children_before if _alive(pid)}
    assert not orphans, f"child processes left running by the test: {sorted(orphans)}"


def _system_tasks() -> set[trio.lowlevel.Task]:
    root = trio.lowlevel.current_root_task()
    assert root is not None
    return {task for nursery in root.child_nurseries for task in nursery.child_tasks}
