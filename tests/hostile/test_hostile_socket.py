"""Socket safety (SPEC §6): the Unix socket is 0660 in a 0750 directory, a stale socket is
replaced, a live one is never taken over (the second server refuses to start, also through the
real CLI), a server on its way out removes the socket only if it is still its own, anything
else at the path is never deleted, an existing directory's mode is the operator's, and a TCP
listener on a non-loopback address warns that the API is unauthenticated."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from _hostile import GPU_SERVICE, RawH2, grpc_frame
from grpclib.const import Status

from deviceapi.testing.runtime import make_test_config, open_test_runtime
from deviceapi.transport.grpc_server import SocketPathError
from deviceapi.transport.unix_socket import claim_unix_socket


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def find(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """``kind`` anywhere in an exception's groups, causes and contexts."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, kind):
            return item
        todo += [item.__cause__, item.__context__]
        if isinstance(item, BaseExceptionGroup):
            todo += list(item.exceptions)
    return None


async def serves(path: str) -> bool:
    async with RawH2.open(path) as raw:
        response = await raw.call(GPU_SERVICE + "ListGpus", grpc_frame(b""))
        return response.grpc_status is Status.OK


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=["umask-000", "umask-022",
                                                              "umask-077"])
async def test_socket_is_0660_in_a_0750_directory(tmp_path: Path, mask: int) -> None:
    config = make_test_config(tmp_path, min_gpus=0)
    path = config.unix_socket
    with umask(mask):
        async with open_test_runtime(config):
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert mode(path) == 0o660
            assert mode(os.path.dirname(path)) == 0o750
            with trio.fail_after(10):
                assert await serves(path)
    assert not await trio.Path(path).exists()  # removed on the way out


async def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    """The socket may live in a shared directory (/run, /tmp): never chmod what is not ours."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    config = make_test_config(tmp_path, min_gpus=0, unix_socket=str(shared / "device.sock"))
    async with open_test_runtime(config):
        assert mode(shared) == 0o1777
        assert mode(shared / "device.sock") == 0o660
    assert mode(shared) == 0o1777


async def test_a_stale_socket_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    config = make_test_config(tmp_path, min_gpus=0)
    path = config.unix_socket
    os.makedirs(os.path.dirname(path))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays: a socket nobody listens on
    with pytest.raises(OSError):
        await trio.open_unix_socket(path)
    with caplog.at_level(logging.INFO, logger="deviceapi.socket"):
        async with open_test_runtime(config):
            assert mode(path) == 0o660
            with trio.fail_after(10):
                assert await serves(path)
    assert any(r.getMessage() == "removing stale socket" for r in caplog.records)


def identity(path: str | Path) -> tuple[int, int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino, info.st_ctime_ns


async def test_a_live_socket_is_never_taken_over(tmp_path: Path) -> None:
    """Issue 14 item 4: a second server on a live server's path used to unlink it and take
    over, leaving the first running but unreachable. It now refuses to start, and touches
    nothing of the first's."""
    config = make_test_config(tmp_path, min_gpus=0)
    path = config.unix_socket
    async with open_test_runtime(config):
        before = identity(path)
        with pytest.raises(BaseException) as info:
            async with open_test_runtime(config):
                pytest.fail("the second server started")
        error = find(info.value, SocketPathError)
        assert error is not None, info.value
        assert str(error) == (
            f"--unix-socket {path} is in use: another server accepts connections on it; "
            "refusing to take it over (stop that server or choose another path)")
        assert identity(path) == before
        with trio.fail_after(10):
            assert await serves(path)


async def test_a_server_on_its_way_out_leaves_its_successors_socket(tmp_path: Path) -> None:
    """Issue 14 item 4: during a rolling restart the old server has stopped accepting (its
    socket is stale) when the new one starts and replaces it; the old one, finishing its
    shutdown, used to delete the new one's socket. It removes the path only if it is still
    its own."""
    config = make_test_config(tmp_path, min_gpus=0)
    path = config.unix_socket
    old_stopped_accepting, new_started, old_gone, done = (trio.Event() for _ in range(4))
    seen: dict[str, object] = {}

    async def old() -> None:
        async with open_test_runtime(config) as rt:
            rt.grpc.stop_accepting()  # what shutdown does first
            old_stopped_accepting.set()
            await new_started.wait()
        old_gone.set()

    async def new() -> None:
        await old_stopped_accepting.wait()
        async with open_test_runtime(config):
            seen["ours"] = identity(path)
            new_started.set()
            await old_gone.wait()
            seen["after"] = identity(path) if await trio.Path(path).exists() else None
            with trio.fail_after(10):
                seen["serves"] = await serves(path)
            done.set()
        seen["gone"] = not await trio.Path(path).exists()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(old)
            nursery.start_soon(new)
    assert seen == {"ours": seen["ours"], "after": seen["ours"], "serves": True, "gone": True}


@pytest.mark.parametrize(("flag", "field"), [
    ("--nvsentinel-api-socket", "nvsentinel_api_socket"),
    ("--platform-connector-socket", "platform_connector_socket"),
])
async def test_the_other_sockets_follow_the_same_rules(tmp_path: Path, flag: str,
                                                       field: str) -> None:
    """SPEC §7's sockets are claimed the same way: a live one is refused (naming its flag),
    a stale one replaced, and each removed on exit."""
    other = tmp_path / "other" / "api.sock"
    other.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(other))
    listener.listen()
    config = make_test_config(tmp_path, min_gpus=0, **{field: str(other)})
    try:
        with pytest.raises(BaseException) as info:
            async with open_test_runtime(config):
                pytest.fail("the server started on a live socket")
        error = find(info.value, SocketPathError)
        assert error is not None and str(error).startswith(f"{flag} {other} is in use")
        assert not await trio.Path(config.unix_socket).exists()  # its own socket released
    finally:
        listener.close()  # now stale
    async with open_test_runtime(config):
        assert mode(other) == 0o660
    assert not await trio.Path(other).exists()


def test_claim_and_release_remove_only_our_own_socket(tmp_path: Path) -> None:
    """The helper every listener uses (the gRPC socket here; the other APIs' sockets too)."""
    path = str(tmp_path / "sub" / "api.sock")
    first = claim_unix_socket(path, flag="--some-socket")
    assert mode(path) == 0o660 and mode(tmp_path / "sub") == 0o750
    with pytest.raises(SocketPathError, match=r"^--some-socket .* is in use"):
        claim_unix_socket(path, flag="--some-socket")  # first is listening
    first.sock.close()  # crashed without cleaning up: the file is stale now
    second = claim_unix_socket(path, flag="--some-socket")
    assert first.release() is False  # not ours any more (a new inode, or the same reused)
    assert second.is_ours() and stat.S_ISSOCK(os.lstat(path).st_mode)
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(path)  # the successor still serves
    second.close()
    assert not os.path.lexists(path)
    assert second.release() is False  # idempotent


def test_release_leaves_a_path_someone_replaced_with_a_file(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    claim = claim_unix_socket(str(path))
    claim.sock.close()
    path.unlink()
    path.write_text("precious\n")
    assert claim.release() is False
    assert path.read_text() == "precious\n"


def _regular_file(path: Path) -> Callable[[], object]:
    path.write_text("precious\n")
    return path.read_text


def _directory(path: Path) -> Callable[[], object]:
    path.mkdir()
    (path / "inside").write_text("precious\n")
    return lambda: sorted(os.listdir(path))


def _symlink_to_file(path: Path) -> Callable[[], object]:
    target = path.parent / "target"
    target.write_text("precious\n")
    path.symlink_to(target)
    return lambda: (os.readlink(path), target.read_text())


def _symlink_to_socket(path: Path) -> Callable[[], object]:
    target = path.parent / "other.sock"
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(target))
    other.close()
    path.symlink_to(target)
    return lambda: (os.readlink(path), stat.S_ISSOCK(os.lstat(target).st_mode))


def _dangling_symlink(path: Path) -> Callable[[], object]:
    path.symlink_to(path.parent / "nowhere")
    return lambda: os.readlink(path)


#: what is at the path → (how to make it (returns a snapshot function), what the error says).
NOT_A_SOCKET: dict[str, tuple[Callable[[Path], Callable[[], object]], str]] = {
    "regular file": (_regular_file, "regular file"),
    "directory": (_directory, "directory"),
    "symlink to a file": (_symlink_to_file, "symlink"),
    "symlink to a socket": (_symlink_to_socket, "symlink"),
    "dangling symlink": (_dangling_symlink, "symlink"),
}


@pytest.mark.parametrize("case", sorted(NOT_A_SOCKET))
async def test_what_is_not_a_socket_is_never_deleted(tmp_path: Path, case: str) -> None:
    make, kind = NOT_A_SOCKET[case]
    path = tmp_path / "device.sock"
    snapshot = make(path)
    before = snapshot()
    config = make_test_config(tmp_path, min_gpus=0, unix_socket=str(path))
    with pytest.raises(BaseException) as info:
        async with open_test_runtime(config):
            pytest.fail("the server started")
    error = find(info.value, SocketPathError)
    assert error is not None, info.value
    assert str(error) == (f"--unix-socket {path} exists and is a {kind}, not a socket; "
                          "refusing to replace it")
    assert snapshot() == before
    assert await trio.Path(path).is_symlink() or await trio.Path(path).exists()


async def test_a_socket_directory_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "device-api"
    blocker.write_text("precious\n")
    config = make_test_config(tmp_path, min_gpus=0)
    with pytest.raises(BaseException) as info:
        async with open_test_runtime(config):
            pytest.fail("the server started")
    error = find(info.value, SocketPathError)
    assert error is not None, info.value
    assert "is not a directory" in str(error)
    assert blocker.read_text() == "precious\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_cli_refuses_a_regular_file_with_one_clear_line(tmp_path: Path, log_format: str
                                                         ) -> None:
    path = tmp_path / "device.sock"
    path.write_text("precious\n")
    result = subprocess.run(
        [sys.executable, "-m", "deviceapi", "--unix-socket", str(path), "--grpc-address", "",
         "--health-port", str(_free_port()), "--metrics-port", str(_free_port()),
         "--log-format", log_format],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1
    assert path.read_text() == "precious\n"
    output = (result.stdout + result.stderr).splitlines()
    clear = [line for line in output if "refusing to replace it" in line]
    assert clear, output
    assert all(str(path) in line and "regular file" in line for line in clear)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("address", "warned"), [
    ("0.0.0.0:0", True), ("[::]:0", True), ("127.0.0.1:0", False), ("localhost:0", False),
])
async def test_tcp_on_a_non_loopback_address_warns_that_the_api_is_unauthenticated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, address: str, warned: bool
) -> None:
    if address.startswith("[") and not socket.has_ipv6:
        pytest.skip("no IPv6")
    config = make_test_config(tmp_path, min_gpus=0, grpc_address=address)
    with caplog.at_level(logging.WARNING, logger="deviceapi.grpc"):
        async with open_test_runtime(config) as rt:
            assert rt.listeners.tcp_port
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "unauthenticated" in r.getMessage()]
    assert bool(warnings) == warned
    if warned:
        assert warnings[0].getMessage() == (
            "gRPC listens on a non-loopback address; the API is unauthenticated")


def test_cli_refuses_a_live_socket_with_one_clear_line(tmp_path: Path) -> None:
    """A second server process on a live path exits 1 naming the path; the first keeps its
    socket."""
    path = tmp_path / "device.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    try:
        before = identity(path)
        result = subprocess.run(
            [sys.executable, "-m", "deviceapi", "--unix-socket", str(path), "--grpc-address",
             "", "--health-port", str(_free_port()), "--metrics-port", str(_free_port()),
             "--log-format", "text"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 1
        assert identity(path) == before
        output = (result.stdout + result.stderr).splitlines()
        clear = [line for line in output if "refusing to take it over" in line]
        assert clear, output
        assert all(str(path) in line and "is in use" in line for line in clear)
        assert "Traceback" not in result.stderr
    finally:
        listener.close()
