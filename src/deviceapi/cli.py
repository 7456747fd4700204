"""device-api: a command-line consumer and provider of the Device API.

    device-api list                   GPUs and their conditions (table, or -o json)
    device-api get GPU-...            one GPU
    device-api watch                  events as they happen (Ctrl-C to stop)
    device-api set-condition GPU-... TYPE STATUS [--reason R] [--message M]

Talks to the server's Unix socket (--unix-socket, default /var/run/device-api/device.sock, or
$DEVICE_API_UNIX_SOCKET), or to TCP with --address HOST:PORT. --api nvsentinel reads through
the merged upstream API instead (SPEC 7.1, nvidia.nvsentinel.v1alpha1; list, get and watch, with
--namespace), on its socket (default /var/run/nvidia-device-api/device-api.sock, the upstream Go
SDK's target). Errors print the server's status and message on one line and exit 1; a server
that cannot be reached is named with the address tried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from .client import DEFAULT_SOCKET, DeviceApiClient
from .proto.device.v1alpha1 import gpu_pb2 as pb
from .proto.nvsentinel.v1alpha1 import gpu_grpc as nvs_grpc
from .proto.nvsentinel.v1alpha1 import gpu_pb2 as nvs

#: The upstream Go SDK's default target, where the chart serves SPEC §7.1.
NVSENTINEL_SOCKET = "/var/run/nvidia-device-api/device-api.sock"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="device-api", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unix-socket", default=os.environ.get("DEVICE_API_UNIX_SOCKET"),
                   help=f"server socket (default: {DEFAULT_SOCKET}; with --api nvsentinel "
                        f"{NVSENTINEL_SOCKET}; $DEVICE_API_UNIX_SOCKET sets it)")
    p.add_argument("--address", default="", help="HOST:PORT instead of the Unix socket")
    p.add_argument("--api", choices=("device", "nvsentinel"), default="device",
                   help="nvidia.device.v1alpha1 (default) or the merged upstream "
                        "nvidia.nvsentinel.v1alpha1 (list, get, watch)")
    p.add_argument("--namespace", default="",
                   help='with --api nvsentinel: only this namespace ("" = all)')
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds per call (default: %(default)s)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="output format (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list GPUs", parents=[output])
    get = sub.add_parser("get", help="show one GPU", parents=[output])
    get.add_argument("name", help="GPU name (its UUID, GPU-... or MIG-...)")
    watch = sub.add_parser("watch", help="stream GPU events", parents=[output])
    watch.add_argument("--resource-version", type=int, default=0,
                       help="resume after this version (0: start with the current GPUs; "
                            "with --api nvsentinel, start now)")
    watch.add_argument("--count", type=int, default=0, help="stop after N events (0: never)")
    setc = sub.add_parser("set-condition", help="upsert one condition (ProviderService)",
                          parents=[output])
    setc.add_argument("name", help="GPU name (its UUID, GPU-... or MIG-...)")
    setc.add_argument("type", help="condition type, e.g. Ready (other types are left alone)")
    setc.add_argument("status", choices=("True", "False", "Unknown"),
                      help="condition status: True, False or Unknown")
    setc.add_argument("--reason", default="",
                      help="short machine-readable reason, e.g. Maintenance (default: none)")
    setc.add_argument("--message", default="", help="human-readable detail (default: none)")
    setc.add_argument("--provider-id", default="device-api-cli",
                      help="provider id the change is recorded under (default: %(default)s)")
    return p


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _conditions(gpu: pb.Gpu | nvs.Gpu) -> str:
    return ",".join(f"{c.type}={c.status}" for c in gpu.status.conditions) or "-"


def _table(gpus: Sequence[pb.Gpu | nvs.Gpu]) -> str:
    rows = [("NAME", "VERSION", "CONDITIONS")]
    rows += [(g.metadata.name, g.metadata.resource_version, _conditions(g)) for g in gpus]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]}" for r in rows)


async def run(args: argparse.Namespace) -> int:
    if args.api == "nvsentinel":
        return await run_nvsentinel(args)
    client = DeviceApiClient(unix_socket=args.unix_socket, address=args.address or None,
                             timeout=args.timeout)
    try:
        if args.command == "list":
            listing = await client.list()
            if args.output == "json":
                _out(json.dumps(_as_dict(listing), indent=2))
            else:
                _out(_table(listing.items))
        elif args.command == "get":
            gpu = await client.get(args.name)
            _out(json.dumps(_as_dict(gpu), indent=2) if args.output == "json"
                 else _table([gpu]))
        elif args.command == "watch":
            seen = 0
            async for event in client.watch(args.resource_version):
                if args.output == "json":
                    _out(json.dumps({"type": event.type, "object": _as_dict(event.object)}))
                else:
                    _print_event(event.type, event.object)
                seen += 1
                if args.count and seen >= args.count:
                    break
        elif args.command == "set-condition":
            rv = await client.update_condition(
                name=args.name, provider_id=args.provider_id,
                condition=pb.Condition(type=args.type, status=args.status,
                                       reason=args.reason, message=args.message))
            _out(f"{args.name}: {args.type}={args.status} (resource version {rv})")
    except GRPCError as exc:
        return _failed(exc, args)
    except (ConnectionError, OSError) as exc:
        return _failed(exc, args)
    finally:
        client.close()
    return 0


class OutputClosed(Exception):
    """Whoever reads our output went away (``device-api watch | head``): not a server error."""


def _out(text: str) -> None:
    """One result on stdout, flushed (a watch is read as it happens); a closed pipe is told
    apart from the socket's errors, which are OSErrors too."""
    try:
        print(text, flush=True)
    except BrokenPipeError as exc:
        raise OutputClosed from exc


def _failed(exc: Exception, args: argparse.Namespace) -> int:
    """One line on stderr, exit status 1; an unreachable server is named with the address
    tried."""
    if isinstance(exc, GRPCError):
        print(f"device-api: {exc.status.name}: {exc.message}", file=sys.stderr)
        return 1
    if args.address:
        where = f"tcp {args.address}"
    else:
        default = NVSENTINEL_SOCKET if args.api == "nvsentinel" else DEFAULT_SOCKET
        where = f"unix socket {args.unix_socket or default}"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    print(f"device-api: cannot reach the server at {where}: {reason} "
          "(--unix-socket or --address say where it listens)", file=sys.stderr)
    return 1


def _print_event(event_type: str, gpu: pb.Gpu | nvs.Gpu) -> None:
    _out(f"{event_type:<9} {gpu.metadata.name}  rv={gpu.metadata.resource_version}  "
         f"{_conditions(gpu)}")


async def run_nvsentinel(args: argparse.Namespace) -> int:
    """list / get / watch through SPEC §7.1's API (nvidia.nvsentinel.v1alpha1)."""
    if args.address:
        host, _, port = args.address.rpartition(":")
        channel = Channel(host or "127.0.0.1", int(port))
    else:
        channel = Channel(path=args.unix_socket or NVSENTINEL_SOCKET)
    stub = nvs_grpc.GpuServiceStub(channel)
    namespace = args.namespace
    try:
        if args.command == "list":
            listing = (await stub.ListGpus(nvs.ListGpusRequest(namespace=namespace),
                                           timeout=args.timeout)).gpu_list
            _out(json.dumps(_as_dict(listing), indent=2) if args.output == "json"
                 else _table(listing.items))
        elif args.command == "get":
            gpu = (await stub.GetGpu(nvs.GetGpuRequest(name=args.name, namespace=namespace),
                                     timeout=args.timeout)).gpu
            _out(json.dumps(_as_dict(gpu), indent=2) if args.output == "json"
                 else _table([gpu]))
        elif args.command == "watch":
            version = str(args.resource_version) if args.resource_version else ""
            request = nvs.WatchGpusRequest(namespace=namespace,
                                           opts=nvs.ListOptions(resource_version=version))
            seen = 0
            async with stub.WatchGpus.open() as stream:
                await stream.send_message(request, end=True)
                async for event in stream:
                    if args.output == "json":
                        _out(json.dumps({"type": event.type,
                                         "object": _as_dict(event.object)}))
                    else:
                        _print_event(event.type, event.object)
                    seen += 1
                    if args.count and seen >= args.count:
                        await stream.cancel()  # leaving a live stream would wait for its end
                        break
        else:
            print(f"device-api: {args.command} is not available with --api nvsentinel",
                  file=sys.stderr)
            return 2
    except (GRPCError, ConnectionError, OSError) as exc:
        return _failed(exc, args)
    finally:
        channel.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except OutputClosed:
        # As Python's docs advise for SIGPIPE: no message (the reader left on purpose), stdout
        # pointed at /dev/null so the interpreter's final flush does not fail again, status 1.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
