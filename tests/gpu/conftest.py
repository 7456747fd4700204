"""Real-GPU suite set-up: the driver's own descriptors.

The NVML library opens pipes on its first ``nvmlInit`` and keeps them for the life of the
process, ``nvmlShutdown`` or not: they are the driver's, not ours. The root conftest's leak check
takes its baseline before each test, so NVML is initialised (and shut down) once per session,
before the first test's baseline: what the driver keeps is then part of every baseline, while
anything a test itself leaves open is still caught.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _gpu import DRIVER_ROOT

from deviceapi.nvml_actor import NvmlUnavailable, PynvmlBackend


@pytest.fixture(scope="session", autouse=True)
def _driver_descriptors_before_baseline() -> Iterator[None]:
    nvml = PynvmlBackend(DRIVER_ROOT)
    try:
        nvml.init()
    except NvmlUnavailable:
        yield  # no driver: the tests skip themselves
        return
    nvml.shutdown()
    yield
