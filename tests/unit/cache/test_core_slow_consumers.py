"""The one slow-consumer policy (cache/slow_consumers.py): list sends cut at the timeout's edge
on the core's clock, and one janitor sweeping both kinds of consumer."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from core_helpers import cond, make_hub, make_store, running_owner, status

from deviceapi.cache._store import RegisterGpu
from deviceapi.cache.slow_consumers import SlowConsumerPolicy, run_slow_consumer_janitor
from deviceapi.proto.device.v1alpha1.gpu_pb2 import GpuSpec


def test_a_send_is_cut_exactly_at_the_timeout_and_once() -> None:
    clock = [100.0]
    policy = SlowConsumerPolicy(30, lambda: clock[0])
    cut: list[str] = []
    policy.begin(lambda: cut.append("a"))
    clock[0] = 110.0
    finished = policy.begin(lambda: cut.append("b"))
    clock[0] = 129.999
    assert policy.cut_stalled_sends() == 0 and cut == []
    clock[0] = 130.0
    assert policy.cut_stalled_sends() == 1 and cut == ["a"]
    policy.finish(finished)  # "b" was sent in time: never cut
    clock[0] = 1000.0
    assert policy.cut_stalled_sends() == 0 and cut == ["a"]
    assert policy.sends_cut == 1 and policy.sends_in_progress == 0


def test_a_stall_is_judged_on_the_policy_clock() -> None:
    policy = SlowConsumerPolicy(5, lambda: 50.0)
    assert not policy.stalled(45.5)
    assert policy.stalled(45.0)
    assert policy.stalled(0.0, now=5.0) and not policy.stalled(0.0, now=4.9)
    assert SlowConsumerPolicy(2, lambda: 0.0).sweep_interval == 0.5  # a quarter timeout
    assert policy.sweep_interval == 1.0  # at most a second


@pytest.mark.parametrize("timeout", [0, -1])
def test_the_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        SlowConsumerPolicy(timeout, lambda: 0.0)


async def test_one_janitor_cuts_stalled_sends_and_evicts_stalled_watches(
        autojump_clock: trio.testing.MockClock) -> None:
    store = make_store()
    hub = make_hub(store)
    policy = SlowConsumerPolicy(8.0, trio.current_time)  # sweeps every 1 s
    cut_at: list[float] = []
    with trio.fail_after(100):
        async with running_owner(store), trio.open_nursery() as nursery:
            await store.write(RegisterGpu("GPU-01", GpuSpec(), status(cond("Ready")), "p1"))
            await nursery.start(run_slow_consumer_janitor, policy, hub)
            begun = trio.current_time()
            sub = hub.subscribe(0)  # a snapshot event pending, never accepted
            policy.begin(lambda: cut_at.append(trio.current_time()))
            await trio.sleep(7.9)
            assert cut_at == [] and sub.end is None
            await trio.sleep(1.2)  # past the timeout, plus one sweep
            assert len(cut_at) == 1 and 8.0 <= cut_at[0] - begun <= 9.0
            assert sub.end is not None and sub.end.reason == "slow_subscriber"
            nursery.cancel_scope.cancel()
