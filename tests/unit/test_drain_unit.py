"""The drain's pieces (deploy/drain.py) on their own; tests/integration/test_drain.py
runs them in real workers behind a real gateway."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.deploy.drain import DRAINING, Activity, DrainPolicy, Shutdown, drain
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc


@pytest.mark.parametrize("grace, timeout", [(-1.0, 10.0), (5.0, 1.0), (float("nan"), 10.0)])
def test_policy_rejects_bad_values(grace, timeout):
    with pytest.raises(ValueError):
        DrainPolicy(grace, timeout)


def test_shutdown_first_request_drains_second_stops_now():
    async def go():
        s = Shutdown()
        s.request()
        assert s.requested.is_set() and not s.now.is_set()
        s.request()
        assert s.now.is_set()
        t = Shutdown()
        t.request(drain=False)
        assert t.requested.is_set() and t.now.is_set()

    asyncio.run(go())


class SlowPrefill(pb_grpc.PrefillServicer):
    """A real gRPC service whose Prefill waits for the test's signal."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def Prefill(self, request, context):
        self.started.set()
        await self.release.wait()
        return pb.PrefillResponse(request_id=request.request_id, first_token_id=7)

    async def Stats(self, request, context):
        return pb.StatsResponse(worker_id="w")


def test_drain_serves_late_calls_waits_for_in_flight_then_refuses_new_ones():
    async def go():
        activity = Activity()
        server = grpc.aio.server(interceptors=[activity])
        service = SlowPrefill()
        pb_grpc.add_PrefillServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        marks = []

        async def mark() -> None:
            marks.append(True)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.PrefillStub(ch)
            first = asyncio.ensure_future(stub.Prefill(pb.PrefillRequest(request_id="a")))
            await service.started.wait()
            assert activity.num_inflight == 1
            draining = asyncio.create_task(drain(activity, DrainPolicy(grace_s=0.2, timeout_s=30), mark))
            await asyncio.sleep(0.05)
            assert marks == [True] and not activity.is_closed
            # A call arriving during the grace is still served (a router's stale view).
            late = asyncio.ensure_future(stub.Prefill(pb.PrefillRequest(request_id="late")))
            await asyncio.sleep(0.4)
            assert activity.num_inflight == 2 and not draining.done()  # waits for both
            service.release.set()
            assert (await first).first_token_id == 7 and (await late).request_id == "late"
            assert await draining is True and activity.is_closed
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Prefill(pb.PrefillRequest(request_id="b"))
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and e.value.details() == DRAINING
            # Not work: still answered after closing.
            assert (await stub.Stats(pb.StatsRequest())).worker_id == "w"
        await server.stop(None)

    asyncio.run(go())


def test_drain_gives_up_at_the_timeout():
    async def go():
        activity = Activity()
        activity._begin()  # a call that never ends

        async def mark() -> None:
            pass

        assert await drain(activity, DrainPolicy(grace_s=0.0, timeout_s=0.2), mark) is False
        assert activity.is_closed

    asyncio.run(go())
