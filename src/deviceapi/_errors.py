"""Domain errors. Each maps to exactly one gRPC status, in one place (transport/_status.py).

Messages are one line, meant for the client, and never carry internal detail.
"""

from __future__ import annotations


class DeviceApiError(Exception):
    """Base of every error a client may see."""


class InvalidArgument(DeviceApiError):
    """The request is malformed or breaks a validation rule (INVALID_ARGUMENT)."""


class NotFound(DeviceApiError):
    """The named GPU does not exist (NOT_FOUND)."""


class AlreadyExists(DeviceApiError):
    """SPEC §7.1 CreateGpu: the name is taken (ALREADY_EXISTS; §1's CreateGpu is idempotent)."""


class Conflict(DeviceApiError):
    """Optimistic concurrency: the expected resource version is not the current one (ABORTED)."""


class ResourceExhausted(DeviceApiError):
    """A bound was hit: GPUs, watchers, subscribe rate, queue, message size (RESOURCE_EXHAUSTED).

    ``reason`` is a short stable token used as a metric label.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class OutOfRange(DeviceApiError):
    """A watch asked to resume from a version the history no longer holds (OUT_OF_RANGE)."""


class Unavailable(DeviceApiError):
    """The server cannot answer now: initializing, shutting down, or restarting (UNAVAILABLE)."""
