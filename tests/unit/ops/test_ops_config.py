"""Flags, environment and ``--help`` of device-api-server, as an operator meets them."""

from __future__ import annotations

import pytest

from deviceapi._config import ConfigError, build_parser, parse_config


def test_a_flag_wins_over_its_environment_variable() -> None:
    """The usual convention: the environment replaces the default, the command line wins."""
    env = {"DEVICE_API_MIN_GPUS": "5", "DEVICE_API_NVML_IGNORED_XIDS": "79"}
    from_env, _ = parse_config([], environ=env)
    assert from_env.min_gpus == 5
    assert 79 in from_env.nvml_ignored_xids
    both, _ = parse_config(["--min-gpus", "2", "--nvml-ignored-xids=all"], environ=env)
    assert both.min_gpus == 2
    assert both.nvml_ignored_xids.everything
    # a boolean written as a bare flag also wins over its variable
    nvml, _ = parse_config(["--enable-nvml-provider"],
                           environ={"DEVICE_API_ENABLE_NVML_PROVIDER": "false"})
    assert nvml.enable_nvml_provider is True


def test_help_shows_defaults_as_they_are_typed() -> None:
    text = build_parser().format_help()
    for python_repr in ("XidSet(", "frozenset(", "everything=", "True)", "False)"):
        assert python_repr not in text
    flat = " ".join(text.split())
    assert "on top of 13,31,43,45,68,109 (comma list or 'all'). (default: none)" in flat
    assert "--problem-conditions PROBLEM_CONDITIONS" in flat
    assert '(default: "")' in flat  # empty strings are visible, not blank
    assert "(default: true)" in flat  # booleans as the flag accepts them
    assert "wins over the environment" in flat


@pytest.mark.parametrize("address", ["", "127.0.0.2", "0.0.0.0", "::1", "[::1]", "localhost",
                                     "node-1.example.internal"])
def test_http_bind_addresses_accepted(address: str) -> None:
    config, _ = parse_config(["--health-address", address, "--metrics-address", address],
                             environ={})
    assert config.health_address == config.metrics_address == address


@pytest.mark.parametrize("address", ["127.0.0.1:8081", "http://127.0.0.1", "two words",
                                     "-bad-.example", "a..b"])
def test_http_bind_address_refused_with_one_line(address: str) -> None:
    for flag in ("--health-address", "--metrics-address"):
        with pytest.raises(ConfigError) as info:
            parse_config([f"{flag}={address}"], environ={})
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"{flag} {address!r}: expected an IP address or host name")
