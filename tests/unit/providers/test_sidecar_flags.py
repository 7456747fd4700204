"""The sidecar's NVML and logging flags are the server's: same names, defaults, parsing, help.

They come from the same definitions in ``_config`` (``add_nvml_flags``, ``add_logging_flags``),
so a default changed for one program cannot drift from the other.
"""

from __future__ import annotations

import argparse

from deviceapi._config import build_parser as server_parser
from deviceapi.providers.nvml.sidecar import build_parser as sidecar_parser

SHARED = ("--nvml-driver-root", "--nvml-health-check", "--nvml-ignored-xids",
          "--nvml-critical-xids", "--nvml-recovery-quiet-period", "--log-format", "--verbosity",
          "--bridge")


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def test_shared_flags_are_defined_once() -> None:
    server, sidecar = _actions(server_parser()), _actions(sidecar_parser())
    for flag in SHARED:
        a, b = server[flag], sidecar[flag]
        assert (a.dest, a.default, a.type, a.choices, a.nargs, a.const, a.help) == \
               (b.dest, b.default, b.type, b.choices, b.nargs, b.const, b.help), flag


def test_the_sidecar_parses_them_as_the_server_does() -> None:
    argv = ["--nvml-ignored-xids", "all", "--nvml-critical-xids", "13,31",
            "--nvml-health-check", "false", "--nvml-recovery-quiet-period", "5", "-v", "2",
            "--log-format", "text", "--bridge", "trio-asyncio"]
    server = server_parser().parse_args(argv)
    sidecar = sidecar_parser().parse_args(argv)
    for flag in SHARED:
        dest = flag.lstrip("-").replace("-", "_")
        assert getattr(server, dest) == getattr(sidecar, dest), flag
