"""The domain core: the store's pure transitions and its owner, the watch hub, provider
sessions and heartbeats, readiness, health classification and NVSentinel ingest (no grpclib,
no asyncio)."""
