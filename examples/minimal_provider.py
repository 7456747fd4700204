"""A minimal provider: register a GPU, heartbeat, and set a health condition.

    python examples/minimal_provider.py --unix-socket /tmp/device-api/device.sock \\
        --gpu GPU-00000000-0000-4000-8000-0000000000e1

What a health monitor (NVML, DCGM, your own) does, through ProviderService:

1. wait until the server listens: gRPC health of ``nvidia.device.v1alpha1.ProviderService`` is
   SERVING as soon as it does — providers must not wait for the readiness gate, they open it;
2. ``RegisterGpu`` with the condition this provider owns, "Unknown" until it has checked the GPU
   (idempotent: after a restart it answers created=false and changes nothing);
3. ``Heartbeat`` naming its GPUs: from now on, if heartbeats stop for longer than the server's
   ``--heartbeat-timeout`` (30 s), the server marks these GPUs Ready=Unknown
   (reason ProviderHeartbeatTimeout) until they resume;
4. ``UpdateGpuCondition``: upsert its own condition by type, leaving every other provider's
   conditions alone; the server sets last_transition_time when the status changes;
5. keep heartbeating every ``--interval`` seconds (a third of the timeout is a good choice).

``--once`` stops after step 4; ``--heartbeats N`` after N more heartbeats (0: until Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from grpclib.exceptions import GRPCError

from deviceapi.client import DEFAULT_SOCKET, DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb

EXAMPLE_GPU = "GPU-00000000-0000-4000-8000-0000000000e1"
PROVIDER_SERVICE = "nvidia.device.v1alpha1.ProviderService"


async def run(args: argparse.Namespace) -> int:
    client = DeviceApiClient(unix_socket=args.unix_socket, address=args.address or None,
                             provider_id=args.provider_id, timeout=10.0)
    try:
        await client.wait_serving(PROVIDER_SERVICE, timeout=args.wait)

        starting = pb.Condition(type=args.condition, status="Unknown", reason="Starting",
                                message=f"{args.provider_id} has not checked this GPU yet")
        created, version = await client.register_gpu(
            name=args.gpu, status=pb.GpuStatus(conditions=[starting]))
        state = "registered" if created else "already registered"
        print(f"{args.gpu}: {state} (resource version {version})", flush=True)

        acknowledged = await client.heartbeat(gpu_names=[args.gpu])
        print(f"heartbeat {'acknowledged' if acknowledged else 'NOT acknowledged'}", flush=True)

        # ... check the GPU here; then publish the verdict:
        condition = pb.Condition(type=args.condition, status=args.status, reason=args.reason,
                                 message=args.message)
        version = await client.update_condition(name=args.gpu, condition=condition)
        print(f"{args.gpu}: {args.condition}={args.status} (resource version {version})",
              flush=True)
        if args.once:
            return 0

        sent = 0
        while not args.heartbeats or sent < args.heartbeats:
            await asyncio.sleep(args.interval)
            await client.heartbeat(gpu_names=[args.gpu])
            sent += 1
        print(f"sent {sent} more heartbeats", flush=True)
    except GRPCError as exc:
        print(f"minimal_provider: {exc.status.name}: {exc.message}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"minimal_provider: no server within {args.wait:g} s", file=sys.stderr)
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
    parser.add_argument("--gpu", default=EXAMPLE_GPU,
                        help="GPU UUID to register (default: %(default)s)")
    parser.add_argument("--provider-id", default="example-provider",
                        help="this provider's id (default: %(default)s)")
    parser.add_argument("--condition", default="ExampleHealthy",
                        help="the condition type this provider owns (default: %(default)s)")
    parser.add_argument("--status", choices=("True", "False", "Unknown"), default="True",
                        help="the verdict to publish (default: %(default)s)")
    parser.add_argument("--reason", default="Checked", help="condition reason")
    parser.add_argument("--message", default="example check passed", help="condition message")
    parser.add_argument("--once", action="store_true",
                        help="exit after setting the condition (no heartbeat loop)")
    parser.add_argument("--heartbeats", type=int, default=0,
                        help="exit after N more heartbeats (0: until Ctrl-C)")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between heartbeats (default: %(default)s)")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the server (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
