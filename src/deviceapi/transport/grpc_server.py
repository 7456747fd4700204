"""The gRPC listeners: grpclib servers on a Unix socket and TCP, with health and reflection.

Both listeners serve the same handler objects. Health (``grpc.health.v1``): names "" and
``nvidia.device.v1alpha1.GpuService`` follow the readiness gate;
``nvidia.device.v1alpha1.ProviderService`` is SERVING as soon as the listeners are up, so a
provider sidecar can wait for it without waiting for the gate it is meant to open. Reflection
lets ``grpcurl`` work unchanged.

Graceful stop (SPEC §6) is a sequence the app drives: :meth:`GrpcServer.stop_accepting` (close
the listening sockets; calls on open connections get UNAVAILABLE), then the app ends watch
streams, then :meth:`GrpcServer.wait_idle` lets in-flight calls finish, then
:meth:`GrpcServer.close` cancels whatever is left. grpclib's own ``close()`` cancels running
calls at once, so the first two steps reach its listening socket (``Server._server``): the one
place we go below its public API here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health

from .._config import Config
from ..actors.core import Core
from ..actors.readiness import Readiness
from . import _bridge
from ._codec import Codec
from ._h2limits import LimitedServer
from ._limits import limit_requests
from ._reflection import reflection_services
from .gpu_service import GpuService
from .provider_service import ProviderService

log = logging.getLogger("deviceapi.grpc")

MappingWrapper = Callable[[dict[str, Handler]], dict[str, Handler]]


#: Seconds between the last call finishing and the connections being closed.
CLOSE_LINGER = 0.2


class SocketPathError(RuntimeError):
    """The Unix socket path is unusable (exists and is not a socket, or is not writable)."""


def prepare_socket_path(path: str) -> None:
    """Create the socket's directory (0750) and remove a stale socket.

    Never deletes anything that is not a socket: a regular file, directory or symlink at the
    path stops the server with a clear error instead. A directory that already exists is the
    operator's (it may be /run or /tmp): its mode is left alone.
    """
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o750)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise SocketPathError(
                f"--unix-socket {path}: {directory} exists and is not a directory") from None
    except NotADirectoryError:
        raise SocketPathError(
            f"--unix-socket {path}: a parent of {directory} is not a directory") from None
    else:
        os.chmod(directory, 0o750)  # makedirs' mode went through the umask
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathError(
            f"--unix-socket {path} exists and is a {_kind(info.st_mode)}, not a socket; "
            "refusing to replace it")
    log.info("removing stale socket", extra={"reason": path})
    os.unlink(path)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    return "regular file" if stat.S_ISREG(mode) else "special file"


class _InFlight:
    """Counts running calls so a graceful stop can wait for them; refuses new ones when draining."""

    def __init__(self, on_refused: Callable[[], None] | None = None) -> None:
        self.count = 0
        self.draining = False
        self._on_refused = on_refused
        self._idle = trio.Event()
        self._idle.set()

    def wrap(self, mapping: dict[str, Handler]) -> dict[str, Handler]:
        return {path: h._replace(func=self._track(h.func))
                for path, h in mapping.items()}

    def _track(self, func: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def tracked(stream: Any) -> None:
            if self.draining:
                if self._on_refused is not None:
                    self._on_refused()
                raise GRPCError(Status.UNAVAILABLE, "server shutting down")
            self.count += 1
            if self.count == 1:
                self._idle = trio.Event()
            try:
                await func(stream)
            finally:
                self.count -= 1
                if self.count == 0:
                    self._idle.set()

        return tracked

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _Service:
    """A servable whose ``__mapping__`` is another's, wrapped (in-flight tracking, metrics)."""

    def __init__(self, mapping: dict[str, Handler]) -> None:
        self._mapping = mapping

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


@dataclasses.dataclass(frozen=True, slots=True)
class Listeners:
    unix_socket: str | None
    tcp_port: int | None


class GrpcServer:
    """Owns the grpclib servers of one runtime. Build and run it inside the bridge's loop."""

    def __init__(self, core: Core, config: Config,
                 wrappers: Iterable[MappingWrapper] = ()) -> None:
        self.core = core
        self.config = config
        self._wrappers = list(wrappers)
        observer = core.observer
        self._inflight = _InFlight(lambda: observer.on_reject("unavailable"))
        self._servers: list[LimitedServer] = []
        self._socket_path: str | None = None
        self.listeners = Listeners(None, None)
        self.gpu_service: GpuService | None = None
        # gRPC health of GpuService follows readiness; one status for every incarnation.
        self._serving = ServiceStatus()
        core.gate.add_listener(lambda state: self._serving.set(state is Readiness.READY))

    def _servables(self) -> list[Any]:
        gpu = GpuService(self.core)
        self.gpu_service = gpu  # the current incarnation's (tests read its fan-out figures)
        provider = ProviderService(self.core)
        # Consumers wait for GpuService (readiness); providers for ProviderService, which
        # serves from the start (provider writes always pass, and they are what opens the gate).
        health = Health({gpu: [self._serving], provider: []})
        mapped = []
        for service in (gpu, provider):
            mapping = service.__mapping__()
            for wrap in self._wrappers:
                mapping = wrap(mapping)
            mapped.append(_Service(self._inflight.wrap(mapping)))
        reflection = reflection_services([gpu, provider, health])
        observer = self.core.observer
        limit = self.config.max_receive_message_bytes
        guarded = [_Service(limit_requests(s.__mapping__(), limit,
                                           lambda reason: observer.on_reject(reason)))
                   for s in (health, *reflection)]
        return [*mapped, *guarded]

    def _backlog(self) -> int:
        """Room in the accept queue for every watcher reconnecting at once (after a restart
        all informers come back together; grpclib's default of 100 refused the rest)."""
        return max(128, self.config.max_watchers + 64)

    def _server(self, servables: list[Any]) -> LimitedServer:
        """A grpclib server whose connections enforce --max-concurrent-streams; a stream
        refused past it counts as a rejected request."""
        observer = self.core.observer
        return LimitedServer(
            servables, codec=Codec(), max_concurrent_streams=self.config.max_concurrent_streams,
            on_refused=lambda: observer.on_reject("max_concurrent_streams"))

    async def run(self, *, task_status: trio.TaskStatus[Listeners] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Listen until cancelled; on the way out close everything and remove the socket."""
        servables = self._servables()
        try:
            if self.config.unix_socket:
                path = self.config.unix_socket
                prepare_socket_path(path)
                server = self._server(servables)
                self._servers.append(server)
                await _bridge.aio_as_trio(server.start)(path=path, backlog=self._backlog())
                os.chmod(path, 0o660)
                self._socket_path = path
                log.info("listening on unix socket", extra={"peer": path})
            tcp_port = None
            host_port = self.config.grpc_host_port()
            if host_port is not None:
                host, port = host_port
                if not self.config.grpc_address_is_loopback():
                    log.warning(
                        "gRPC listens on a non-loopback address; the API is unauthenticated",
                        extra={"peer": self.config.grpc_address},
                    )
                server = self._server(servables)
                self._servers.append(server)
                await _bridge.aio_as_trio(server.start)(host, port, backlog=self._backlog())
                listening = server._server
                assert isinstance(listening, asyncio.Server)
                tcp_port = listening.sockets[0].getsockname()[1]
                log.info("listening on tcp", extra={"peer": f"{host}:{tcp_port}"})
            self.listeners = Listeners(self._socket_path, tcp_port)
            task_status.started(self.listeners)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.close()

    def stop_accepting(self) -> None:
        """Close the listening sockets; calls on open connections now get UNAVAILABLE.

        The socket file stays until :meth:`close` (SPEC §6 removes it last)."""
        self._inflight.draining = True
        for server in self._servers:
            if server._server is not None:
                server._server.close()

    @property
    def in_flight(self) -> int:
        return self._inflight.count

    async def wait_idle(self) -> None:
        """Wait until no call is running (watch streams end when the hub closes them)."""
        await self._inflight.wait_idle()

    async def close(self) -> None:
        """Cancel whatever still runs and wait for the servers to finish (idempotent)."""
        servers, self._servers = self._servers, []
        for server in servers:
            with contextlib.suppress(RuntimeError):
                server.close()
        for server in servers:
            with contextlib.suppress(RuntimeError):
                await _bridge.aio_as_trio(server.wait_closed)()
        if any(server.open_connections for server in servers):
            # Answers just written may not be read yet, and grpclib's client fails every stream
            # of a connection that closes: let them land, then close (a client on an idle
            # connection then fails at once instead of at its deadline).
            await trio.sleep(CLOSE_LINGER)
            for server in servers:
                server.close_connections()
        self.remove_socket()

    def remove_socket(self) -> None:
        """Remove our socket file (only if it is still a socket); idempotent."""
        path, self._socket_path = self._socket_path, None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
