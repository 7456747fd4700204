"""A client of the merged upstream API (SPEC §7.1) with grpcio, shaped like the upstream Go SDK.

    python examples/upstream_api_client.py --unix-socket /var/run/nvidia-device-api/device-api.sock

The server serves ``nvidia.nvsentinel.v1alpha1.GpuService`` on its own socket when started with
``--nvsentinel-api-socket`` (the chart turns it on at the path above, the Go SDK's default
target). This does what the SDK's informers and controllers do:

1. wait until gRPC health of the service is SERVING (reads answer UNAVAILABLE before that);
2. list, then watch from the list's ``resource_version`` (nothing is missed in between);
3. with ``--gpu NAME``: create it (ALREADY_EXISTS → read the existing one), then set one
   condition with the version just read as the precondition (ABORTED → re-read and retry).

Each event prints one line; ``--events N`` exits after N of them (0: run until Ctrl-C).
grpcio's generic calls carry the message classes shipped in ``deviceapi.proto.nvsentinel``; code
generated with ``grpc_tools.protoc`` from ``src/deviceapi/proto/nvsentinel/v1alpha1/gpu.proto``
works the same.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from grpclib.health.v1 import health_pb2

from deviceapi.proto.nvsentinel.v1alpha1 import gpu_pb2 as pb

SERVICE = "nvidia.nvsentinel.v1alpha1.GpuService"
DEFAULT_SOCKET = "/var/run/nvidia-device-api/device-api.sock"


class GpuClient:
    """The service's calls over one grpcio channel, each with a deadline."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self.timeout = timeout

        def unary(method: str, request: Any, reply: Any) -> Callable[..., Any]:
            return channel.unary_unary(f"/{SERVICE}/{method}",
                                       request_serializer=request.SerializeToString,
                                       response_deserializer=reply.FromString)

        self.get_gpu = unary("GetGpu", pb.GetGpuRequest, pb.GetGpuResponse)
        self.list_gpus = unary("ListGpus", pb.ListGpusRequest, pb.ListGpusResponse)
        self.create_gpu = unary("CreateGpu", pb.CreateGpuRequest, pb.Gpu)
        self.update_status = unary("UpdateGpuStatus", pb.UpdateGpuStatusRequest, pb.Gpu)
        self.watch_gpus = channel.unary_stream(
            f"/{SERVICE}/WatchGpus", request_serializer=pb.WatchGpusRequest.SerializeToString,
            response_deserializer=pb.WatchGpusResponse.FromString)
        self.health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)

    def wait_serving(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                reply = self.health(health_pb2.HealthCheckRequest(service=SERVICE),
                                    timeout=self.timeout)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{SERVICE} not SERVING after {wait:g}s")
            time.sleep(0.2)

    def ensure(self, name: str) -> pb.Gpu:
        """Create ``name``, or read it if it already exists (ALREADY_EXISTS)."""
        gpu = pb.Gpu(metadata=pb.ObjectMeta(name=name), spec=pb.GpuSpec(uuid=name))
        try:
            created: pb.Gpu = self.create_gpu(pb.CreateGpuRequest(gpu=gpu), timeout=self.timeout)
            return created
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        existing: pb.Gpu = self.get_gpu(pb.GetGpuRequest(name=name), timeout=self.timeout).gpu
        return existing

    def set_condition(self, current: pb.Gpu, kind: str, status: str) -> pb.Gpu:
        """Replace ``kind`` in the status, guarded by the version read (ABORTED → re-read)."""
        for _ in range(5):
            gpu = pb.Gpu()
            gpu.CopyFrom(current)
            kept = [c for c in gpu.status.conditions if c.type != kind]
            del gpu.status.conditions[:]
            gpu.status.conditions.extend(kept)
            gpu.status.conditions.add(type=kind, status=status, reason="Example")
            try:
                updated: pb.Gpu = self.update_status(pb.UpdateGpuStatusRequest(gpu=gpu),
                                                     timeout=self.timeout)
                return updated
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.ABORTED:
                    raise
            current = self.get_gpu(pb.GetGpuRequest(name=current.metadata.name),
                                   timeout=self.timeout).gpu
        raise RuntimeError(f"{current.metadata.name}: still conflicting after 5 tries")

    def watch(self, version: str) -> Iterator[pb.WatchGpusResponse]:
        request = pb.WatchGpusRequest(opts=pb.ListOptions(resource_version=version))
        yield from self.watch_gpus(request)


def conditions(gpu: pb.Gpu) -> str:
    return ",".join(f"{c.type}={c.status}" for c in gpu.status.conditions) or "-"


def run(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(f"unix://{args.unix_socket}") as channel:
        client = GpuClient(channel, args.timeout)
        client.wait_serving(args.wait)
        listing = client.list_gpus(pb.ListGpusRequest(), timeout=args.timeout).gpu_list
        version = listing.metadata.resource_version
        print(f"listed {len(listing.items)} GPUs at version {version}", flush=True)
        if args.gpu:
            gpu = client.ensure(args.gpu)
            updated = client.set_condition(gpu, "ExampleHealthy", args.status)
            print(f"{args.gpu}: ExampleHealthy={args.status} (generation "
                  f"{updated.metadata.generation}, version {updated.metadata.resource_version})",
                  flush=True)
        if args.once:
            return 0
        for seen, event in enumerate(client.watch(version), start=1):
            gpu = event.object
            print(f"{event.type} {gpu.metadata.name} version={gpu.metadata.resource_version} "
                  f"{conditions(gpu)}", flush=True)
            if args.events and seen >= args.events:
                break
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unix-socket", default=DEFAULT_SOCKET)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for SERVING")
    p.add_argument("--gpu", default="", help="create this GPU and set ExampleHealthy on it")
    p.add_argument("--status", choices=("True", "False", "Unknown"), default="True")
    p.add_argument("--once", action="store_true", help="exit without watching")
    p.add_argument("--events", type=int, default=0, help="exit after N events (0: never)")
    args = p.parse_args(argv)
    try:
        return run(args)
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
