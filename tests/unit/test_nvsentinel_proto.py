"""SPEC §7.1's wire contract (``nvidia.nvsentinel.v1alpha1``): fresh stubs, exact descriptors.

1. The committed stubs under ``src/deviceapi/proto/nvsentinel`` are what ``make proto`` makes
   (its recipe is checked, then replayed into a temporary directory and compared byte for byte).
2. Every message is checked field by field against a table transcribed from SPEC §7.1, and the
   service method by method; the file's name does not clash with SPEC §1's (one protobuf pool).
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_proto_stubs import PLUGINS, _generated_files, _shape, _short

from deviceapi.proto.device.v1alpha1 import gpu_pb2 as v1
from deviceapi.proto.nvsentinel.v1alpha1 import gpu_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "src" / "deviceapi" / "proto"
STUB_DIR = PROTO_DIR / "nvsentinel" / "v1alpha1"
PROTO = "nvsentinel/v1alpha1/gpu.proto"
PACKAGE = "nvidia.nvsentinel.v1alpha1"
MAKEFILE_SED = (
    r"sed -i 's/^from nvsentinel\.v1alpha1 import/from deviceapi.proto.nvsentinel.v1alpha1 "
    r"import/; s/^import nvsentinel\.v1alpha1\./import deviceapi.proto.nvsentinel.v1alpha1./; "
    r"s/\([[ ,]\)nvsentinel\.v1alpha1\./\1deviceapi.proto.nvsentinel.v1alpha1./g'"
)


def rewrite_imports(text: str) -> str:
    """The Makefile's ``sed`` for this package, line by line and in the same order."""
    text = re.sub(r"^from nvsentinel\.v1alpha1 import",
                  "from deviceapi.proto.nvsentinel.v1alpha1 import", text, flags=re.M)
    text = re.sub(r"^import nvsentinel\.v1alpha1\.",
                  "import deviceapi.proto.nvsentinel.v1alpha1.", text, flags=re.M)
    return re.sub(r"([\[ ,])nvsentinel\.v1alpha1\.",
                  r"\1deviceapi.proto.nvsentinel.v1alpha1.", text)


def test_makefile_regenerates_this_package_too() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nproto:\n", 1)[1].split("\n\n", 1)[0]
    assert "$(NVSENTINEL_PROTOS)" in recipe
    assert MAKEFILE_SED in recipe, "the Makefile's import rewrite changed; update this test"
    protos = re.search(r"^NVSENTINEL_PROTOS := (.*)$", makefile, flags=re.M)
    assert protos is not None and protos.group(1).split() == [f"$(PROTO_DIR)/{PROTO}"]


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    bindir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    missing = [p for p in PLUGINS if shutil.which(p, path=path) is None]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"protoc plugins missing in CI: {missing} (install .[dev])")
        pytest.skip(f"protoc plugins not installed: {missing} (pip install -e '.[dev]')")
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTO_DIR),
         f"--python_out={tmp_path}", f"--mypy_out={tmp_path}",
         f"--grpclib_python_out={tmp_path}", PROTO],
        cwd=ROOT, env={**os.environ, "PATH": path}, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, f"protoc failed: {result.stderr}"
    fresh = _generated_files(tmp_path / "nvsentinel" / "v1alpha1")
    committed = _generated_files(STUB_DIR)
    assert fresh and set(fresh) == set(committed), (sorted(fresh), sorted(committed))
    for name in sorted(fresh):
        expected = rewrite_imports(fresh[name].read_text())
        actual = committed[name].read_text()
        diff = list(difflib.unified_diff(actual.splitlines(), expected.splitlines(), lineterm=""))
        assert not diff, f"stale {name} (run make proto):\n" + "\n".join(diff[:30])


TS = "google.protobuf.Timestamp"

#: SPEC §7.1, transcribed: message → [(field, number, type)].
SPEC_MESSAGES: dict[str, list[tuple[str, int, str]]] = {
    "ObjectMeta": [("name", 1, "string"), ("resource_version", 2, "string"),
                   ("namespace", 3, "string"), ("uid", 4, "string"), ("generation", 5, "int64"),
                   ("creation_timestamp", 6, TS)],
    "ListMeta": [("resource_version", 1, "string")],
    "GetOptions": [("resource_version", 1, "string")],
    "ListOptions": [("resource_version", 1, "string")],
    "CreateOptions": [],
    "UpdateOptions": [],
    "DeleteOptions": [],
    "GpuSpec": [("uuid", 1, "string")],
    "Condition": [("type", 1, "string"), ("status", 2, "string"),
                  ("last_transition_time", 3, TS), ("reason", 4, "string"),
                  ("message", 5, "string")],
    "GpuStatus": [("conditions", 1, "repeated Condition"), ("recommended_action", 2, "string")],
    "Gpu": [("metadata", 1, "ObjectMeta"), ("spec", 2, "GpuSpec"), ("status", 3, "GpuStatus")],
    "GpuList": [("metadata", 1, "ListMeta"), ("items", 2, "repeated Gpu")],
    "GetGpuRequest": [("name", 1, "string"), ("namespace", 2, "string"),
                      ("opts", 3, "GetOptions")],
    "GetGpuResponse": [("gpu", 1, "Gpu")],
    "ListGpusRequest": [("namespace", 1, "string"), ("opts", 2, "ListOptions")],
    "ListGpusResponse": [("gpu_list", 1, "GpuList")],
    "WatchGpusRequest": [("namespace", 1, "string"), ("opts", 2, "ListOptions")],
    "WatchGpusResponse": [("type", 1, "string"), ("object", 2, "Gpu")],
    "CreateGpuRequest": [("gpu", 1, "Gpu"), ("opts", 2, "CreateOptions")],
    "UpdateGpuRequest": [("gpu", 1, "Gpu"), ("opts", 2, "UpdateOptions")],
    "UpdateGpuStatusRequest": [("gpu", 1, "Gpu"), ("opts", 2, "UpdateOptions")],
    "DeleteGpuRequest": [("name", 1, "string"), ("namespace", 2, "string"),
                         ("opts", 3, "DeleteOptions")],
}

SPEC_SERVICE = {
    "GetGpu": ("GetGpuRequest", "GetGpuResponse", False),
    "ListGpus": ("ListGpusRequest", "ListGpusResponse", False),
    "WatchGpus": ("WatchGpusRequest", "WatchGpusResponse", True),
    "CreateGpu": ("CreateGpuRequest", "Gpu", False),
    "UpdateGpu": ("UpdateGpuRequest", "Gpu", False),
    "UpdateGpuStatus": ("UpdateGpuStatusRequest", "Gpu", False),
    "DeleteGpu": ("DeleteGpuRequest", "google.protobuf.Empty", False),
}


def _local(full_name: str) -> str:
    return full_name.removeprefix(PACKAGE + ".")


def test_file_and_package() -> None:
    assert gpu_pb2.DESCRIPTOR.package == PACKAGE
    assert gpu_pb2.DESCRIPTOR.name == PROTO != v1.DESCRIPTOR.name
    assert not gpu_pb2.DESCRIPTOR.enum_types_by_name
    assert set(gpu_pb2.DESCRIPTOR.message_types_by_name) == set(SPEC_MESSAGES)


@pytest.mark.parametrize("name", sorted(SPEC_MESSAGES))
def test_message_matches_spec(name: str) -> None:
    message = gpu_pb2.DESCRIPTOR.message_types_by_name[name]
    assert not message.enum_types and not message.nested_types
    shape = [(f, n, t.replace(PACKAGE + ".", "")) for f, n, t in _shape(message)]
    assert shape == SPEC_MESSAGES[name]
    assert _short(message.full_name) == message.full_name  # not §1's package


def test_service_matches_spec() -> None:
    service = gpu_pb2.DESCRIPTOR.services_by_name["GpuService"]
    assert service.full_name == f"{PACKAGE}.GpuService"
    methods = {m.name: (_local(m.input_type.full_name), _local(m.output_type.full_name),
                        m.server_streaming) for m in service.methods}
    assert methods == SPEC_SERVICE
    assert not any(m.client_streaming for m in service.methods)


@pytest.mark.parametrize("name", ["GpuSpec", "Condition", "GpuStatus", "ListMeta"])
def test_shared_messages_are_the_same_on_the_wire(name: str) -> None:
    """SPEC §7.1: these are "as in §1", which lets the server pass them across as bytes."""
    ours = gpu_pb2.DESCRIPTOR.message_types_by_name[name]
    theirs = v1.DESCRIPTOR.message_types_by_name[name]
    assert [(f.name, f.number, f.type, f.is_repeated) for f in ours.fields] == [
        (f.name, f.number, f.type, f.is_repeated) for f in theirs.fields]
