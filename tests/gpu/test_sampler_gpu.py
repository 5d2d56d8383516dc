"""The sampler on CUDA logits at serving shapes: no copy of the logits to the host, and a
seeded request draws what it draws on the CPU (the draws are integer hashes of
(seed, position), the same on every device)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler
from pdserve.engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

B, V = 256, 128256


def _requests(**params) -> list[Request]:
    return [Request(f"r{i}", list(range(16)), SamplingParams(seed=i, **params), 16) for i in range(B)]


@pytest.mark.parametrize("params", [dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=50),
                                    dict(temperature=0.7, min_p=0.05), dict(temperature=1.0),
                                    dict(temperature=0.8, top_p=0.9, repetition_penalty=1.1, logit_bias={5: 3.0})],
                         ids=["top_p", "top_k", "min_p", "plain", "processors"])
@pytest.mark.parametrize("scale", [4.0, 0.5], ids=["peaked", "flat"])
def test_seeded_tokens_equal_on_cuda_and_cpu(params, scale):
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(1)) * scale
    cpu = Sampler()(logits, _requests(**params)).token_ids
    cuda = Sampler()(logits.cuda(), _requests(**params)).token_ids
    # Float reductions differ in order between devices; a draw that lands within rounding
    # of a boundary may pick the neighbour. Nearly every row must agree.
    same = sum(a == b for a, b in zip(cpu, cuda))
    assert same >= B - 2, f"{B - same} of {B} rows differ"


def test_greedy_and_logprobs_on_cuda():
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(2)).cuda() * 3
    reqs = [Request(f"g{i}", [1], SamplingParams(temperature=0.0, logprobs=5), 16) for i in range(B)]
    out = Sampler()(logits, reqs)
    assert out.token_ids == logits.argmax(-1).tolist()
    raw = torch.log_softmax(logits, -1)
    for i in (0, 17, B - 1):
        assert set(out.logprobs[i]) == set(raw[i].topk(5).indices.tolist())
