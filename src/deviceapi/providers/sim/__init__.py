"""Simulated providers and load generators (``--simulate N``, tests, benchmarks)."""

from .provider import SimulatedProvider, simulated_gpu_names

__all__ = ["SimulatedProvider", "simulated_gpu_names"]
