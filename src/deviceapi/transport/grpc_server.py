"""The gRPC listeners: grpclib servers on a Unix socket and TCP, with health and reflection.

Both listeners serve the same handler objects. Health (``grpc.health.v1``): names "" and
``nvidia.device.v1alpha1.GpuService`` follow the readiness gate;
``nvidia.device.v1alpha1.ProviderService`` is SERVING as soon as the listeners are up, so a
provider sidecar can wait for it without waiting for the gate it is meant to open. Reflection
lets ``grpcurl`` work unchanged.

With ``--nvsentinel-api-socket``, a third grpclib server on its own Unix socket serves the
merged upstream API (SPEC §7.1, ``nvidia.nvsentinel.v1alpha1.GpuService``) from the same core,
with its own health name (following readiness) and reflection; it stops, drains and removes its
socket with the others.

Graceful stop (SPEC §6) is a sequence the app drives: :meth:`GrpcServer.stop_accepting` (close
the listening sockets; calls on open connections get UNAVAILABLE), then the app ends watch
streams, then :meth:`GrpcServer.wait_idle` lets in-flight calls finish, then
:meth:`GrpcServer.close` cancels whatever is left. grpclib's own ``close()`` cancels running
calls at once, so the first two steps reach its listening socket (``Server._server``): one of
the two places we go below its public API here (the other: :func:`_drop_stored_error`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import traceback
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health

from .._bridge import Bridge
from .._config import Config
from ..cache.port import CorePort
from ..cache.readiness import Readiness
from ._codec import Codec
from ._h2limits import LimitedServer
from ._limits import limit_requests
from ._reflection import reflection_services
from .gpu_service import GpuService
from .nvsentinel_service import NvsentinelGpuService
from .platform_connector import PlatformConnectorService
from .provider_service import ProviderService
from .unix_socket import ClaimedSocket, claim_unix_socket
from .unix_socket import SocketPathError as SocketPathError  # where callers have imported it

log = logging.getLogger("deviceapi.grpc")

MappingWrapper = Callable[[dict[str, Handler]], dict[str, Handler]]


#: Seconds between the last call finishing and the connections being closed.
CLOSE_LINGER = 0.2
#: Seconds each step of :meth:`GrpcServer.close` may wait before it moves on.
CLOSE_GRACE = 0.5


class _InFlight:
    """Counts running calls so a graceful stop can wait for them; refuses new ones when draining.

    All on the handlers' loop (asyncio): the trio side waits through the bridge."""

    def __init__(self, on_refused: Callable[[], None] | None = None) -> None:
        self.count = 0
        self.draining = False
        self._on_refused = on_refused
        self._idle = asyncio.Event()
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
            self._idle.clear()
            try:
                await func(stream)
            except BaseException as error:
                # The error's traceback holds every frame of the call, and they hold the
                # stream, the task and the error again: a reference cycle per failed or
                # cancelled call (each watch that ends with its client) that only a full
                # collection frees. Their locals are of no use once the call is over.
                traceback.clear_frames(error.__traceback__)
                # grpclib keeps its own copy of a terminated call's error: dropped once its
                # request handler is done with the call.
                task = asyncio.current_task()
                if task is not None:
                    task.add_done_callback(functools.partial(_drop_stored_error, stream))
                raise
            finally:
                self.count -= 1
                if self.count == 0:
                    self._idle.set()

        return tracked

    async def wait_idle(self) -> None:
        """From asyncio: until no call is running."""
        await self._idle.wait()


def _drop_stored_error(stream: Any, _task: asyncio.Future[Any]) -> None:
    """Once grpclib's request handler has finished a failed call, drop the error its wrapper
    kept (below grpclib's API: ``Stream._stream.wrapper._error``).

    When a client goes away mid-call (each watcher that leaves), grpclib stores a
    StreamTerminatedError in the protocol stream's wrapper, cancels the call, and raises the
    stored error as the call unwinds: its traceback holds the request handler's frame, and the
    frame the wrapper, which holds the error: a cycle through the protocol stream, the HTTP/2
    connection, the transport and the socket, ~100 objects per connection that only a full
    collection frees (at 32 conditions a re-sync of 256 watchers left ~37,000, and that
    collection stalled the loop for 0.1-0.35 s). Dropped, refcounting frees it all when the
    connection goes. A grpclib without these attributes is left as it is."""
    wrapper: Any = getattr(getattr(stream, "_stream", None), "wrapper", None)
    if getattr(wrapper, "_error", None) is not None:
        wrapper._error = None


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
    #: SPEC §7.1's socket (None when off).
    nvsentinel_socket: str | None = None


class GrpcServer:
    """Owns the grpclib servers of one runtime. Build and run it inside the bridge's loop."""

    def __init__(self, port: CorePort, config: Config,
                 wrappers: Iterable[MappingWrapper] = (), *, bridge: Bridge) -> None:
        self.port = port
        self.bridge = bridge
        self.config = config
        self._max_receive = config.max_receive_message_bytes
        self._wrappers = list(wrappers)
        observer = port.observer
        self._inflight = _InFlight(lambda: observer.on_reject("unavailable"))
        self._servers: list[LimitedServer] = []
        self._claims: list[ClaimedSocket] = []
        self.listeners = Listeners(None, None)
        self.gpu_service: GpuService | None = None
        # gRPC health of GpuService follows readiness; one status for every incarnation.
        self._serving = ServiceStatus()
        port.add_readiness_listener(lambda state: self._serving.set(state is Readiness.READY))

    def _servables(self) -> list[Any]:
        gpu = GpuService(self.port, self.bridge, self._max_receive)
        self.gpu_service = gpu  # the current incarnation's (tests read its fan-out figures)
        provider = ProviderService(self.port, self.bridge, self._max_receive)
        # Consumers wait for GpuService (readiness); providers for ProviderService, which
        # serves from the start (provider writes always pass, and they are what opens the gate).
        return self._assemble([gpu, provider], Health({gpu: [self._serving], provider: []}))

    def _nvsentinel_servables(self) -> list[Any]:
        """SPEC §7.1's socket: its GpuService, health for its name (readiness), reflection."""
        service = NvsentinelGpuService(self.port, self.bridge, self._max_receive)
        return self._assemble([service], Health({service: [self._serving]}))

    def _platform_connector_servables(self) -> list[Any]:
        """SPEC §7.2's socket: the ingest service (a provider: SERVING from the start)."""
        service = PlatformConnectorService(self.port, self.bridge, self._max_receive)
        return self._assemble([service], Health({service: []}))

    def _assemble(self, services: list[Any], health: Health) -> list[Any]:
        """The services wrapped (metrics, in-flight tracking), then health and reflection."""
        mapped = []
        for service in services:
            mapping = service.__mapping__()
            for wrap in self._wrappers:
                mapping = wrap(mapping)
            mapped.append(_Service(self._inflight.wrap(mapping)))
        reflection = reflection_services([*services, health])
        observer = self.port.observer
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
        observer = self.port.observer
        return LimitedServer(
            servables, codec=Codec(), max_concurrent_streams=self.config.max_concurrent_streams,
            on_refused=lambda: observer.on_reject("max_concurrent_streams"))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Listen until cancelled; on the way out close everything and remove the socket.

        Started means every listener is bound; :attr:`listeners` then says where (a
        supervised child: every incarnation updates it)."""
        servables = self._servables()
        try:
            if self.config.unix_socket:
                await self._listen_unix(self.config.unix_socket, "--unix-socket", servables)
            if self.config.platform_connector_socket:
                await self._listen_unix(self.config.platform_connector_socket,
                                        "--platform-connector-socket",
                                        self._platform_connector_servables())
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
                await self.bridge.aio_as_trio(server.start)(host, port, backlog=self._backlog())
                listening = server._server
                assert isinstance(listening, asyncio.Server)
                tcp_port = listening.sockets[0].getsockname()[1]
                log.info("listening on tcp", extra={"peer": f"{host}:{tcp_port}"})
            nvsentinel = self.config.nvsentinel_api_socket or None
            if nvsentinel:
                await self._listen_unix(nvsentinel, "--nvsentinel-api-socket",
                                        self._nvsentinel_servables())
            self.listeners = Listeners(self.config.unix_socket or None, tcp_port, nvsentinel)
            task_status.started()  # self.listeners says where
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self.close()

    async def _listen_unix(self, path: str, flag: str, servables: list[Any]) -> None:
        """Serve ``servables`` on a Unix socket (0660): never a live server's path, and on
        close removed only if still ours (``unix_socket.claim_unix_socket``)."""
        claim = claim_unix_socket(path, flag=flag, backlog=self._backlog())
        self._claims.append(claim)
        server = self._server(servables)
        self._servers.append(server)
        try:
            await self.bridge.aio_as_trio(server.start)(sock=claim.sock, backlog=self._backlog())
        except BaseException:
            claim.sock.close()
            raise
        log.info("listening on unix socket", extra={"peer": path})

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
        await self.bridge.aio_as_trio(self._inflight.wait_idle)()

    async def close(self) -> None:
        """Cancel whatever still runs, close every connection, remove the socket (idempotent).

        Bounded whatever clients do: each wait below has its own :data:`CLOSE_GRACE`, and
        connections that do not close in time are dropped. (From Python 3.12,
        ``asyncio.Server.wait_closed`` — and so grpclib's ``Server.wait_closed`` — waits until
        every client has disconnected: an idle client, or the in-process providers' loopback
        connections, would hold the shutdown until they went away.)
        """
        servers, self._servers = self._servers, []
        try:
            for server in servers:
                with contextlib.suppress(RuntimeError):
                    server.close()  # stop accepting; cancel running calls
            with trio.move_on_after(CLOSE_GRACE):
                for server in servers:
                    await self.bridge.aio_as_trio(server.wait_calls_closed)()
                if any(server.open_connections for server in servers):
                    # Answers just written may not be read yet, and grpclib's client fails
                    # every stream of a connection that closes: let them land, then close (a
                    # client on an idle connection then fails at once instead of at its
                    # deadline).
                    await trio.sleep(CLOSE_LINGER)
            for server in servers:
                server.close_connections()
            with trio.move_on_after(CLOSE_GRACE) as waited:
                for server in servers:
                    await self.bridge.aio_as_trio(server.wait_connections_closed)()
            if waited.cancelled_caught:
                log.warning("shutdown: connections did not close in time; dropping them")
                for server in servers:
                    server.abort_connections()
        finally:
            self.remove_socket()

    def remove_socket(self) -> None:
        """Remove our socket files, only those still ours (a successor may have replaced one
        after our listener closed); idempotent."""
        claims, self._claims = self._claims, []
        for claim in claims:
            claim.release()
