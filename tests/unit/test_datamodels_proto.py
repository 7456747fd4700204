"""SPEC §7.2's wire contract: the committed ``datamodels`` stubs are fresh (regenerated with the
Makefile's command and compared byte for byte), and the descriptors carry SPEC's names, field
numbers, types and enum values exactly, so NVSentinel's monitors' own stubs talk to us."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import FieldDescriptor

from deviceapi.proto.datamodels import health_event_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "src" / "deviceapi" / "proto"
STUB_DIR = PROTO_DIR / "datamodels"
TS = "google.protobuf.Timestamp"

SPEC_MESSAGES: dict[str, list[tuple[str, int, str]]] = {
    "HealthEvents": [("version", 1, "uint32"), ("events", 2, "repeated HealthEvent")],
    "HealthEvent": [
        ("version", 1, "uint32"), ("agent", 2, "string"), ("componentClass", 3, "string"),
        ("checkName", 4, "string"), ("isFatal", 5, "bool"), ("isHealthy", 6, "bool"),
        ("message", 7, "string"), ("recommendedAction", 8, "RecommendedAction"),
        ("errorCode", 9, "repeated string"), ("entitiesImpacted", 10, "repeated Entity"),
        ("metadata", 11, "map"), ("generatedTimestamp", 12, TS), ("nodeName", 13, "string"),
        ("quarantineOverrides", 14, "BehaviourOverrides"),
        ("drainOverrides", 15, "BehaviourOverrides"),
        ("processingStrategy", 16, "ProcessingStrategy"), ("id", 17, "string"),
        ("customRecommendedAction", 18, "string"),
    ],
    "Entity": [("entityType", 1, "string"), ("entityValue", 2, "string")],
    "BehaviourOverrides": [("force", 1, "bool"), ("skip", 2, "bool")],
}
SPEC_ENUMS = {
    "RecommendedAction": {"NONE": 0, "COMPONENT_RESET": 2, "CONTACT_SUPPORT": 5,
                          "RUN_FIELDDIAG": 6, "RESTART_VM": 15, "RESTART_BM": 24,
                          "REPLACE_VM": 25, "RUN_DCGMEUD": 26, "CUSTOM": 27, "RESTART_APP": 39,
                          "UNKNOWN": 99},
    "ProcessingStrategy": {"UNSPECIFIED": 0, "EXECUTE_REMEDIATION": 1, "STORE_ONLY": 2},
}
_SCALARS = {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_BOOL: "bool",
            FieldDescriptor.TYPE_UINT32: "uint32"}


def _type(field: FieldDescriptor) -> str:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return "map"
    if field.message_type is not None:
        name = field.message_type.full_name
        name = name.removeprefix("datamodels.")
    elif field.enum_type is not None:
        name = field.enum_type.name
    else:
        name = _SCALARS[field.type]
    repeated = field.is_repeated
    return f"repeated {name}" if repeated else name


def test_messages_enums_and_service_are_specs() -> None:
    file = pb.DESCRIPTOR
    assert file.package == "datamodels"
    for name, fields in SPEC_MESSAGES.items():
        message = file.message_types_by_name[name]
        assert [(f.name, f.number, _type(f)) for f in message.fields] == fields, name
    assert set(file.message_types_by_name) == set(SPEC_MESSAGES)
    for name, values in SPEC_ENUMS.items():
        assert {v.name: v.number for v in file.enum_types_by_name[name].values} == values
    (service,) = file.services_by_name.values()
    assert service.full_name == "datamodels.PlatformConnector"
    (method,) = service.methods
    assert (method.name, method.input_type.full_name, method.output_type.full_name,
            method.client_streaming, method.server_streaming) == (
        "HealthEventOccurredV1", "datamodels.HealthEvents", "google.protobuf.Empty",
        False, False)


def test_committed_stubs_are_fresh_and_make_proto_regenerates_them(tmp_path: Path) -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nproto:\n", 1)[1].split("\n\n", 1)[0]
    assert "$(DATAMODELS_PROTOS)" in recipe
    sed = re.search(r"sed -i '([^']*)' \\\n\t\t\$\(PROTO_DIR\)/datamodels/\*_grpc\.py", recipe)
    assert sed is not None, "the Makefile's datamodels rewrite changed; update this test"
    bindir = str(Path(sys.executable).parent)
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROTO_DIR),
         f"--python_out={tmp_path}", f"--mypy_out={tmp_path}",
         f"--grpclib_python_out={tmp_path}", "datamodels/health_event.proto"],
        cwd=ROOT, env={**os.environ, "PATH": os.pathsep.join([bindir, os.environ["PATH"]])},
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    fresh = tmp_path / "datamodels"
    subprocess.run(["sed", "-i", sed.group(1), str(fresh / "health_event_grpc.py")], check=True)
    names = sorted(p.name for p in fresh.iterdir())
    assert names == ["health_event_grpc.py", "health_event_pb2.py", "health_event_pb2.pyi"]
    for name in names:
        assert (fresh / name).read_text() == (STUB_DIR / name).read_text(), (
            f"{name} is stale: run make proto")
