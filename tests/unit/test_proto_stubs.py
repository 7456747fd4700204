"""The wire contract itself: committed stubs are fresh, and descriptors match SPEC §1 exactly.

1. The generated stubs under ``src/deviceapi/proto`` are regenerated into a temporary directory
   with the Makefile's ``proto`` command (protoc with the python, mypy and grpclib plugins,
   then the import rewrite its ``sed`` does, here in Python) and compared byte for byte.
2. Every message of SPEC §1 is checked field by field (name, number, type, repeated) against a
   table transcribed from the SPEC text, with no extra fields and no oneofs; services are
   checked method by method (path, request/response shape, streaming).
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from deviceapi.proto.device.v1alpha1 import gpu_pb2, provider_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "src" / "deviceapi" / "proto"
STUB_DIR = PROTO_DIR / "device" / "v1alpha1"
PROTOS = ("device/v1alpha1/gpu.proto", "device/v1alpha1/provider.proto")
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_grpc.py")
PLUGINS = ("protoc-gen-mypy", "protoc-gen-grpclib_python")
#: The Makefile's rewrite, verbatim: if it changes, so must ``rewrite_imports`` below.
MAKEFILE_SED = (
    r"sed -i 's/^from device\.v1alpha1 import/from deviceapi.proto.device.v1alpha1 import/; "
    r"s/^import device\.v1alpha1\./import deviceapi.proto.device.v1alpha1./; "
    r"s/\([[ ,]\)device\.v1alpha1\./\1deviceapi.proto.device.v1alpha1./g'"
)
PACKAGE = "nvidia.device.v1alpha1"


def rewrite_imports(text: str) -> str:
    """The Makefile's ``sed`` script, line by line and in the same order."""
    text = re.sub(r"^from device\.v1alpha1 import",
                  "from deviceapi.proto.device.v1alpha1 import", text, flags=re.M)
    text = re.sub(r"^import device\.v1alpha1\.",
                  "import deviceapi.proto.device.v1alpha1.", text, flags=re.M)
    return re.sub(r"([\[ ,])device\.v1alpha1\.", r"\1deviceapi.proto.device.v1alpha1.", text)


def _generated_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for pattern in GENERATED for p in directory.glob(pattern)}


def test_makefile_proto_target_is_what_this_test_replays() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nproto:\n", 1)[1].split("\n\n", 1)[0]
    for flag in ("-m grpc_tools.protoc -I $(PROTO_DIR)", "--python_out=$(PROTO_DIR)",
                 "--mypy_out=$(PROTO_DIR)", "--grpclib_python_out=$(PROTO_DIR)", "$(PROTOS)"):
        assert flag in recipe, f"the Makefile's proto target changed ({flag!r}); update this test"
    assert MAKEFILE_SED in recipe, "the Makefile's import rewrite changed; update this test"
    protos = re.search(r"^PROTOS := (.*)$", makefile, flags=re.M)
    assert protos is not None
    assert protos.group(1).split() == [f"$(PROTO_DIR)/{p}" for p in PROTOS]


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
         f"--grpclib_python_out={tmp_path}", *PROTOS],
        cwd=ROOT, env={**os.environ, "PATH": path}, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, f"protoc failed: {result.stderr}"
    fresh = _generated_files(tmp_path / "device" / "v1alpha1")
    committed = _generated_files(STUB_DIR)
    assert fresh, "protoc generated nothing"

    problems: list[str] = []
    for name in sorted(set(fresh) | set(committed)):
        if name not in committed:
            problems.append(f"{name}: generated but not committed")
            continue
        if name not in fresh:
            problems.append(f"{name}: committed but no longer generated")
            continue
        expected = rewrite_imports(fresh[name].read_text())
        actual = committed[name].read_text()
        if expected != actual:
            diff = difflib.unified_diff(actual.splitlines(), expected.splitlines(),
                                        f"committed/{name}", f"regenerated/{name}",
                                        lineterm="", n=1)
            problems.append(f"{name} differs:\n" + "\n".join(list(diff)[:30]))
    assert not problems, ("stale generated stubs in src/deviceapi/proto: run make proto\n"
                          + "\n".join(problems))


# ---- SPEC §1, transcribed ------------------------------------------------------------------------

TS = "google.protobuf.Timestamp"

#: message → [(field, number, type)], "repeated X" for repeated fields; other messages of the
#: package by their short name.
SPEC_MESSAGES: dict[str, list[tuple[str, int, str]]] = {
    "ObjectMeta": [("name", 1, "string"), ("resource_version", 2, "string"),
                   ("namespace", 3, "string")],
    "ListMeta": [("resource_version", 1, "string")],
    "GetOptions": [("resource_version", 1, "string"), ("namespace", 2, "string")],
    "ListOptions": [("resource_version", 1, "string"), ("namespace", 2, "string")],
    "GpuSpec": [("uuid", 1, "string")],
    "Condition": [("type", 1, "string"), ("status", 2, "string"),
                  ("last_transition_time", 3, TS), ("reason", 4, "string"),
                  ("message", 5, "string")],
    "GpuStatus": [("conditions", 1, "repeated Condition"), ("recommended_action", 2, "string")],
    "Gpu": [("metadata", 1, "ObjectMeta"), ("spec", 2, "GpuSpec"), ("status", 3, "GpuStatus"),
            ("resource_version", 4, "int64")],
    "GpuList": [("metadata", 1, "ListMeta"), ("items", 2, "repeated Gpu")],
    "GetGpuRequest": [("name", 1, "string"), ("opts", 2, "GetOptions")],
    "GetGpuResponse": [("gpu", 1, "Gpu")],
    "ListGpusRequest": [("opts", 1, "ListOptions")],
    "ListGpusResponse": [("gpu_list", 1, "GpuList")],
    "WatchGpusRequest": [("opts", 1, "ListOptions")],
    "WatchGpusResponse": [("type", 1, "string"), ("object", 2, "Gpu")],
    "CreateGpuRequest": [("gpu", 1, "Gpu")],
    "CreateGpuResponse": [("gpu", 1, "Gpu"), ("created", 2, "bool")],
    "UpdateGpuRequest": [("gpu", 1, "Gpu")],
    "UpdateGpuResponse": [("gpu", 1, "Gpu")],
    "UpdateGpuStatusRequest": [("name", 1, "string"), ("status", 2, "GpuStatus"),
                               ("resource_version", 3, "int64")],
    "UpdateGpuStatusResponse": [("gpu", 1, "Gpu")],
    "DeleteGpuRequest": [("name", 1, "string")],
}

#: GpuService: rpc → (request, response, server streaming).
SPEC_GPU_SERVICE: dict[str, tuple[str, str, bool]] = {
    "GetGpu": ("GetGpuRequest", "GetGpuResponse", False),
    "ListGpus": ("ListGpusRequest", "ListGpusResponse", False),
    "WatchGpus": ("WatchGpusRequest", "WatchGpusResponse", True),
    "CreateGpu": ("CreateGpuRequest", "CreateGpuResponse", False),
    "UpdateGpu": ("UpdateGpuRequest", "UpdateGpuResponse", False),
    "UpdateGpuStatus": ("UpdateGpuStatusRequest", "UpdateGpuStatusResponse", False),
    "DeleteGpu": ("DeleteGpuRequest", "google.protobuf.Empty", False),
}

#: ProviderService (all unary): only paths and field numbers travel, so messages are compared
#: by shape, whatever their names.
SPEC_PROVIDER_SERVICE: dict[str, tuple[list[tuple[str, int, str]], list[tuple[str, int, str]]]] = {
    "RegisterGpu": (
        [("name", 1, "string"), ("spec", 2, "GpuSpec"), ("provider_id", 3, "string"),
         ("initial_status", 4, "GpuStatus")],
        [("created", 1, "bool"), ("resource_version", 2, "int64")],
    ),
    "UnregisterGpu": ([("name", 1, "string")], [("deleted", 1, "bool")]),
    "UpdateGpuStatus": (
        [("name", 1, "string"), ("status", 2, "GpuStatus"), ("provider_id", 3, "string")],
        [("resource_version", 1, "int64")],
    ),
    "UpdateGpuCondition": (
        [("name", 1, "string"), ("condition", 2, "Condition"), ("provider_id", 3, "string")],
        [("resource_version", 1, "int64")],
    ),
    "Heartbeat": (
        [("provider_id", 1, "string"), ("gpu_names", 2, "repeated string")],
        [("acknowledged", 1, "bool")],
    ),
}

_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_BOOL: "bool",
}


def _short(full_name: str) -> str:
    return full_name.removeprefix(PACKAGE + ".")


def _type_of(field: Any) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        base = _short(field.message_type.full_name)
    else:
        base = _SCALARS.get(field.type, f"<protobuf type {field.type}>")
    return f"repeated {base}" if field.is_repeated else base


def _shape(message: Any) -> list[tuple[str, int, str]]:
    for field in message.fields:
        assert field.containing_oneof is None, f"{message.full_name}.{field.name} is in a oneof"
        assert not field.has_presence or field.type == FieldDescriptor.TYPE_MESSAGE, (
            f"{message.full_name}.{field.name} is declared optional")
    return [(f.name, f.number, _type_of(f)) for f in message.fields]


def test_wire_files_and_package() -> None:
    assert gpu_pb2.DESCRIPTOR.name == "device/v1alpha1/gpu.proto"
    assert provider_pb2.DESCRIPTOR.name == "device/v1alpha1/provider.proto"
    for file in (gpu_pb2.DESCRIPTOR, provider_pb2.DESCRIPTOR):
        assert file.package == PACKAGE
        assert not file.enum_types_by_name, "the wire API has no enums (SPEC §1)"


@pytest.mark.parametrize("name", sorted(SPEC_MESSAGES))
def test_message_matches_spec(name: str) -> None:
    message = gpu_pb2.DESCRIPTOR.message_types_by_name.get(name)
    assert message is not None, f"message {name} is missing from gpu.proto"
    assert not message.enum_types and not message.nested_types
    assert _shape(message) == SPEC_MESSAGES[name]


def test_gpu_service_matches_spec() -> None:
    service = gpu_pb2.DESCRIPTOR.services_by_name["GpuService"]
    assert service.full_name == f"{PACKAGE}.GpuService"
    methods = {
        m.name: (_short(m.input_type.full_name), _short(m.output_type.full_name),
                 m.server_streaming)
        for m in service.methods
    }
    assert methods == SPEC_GPU_SERVICE
    assert not any(m.client_streaming for m in service.methods)


def test_provider_service_matches_spec() -> None:
    service = provider_pb2.DESCRIPTOR.services_by_name["ProviderService"]
    assert service.full_name == f"{PACKAGE}.ProviderService"
    assert [m.name for m in service.methods] == list(SPEC_PROVIDER_SERVICE)
    for method in service.methods:
        request, response = SPEC_PROVIDER_SERVICE[method.name]
        assert not method.client_streaming and not method.server_streaming, method.name
        assert _shape(method.input_type) == request, method.name
        assert _shape(method.output_type) == response, method.name


# ---- docs/API.md documents all of it -------------------------------------------------------------


def _field_lines(fields: list[tuple[str, int, str]]) -> list[str]:
    return [f"{kind} {name} = {number}" for name, number, kind in fields]


def test_api_doc_covers_every_rpc_and_field() -> None:
    """Every RPC has its section in docs/API.md, and every field of SPEC §1 is written there
    as ``type name = number``."""
    doc = (ROOT / "docs" / "API.md").read_text()
    headings = set(re.findall(r"^### (.+)$", doc, flags=re.M))
    for rpc in SPEC_GPU_SERVICE:
        assert rpc in headings, f"docs/API.md has no section for GpuService.{rpc}"
    for rpc in SPEC_PROVIDER_SERVICE:
        assert rpc in headings or f"ProviderService {rpc}" in headings, (
            f"docs/API.md has no section for ProviderService.{rpc}")
    flat = " ".join(doc.split())
    missing = [
        f"{where}: {line}"
        for where, fields in [
            *SPEC_MESSAGES.items(),
            *((f"{rpc} request", shapes[0]) for rpc, shapes in SPEC_PROVIDER_SERVICE.items()),
            *((f"{rpc} response", shapes[1]) for rpc, shapes in SPEC_PROVIDER_SERVICE.items()),
        ]
        for line in _field_lines(fields)
        if line not in flat
    ]
    assert not missing, "fields missing from docs/API.md:\n" + "\n".join(missing)
