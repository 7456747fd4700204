"""The container image, checked statically (no container engine runs in CI): multi-stage, a
runtime stage with no shell and no RUN, non-root 65534, exec-form entrypoint of the console
script, read-only-root friendly, and a .dockerignore that keeps the build context small and
free of secrets and local environments."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field

import pytest
from helmtest import REPO, scenario

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m, line
            base = re.sub(r"\$\{(\w+)\}", lambda v: args.get(v[1], v[0]), m[1])
            stages.append(Stage(base=base, name=m[2]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede the first FROM: {line}"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


def test_multi_stage_build() -> None:
    _, stages = parse_dockerfile()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    assert build.name
    assert any(f"--from={build.name}" in c for c in runtime.all("COPY"))


def test_runtime_stage_needs_no_shell() -> None:
    _, stages = parse_dockerfile()
    runtime = stages[-1]
    # distroless: no shell, so nothing may RUN in the final stage either.
    assert runtime.base.startswith("gcr.io/distroless/python3"), runtime.base
    assert not runtime.all("RUN")
    for keyword in ("ENTRYPOINT", "CMD"):
        for arg in runtime.all(keyword):
            form = json.loads(arg)  # exec form: a JSON array, never `sh -c`
            assert isinstance(form, list) and all(isinstance(x, str) for x in form), arg
            assert form[0] not in {"sh", "/bin/sh", "bash", "/bin/bash"}, arg


def test_entrypoint_is_the_server_console_script() -> None:
    _, stages = parse_dockerfile()
    runtime = stages[-1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    program = json.loads(entrypoint)[0]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert program.rsplit("/", 1)[-1] == "device-api-server"
    assert "device-api-server" in scripts
    # The chart's other commands (sidecar, init container) are found on PATH.
    env = " ".join(runtime.all("ENV"))
    assert re.search(r"PATH=/opt/venv/bin:", env), env
    assert program.startswith("/opt/venv/bin/")


def test_non_root_and_read_only_root_friendly() -> None:
    _, stages = parse_dockerfile()
    runtime = stages[-1]
    users = runtime.all("USER")
    assert users and users[-1] in {"65534", "65534:65534"}, users
    env = " ".join(runtime.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # nothing written next to the code at run time
    build = stages[0]
    assert any("compileall" in r for r in build.all("RUN"))  # bytecode made at build time
    # The chart runs the same user the image declares.
    assert scenario("defaults").server["securityContext"]["runAsUser"] == 65534


def test_build_context_files_exist_and_are_not_ignored() -> None:
    _, stages = parse_dockerfile()
    patterns = ignore_patterns()
    for copy in stages[0].all("COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _dest = copy.split()
        for src in (s for s in sources if not s.startswith("--")):
            assert (REPO / src).exists(), src
            assert not ignored(src, patterns), f"{src} is copied but .dockerignore excludes it"


def ignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def ignored(path: str, patterns: list[str]) -> bool:
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.removeprefix("**/")):
            verdict = not negate
    return verdict


@pytest.mark.parametrize(
    "path", [".venv", ".git", "tests", ".tools", "bench", "helm", "__pycache__", "x.egg-info"]
)
def test_dockerignore_excludes_local_state(path: str) -> None:
    assert ignored(path, ignore_patterns()), path
