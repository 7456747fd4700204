"""Command-line flags and environment of ``device-api-server`` (SPEC §6).

Every default in SPEC.md is a flag here, and every flag can also be set by an environment
variable ``DEVICE_API_<FLAG>`` (upper case, dashes as underscores). The environment overrides the
*default*; a flag given on the command line wins over the environment (the usual convention:
the more specific, more visible setting wins, so ``device-api-server --min-gpus 2`` means 2 even
in a shell that exported ``DEVICE_API_MIN_GPUS``). Parsing produces one frozen :class:`Config`;
nothing else in the program reads ``os.environ`` or argv.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Mapping, Sequence
from typing import Literal

ENV_PREFIX = "DEVICE_API_"

#: XIDs that say nothing about the GPU's health (application faults and the like).
DEFAULT_IGNORED_XIDS: frozenset[int] = frozenset({13, 31, 43, 45, 68, 109})
#: XIDs after which a GPU must not take new work.
DEFAULT_CRITICAL_XIDS: frozenset[int] = frozenset({48, 63, 64, 74, 79, 92, 94, 95, 119, 120})


class ConfigError(ValueError):
    """A flag or environment value is invalid; the message is one line for the operator."""


@dataclasses.dataclass(frozen=True, slots=True)
class XidSet:
    """A set of XIDs given on the command line; ``everything`` stands for ``all``."""

    xids: frozenset[int] = frozenset()
    everything: bool = False

    def __contains__(self, xid: object) -> bool:
        return self.everything or xid in self.xids

    def __str__(self) -> str:
        """As an operator writes it on the command line (``--help`` shows defaults this way)."""
        if self.everything:
            return "all"
        return ",".join(str(x) for x in sorted(self.xids)) or "none"


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration of one server process (durations in seconds)."""

    grpc_address: str = "127.0.0.1:50051"
    unix_socket: str = "/var/run/device-api/device.sock"
    health_port: int = 8081
    metrics_port: int = 9090
    #: Bind addresses of the HTTP listeners ("" = every interface, the default).
    health_address: str = ""
    metrics_address: str = ""
    #: SPEC §7.1: the merged upstream API (nvidia.nvsentinel.v1alpha1) on its own socket.
    nvsentinel_api_socket: str = ""
    #: SPEC §7.2: NVSentinel's platform-connector ingest on its own socket.
    platform_connector_socket: str = ""
    #: SPEC §7.3: condition types for which "True" means a problem.
    problem_conditions: frozenset[str] = frozenset()
    shutdown_timeout: float = 30.0
    shutdown_delay: float = 5.0
    log_format: Literal["json", "text"] = "json"
    verbosity: int = 0
    bridge: Literal["trio-asyncio", "guest"] = "guest"
    enable_nvml_provider: bool = False
    nvml_driver_root: str = "/run/nvidia/driver"
    nvml_health_check: bool = True
    nvml_ignored_xids: XidSet = XidSet()
    nvml_critical_xids: XidSet = XidSet()
    nvml_recovery_quiet_period: float = 60.0
    simulate: int = 0
    simulate_flap_interval: float = 0.0
    min_gpus: int = 1
    provider_timeout: float = 30.0
    heartbeat_timeout: float = 30.0
    max_gpus: int = 1024
    max_conditions: int = 32
    max_object_bytes: int = 65536
    max_receive_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 100
    max_watchers: int = 256
    watch_queue: int = 256
    watch_history: int = 1024
    slow_subscriber_timeout: float = 30.0
    subscribe_rate: float = 10.0
    subscribe_burst: int = 20
    node_name: str = ""

    def grpc_host_port(self) -> tuple[str, int] | None:
        """The TCP listen address, or None when TCP is off (``--grpc-address ""``)."""
        if not self.grpc_address:
            return None
        return split_host_port(self.grpc_address)

    def grpc_address_is_loopback(self) -> bool:
        """True when the TCP listener (if any) is reachable from this host only."""
        host_port = self.grpc_host_port()
        if host_port is None:
            return True
        host = host_port[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def as_dict(self) -> dict[str, object]:
        """Plain values for printing (``--check-config``) and logging."""
        out: dict[str, object] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, XidSet):
                value = "all" if value.everything else sorted(value.xids)
            elif isinstance(value, frozenset):
                value = sorted(value)
            out[field.name] = value
        return out


def bind_host(address: str) -> str:
    """The host part of a bind-address flag as the socket layer wants it (``[::1]`` → ``::1``);
    "" stays "" (every interface)."""
    return address.strip().removeprefix("[").removesuffix("]")


def _check_bind_address(flag: str, address: str) -> None:
    """An HTTP bind address is "" (every interface), an IP literal, or a host name; anything
    else (a port, a URL, spaces) is refused here, before anything starts."""
    host = bind_host(address)
    if not host:
        return
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if all(label and len(label) <= 63 and label.replace("-", "").isalnum()
           and label.isascii() and not label.startswith("-") for label in labels):
        return
    raise ConfigError(
        f"{flag} {address!r}: expected an IP address or host name without a port "
        '("" = every interface)'
    )


def split_host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too); raise ConfigError on anything else."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(f"--grpc-address {address!r}: expected HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--grpc-address {address!r}: port out of range")
    return host or "0.0.0.0", port


def parse_xids(text: str) -> XidSet:
    """Parse ``"79,48"`` or ``"all"`` (empty means none)."""
    text = text.strip()
    if text.lower() == "all":
        return XidSet(everything=True)
    xids: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        if not item.isdigit():
            raise ConfigError(f"XID list {text!r}: {item!r} is not a number (or use 'all')")
        xids.add(int(item))
    return XidSet(frozenset(xids))


def parse_names(text: str) -> frozenset[str]:
    """A comma list of names (blanks dropped)."""
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {text!r}")
    return value


def _show_default(value: object) -> str:
    """A default as it would be typed on the command line, not as a Python repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (frozenset, set)):
        return ",".join(sorted(str(v) for v in value)) or "none"
    if value == "":
        return '""'
    return str(value)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every default written the way an operator would type it.

    argparse's own formatter prints ``%(default)s``, i.e. ``str()`` of the parsed value, which
    for sets is ``frozenset()``; this one renders it with :func:`_show_default` instead. (The
    hook, ``_get_help_string``, is the one ``ArgumentDefaultsHelpFormatter`` itself overrides.)
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or "(default" in text
                or action.default in (None, argparse.SUPPRESS)):
            return text
        shown = _show_default(action.default).replace("%", "%%")
        return f"{text} (default: {shown})"


ArgumentGroup = argparse._ArgumentGroup | argparse.ArgumentParser


def add_logging_flags(group: ArgumentGroup) -> None:
    """--log-format, -v and --bridge: one definition for the server and the NVML sidecar."""
    d = Config()
    group.add_argument("--log-format", choices=("json", "text"), default=d.log_format,
                       help="Log line format.")
    group.add_argument("-v", "--verbosity", type=_non_negative_int, default=d.verbosity,
                       help="Log verbosity: 0 info, 1 debug, 2 and more trace.")
    group.add_argument("--bridge", choices=("trio-asyncio", "guest"), default=d.bridge,
                       help="How the trio actors and grpclib's asyncio share the thread: guest "
                            "(trio as a guest of a native asyncio loop; cheaper per call) or "
                            "trio-asyncio (an asyncio loop on top of trio). The test suite runs "
                            "in both; see docs/BENCHMARKS.md.")


def add_nvml_flags(group: ArgumentGroup) -> None:
    """The NVML poller's flags (driver root, health check, XIDs, quiet period): one definition
    for the server's embedded provider and the ``device-api-nvml-provider`` sidecar."""
    d = Config()
    group.add_argument("--nvml-driver-root", default=d.nvml_driver_root,
                       help="Where the driver is mounted; libnvidia-ml.so.1 is looked up here "
                            "before the system default.")
    group.add_argument("--nvml-health-check", type=parse_bool, nargs="?", const=True,
                       default=d.nvml_health_check,
                       help="Watch XID events and mark GPUs unhealthy.")
    group.add_argument("--nvml-ignored-xids", type=parse_xids, default=d.nvml_ignored_xids,
                       help="XIDs to ignore on top of 13,31,43,45,68,109 (comma list or 'all').")
    group.add_argument("--nvml-critical-xids", type=parse_xids, default=d.nvml_critical_xids,
                       help="XIDs that mark a GPU unhealthy on top of "
                            "48,63,64,74,79,92,94,95,119,120 (comma list or 'all').")
    group.add_argument("--nvml-recovery-quiet-period", type=_positive_float,
                       default=d.nvml_recovery_quiet_period,
                       help="Seconds without critical events after which a GPU NVML reports "
                            "healthy is marked Ready again.")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``device-api-server``; the Helm chart's tests render args through it."""
    p = argparse.ArgumentParser(
        prog="device-api-server",
        description=(
            "Node-local GPU device-state server. Health providers (NVML, DCGM, NVSentinel) write "
            "GPU state; device plugins and DRA drivers read and watch it over gRPC. Every flag "
            f"can also be set by an environment variable {ENV_PREFIX}<FLAG> (for example "
            f"{ENV_PREFIX}MIN_GPUS=4), which replaces the default; a flag given on the command "
            "line wins over the environment."
        ),
        formatter_class=HelpFormatter,
    )
    d = Config()
    listen = p.add_argument_group("listeners")
    listen.add_argument("--grpc-address", default=d.grpc_address,
                        help='TCP HOST:PORT for gRPC; "" turns TCP off. A non-loopback address '
                             "logs a warning: the API is unauthenticated.")
    listen.add_argument("--unix-socket", default=d.unix_socket,
                        help='Unix socket for gRPC (dir 0750, socket 0660); "" turns it off.')
    listen.add_argument("--health-port", type=_port, default=d.health_port,
                        help="HTTP port for /healthz, /livez and /readyz.")
    listen.add_argument("--metrics-port", type=_port, default=d.metrics_port,
                        help="HTTP port for /metrics (must differ from --health-port).")
    listen.add_argument("--health-address", default=d.health_address,
                        help='Address the health listener binds ("" = every interface).')
    listen.add_argument("--metrics-address", default=d.metrics_address,
                        help='Address the metrics listener binds ("" = every interface).')
    listen.add_argument("--nvsentinel-api-socket", default=d.nvsentinel_api_socket,
                        help="Unix socket serving the merged upstream API "
                             "(nvidia.nvsentinel.v1alpha1.GpuService) from the same store; "
                             '"" = off.')
    listen.add_argument("--platform-connector-socket", default=d.platform_connector_socket,
                        help="Unix socket accepting NVSentinel health monitors' "
                             'HealthEventOccurredV1 batches; "" = off.')

    life = p.add_argument_group("lifecycle")
    life.add_argument("--shutdown-timeout", type=_positive_float, default=d.shutdown_timeout,
                      help="Seconds in-flight calls get to finish after SIGTERM before a force "
                           "close.")
    life.add_argument("--shutdown-delay", type=_positive_float, default=d.shutdown_delay,
                      help="Seconds between turning not-ready and closing the listeners, so "
                           "load balancers and clients notice.")
    add_logging_flags(life)
    life.add_argument("--check-config", action="store_true",
                      help="Validate flags and environment, print the effective configuration "
                           "as JSON and exit (0 valid, 2 invalid).")
    life.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                      help="Node name for the info metric (default: $NODE_NAME).")

    nvml = p.add_argument_group("NVML provider")
    nvml.add_argument("--enable-nvml-provider", type=parse_bool, nargs="?", const=True,
                      default=d.enable_nvml_provider,
                      help="Run the built-in NVML provider inside the server.")
    add_nvml_flags(nvml)

    sim = p.add_argument_group("simulation")
    sim.add_argument("--simulate", type=_non_negative_int, default=d.simulate,
                     help="Register N simulated GPUs from a built-in provider (0 = off).")
    sim.add_argument("--simulate-flap-interval", type=_positive_float,
                     default=d.simulate_flap_interval,
                     help="Seconds between simulated health flaps of one GPU (0 = never).")

    bounds = p.add_argument_group("readiness and bounds")
    bounds.add_argument("--problem-conditions", type=parse_names,
                        default=d.problem_conditions,
                        help="Condition types written in the 'True means a problem' style "
                             "(comma list): for these, True counts as unhealthy.")
    bounds.add_argument("--min-gpus", type=_non_negative_int, default=d.min_gpus,
                        help="GPUs that must be registered before the server is READY.")
    bounds.add_argument("--provider-timeout", type=_positive_float, default=d.provider_timeout,
                        help="Seconds after which the server is READY even with fewer GPUs.")
    bounds.add_argument("--heartbeat-timeout", type=_positive_float, default=d.heartbeat_timeout,
                        help="Seconds without a heartbeat before a provider's GPUs turn "
                             "Ready=Unknown.")
    bounds.add_argument("--max-gpus", type=_non_negative_int, default=d.max_gpus,
                        help="Most GPUs the cache holds.")
    bounds.add_argument("--max-conditions", type=_non_negative_int, default=d.max_conditions,
                        help="Most conditions per GPU.")
    bounds.add_argument("--max-object-bytes", type=_non_negative_int,
                        default=d.max_object_bytes, help="Largest serialized GPU object.")
    bounds.add_argument("--max-receive-message-bytes", type=_non_negative_int,
                        default=d.max_receive_message_bytes,
                        help="Largest gRPC request message accepted.")
    bounds.add_argument("--max-concurrent-streams", type=_non_negative_int,
                        default=d.max_concurrent_streams,
                        help="Most concurrent HTTP/2 streams per connection.")
    bounds.add_argument("--max-watchers", type=_non_negative_int, default=d.max_watchers,
                        help="Most concurrent WatchGpus streams.")
    bounds.add_argument("--watch-queue", type=_non_negative_int, default=d.watch_queue,
                        help="Events buffered per watcher before it is evicted.")
    bounds.add_argument("--watch-history", type=_non_negative_int, default=d.watch_history,
                        help="Events kept for resuming watches.")
    bounds.add_argument("--slow-subscriber-timeout", type=_positive_float,
                        default=d.slow_subscriber_timeout,
                        help="Seconds a watcher may leave an event unaccepted before eviction.")
    bounds.add_argument("--subscribe-rate", type=_positive_float, default=d.subscribe_rate,
                        help="New watches per second (token bucket rate).")
    bounds.add_argument("--subscribe-burst", type=_non_negative_int, default=d.subscribe_burst,
                        help="New watches allowed in a burst (token bucket size).")
    return p


def _env_argv(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list[str]:
    """Turn ``DEVICE_API_<FLAG>`` variables into argv items. They are put *before* the command
    line's, and argparse keeps the last value of an option, so a flag given on the command line
    wins over its variable."""
    argv: list[str] = []
    for action in parser._actions:  # argparse offers no public iterator over options
        long_names = [s for s in action.option_strings if s.startswith("--")]
        if not long_names or action.dest in {"help", "check_config"}:
            continue
        flag = long_names[0]
        key = ENV_PREFIX + flag[2:].upper().replace("-", "_")
        if key in environ:
            argv.append(f"{flag}={environ[key]}")
    return argv


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Config, bool]:
    """Parse argv and environment into a Config; return it and whether --check-config was set.

    Raises ConfigError (one line) for values that parse but do not fit together; argparse
    itself exits with status 2 on malformed flags, which is what ``--check-config`` promises.
    """
    parser = build_parser()
    env = os.environ if environ is None else environ
    args = parser.parse_args([*_env_argv(parser, env), *(argv if argv is not None else [])])
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    config = Config(**values)
    validate(config)
    return config, bool(args.check_config)


def validate(config: Config) -> None:
    """Cross-field checks; raise ConfigError with a one-line reason."""
    if config.health_port == config.metrics_port:
        raise ConfigError(
            f"--health-port and --metrics-port must differ (both {config.health_port})"
        )
    config.grpc_host_port()  # raises on a malformed address
    _check_bind_address("--health-address", config.health_address)
    _check_bind_address("--metrics-address", config.metrics_address)
    if not config.grpc_address and not config.unix_socket:
        raise ConfigError("--grpc-address and --unix-socket are both empty: nothing to serve on")
    if not 1 <= config.max_concurrent_streams <= 2**31 - 1:
        raise ConfigError("--max-concurrent-streams must be between 1 and 2147483647")
    for name in ("max_watchers", "watch_queue", "watch_history", "max_gpus"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
