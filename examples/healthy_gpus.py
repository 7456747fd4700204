"""A minimal consumer: keep the set of healthy GPUs up to date, as a device plugin needs it.

    python examples/healthy_gpus.py --unix-socket /tmp/device-api/device.sock

It waits until the server is READY (gRPC health of ``nvidia.device.v1alpha1.GpuService`` is
SERVING), then runs an :class:`~deviceapi.client.informer.Informer`: list, watch from the list's
version, keep a local cache, resume after an eviction or a dropped connection, relist when the
version is too old. So it never misses a transition, and it only ever has to look at its cache.

A GPU is healthy when it has at least one condition and every condition is "True" (the server's
classification: any "False" → unhealthy; any "Unknown", or no condition at all → unknown, which
is not healthy either). Each time the set of healthy GPUs changes, one line is printed:

    4 of 5 GPUs healthy: GPU-0a1b… GPU-2c3d… GPU-4e5f… GPU-6a7b…

``--updates N`` exits after N lines (0, the default: run until Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from grpclib.exceptions import GRPCError

from deviceapi.client import DEFAULT_SOCKET, DeviceApiClient
from deviceapi.client.informer import Informer
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb


def is_healthy(gpu: pb.Gpu) -> bool:
    conditions = gpu.status.conditions
    return bool(conditions) and all(c.status == "True" for c in conditions)


async def run(args: argparse.Namespace) -> int:
    client = DeviceApiClient(unix_socket=args.unix_socket, address=args.address or None)
    try:
        # Reads answer UNAVAILABLE until the server is READY; wait for it instead of failing.
        await client.wait_serving(timeout=args.wait)

        printed = 0
        last: frozenset[str] | None = None
        enough = asyncio.Event()

        def report(_: pb.Gpu | None = None) -> None:
            nonlocal printed, last
            if not informer.synced.is_set():
                return  # still listing: report the whole set once it is complete
            healthy = frozenset(n for n, gpu in informer.cache.items() if is_healthy(gpu))
            if healthy == last:
                return
            last = healthy
            names = " ".join(sorted(healthy)) or "-"
            print(f"{len(healthy)} of {len(informer.cache)} GPUs healthy: {names}", flush=True)
            printed += 1
            if args.updates and printed >= args.updates:
                enough.set()

        informer = Informer(client, on_add=report, on_update=report, on_delete=report)
        runner = asyncio.create_task(informer.run())
        synced = asyncio.create_task(informer.synced.wait())
        finished = asyncio.create_task(enough.wait())
        try:
            await asyncio.wait({runner, synced}, return_when=asyncio.FIRST_COMPLETED)
            if not runner.done():
                report()  # the initial set
                await asyncio.wait({runner, finished}, return_when=asyncio.FIRST_COMPLETED)
            if runner.done():
                runner.result()  # the informer gave up: raise its error
        finally:
            for task in (runner, synced, finished):
                task.cancel()
            await asyncio.gather(runner, synced, finished, return_exceptions=True)
    except GRPCError as exc:
        print(f"healthy_gpus: {exc.status.name}: {exc.message}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"healthy_gpus: the server was not ready within {args.wait:g} s", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unix-socket",
                        default=os.environ.get("DEVICE_API_UNIX_SOCKET", DEFAULT_SOCKET),
                        help="server socket (default: %(default)s)")
    parser.add_argument("--address", default="", help="HOST:PORT instead of the Unix socket")
    parser.add_argument("--updates", type=int, default=0,
                        help="exit after printing N updates (0: run until Ctrl-C)")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the server to be READY (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
