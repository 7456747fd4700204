"""``device-api-server``: parse flags, set up logging, run the server until a signal.

Exit codes: 0 after a graceful shutdown, 2 for invalid flags or configuration, 1 when the
server could not start (e.g. the socket path is unusable) or its supervision tree gave up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from . import _bridge
from ._config import Config, ConfigError, parse_config
from ._logging import configure_logging
from .otp import describe, unwrap

log = logging.getLogger("deviceapi.main")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, check_only = parse_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"device-api-server: {exc}", file=sys.stderr)
        return 2
    if check_only:
        print(json.dumps(config.as_dict(), indent=2, sort_keys=True))
        return 0
    configure_logging(config.log_format, config.verbosity)
    try:
        _bridge.run(serve, config, mode=config.bridge)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # startup failures and escalations: one clear line, no traceback
        # The innermost cause is what an operator can act on (e.g. the socket path is a file).
        cause = unwrap(exc)
        while cause.__cause__ is not None:
            cause = unwrap(cause.__cause__)
        log.error(f"server stopped: {cause}", extra={"reason": describe(exc)})
        return 1
    return 0


async def serve(config: Config) -> None:
    """Run one server until SIGTERM/SIGINT, then shut down gracefully (SPEC §6).

    A second signal during shutdown exits at once.
    """
    from ._app import open_runtime  # imported here so --help and --check-config stay fast

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_runtime(config) as runtime:
            log.info("server started", extra={"reason": "serving"})
            async for signum in signals:
                log.info("signal received; shutting down",
                         extra={"reason": signal.Signals(signum).name})
                break
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_second_signal, signals, runtime.grpc.remove_socket)
                await runtime.shutdown()
                nursery.cancel_scope.cancel()
    log.info("server stopped", extra={"reason": "shutdown complete"})


async def _second_signal(signals: AsyncIterator[int], remove_socket: Callable[[], None]) -> None:
    async for signum in signals:
        log.warning("second signal; exiting now", extra={"reason": signal.Signals(signum).name})
        remove_socket()
        logging.shutdown()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
