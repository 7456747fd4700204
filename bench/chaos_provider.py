"""A chaos provider in its own process, so the chaos run can kill it with SIGKILL.

``python -m bench.chaos_provider --socket S --id P --names A,B --counter N [--pending NAME MSG]``
runs one incarnation of :class:`bench.chaos.ChaosProvider` (register every GPU, re-send the
write that was in flight when the previous incarnation died, then heartbeat and write) and
reports to the coordinator on stdout, one JSON object a line, *before* and *after* each write:

- ``{"registered": true}`` once every GPU is registered;
- ``{"send": [name, message]}`` before a write goes out (it may or may not land);
- ``{"ack": [name, message]}`` once the server acknowledged it;
- ``{"stopped": true}`` after ``stop`` arrived on stdin and nothing is in flight.

The coordinator's model of acknowledged writes is built only from ``ack`` lines; a ``send``
without an ``ack`` is what a killed process had in flight, handed to the next incarnation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
from typing import Any

from bench.chaos import ChaosOptions, ChaosProvider


def _say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class ReportingProvider(ChaosProvider):
    async def _write(self, name: str, message: str) -> None:
        _say(send=[name, message])
        await super()._write(name, message)
        _say(ack=[name, message])


async def _serve(args: argparse.Namespace) -> None:
    options = ChaosOptions(write_rate=args.rate, padding=args.padding,
                           heartbeat_interval=args.heartbeat_interval,
                           recover_timeout=args.recover_timeout)
    provider = ReportingProvider(args.id, args.names.split(","), args.socket, options,
                                 random.Random(args.seed))
    provider.set_counter(args.counter)
    if args.pending:
        provider.pending = (args.pending[0], args.pending[1])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stdin() -> None:
        sys.stdin.readline()
        stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    run = asyncio.ensure_future(provider.run())
    registered = asyncio.ensure_future(provider.registered.wait())
    await asyncio.wait([run, registered], return_when=asyncio.FIRST_COMPLETED)
    if registered.done():
        _say(registered=True)
    await asyncio.wait([run, asyncio.ensure_future(stop.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    if run.done():
        run.result()  # it failed: let the traceback reach stderr
        return
    provider.stop_writing = True
    while provider.pending is not None and not run.done():  # noqa: ASYNC110 - its own loop
        await asyncio.sleep(0.01)
    _say(stopped=True)
    await run  # heartbeats go on until the coordinator kills or terminates us


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos_provider",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--names", required=True, help="comma-separated GPU UUIDs")
    parser.add_argument("--counter", type=int, default=0,
                        help="where the previous incarnation's write counter stopped")
    parser.add_argument("--pending", nargs=2, metavar=("NAME", "MESSAGE"),
                        help="the write the previous incarnation had in flight")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--padding", type=int, default=300)
    parser.add_argument("--heartbeat-interval", type=float, default=0.25)
    parser.add_argument("--recover-timeout", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
