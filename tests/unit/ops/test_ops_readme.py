"""The first five minutes: what README.md tells a new user to type works as written.

Every command in README's shell blocks names a program that exists where it says (``.venv/bin``,
``.tools/bin``) or a system tool; ``make run`` stops at once on Ctrl-C; the tool installer keeps
everything inside the checkout.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
#: Programs a fresh machine has (README's "Set up" asks for make and Python).
SYSTEM = {"make", "curl", "grep", "python3"}


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    text = "\n".join(blocks).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        for part in re.split(r";|\|", line):
            if part.strip():
                commands.append(shlex.split(part))
    return commands


def test_readme_commands_name_programs_that_exist() -> None:
    commands = readme_commands()
    programs = {argv[0] for argv in commands}
    assert {".venv/bin/device-api", ".tools/bin/grpcurl", "make"} <= programs
    for program in programs:
        if "/" not in program:
            assert program in SYSTEM, f"README runs {program!r}: not found on a fresh clone"
            continue
        assert program.startswith((".venv/bin/", ".tools/bin/")), program
        path = ROOT / program
        if not path.parent.is_dir():
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{path.parent} missing (CI runs `make .venv/.installed tools`)")
            pytest.skip(f"{path.parent} not set up here")
        assert path.is_file() and os.access(path, os.X_OK), f"README runs {program}: missing"


def test_readme_help_command_is_runnable_as_written() -> None:
    text = README.read_text()
    assert "`.venv/bin/device-api-server --help`" in text
    assert "`device-api-server --help`" not in text.replace(".venv/bin/device-api-server", "")


def test_make_run_has_no_shutdown_delay() -> None:
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None
    assert "--shutdown-delay 0" in recipe.group(1)


def test_tool_installer_installs_nothing_system_wide() -> None:
    """Installing Debian's `prometheus` starts a Prometheus on :9090 (our metrics port)."""
    for script in (ROOT / "scripts" / "install-tools.sh", ROOT / ".ci" / "run"):
        for line in script.read_text().replace("\\\n", " ").splitlines():
            code = line.split("#", 1)[0]
            assert not re.search(r"apt-get\s+install\b.*\bprometheus\b", code), (script, line)
            assert not re.search(r"\b(pip|npm)\b.*\s-g\b|--global", code), (script, line)
    installer = (ROOT / "scripts" / "install-tools.sh").read_text()
    assert "apt-get download" in installer and "dpkg -x" in installer
