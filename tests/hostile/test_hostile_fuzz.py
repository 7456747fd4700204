"""Fuzz every RPC of GpuService and ProviderService through a real client over the Unix socket.

Hypothesis draws valid-shaped requests — empty, huge, unicode and control characters, negative
and overflowing versions, unknown condition statuses, duplicate condition types, names that look
like paths — and each is checked against an independent model (``_model.py``): the status code
is one the model allows, an error's message is one clean line, the server keeps serving, and
after every request the server's List is exactly the model (state changes only by valid
writes).

One server serves every example of a test, and the model carries over between examples
(reset-free): hypothesis runs in a worker thread and each example crosses into the test's trio
run with ``trio.from_thread.run``, where the client and the in-process server live.
"""

from __future__ import annotations

import asyncio
import collections
import string
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import trio
from _hostile import assert_clean_message
from _model import GPU, REQUESTS, Limits, Model, Outcome, expect
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import HealthCheck, given, settings

from deviceapi.client import DeviceApiClient
from deviceapi.proto.device.v1alpha1 import gpu_pb2 as pb
from deviceapi.proto.device.v1alpha1 import provider_pb2 as ppb
from deviceapi.testing.objects import gpu_name
from deviceapi.testing.runtime import (
    make_test_config,
    open_client,
    open_test_runtime,
    run_aio,
    wait_until,
)

EXAMPLES = 1000
LIMITS = Limits(max_gpus=8, max_conditions=32, max_object_bytes=65536, watch_history=64)

# -- strategies ------------------------------------------------------------------------------

POOL = [gpu_name(i) for i in range(5)] + ["MIG-0a1b2c3d-1111-2222-3333-444455556666"]
ODD_NAMES = [
    "", "GPU-", "MIG-", "GPU--1", "gpu-00000000", "GPU-xyz", "GPU-0/../../etc/passwd",
    "../GPU-0", "/var/run/device-api/device.sock", "GPU-0/", "GPU-0\\1", "C:\\GPU-0",
    "GPU-0\x00", "GPU-0\n", "GPU-0 ", " GPU-0", "GPU-\uff10", "GPU-0\u202e", "GPU-é",
    "GPU-" + "a" * 124, "GPU-" + "a" * 125, "MIG-" + "f" * 300, "GPU-0" * 1000,
]
PRINTABLE = string.ascii_letters + string.digits + string.punctuation + " "


def sized(n: int, char: str = "x") -> str:
    return char * n


def text(boundary: int, *extra: str) -> st.SearchStrategy[str]:
    """Short unicode text (control characters included), or exactly boundary-1/0/+1 long."""
    return st.one_of(
        st.sampled_from(["", *extra]),
        st.text(max_size=24),
        st.sampled_from([boundary - 1, boundary, boundary + 1]).map(sized),
        st.just(sized(boundary, "é")),  # at the limit in characters, twice that in bytes
    )


names = st.one_of(
    st.sampled_from(POOL),
    st.sampled_from(ODD_NAMES),
    st.from_regex(r"(GPU|MIG)-[0-9a-fA-F][0-9a-fA-F-]{0,40}", fullmatch=True),
    st.text(max_size=16),
)
condition_types = st.one_of(
    st.sampled_from(["Ready", "NVMLReady", "XID", "", "bad\x01", "bad\x7f", "tab\t",
                     "ünïcödé", "../../x", sized(128), sized(129)]),
    st.text(max_size=12),
)
condition_statuses = st.one_of(
    st.sampled_from(["True", "False", "Unknown"]),
    st.sampled_from(["true", "TRUE", "unknown", "", " True", "True\x00", "Maybe", "1"]),
    st.text(max_size=6),
)
versions = st.one_of(
    st.sampled_from(["", "0", "1", "01", "-1", "+1", " 1", "1 ", "0x10", "1e3", "١٢",
                     "9223372036854775807", "9223372036854775808", str(2**64)]),
    st.integers(min_value=0, max_value=2**70).map(str),
    st.text(max_size=6),
)
int64s = st.one_of(st.sampled_from([0, 1, -1, -(2**63), 2**63 - 1]), st.integers(-3, 40))
provider_ids = st.one_of(
    st.sampled_from(["", "nvml", "dcgm", sized(253, "p"), sized(254, "p"), "bad\x00",
                     "bad\n", "ünï", "a/b"]),
    st.text(max_size=10),
)
#: grpclib clients can only send printable ASCII header values.
provider_headers = st.one_of(
    st.none(), st.sampled_from(["nvml", sized(253, "p"), sized(254, "p")]),
    st.text(alphabet=PRINTABLE, min_size=1, max_size=10),
)


def either(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any],
           fuzz: bool) -> st.SearchStrategy[Any]:
    """A field of a well-formed request; of a hostile one, hostile half the time."""
    return st.one_of(valid, hostile) if fuzz else valid


@st.composite
def existing(draw: st.DrawFn, model: Model) -> str:
    """A name the model holds (from the pool when it holds none).

    Draws the same shape whatever the model holds: hypothesis requires data generation that
    does not depend on outside state, and the model changes between examples."""
    index = draw(st.integers(0, 15))
    held = sorted(model.gpus) or POOL
    return held[index % len(held)]


def valid_names(model: Model) -> st.SearchStrategy[str]:
    return st.one_of(existing(model), st.sampled_from(POOL),
                     st.from_regex(r"(GPU|MIG)-[0-9a-f][0-9a-f-]{0,36}", fullmatch=True))


@st.composite
def conditions(draw: st.DrawFn, fuzz: bool) -> pb.Condition:
    return pb.Condition(
        type=draw(either(st.sampled_from(["Ready", "NVMLReady", "XID"]), condition_types, fuzz)),
        status=draw(either(st.sampled_from(["True", "False", "Unknown"]), condition_statuses,
                           fuzz)),
        reason=draw(either(st.sampled_from(["", "Initialized"]), text(256, "XidCritical"),
                           fuzz)),
        message=draw(either(st.sampled_from(["", "ok"]), text(4096, "multi\nline"), fuzz)))


@st.composite
def statuses(draw: st.DrawFn, fuzz: bool) -> pb.GpuStatus:
    counts = [0, 1, 2, 3, 31, 32, 33] if fuzz else [0, 1, 2, 3, 32]
    count = draw(st.sampled_from(counts))
    items: list[pb.Condition] = []
    for i in range(count):
        if fuzz and draw(st.integers(0, 9)) == 0:
            items.append(draw(conditions(fuzz=True)))
        else:
            # 32 conditions with 4 KiB messages make an object over 64 KiB.
            message = draw(st.sampled_from(["", "ok", sized(4096)] if fuzz else ["", "ok"]))
            items.append(pb.Condition(type=f"T{i}", message=message,
                                      status=draw(st.sampled_from(["True", "False", "Unknown"]))))
    if fuzz and items and draw(st.integers(0, 9)) == 0:
        items.append(items[draw(st.integers(0, len(items) - 1))])  # a duplicate type
    action = draw(either(st.sampled_from(["", "drain the node"]), text(4096), fuzz))
    return pb.GpuStatus(conditions=items, recommended_action=action)


def maybe_missing(strategy: st.SearchStrategy[Any], fuzz: bool) -> st.SearchStrategy[Any]:
    return either(strategy, st.none(), fuzz)


@st.composite
def gpus(draw: st.DrawFn, model: Model, fuzz: bool) -> pb.Gpu:
    name = draw(either(valid_names(model), names, fuzz))
    current = model.gpus.get(name)
    rv = current.resource_version if current is not None else 0
    return pb.Gpu(
        metadata=pb.ObjectMeta(
            name=name,
            namespace=draw(either(st.sampled_from(["", "default"]), text(253), fuzz)),
            resource_version=draw(either(st.sampled_from(["", str(rv), str(rv + 1)]), versions,
                                         fuzz))),
        spec=pb.GpuSpec(uuid=draw(either(st.sampled_from(["", name]), names, fuzz))),
        status=draw(statuses(fuzz)),
        resource_version=draw(either(st.sampled_from([0, rv, rv - 1]), int64s, fuzz)),
    )


def draw_request(data: st.DataObject, model: Model) -> tuple[str, Any, str | None]:
    """(method path, request, x-provider-id header) for one example: well-formed two times in
    three (so that state builds up and every success path runs), hostile otherwise."""
    path = data.draw(st.sampled_from(sorted(REQUESTS)), label="method")
    method = path.rsplit("/", 1)[1]
    fuzz = data.draw(st.integers(0, 2), label="hostile") == 0
    name = data.draw(either(valid_names(model), names, fuzz), label="name")
    header = None
    if path.startswith(GPU):
        header = data.draw(either(st.sampled_from([None, "nvml", "dcgm"]), provider_headers,
                                  fuzz), label="x-provider-id")
    current = model.gpus.get(name)
    rv = current.resource_version if current is not None else 0
    request: Any
    if path.startswith(GPU):
        match method:
            case "GetGpu":
                request = pb.GetGpuRequest(name=name)
            case "ListGpus":
                request = pb.ListGpusRequest(opts=pb.ListOptions(
                    resource_version=data.draw(either(st.just(""), versions, fuzz)),
                    namespace=data.draw(either(st.just(""), text(253), fuzz))))
            case "WatchGpus":
                recent = st.integers(-2, 70).map(lambda back: str(max(0, model.rv - back)))
                request = pb.WatchGpusRequest(opts=pb.ListOptions(
                    resource_version=data.draw(either(st.one_of(st.just(""), recent), versions,
                                                      fuzz))))
            case "CreateGpu" | "UpdateGpu":
                gpu = data.draw(maybe_missing(gpus(model, fuzz), fuzz))
                request = REQUESTS[path](gpu=gpu)
            case "UpdateGpuStatus":
                request = pb.UpdateGpuStatusRequest(
                    name=name, status=data.draw(maybe_missing(statuses(fuzz), fuzz)),
                    resource_version=data.draw(either(st.sampled_from([0, rv, rv - 1]), int64s,
                                                      fuzz)))
            case _:
                request = pb.DeleteGpuRequest(name=name)
        return path, request, header
    provider = data.draw(either(st.sampled_from(["", "nvml", "dcgm"]), provider_ids, fuzz),
                         label="provider_id")
    match method:
        case "RegisterGpu":
            request = ppb.ProviderRegisterGpuRequest(
                name=name, spec=pb.GpuSpec(uuid=data.draw(either(st.just(name), names, fuzz))),
                provider_id=provider, initial_status=data.draw(statuses(fuzz)))
        case "UnregisterGpu":
            request = ppb.ProviderUnregisterGpuRequest(name=name)
        case "UpdateGpuStatus":
            request = ppb.ProviderUpdateGpuStatusRequest(
                name=name, status=data.draw(maybe_missing(statuses(fuzz), fuzz)),
                provider_id=provider)
        case "UpdateGpuCondition":
            request = ppb.ProviderUpdateGpuConditionRequest(
                name=name, condition=data.draw(maybe_missing(conditions(fuzz), fuzz)),
                provider_id=provider or "nvml")
        case _:
            request = ppb.HeartbeatRequest(
                provider_id=provider or "nvml",
                gpu_names=data.draw(st.lists(either(existing(model), names, fuzz),
                                             max_size=4)))
    return path, request, header


# -- the runner (trio side) ------------------------------------------------------------------


class Fuzzer:
    """Runs drawn requests against one server and keeps the model in step."""

    def __init__(self, runtime: Any, client: DeviceApiClient, limits: Limits) -> None:
        self.runtime = runtime
        self.client = client
        self.model = Model(limits, runtime.core.store.version_base)
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.cases = 0

    async def run(self, path: str, request: Any, header: str | None) -> None:
        outcome = expect(self.model, path, request, header or "")
        method = path.rsplit("/", 1)[1]
        if method == "WatchGpus":
            code, message = await run_aio(self._watch, request, outcome)
        else:
            code, message = await run_aio(self._unary, path, request, header)
        self.cases += 1
        self.codes[(path.rsplit(".", 1)[1], code.name)] += 1
        allowed = sorted(c.name for c in outcome.codes)
        assert code in outcome.codes, f"{path}: got {code.name} {message!r}, expected {allowed}"
        if code is Status.OK:
            if outcome.commit is not None:
                outcome.commit()
        else:
            assert_clean_message(message)
            assert message, f"{path}: {code.name} without a message"
        listing = await run_aio(self.client.list)
        self.model.check_list(listing)

    async def _unary(self, path: str, request: Any, header: str | None) -> tuple[Status, str]:
        service, method = path.strip("/").split("/")
        stub = self.client.gpus if service.endswith("GpuService") else self.client.providers
        metadata = {"x-provider-id": header} if header is not None else None
        try:
            await getattr(stub, method)(request, timeout=10, metadata=metadata)
        except GRPCError as exc:
            return exc.status, exc.message or ""
        return Status.OK, ""

    async def _watch(self, request: pb.WatchGpusRequest, outcome: Outcome) -> tuple[Status, str]:
        hub = self.runtime.core.hub
        subscribed = hub.statistics().subscribed_total
        async with asyncio.timeout(10), self.client.gpus.WatchGpus.open() as stream:
            await stream.send_message(request, end=True)
            try:
                if Status.OK in outcome.codes and outcome.initial_events == 0:
                    # Nothing to read: wait until the server subscribed us, or answered.
                    answer = asyncio.ensure_future(stream.recv_message())
                    def waiting() -> bool:
                        return hub.statistics().subscribed_total == subscribed

                    while waiting() and not answer.done():  # noqa: ASYNC110 (no event to wait on)
                        await asyncio.sleep(0.001)
                    if answer.done():
                        raise AssertionError(f"watch ended at once: {answer.result()!r}")
                    answer.cancel()
                else:
                    events = []
                    for _ in range(min(outcome.initial_events, 3) or 1):
                        event = await stream.recv_message()
                        assert event is not None
                        events.append(event)
                    self._check_initial(request, events)
            except GRPCError as exc:
                return exc.status, exc.message or ""
            await stream.cancel()
        return Status.OK, ""

    def _check_initial(self, request: pb.WatchGpusRequest, events: list[Any]) -> None:
        start = int(request.opts.resource_version or 0)
        if start == 0:
            by_version = sorted(self.model.gpus.values(), key=lambda g: g.resource_version)
            assert [(e.type, e.object.metadata.name) for e in events] == [
                ("ADDED", g.metadata.name) for g in by_version[:len(events)]]
        else:
            assert [e.object.resource_version for e in events] == list(
                range(start + 1, start + 1 + len(events)))


# -- the test --------------------------------------------------------------------------------


async def test_fuzz_every_rpc_through_a_real_client(tmp_path: Path) -> None:
    config = make_test_config(
        tmp_path, min_gpus=0, max_gpus=LIMITS.max_gpus, watch_history=LIMITS.watch_history,
        subscribe_rate=1e9, subscribe_burst=10**9, heartbeat_timeout=1e9)
    async with open_test_runtime(config) as rt, open_client(rt) as client:
        fuzzer = Fuzzer(rt, client, LIMITS)

        @settings(max_examples=EXAMPLES, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example])
        @given(st.data())
        def one_request(data: st.DataObject) -> None:
            path, request, header = draw_request(data, fuzzer.model)
            trio.from_thread.run(fuzzer.run, path, request, header)

        with trio.fail_after(120):
            await trio.to_thread.run_sync(one_request)
            await wait_until(lambda: rt.core.hub.statistics().active == 0)  # all cancelled
        assert rt.core.store.statistics().rv == fuzzer.model.rv
        print(f"\nfuzzed {fuzzer.cases} requests over {len(REQUESTS)} RPCs; "
              f"model ended with {len(fuzzer.model.gpus)} GPUs at rv {fuzzer.model.rv}")
        for (method, code), count in sorted(fuzzer.codes.items()):
            print(f"  {method:40} {code:20} {count}")
        methods = {m for m, _ in fuzzer.codes}
        assert len(methods) == len(REQUESTS)
        assert {c for _, c in fuzzer.codes} >= {
            "OK", "INVALID_ARGUMENT", "NOT_FOUND", "ABORTED", "RESOURCE_EXHAUSTED",
            "OUT_OF_RANGE"}
