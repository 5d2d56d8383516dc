"""One workload spec for both the load test and the simulator.

:func:`sim_requests` plans a :class:`~pdserve.loadtest.config.LoadTestConfig`'s requests
with the load test's own :class:`~pdserve.loadtest.workloads.WorkloadBuilder` (same
seed, same lengths, same arrival offsets) and turns each into a
:class:`~pdserve.loadtest.simulator.SimRequest`.

Block hashes, for the simulated prefix caches:

- with a tokenizer the prompt is tokenized as the gateway does (the completion text, or
  the chat template) and hashed with the engine's own ``block_hashes``: exact;
- without one, each workload's sharing is stated instead: shared-prefix requests share
  the ``prefix_len // block_size`` blocks of their group, trace requests share the
  blocks of their hash ids, a multi-turn conversation's turns share their whole
  previous prompt; everything else is unique.

Multi-turn: turn ``k > 0`` follows turn ``k-1`` (``SimRequest.follows``); the simulator
starts it when the previous turn finishes.
"""

from __future__ import annotations

from typing import Sequence

from pdserve.engine.hashing import block_hashes as engine_block_hashes
from pdserve.engine.hashing import hash_block

from .config import LoadTestConfig
from .prompts import PromptFactory
from .simulator import SimRequest
from .workloads import RequestSpec, WorkloadBuilder, read_trace


def _keyed_hashes(keys: Sequence[tuple]) -> tuple[int, ...]:
    """Chained hashes of abstract block keys (a block's identity without its tokens)."""
    out = []
    parent = 0
    for key in keys:
        parent = hash_block(parent, [abs(hash(k)) % (1 << 31) for k in key])
        out.append(parent)
    return tuple(out)


def _stated_hashes(config: LoadTestConfig, spec: RequestSpec, block_size: int,
                   trace_hash_ids: Sequence[Sequence[int]]) -> tuple[int, ...]:
    num_blocks = spec.input_len // block_size
    if config.workload == "shared-prefix":
        shared = min(config.prefix_len // block_size, num_blocks)
        keys = [(1, spec.group_id, j) for j in range(shared)]
        keys += [(2, spec.request_id, j) for j in range(shared, num_blocks)]
    elif config.workload == "trace":
        # A block is identified by the hash id covering its first token and its place in
        # it; past the line's hash ids, by the line itself (unique).
        hash_ids = trace_hash_ids[spec.group_id]
        keys = []
        for j in range(num_blocks):
            k = j * block_size // config.trace_block_size
            keys.append((4, hash_ids[k], j * block_size % config.trace_block_size) if k < len(hash_ids)
                        else (3, spec.group_id, j))
    elif config.workload == "multi-turn":
        keys = [(5, spec.session_id, j) for j in range(num_blocks)]
    else:
        return ()
    return _keyed_hashes(keys)


def _token_ids(factory: PromptFactory, prompt) -> list[int]:
    if isinstance(prompt, str):
        return list(factory.tokenizer.encode(prompt))
    return list(factory.tokenizer.encode_chat(prompt))


def sim_requests(config: LoadTestConfig, block_size: int, *, max_requests: int | None = None,
                 factory: PromptFactory | None = None) -> list[SimRequest]:
    """The workload of ``config`` as simulator requests (open-loop arrivals kept; None -> 0)."""
    if factory is None:
        factory = PromptFactory.from_dir(config.tokenizer_dir)
    specs = WorkloadBuilder(config, factory).requests(max_requests)
    if not specs:
        raise ValueError("the workload plans no requests")
    exact = factory.tokenizer is not None and config.workload != "multi-turn"
    trace_hash_ids = [e["hash_ids"] for e in read_trace(config.trace_path)] if config.workload == "trace" else []
    previous: dict[int, int] = {}
    out = []
    for spec in specs:
        if exact:
            hashes = tuple(engine_block_hashes(_token_ids(factory, spec.prompt), block_size))
        else:
            hashes = _stated_hashes(config, spec, block_size, trace_hash_ids)
        follows = previous.get(spec.session_id) if spec.turn > 0 else None
        previous[spec.session_id] = spec.request_id
        out.append(SimRequest(spec.request_id, spec.arrival_s or 0.0, spec.input_len, spec.output_len, hashes,
                              follows=follows))
    return out
