"""Domain errors → gRPC status codes, in one place.

Handlers raise DeviceApiError subclasses (or let the actors' errors through); ``rpc_errors``
turns them into ``GRPCError`` with a one-line message. Anything else is INTERNAL with a fixed
message: the traceback goes to the server log, never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from .._errors import (
    AlreadyExists,
    Conflict,
    DeviceApiError,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from ..actors import ActorCrashed

log = logging.getLogger("deviceapi.grpc")

_CODES: dict[type[DeviceApiError], Status] = {
    InvalidArgument: Status.INVALID_ARGUMENT,
    NotFound: Status.NOT_FOUND,
    AlreadyExists: Status.ALREADY_EXISTS,
    Conflict: Status.ABORTED,
    ResourceExhausted: Status.RESOURCE_EXHAUSTED,
    OutOfRange: Status.OUT_OF_RANGE,
    Unavailable: Status.UNAVAILABLE,
}


def status_of(error: DeviceApiError) -> Status:
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return Status.INTERNAL


def rejection_reason(error: DeviceApiError) -> str:
    """A short, stable label for the rejected-requests metric."""
    if isinstance(error, ResourceExhausted):
        return error.reason
    return status_of(error).name.lower()


@contextmanager
def rpc_errors(method: str, on_reject: Callable[[str], None] | None = None) -> Iterator[None]:
    """Map whatever the body raises to the right gRPC status."""
    try:
        yield
    except GRPCError as exc:
        if on_reject is not None:
            on_reject(exc.status.name.lower())
        raise
    except DeviceApiError as exc:
        if on_reject is not None:
            on_reject(rejection_reason(exc))
        raise GRPCError(status_of(exc), _one_line(str(exc))) from None
    except ActorCrashed:
        if on_reject is not None:
            on_reject("actor_restart")
        raise GRPCError(Status.UNAVAILABLE, "the cache is restarting; retry") from None
    except Exception:
        log.exception("internal error", extra={"method": method})
        if on_reject is not None:
            on_reject("internal")
        raise GRPCError(Status.INTERNAL, "internal error") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())
