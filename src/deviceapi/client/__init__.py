"""Clients of the Device API: an asyncio client, its trio face, and an informer."""

from ._client import DEFAULT_SOCKET, DeviceApiClient, is_retryable

__all__ = ["DEFAULT_SOCKET", "DeviceApiClient", "is_retryable"]
