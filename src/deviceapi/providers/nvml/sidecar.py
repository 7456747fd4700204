"""``device-api-nvml-provider``: the NVML provider as its own process (a sidecar container).

It reaches the server over the Unix socket (or TCP), waits until the server's ProviderService
reports SERVING, registers the node's GPUs, heartbeats, and watches XID events. When the server
restarts, the provider notices (its calls fail), reconnects and re-registers idempotently; it
never deletes GPUs. Without an NVML driver it logs one clear line and keeps retrying.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

import trio

from ... import _bridge
from ..._config import HelpFormatter, add_logging_flags, add_nvml_flags
from ..._logging import configure_logging
from ...client import DEFAULT_SOCKET
from ...client.trio_client import TrioProviderClient
from ._api import ProviderApi
from ._pynvml import PynvmlBackend
from .poller import PollerOptions
from .service import run_nvml_provider

log = logging.getLogger("deviceapi.nvml")


def build_parser() -> argparse.ArgumentParser:
    """The sidecar's own flags (where the server is, who it is, how often it heartbeats); the
    NVML and logging flags are the server's definitions (``_config``), same names and defaults."""
    p = argparse.ArgumentParser(
        prog="device-api-nvml-provider",
        description="NVML GPU provider for device-api-server (runs beside it as a sidecar).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--unix-socket", default=DEFAULT_SOCKET, help="the server's Unix socket")
    p.add_argument("--address", default="", help="HOST:PORT of the server instead of the socket")
    node = os.environ.get("NODE_NAME") or socket.gethostname()
    p.add_argument("--provider-id", default=f"nvml-{node}",
                   help="provider id the GPUs are registered under")
    p.add_argument("--heartbeat-interval", type=float, default=10.0,
                   help="seconds between heartbeats (keep below the server's heartbeat timeout)")
    add_nvml_flags(p.add_argument_group("NVML"))
    add_logging_flags(p.add_argument_group("logging"))
    return p


async def run(args: argparse.Namespace) -> None:
    options = dataclasses.replace(
        PollerOptions(),
        provider_id=args.provider_id,
        health_check=args.nvml_health_check,
        ignored_xids=args.nvml_ignored_xids,
        critical_xids=args.nvml_critical_xids,
        recovery_quiet_period=args.nvml_recovery_quiet_period,
        heartbeat_interval=args.heartbeat_interval,
    )

    bridge = _bridge.current()  # made by _bridge.run in main

    async def connect() -> ProviderApi:
        if args.address:
            return await TrioProviderClient.connect(address=args.address, bridge=bridge)
        return await TrioProviderClient.connect(unix_socket=args.unix_socket, bridge=bridge)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with bridge.open_loop(), trio.open_nursery() as nursery:
            await nursery.start(run_nvml_provider,
                                lambda: PynvmlBackend(args.nvml_driver_root), connect, options)
            log.info("NVML provider started", extra={"provider": args.provider_id})
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    log.info("NVML provider stopped", extra={"provider": args.provider_id})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.verbosity)
    _bridge.run(run, args, mode=args.bridge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
