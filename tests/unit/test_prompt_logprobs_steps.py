"""Prompt logprobs in the step plumbing, without a model: which positions a chunk must
score (``prompt_logprobs_span`` / ``prepare_inputs``), how rows go back to requests
(``add_prompt_logprobs``), the prefix-cache cut in the scheduler, and stream coalescing.

The numbers themselves are checked against transformers in
tests/integration/test_prompt_logprobs.py.
"""

from __future__ import annotations

import torch

from pdserve.engine.async_engine import coalesce
from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.model_runner import (
    PromptLogprobRows, add_prompt_logprobs, order_for_step, prepare_inputs, prompt_logprobs_span,
)
from pdserve.engine.outputs import CompletionDelta
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledRequest, Scheduler

BS = 4


def make(num_blocks=32, budget=64, chunk=None):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=True)
    return kv, Scheduler(SchedulerConfig(budget, 16, chunk), kv)


def request(rid, prompt, n=1, k=2):
    sp = SamplingParams(max_tokens=2, n=n, prompt_logprobs=k)
    return [Request(rid if i == 0 else f"{rid}#{i}", list(prompt), sp, BS) for i in range(n)]


def fake_rows(inputs, k):
    """Rows as the runner would return them, encoding (token index, target) so a test can
    see which row landed where: logprob = -index, top ids = target + 1 .. target + k."""
    idx, tgt = inputs.prompt_logprobs_indices, inputs.prompt_logprobs_token_ids
    top = tgt.unsqueeze(1) + torch.arange(1, k + 1)
    return PromptLogprobRows(-idx.float(), top, -top.float())


def step(kv, sched, k):
    out = sched.schedule()
    ordered = order_for_step(out.scheduled)
    rows = [kv.tables.row(s.request.request_id) for s in ordered]
    inputs = prepare_inputs(ordered, kv.tables.array, rows, BS)
    if inputs.prompt_logprobs_indices.shape[0]:
        add_prompt_logprobs(ordered, fake_rows(inputs, k))
    sampled = [s.request for s in ordered if s.samples]
    sched.update_after_step(out)
    for req in sampled:
        req.append_token(7)
    return out, inputs


def test_chunked_prompt_scores_every_position_once_and_siblings_none():
    """A 10-token prompt in chunks of 4 next to a decoding request: positions 0..8 score
    tokens 1..9 over three steps (position 9's logits are the sampled row), the token
    indices skip the decode that comes first in each step, and the n = 2 sibling (forked
    after the prompt) scores nothing."""
    kv, sched = make(chunk=4)
    prompt = list(range(100, 110))
    other = Request("o", [1, 2], SamplingParams(max_tokens=8), BS)
    sched.add_request(other)
    step(kv, sched, 2)  # "o" computes its prompt and now decodes
    parent, child = request("p", prompt, n=2)
    sched.add_request(parent, [child])
    assert parent.prompt_logprobs == [None] and child.prompt_logprobs is None

    spans = []
    while len(parent.prompt_logprobs) < len(prompt):
        out, inputs = step(kv, sched, 2)
        spans.append(inputs.prompt_logprobs_indices.tolist())
        assert inputs.prompt_logprobs_k.tolist() == [2]
    assert spans == [[1, 2, 3, 4], [1, 2, 3, 4], [1]]  # token 0 of each step is o's decode
    for i in range(1, len(prompt)):
        entry = parent.prompt_logprobs[i]
        assert list(entry) == [prompt[i], prompt[i] + 1, prompt[i] + 2]  # the prompt token first, then top-k
    # The sibling runs its tail and scores nothing; neither does anything afterwards.
    for _ in range(3):
        _, inputs = step(kv, sched, 2)
        assert inputs.prompt_logprobs_indices.shape[0] == 0
        assert inputs.prompt_logprobs_k.shape[0] == 0
    assert child.prompt_logprobs is None and len(parent.prompt_logprobs) == len(prompt)
    for r in (parent, child, other):
        sched.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED)
    assert kv.stats().num_free_blocks == kv.stats().num_total_blocks


def test_prefix_hits_are_cut_at_the_first_missing_position():
    """A cached prompt is not a hit for a request that asks for prompt logprobs; after a
    preemption, the blocks before its first missing position are (nothing is scored twice)."""
    kv, sched = make(chunk=3)
    prompt = list(range(200, 213))  # 13 tokens: 3 full blocks
    plain = Request("plain", prompt, SamplingParams(max_tokens=1), BS)
    sched.add_request(plain)
    while plain.num_computed_tokens < len(prompt):
        step(kv, sched, 0)
    sched.finish_request("plain", RequestStatus.FINISHED_LENGTH)
    assert kv.stats().num_cached_blocks == 3

    (req,) = request("r", prompt, k=0)
    sched.add_request(req)
    step(kv, sched, 0)
    assert req.num_cached_tokens == 0 and req.num_computed_tokens == 3  # computed, not a hit
    step(kv, sched, 0)
    assert len(req.prompt_logprobs) == 7 and req.prompt_logprobs_position == 6
    sched._preempt(req)
    _, inputs = step(kv, sched, 0)
    # Resumed at position 4 (one cached block: position 6 is the first missing one);
    # positions 4 and 5 are computed again but scored only once.
    assert inputs.positions.tolist() == [4, 5, 6] and inputs.prompt_logprobs_indices.tolist() == [2]
    while req.num_computed_tokens < len(prompt):
        step(kv, sched, 0)
    assert req.prompt_logprobs_position is None
    assert [list(e) for e in req.prompt_logprobs[1:]] == [[t] for t in prompt[1:]]  # k = 0: the token alone
    sched.finish_request("r", RequestStatus.FINISHED_STOPPED)
    assert kv.stats().num_free_blocks == kv.stats().num_total_blocks


def test_span_refuses_a_gap():
    (req,) = request("g", list(range(10)))
    req.prompt_logprobs = [None]
    req.num_computed_tokens = 4  # as if the cache had skipped positions 0..3
    try:
        prompt_logprobs_span(ScheduledRequest(req, 4))
    except RuntimeError as e:
        assert "position 0" in str(e)
    else:
        raise AssertionError("a gap in the prompt logprobs must not pass silently")


def test_coalesce_keeps_the_prompt_logprobs_of_the_first_delta():
    plp = [None, {5: -1.0, 6: -0.5}]
    merged = coalesce([
        CompletionDelta("r#0", 0, [7], "a", None, None, prompt_logprobs=plp),
        CompletionDelta("r#1", 1, [8], "b", None, None),
        CompletionDelta("r#0", 0, [9], "c", None, "length"),
    ])
    assert merged[0].token_ids == [7, 9] and merged[0].prompt_logprobs is plp
    assert merged[1].prompt_logprobs is None
