"""The args the chart renders are accepted by the programs they are passed to.

The reference chart shipped a flag its server did not have, and every pod crash-looped. Here the
server container's args go through ``device-api-server --check-config`` when the installed
console script offers it (it exits 0 only for a valid configuration), and otherwise through the
server's own parser, ``deviceapi._config.parse_config``. The sidecar's flags are checked against
``device-api-nvml-provider --help`` once that program is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from helmtest import SCENARIOS, nested, render, scenario

#: Value sets whose server args must all be valid, on top of every toggle scenario.
EXTRA_VALUES: dict[str, dict[str, Any]] = {
    "tuned": {
        "server.grpcAddress": "0.0.0.0:50051",
        "server.unixSocket": "/run/device-api/api.sock",
        "server.healthPort": 8181,
        "server.metricsPort": 9191,
        "server.shutdownDelay": 2.5,
        "server.shutdownTimeout": 45,
        "server.logFormat": "text",
        "server.verbosity": 2,
        "server.minGpus": 8,
        "server.providerTimeout": 120,
        "server.maxGpus": 4096,
        "server.maxReceiveMessageBytes": 16777216,
        "server.subscribeRate": 2.5,
        "server.extraArgs": ["--nvml-recovery-quiet-period=300"],
    },
    "nvml-tuned": {
        "nvml.enabled": True,
        "nvml.healthCheck": False,
        "nvml.ignoredXids": "all",
        "nvml.criticalXids": "13, 31",
        "nvml.recoveryQuietPeriod": 30,
    },
}
CASES = {
    **{name: nested(values) for name, values in SCENARIOS.items()},
    **{name: nested(values) for name, values in EXTRA_VALUES.items()},
}


def _console_script(name: str) -> str | None:
    """The program in this interpreter's venv, else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


@cache
def _help_text(program: str) -> str | None:
    try:
        proc = subprocess.run(
            [program, "--help"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _clean_env() -> dict[str, str]:
    """No DEVICE_API_* from the developer's shell may change the verdict."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_API_")}
    env["NODE_NAME"] = "node-1"
    return env


def check_server_args(args: list[str]) -> None:
    program = _console_script("device-api-server")
    help_text = _help_text(program) if program else None
    if program and help_text and "--check-config" in help_text:
        proc = subprocess.run(
            [program, *args, "--check-config"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=_clean_env(),
        )
        assert proc.returncode == 0, f"--check-config refused {args}:\n{proc.stderr}"
        return
    # Until the console script offers --check-config: the very parser it will use.
    from deviceapi._config import parse_config

    try:
        _, check = parse_config(args, environ={})
    except SystemExit as exc:  # argparse: unknown flag or malformed value
        raise AssertionError(f"the server's parser refused {args}") from exc
    assert check is False


@pytest.mark.parametrize("case", sorted(CASES))
def test_server_args_are_accepted_by_the_server(case: str) -> None:
    args = render(CASES[case]).server["args"]
    assert all(isinstance(a, str) and a.startswith("-") for a in args), args
    check_server_args(args)


def test_rendered_values_reach_the_effective_config() -> None:
    """Values become the configuration they describe (not just something that parses)."""
    from deviceapi._config import parse_config

    args = render(CASES["tuned"]).server["args"]
    config, _ = parse_config(args, environ={})
    assert config.grpc_address == "0.0.0.0:50051"
    assert config.unix_socket == "/run/device-api/api.sock"
    assert (config.health_port, config.metrics_port) == (8181, 9191)
    assert (config.shutdown_delay, config.shutdown_timeout) == (2.5, 45)
    assert config.log_format == "text" and config.verbosity == 2
    assert config.min_gpus == 8 and config.provider_timeout == 120
    assert config.max_gpus == 4096 and config.max_receive_message_bytes == 16777216
    assert config.subscribe_rate == 2.5
    assert config.nvml_recovery_quiet_period == 300
    assert config.enable_nvml_provider is False

    nvml, _ = parse_config(render(CASES["nvml-tuned"]).server["args"], environ={})
    assert nvml.enable_nvml_provider is True
    assert nvml.nvml_health_check is False
    assert nvml.nvml_ignored_xids.everything
    assert nvml.nvml_critical_xids.xids == {13, 31}
    assert nvml.nvml_recovery_quiet_period == 30


def test_chart_defaults_are_the_server_defaults() -> None:
    """values.yaml restates the server's defaults; drift would surprise operators."""
    from deviceapi._config import Config, parse_config

    rendered, _ = parse_config(scenario("defaults").server["args"], environ={})
    defaults = Config()
    # SPEC §7.1: the server leaves the upstream API's socket off; the chart turns it on where
    # the upstream Go SDK looks by default.
    assert rendered.nvsentinel_api_socket == "/var/run/nvidia-device-api/device-api.sock"
    for field in rendered.as_dict():
        if field in {"node_name", "nvsentinel_api_socket"}:
            continue
        assert getattr(rendered, field) == getattr(defaults, field), field


def test_check_config_exit_status_when_available() -> None:
    """Once --check-config exists, it must refuse what the parser refuses (else the checks above
    would prove nothing)."""
    program = _console_script("device-api-server")
    help_text = _help_text(program) if program else None
    if not (program and help_text and "--check-config" in help_text):
        pytest.skip("device-api-server --check-config is not available yet; the parser is used")
    bad = subprocess.run(
        [program, "--no-such-flag", "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_clean_env(),
    )
    assert bad.returncode != 0
    good = subprocess.run(
        [program, "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_clean_env(),
    )
    assert good.returncode == 0, good.stderr
    json.loads(good.stdout)  # prints the effective configuration as JSON


@pytest.mark.parametrize("case", ["nvml-sidecar", "all-sidecar"])
def test_sidecar_flags_exist_in_the_nvml_provider(case: str) -> None:
    program = _console_script("device-api-nvml-provider")
    help_text = _help_text(program) if program else None
    if not help_text:
        pytest.skip("device-api-nvml-provider is not installed yet (its flags are checked then)")
    side = render(CASES[case]).container("nvml-provider")
    assert side["command"] == ["device-api-nvml-provider"]
    offered = set(re.findall(r"--[a-z0-9][a-z0-9-]*", help_text))
    for arg in side["args"]:
        flag = arg.split("=", 1)[0]
        assert flag in offered, f"{flag} is not a flag of device-api-nvml-provider"
