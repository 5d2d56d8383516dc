"""A misbehaving prefill worker, as a process of its own (tests only).

It serves ``Prefill`` and writes into the decode worker's destination blocks with a real
KV transfer agent of the given backend (random bytes, no model), but breaks the rules the
way the request id asks:

* ``die...``: starts the write and kills itself as soon as the decode side admitted it
  (bytes may have landed; no completion, no answer): a prefill worker dying mid-transfer.
* ``late...``: sleeps ``late_s`` before writing (past the decode worker's hop timeout and
  lease), then writes, and prints how the write ended (``WROTE [[state, message], ...]``).

Started as ``python rogue_prefill.py '<json>'`` with ``backend``, ``name`` (its agent),
``store`` (the control plane's URL, where it finds the decode worker) and ``late_s``;
prints ``READY <address> <agent metadata hex>`` once serving. The test registers it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from pdserve.deploy.store import open_store
from pdserve.kvtransfer import KVRegionLayout, create_agent, plan_transfer
from pdserve.kvtransfer.base import unpack_metadata
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc


class Rogue(pb_grpc.PrefillServicer):
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.store = open_store(cfg["store"])
        self.layout = KVRegionLayout.from_dict(cfg["layout"])
        region = torch.randn(self.layout.shape).to(getattr(torch, self.layout.dtype))
        self.agent = create_agent(cfg["backend"], cfg["name"], region, self.layout)

    def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        dest = request.destination
        decode = self.store.get_worker(dest.worker_id)
        peer_layouts = [KVRegionLayout.from_dict(unpack_metadata(r.metadata)[0]["layout"]) for r in decode.transfer.ranks]
        for r in decode.transfer.ranks:
            self.agent.add_peer(r.agent_name, r.metadata)
        if request.request_id.startswith("late"):
            time.sleep(self.cfg["late_s"])
        plans = plan_transfer([self.layout], peer_layouts, list(range(len(dest.block_ids))), list(dest.block_ids))
        handles = [self.agent.write(dest.transfer_id, decode.transfer.ranks[p.dst_rank].agent_name, p, b"",
                                    timeout_s=10) for p in plans]
        if request.request_id.startswith("die"):
            while not any(h.is_started for h in handles):
                states = [self.agent.poll(h) for h in handles]
                if any(s.failed for s in states):
                    print("NOT ADMITTED", [s.message for s in states], flush=True)
                    os._exit(2)
                time.sleep(0.0002)
            print("ADMITTED", flush=True)
            os._exit(1)  # as SIGKILL would: no completion, no answer
        states = [self.agent.wait(h) for h in handles]
        print("WROTE", json.dumps([[s.state.value, s.message] for s in states]), flush=True)
        return pb.PrefillResponse(request_id=request.request_id, outcome=pb.HOP_DONE, destination=dest)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    rogue = Rogue(cfg)
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_PrefillServicer_to_server(rogue, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("READY", f"127.0.0.1:{port}", rogue.agent.metadata().hex(), flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
