"""Prompt logprobs (vLLM's ``prompt_logprobs``) against transformers, in one engine and
across prefill and decode.

Reference: log_softmax of the tiny random Llama's logits over the whole prompt in one
transformers forward (float32, compared like test_correctness_vs_hf's logprobs). Entry i
of the result is prompt token i's logprob given tokens 0..i-1 plus the top-k, entry 0 is
None. Covered: plain batches of mixed lengths, n > 1, chunked prefill, preemption, the
prefix cache (a prompt logprobs request recomputes a cached prefix), TP 2, and P/D:
engine to engine in one process, then real prefill and decode workers on both transfer
backends (remote prefill, and local prefill on the decode worker). Every test ends with
every KV block back.
"""

from __future__ import annotations

import threading

import pytest
import torch

import hf_reference as H
from pdserve.deploy.processes import wait_all_free
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.proto import convert
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from test_disagg_workers import NUM_BLOCKS, cluster  # noqa: F401 - the workers fixture, both backends

pytestmark = pytest.mark.integration

K = 5
# Same tolerance and reasoning as test_correctness_vs_hf's LOGPROBS_ATOL: float32 logits
# reassociated differently (paged attention, chunks) differ from HF by ~1e-5.
ATOL = 1e-4
LENGTHS = (1, 2, 15, 16, 17, 40, 100)


def greedy(max_tokens=4, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def model_dir(hf_model_dir):
    return hf_model_dir("llama")


@pytest.fixture(scope="module")
def vocab(model_dir):
    return H.read_config(model_dir)["vocab_size"]


_REF: dict[tuple[int, ...], torch.Tensor] = {}


def hf_logprobs(model_dir, prompt) -> torch.Tensor:
    """[L, vocab]: row j is the log_softmax after prompt[0..j] (cached per prompt)."""
    key = tuple(prompt)
    if key not in _REF:
        model = H.load_hf_model(model_dir)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(prompt)]), use_cache=False).logits[0]
        _REF[key] = torch.log_softmax(logits.double(), dim=-1).float()
    return _REF[key]


def check_against_hf(label, model_dir, prompt, plp, k=K) -> None:
    """Every position: the prompt token and HF's top-k (ties at the k-th may go either way),
    with HF's values."""
    assert plp is not None and len(plp) == len(prompt), f"[{label}] {None if plp is None else len(plp)} entries for {len(prompt)} tokens"
    assert plp[0] is None, f"[{label}] entry 0 is {plp[0]!r}"
    ref = hf_logprobs(model_dir, prompt)
    for i in range(1, len(prompt)):
        where = f"[{label}] position {i} of {len(prompt)}"
        d, row, tok = plp[i], ref[i - 1], prompt[i]
        assert isinstance(d, dict) and tok in d, f"{where}: prompt token {tok} missing from {d}"
        assert len(d) in (k, k + 1), f"{where}: {len(d)} entries for prompt_logprobs={k}"
        assert all(isinstance(t, int) and isinstance(v, float) for t, v in d.items()), f"{where}: {d}"
        keys = list(d)
        torch.testing.assert_close(torch.tensor([d[t] for t in keys]), row[keys], rtol=1e-4, atol=ATOL,
                                   msg=lambda m, where=where: f"{where}: differs from HF log_softmax:\n{m}")
        if k:
            kth = float(row.topk(k).values[-1])
            assert all(t == tok or float(row[t]) >= kth - ATOL for t in keys), f"{where}: {keys} not HF's top-{k}"
            assert all(t in d for t in row.topk(k).indices.tolist() if float(row[t]) > kth + ATOL), (
                f"{where}: HF's top-{k} {row.topk(k).indices.tolist()} not all in {keys}")


def assert_same(label, a, b) -> None:
    """Two engines' prompt logprobs agree (values within float noise; the top-k may swap
    only tokens tied within it)."""
    assert len(a) == len(b) and a[0] is None and b[0] is None, f"[{label}] lengths {len(a)} vs {len(b)}"
    for i in range(1, len(a)):
        for x, y in ((a[i], b[i]), (b[i], a[i])):
            floor = min(x.values())
            for t, v in x.items():
                if t in y:
                    assert abs(v - y[t]) <= 1e-5, f"[{label}] position {i} token {t}: {v} vs {y[t]}"
                else:
                    assert v <= floor + ATOL, f"[{label}] position {i}: token {t} ({v}) only on one side"


def assert_all_free(llm_or_engine) -> None:
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    s = engine.kv_cache_stats()
    assert s.num_free_blocks == s.num_total_blocks, s
    assert not engine.has_unfinished


# -- one engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(model_dir):
    with LLM(model_dir, num_kv_blocks=128, block_size=16) as engine:
        yield engine


def test_batch_of_lengths_and_n(llm, model_dir, vocab):
    """Prompts of several lengths in one batch, beside requests without prompt logprobs
    (None, and outputs unchanged) and one with k = 0 (the prompt token alone); n = 2
    returns them once for the request."""
    prompts = H.random_prompts(vocab, LENGTHS, seed=21)
    plain = llm.generate(prompts, greedy())
    params = [greedy(prompt_logprobs=K) for _ in prompts]
    outs = llm.generate(prompts + prompts[3:4], params + [greedy(prompt_logprobs=0)])
    for p, o, ref in zip(prompts, outs, plain):
        check_against_hf(f"len {len(p)}", model_dir, p, o.prompt_logprobs)
        assert o.token_ids == ref.token_ids and ref.prompt_logprobs is None
    zero = outs[-1].prompt_logprobs
    assert [list(e) for e in zero[1:]] == [[t] for t in prompts[3][1:]]
    assert_same("k=0 vs k=5 values", zero, [None] + [{t: e[t]} for t, e in zip(prompts[3][1:], outs[3].prompt_logprobs[1:])])

    (n2,) = llm.generate(prompts[5], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=4, prompt_logprobs=K))
    assert len(n2.outputs) == 2
    check_against_hf("n=2", model_dir, prompts[5], n2.prompt_logprobs)
    assert_all_free(llm)


def test_prefix_cache_is_not_a_shortcut(llm, model_dir, vocab):
    """A prompt logprobs request sharing a cached prefix still gets every position (its
    prompt is computed, not taken from the cache); it still stores its blocks, and a
    later plain request takes them."""
    prefix = H.random_prompts(vocab, [48], seed=22)[0]
    first, second, third = prefix + [5, 6, 7], prefix + [8, 9], prefix + [10]
    a = llm.generate(first, greedy())[0]
    b = llm.generate(second, greedy(prompt_logprobs=K))[0]
    assert a.prompt_logprobs is None and b.num_cached_tokens == 0
    check_against_hf("shared prefix", model_dir, second, b.prompt_logprobs)
    # The same prompt again: the same values, still computed.
    again = llm.generate(second, greedy(prompt_logprobs=K))[0]
    assert again.num_cached_tokens == 0 and again.token_ids == b.token_ids
    assert_same("repeat", again.prompt_logprobs, b.prompt_logprobs)
    assert llm.generate(third, greedy())[0].num_cached_tokens == 48
    assert_all_free(llm)


def test_chunked_prefill(model_dir, vocab):
    """Chunks of 16 under a 40-token budget: prompts span several steps, chunk ends fall
    inside blocks, decodes and chunks share steps, and requests queue (max_num_seqs 3)."""
    prompts = H.random_prompts(vocab, LENGTHS, seed=23)
    with LLM(model_dir, num_kv_blocks=128, prefill_chunk_size=16, max_num_batched_tokens=40, max_num_seqs=3) as llm:
        outs = llm.generate(prompts, greedy(8, prompt_logprobs=K))
        for p, o in zip(prompts, outs):
            check_against_hf(f"chunked len {len(p)}", model_dir, p, o.prompt_logprobs)
        assert_all_free(llm)


def test_preemption_collects_each_position_once(model_dir, vocab):
    """A pool of 9 blocks for prompts up to 100 tokens: requests are preempted (some in
    the middle of their prompt) and recomputed; no position is lost or collected twice."""
    prompts = H.random_prompts(vocab, (100, 70, 33, 17), seed=24)
    with LLM(model_dir, num_kv_blocks=9, prefill_chunk_size=16, max_num_batched_tokens=40) as llm:
        sched = llm.engine.scheduler
        preempted = []
        preempt = sched._preempt
        sched._preempt = lambda req: (preempted.append((req.request_id, req.num_computed_tokens)), preempt(req))[-1]
        outs = llm.generate(prompts, greedy(16, prompt_logprobs=K))
        # Precondition: some request is preempted with its prompt half computed.
        assert any(n < len(prompts[int(rid)]) for rid, n in preempted), preempted
        for p, o in zip(prompts, outs):
            check_against_hf(f"preempted len {len(p)}", model_dir, p, o.prompt_logprobs)
        assert_all_free(llm)


@pytest.mark.slow
def test_tensor_parallel(model_dir, vocab):
    """TP 2 (gloo on CPU): rank 1 helps compute the logits (the LM head gathers the
    vocabulary) but only rank 0 reduces them; chunked so rows come from several steps."""
    prompts = H.random_prompts(vocab, (17, 40, 100), seed=25)
    with LLM(model_dir, tensor_parallel_size=2, num_kv_blocks=64, prefill_chunk_size=16) as llm:
        outs = llm.generate(prompts, greedy(4, prompt_logprobs=K))
        for p, o in zip(prompts, outs):
            check_against_hf(f"tp2 len {len(p)}", model_dir, p, o.prompt_logprobs)
        assert_all_free(llm)


# -- P/D, engine to engine -----------------------------------------------------------------


def test_engine_to_engine(model_dir, vocab):
    """The prefill engine computes them (its prefill-only request keeps the parameter) and
    hands them over with the first token; the decode engine computes none of them itself
    and returns them on completion 0's first delta. A wrong-length answer is refused."""
    def make():
        config = EngineConfig(model=ModelConfig.from_dir(model_dir), cache=CacheConfig(num_blocks=64),
                              scheduler=SchedulerConfig(max_num_batched_tokens=32))
        return LLMEngine(config)

    p_engine, d_engine = make(), make()
    rows_on_decode = []
    execute = d_engine.executor.execute
    d_engine.executor.execute = lambda inputs: (rows_on_decode.append(inputs.prompt_logprobs_indices.numel()),
                                                execute(inputs))[-1]
    try:
        prompt = H.random_prompts(vocab, [70], seed=26)[0]
        params = SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=6, ignore_eos=True, prompt_logprobs=K)
        d_engine.add_request("r", prompt, params, remote_prefill=True)
        d_engine.step()
        (rp,) = d_engine.take_remote_prefills()
        assert rp.first_block_index == 0

        p_engine.add_prefill_only("r#0", prompt, rp.request.sampling_params)
        first = None
        while first is None:
            first = next((d for d in p_engine.step() if d.finish_reason is not None), None)
        check_against_hf("prefill engine", model_dir, prompt, first.prompt_logprobs)
        src = p_engine.block_ids("r#0")
        d_engine.executor.runner.kv_cache[:, rp.block_ids] = p_engine.executor.runner.kv_cache[:, src]
        assert p_engine.take_finished("r#0", prompt) is not None and p_engine.release("r#0")

        with pytest.raises(ValueError, match="prompt logprobs"):
            d_engine.complete_remote_prefill("r#0", first.token_ids[0], None, first.prompt_logprobs[:-1])
        delta = d_engine.complete_remote_prefill("r#0", first.token_ids[0], None, first.prompt_logprobs)
        assert delta.index == 0 and delta.prompt_logprobs == first.prompt_logprobs
        deltas = [delta]
        while d_engine.has_unfinished:
            deltas += d_engine.step()
        assert all(d.prompt_logprobs is None for d in deltas[1:])
        out = d_engine.take_finished("r", prompt)
        assert out.prompt_logprobs == first.prompt_logprobs and len(out.outputs) == 2
        assert not any(rows_on_decode), "the decode engine computed prompt logprobs itself"

        with LLM(model_dir, num_kv_blocks=64) as llm:
            ref = llm.generate(prompt, params)[0]
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
        assert_same("engine to engine", out.prompt_logprobs, ref.prompt_logprobs)
        assert_all_free(p_engine)
        assert_all_free(d_engine)
    finally:
        p_engine.shutdown()
        d_engine.shutdown()


# -- P/D, real workers (both transfer backends) ----------------------------------------------


def generate_messages(d, rid, prompt, params, prefill="p0") -> list[pb.GenerateResponse]:
    req = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling_params=convert.sampling_message(params),
                             prefill_worker_id=prefill)
    return list(pb_grpc.DecodeStub(d.channel).Generate(req, timeout=60))


def wire_prompt_logprobs(label, prompt, messages) -> list:
    """The prompt logprobs a Generate stream carried (``RequestOutput``'s form, with the
    leading None a gateway adds), checking they came once, on completion 0's first message,
    each with the prompt token first."""
    carrying = [i for i, m in enumerate(messages) if len(m.prompt_logprobs)]
    if len(prompt) == 1:
        assert not carrying, f"[{label}] a one-token prompt has no prompt logprobs"
        return [None]
    first0 = next(i for i, m in enumerate(messages) if m.index == 0)
    assert carrying == [first0] and messages[first0].token_ids, f"[{label}] prompt logprobs on messages {carrying}"
    entries = messages[first0].prompt_logprobs
    assert [e.token_ids[0] for e in entries] == prompt[1:], f"[{label}] the prompt token must come first"
    return [None, *(convert.logprobs_dict(e) for e in entries)]


def test_workers_remote_and_local_prefill(cluster, vocab):  # noqa: F811
    """Remote prefill (concurrent prompts of several lengths, n = 2, a repeated prompt
    that the prefill worker has cached) and local prefill on the decode worker: the first
    message of completion 0 carries a single engine's prompt logprobs."""
    model_dir, _, p, d, backend = cluster
    prompts = H.random_prompts(vocab, (1, 17, 60), seed=27)
    params = greedy(6, prompt_logprobs=K)
    n2 = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=5, ignore_eos=True, prompt_logprobs=K)
    with LLM(model_dir, num_kv_blocks=NUM_BLOCKS) as llm:
        ref = llm.generate(prompts, params)
        ref_n2 = llm.generate(prompts[2], n2)[0]

    results: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i, pr=pr: results.__setitem__(i, generate_messages(d, f"c{i}", pr, params)))
               for i, pr in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (pr, r) in enumerate(zip(prompts, ref)):
        label = f"{backend} remote len {len(pr)}"
        msgs = results[i]
        assert [t for m in msgs for t in m.token_ids] == r.token_ids, label
        assert_same(label, wire_prompt_logprobs(label, pr, msgs), r.prompt_logprobs)

    for rid, prefill in (("again", "p0"), ("local", "")):  # cached on both workers by now
        label = f"{backend} {rid}"
        msgs = generate_messages(d, rid, prompts[2], params, prefill)
        assert [t for m in msgs for t in m.token_ids] == ref[2].token_ids, label
        assert_same(label, wire_prompt_logprobs(label, prompts[2], msgs), ref[2].prompt_logprobs)

    msgs = generate_messages(d, "n2", prompts[2], n2)
    for c in ref_n2.outputs:
        assert [t for m in msgs if m.index == c.index for t in m.token_ids] == c.token_ids
    assert_same(f"{backend} n=2", wire_prompt_logprobs("n=2", prompts[2], msgs), ref_n2.prompt_logprobs)
    assert wait_all_free([p, d])
