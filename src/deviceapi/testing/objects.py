"""Ready-made GPU objects for tests (ours and users'): valid names and messages."""

from __future__ import annotations

from ..proto.device.v1alpha1 import gpu_pb2 as pb

GPU_A = "GPU-0a000000-0000-4000-8000-000000000001"
GPU_B = "GPU-0b000000-0000-4000-8000-000000000002"
GPU_C = "GPU-0c000000-0000-4000-8000-000000000003"


def gpu_name(i: int) -> str:
    """The i-th of an endless supply of distinct, valid GPU UUIDs."""
    return f"GPU-{i:08x}-0000-4000-8000-000000000000"


def make_gpu(name: str, *conditions: tuple[str, str]) -> pb.Gpu:
    """A Gpu message named ``name`` with conditions given as (type, status) pairs."""
    return pb.Gpu(
        metadata=pb.ObjectMeta(name=name),
        spec=pb.GpuSpec(uuid=name),
        status=pb.GpuStatus(conditions=[pb.Condition(type=t, status=s) for t, s in conditions]),
    )
