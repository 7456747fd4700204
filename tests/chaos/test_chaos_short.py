"""Chaos in the normal suite: 64 GPUs, 16 informers, 4 providers, 20 seeded faults, < 60 s.

The scenario and its invariants live in ``bench.chaos`` (``make chaos`` runs the full size):
CacheOwner crashes, exits, hangs and crashes on its k-th next message, watch streams ended,
stalled and disconnected, provider connections dropped and provider incarnations cancelled, a
provider process killed with SIGKILL and started again, the embedded NVML provider (fake NVML)
crashed and its XIDs reported, all under write load. Afterwards: no acknowledged write lost, no
gap in any watch stream, only resumable stream ends, every informer converged, every NVML
verdict still in the server, READY and SERVING, no escalation, every fault recovered, no watcher
slot or call left over (and the suite's fd/process/task leak checks).

The second runs the other part of ``make chaos``: the server process itself SIGKILLed and
restarted on its socket while providers and informers keep running (``bench.chaos_restarts``).

The third test pins what the first chaos runs found: a provider that comes back from a
heartbeat timeout and writes before its heartbeat is processed used to leave the server's
Ready=Unknown on that GPU for good.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is a top-level package next to src/ and tests/
    sys.path.insert(0, str(ROOT))

from bench.chaos import KINDS, ChaosOptions, run_chaos  # noqa: E402
from bench.chaos_restarts import RestartOptions, run_restarts  # noqa: E402
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb  # noqa: E402
from deviceapi.testing.objects import GPU_A  # noqa: E402
from deviceapi.testing.runtime import (  # noqa: E402
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)


@pytest.mark.slow
async def test_short_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    options = ChaosOptions(gpus=64, watchers=16, faults=20, seed=7)
    with trio.fail_after(60):
        report = await run_chaos(options, tmp_path)
    assert report.problems() == []
    assert len(report.faults) == 20
    assert {f.kind for f in report.faults} == set(KINDS)
    assert report.writes_acked > 0
    assert report.owner_restarts == report.owner_faults_fired > 0
    # Each NVML crash restarts it; a gRPC crash may too (its loopback connection drops).
    assert report.nvml_faults_fired > 0
    assert 0 <= report.nvml_restarts - report.nvml_faults_fired <= report.grpc_faults_fired
    assert report.process_kills > 0 and report.process_starts > report.process_kills
    assert report.xids["delivered"] > 0


@pytest.mark.slow
async def test_server_process_killed_and_restarted_keeps_every_invariant(
    tmp_path: Path,
) -> None:
    """The server process itself SIGKILLed twice under load (issue 14): every informer's cache
    equals the last server's state, none applied an event on a list from another
    incarnation, every provider re-registered, versions rose across every restart."""
    options = RestartOptions(gpus=16, watchers=4, providers=2, kills=2, seed=3)
    with trio.fail_after(90):
        report = await run_restarts(options, tmp_path)
    assert report.problems() == []
    assert report.restarts == 2 and report.divergences() == 0
    bases = [i.base for i in report.incarnations]
    assert bases == sorted(set(bases)) and len(bases) == 3
    assert report.relists >= 2 * options.watchers  # every informer relisted after each kill
    assert all(i.ready_after_kill < 60 for i in report.incarnations[1:])


async def test_heartbeat_restore_after_a_write_while_masked(tmp_path: Path) -> None:
    """SPEC §4: when heartbeats resume, a provider that never wrote Ready has none — even if
    it wrote another condition while its GPUs were masked."""
    config = make_test_config(tmp_path, heartbeat_timeout=0.5)
    with trio.fail_after(20):
        async with open_test_runtime(config) as rt, open_client(rt, provider_id="p") as c:
            init = pb.GpuStatus(conditions=[pb.Condition(type="Init", status="True")])
            await run_aio(c.register_gpu, name=GPU_A, status=init)
            await run_aio(c.heartbeat, gpu_names=[GPU_A])
            await wait_until(lambda: rt.core.sessions.statistics().masked == 1)
            # The provider comes back and writes before its first heartbeat is processed.
            await run_aio(c.update_condition, name=GPU_A,
                          condition=pb.Condition(type="Load", status="True"))
            await run_aio(c.heartbeat, gpu_names=[GPU_A])
            conditions = rt.core.store.state.gpus[GPU_A].status.conditions
            assert [c.type for c in conditions] == ["Init", "Load"]
