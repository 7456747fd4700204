"""Send NVSentinel health events to the server, as NVIDIA's gpu-health-monitor does (grpcio).

    python examples/nvsentinel_monitor.py --socket /tmp/device-api/platform-connector.sock \\
        --gpu-uuid GPU-00000000-0000-4000-8000-0000000000e1 --fatal

The server must run with ``--platform-connector-socket`` (SPEC §7.2). This sends one
``datamodels.PlatformConnector/HealthEventOccurredV1`` batch with one event about the GPU,
shaped like the monitor's: entities ``GPU`` (DCGM index), ``PCI`` and ``GPU_UUID`` — only
``GPU_UUID`` lets the server find the GPU, so run NVSentinel's metadata collector — one error
code, ``isFatal`` whenever there is an action. ``--healthy`` sends the recovery instead;
``--node-level`` sends DCGM-unreachable (no entity: every GPU's ``GpuDcgmConnectivityFailure``
turns Unknown). The batch carries an ``idempotency-key`` header and is retried on UNAVAILABLE
with the same key, so a retry whose first attempt did land is applied once.

It prints one line: ``ok <check> <key>`` — the batch is committed; a §1 client reading the GPU
now sees the condition (``device-api get <uuid>``).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence

import grpc
from google.protobuf.empty_pb2 import Empty

from deviceapi.proto.datamodels import health_event_pb2 as pb

METHOD = "/datamodels.PlatformConnector/HealthEventOccurredV1"


def build_event(args: argparse.Namespace) -> pb.HealthEvent:
    event = pb.HealthEvent(version=1, agent="gpu-health-monitor", componentClass="GPU",
                           nodeName=args.node_name)
    event.generatedTimestamp.GetCurrentTime()
    if args.node_level:
        event.checkName = "GpuDcgmConnectivityFailure"
        event.isHealthy = args.healthy
        event.isFatal = not args.healthy
        event.recommendedAction = pb.NONE if args.healthy else pb.CONTACT_SUPPORT
        event.message = "DCGM reachable" if args.healthy else "Failed to connect to DCGM"
        if not args.healthy:
            event.errorCode.append("GPU_DCGM_CONNECTIVITY_ERROR")
        return event
    event.checkName = args.check
    event.entitiesImpacted.extend([
        pb.Entity(entityType="GPU", entityValue=str(args.gpu_index)),
        pb.Entity(entityType="PCI", entityValue=args.pci),
        pb.Entity(entityType="GPU_UUID", entityValue=args.gpu_uuid),
    ])
    if args.healthy:
        event.isHealthy = True
        event.message = f"{args.check} reported no errors"
    else:
        event.errorCode.append(args.error_code)
        event.recommendedAction = pb.COMPONENT_RESET if args.fatal else pb.NONE
        event.isFatal = args.fatal
        event.message = f"{args.error_code} on GPU {args.gpu_index}"
    return event


def send(channel: grpc.Channel, batch: pb.HealthEvents, key: str, attempts: int) -> None:
    """Send with retries on UNAVAILABLE / DEADLINE_EXCEEDED, always with the same key."""
    call = channel.unary_unary(METHOD, request_serializer=pb.HealthEvents.SerializeToString,
                               response_deserializer=Empty.FromString)
    for attempt in range(attempts):
        try:
            call(batch, timeout=5.0, metadata=[("idempotency-key", key)])
            return
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                    or attempt == attempts - 1:
                raise
            time.sleep(min(0.2 * 2 ** attempt, 2.0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the server's --platform-connector-socket")
    parser.add_argument("--gpu-uuid", default="", help="GPU_UUID entity (the GPU's name)")
    parser.add_argument("--gpu-index", type=int, default=0)
    parser.add_argument("--pci", default="0000:17:00.0")
    parser.add_argument("--check", default="GpuMemWatch", help="checkName = condition type")
    parser.add_argument("--error-code", default="DCGM_FR_VOLATILE_DBE_DETECTED")
    parser.add_argument("--fatal", action="store_true", help="fatal, action COMPONENT_RESET")
    parser.add_argument("--healthy", action="store_true", help="send the recovery")
    parser.add_argument("--node-level", action="store_true", help="DCGM unreachable (no entity)")
    parser.add_argument("--node-name", default="node-1")
    parser.add_argument("--attempts", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.node_level and not args.gpu_uuid:
        parser.error("--gpu-uuid is required unless --node-level")
    event = build_event(args)
    key = str(uuid.uuid4())
    with grpc.insecure_channel(f"unix://{args.socket}") as channel:
        try:
            send(channel, pb.HealthEvents(version=1, events=[event]), key, args.attempts)
        except grpc.RpcError as exc:
            print(f"nvsentinel_monitor: {exc.code().name}: {exc.details()}",  # type: ignore[attr-defined]
                  file=sys.stderr)
            return 1
    print(f"ok {event.checkName} {key}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
