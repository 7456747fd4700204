"""Short names for the shipped test objects (deviceapi.testing.objects)."""

from deviceapi.testing.objects import GPU_A, GPU_B, GPU_C, gpu_name
from deviceapi.testing.objects import make_gpu as gpu

__all__ = ["GPU_A", "GPU_B", "GPU_C", "gpu", "gpu_name"]
