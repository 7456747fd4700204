"""gRPC server reflection that also resolves method symbols.

grpclib's reflection asks protobuf's descriptor pool for the file containing a symbol; the pool
knows services but not their methods, so ``grpcurl describe <service>.<method>`` answered "not
found". The reflection spec (and grpc-go, the reference server's stack) accept method symbols,
so this pool answers them with their service's file and delegates everything else.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool
from grpclib.reflection.service import ServerReflection


class _MethodAwarePool:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            service = self._pool.FindServiceByName(service_name)  # KeyError if not a service
            if method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def reflection_services(services: list[Any]) -> list[Any]:
    """The reflection services (v1 and v1alpha) for ``services``."""
    extended = ServerReflection.extend(services, pool=_MethodAwarePool(descriptor_pool.Default()))
    return list(extended[len(services):])
