"""Fixtures of the virtual-time poller tests (see ``_poller_helpers.py``)."""

from __future__ import annotations

import pytest
from _poller_helpers import OPTIONS, MakePoller

from deviceapi.providers.nvml import FakeNvml, NvmlPoller, PollerOptions, run_inline
from deviceapi.providers.nvml.ledger import HealthLedger
from deviceapi.providers.nvml.testing import RecordingProviderApi


@pytest.fixture
def api() -> RecordingProviderApi:
    return RecordingProviderApi()


@pytest.fixture
def make_poller(api: RecordingProviderApi) -> MakePoller:
    """A poller over the fake that runs NVML calls inline (deterministic in virtual time)."""

    def make(
        backend: FakeNvml,
        options: PollerOptions = OPTIONS,
        *,
        ledger: HealthLedger | None = None,
    ) -> NvmlPoller:
        return NvmlPoller(backend, api, options, ledger=ledger, run_blocking=run_inline)

    return make
