"""Where the real-GPU suite finds the driver: ``DEVICE_API_NVML_DRIVER_ROOT`` (the server's
``--nvml-driver-root``), default ``/run/nvidia/driver`` as in the chart; ``make gpu-test`` sets
it for machines whose driver lives elsewhere."""

from __future__ import annotations

import os

DRIVER_ROOT = os.environ.get("DEVICE_API_NVML_DRIVER_ROOT", "/run/nvidia/driver")
