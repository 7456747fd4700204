"""GPU fixtures shared by the integration tests (a plain module: unique name, no conftest clash)."""

from __future__ import annotations

from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb

GPU_A = "GPU-0a000000-0000-4000-8000-000000000001"
GPU_B = "GPU-0b000000-0000-4000-8000-000000000002"
GPU_C = "GPU-0c000000-0000-4000-8000-000000000003"


def gpu(name: str, *conditions: tuple[str, str]) -> pb.Gpu:
    return pb.Gpu(
        metadata=pb.ObjectMeta(name=name),
        spec=pb.GpuSpec(uuid=name),
        status=pb.GpuStatus(conditions=[pb.Condition(type=t, status=s) for t, s in conditions]),
    )


def gpu_name(i: int) -> str:
    return f"GPU-{i:08x}-0000-4000-8000-000000000000"
