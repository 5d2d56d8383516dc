"""Per-step cost of structured-output (grammar) masks.

    python benchmarks/bench_structured.py [--reps 3] [--steps 24] [--batch 64] [--dtype float32]

Decode steps of ``--batch`` sequences, every one under a JSON schema (four schemas,
round-robin, each long enough that no sequence finishes inside the measured steps),
against the same batch unconstrained, sampled alike (temperature 0.8, top_p 0.95, a
seed per request), in the same process, alternating runs so drift hits both alike:

(a) the tiny default model (8 layers, hidden 512, vocabulary 8,192);
(b) a 1-layer model with Llama 3's 128,256-token vocabulary (``bench_host.write_model``):
    the mask fill and apply scale with the vocabulary while this model's forward
    barely costs anything, so this is the worst case for the ratio.

Printed: mean decode step time with and without grammars (medians of ``--reps``), their
ratio and the spread of the ratios of each alternated pair of runs, and the parts
(mask fill for the batch by llguidance's thread pool; bit unpack and apply; token
accept). Asserts only that no sequence finished or failed inside the measured steps (a
token its matcher refused would have failed it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCHEMAS = [
    {"type": "object", "properties": {"rows": {"type": "array", "minItems": 40, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 16},
                                         "ok": {"type": "boolean"}},
        "required": ["id", "name", "ok"], "additionalProperties": False}}},
     "required": ["rows"], "additionalProperties": False},
    {"type": "array", "minItems": 60, "items": {"enum": ["red", "green", "blue", "cyan", "magenta"]}},
    {"type": "object", "properties": {"text": {"type": "string", "minLength": 200, "maxLength": 400}},
     "required": ["text"], "additionalProperties": False},
    {"type": "array", "minItems": 50, "items": {"type": "object", "properties": {
        "x": {"type": "number"}, "y": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"},
                                                                     "maxItems": 3}},
        "required": ["x", "y", "tags"], "additionalProperties": False}},
]


def decode_step_s(engine, prompts, params_of, steps: int, tag: str) -> float:
    """Mean seconds of a decode-only step with ``prompts`` running (prefill excluded)."""
    rids = [f"{tag}-{i}" for i in range(len(prompts))]
    for i, (rid, prompt) in enumerate(zip(rids, prompts)):
        engine.add_request(rid, prompt, params_of(i))
    try:
        while any(r.is_prefilling or r.num_computed_tokens == 0 for r in engine.scheduler.requests.values()):
            engine.step()
        engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = (time.perf_counter() - start) / steps
        running = [r for r in engine.scheduler.requests.values() if not r.status.is_finished]
        assert len(running) == len(prompts), "a sequence finished inside the measured steps"
        return elapsed
    finally:
        for rid in rids:
            engine.abort_request(rid)


def measure(name: str, model_dir: Path, args, rows: list) -> None:
    from bench_host import random_prompts

    from pdserve.engine import LLM, SamplingParams
    from pdserve.engine.sampling_params import StructuredOutput

    sos = [StructuredOutput("json", json.dumps(s)) for s in SCHEMAS]
    max_tokens = args.steps + 64

    def free(i):
        return SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=max_tokens, ignore_eos=True)

    def constrained(i):
        return SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=max_tokens,
                              structured_output=sos[i % len(sos)])

    with LLM(str(model_dir), dtype=args.dtype) as llm:
        engine = llm.engine
        vocab = engine.config.model.vocab_size
        prompts = random_prompts(args.batch, 16, min(vocab, 8000), args.seed)
        decode_step_s(engine, prompts, free, 4, "warm-f")
        decode_step_s(engine, prompts, constrained, 4, "warm-c")
        times: dict[str, list[float]] = {"free": [], "grammar": []}
        for rep in range(args.reps):
            times["free"].append(decode_step_s(engine, prompts, free, args.steps, f"f{rep}"))
            times["grammar"].append(decode_step_s(engine, prompts, constrained, args.steps, f"c{rep}"))
        parts = mask_parts(engine, prompts, sos, args)
    f, g = statistics.median(times["free"]), statistics.median(times["grammar"])
    ratios = sorted(b / a for a, b in zip(times["free"], times["grammar"]))
    print(f"{name}: vocab {vocab}, batch {args.batch}: decode step {1000 * f:.2f} ms free, {1000 * g:.2f} ms "
          f"with JSON-schema masks: {g / f:.3f}x (+{100 * (g / f - 1):.1f}%); per-pair ratios "
          f"{ratios[0]:.3f}..{ratios[-1]:.3f}, median {statistics.median(ratios):.3f}")
    print(f"    parts per step: fill {parts['fill']:.3f} ms, apply {parts['apply']:.3f} ms, "
          f"accept {parts['accept']:.3f} ms")
    rows.append((f"{name} step free / grammar", f"{1000 * f:.2f} / {1000 * g:.2f} ms"))
    rows.append((f"{name} grammar / free", f"{g / f:.3f}x (pairs {ratios[0]:.3f}..{ratios[-1]:.3f})"))
    rows.append((f"{name} fill / apply / accept", f"{parts['fill']:.3f} / {parts['apply']:.3f} / "
                                                  f"{parts['accept']:.3f} ms"))


def mask_parts(engine, prompts, sos, args) -> dict[str, float]:
    """The grammar's share of a step, timed apart: fill the batch's masks, unpack and apply
    them to [batch, vocab] logits, accept one allowed token per row."""
    from pdserve.engine.logits_processors import apply_token_bitmask, bitmask_words
    from pdserve.engine.structured_output import GrammarConstraint

    vocab = engine.config.model.vocab_size
    constraints = [engine.grammars.constraint(sos[i % len(sos)]) for i in range(len(prompts))]
    bitmask = torch.zeros(len(constraints), bitmask_words(vocab), dtype=torch.int32)
    logits = torch.randn(len(constraints), vocab)
    fill = apply = accept = 0.0
    steps = args.steps
    for _ in range(steps):
        bitmask.zero_()
        work = logits.clone()
        t0 = time.perf_counter()
        GrammarConstraint.fill_bitmasks([(c, i) for i, c in enumerate(constraints)], bitmask)
        t1 = time.perf_counter()
        apply_token_bitmask(work, bitmask)
        t2 = time.perf_counter()
        tokens = work.argmax(dim=1).tolist()
        t3 = time.perf_counter()
        for c, t in zip(constraints, tokens):
            c.accept_token(t)
        t4 = time.perf_counter()
        fill, apply, accept = fill + t1 - t0, apply + t2 - t1, accept + t4 - t3
    for c in constraints:
        c.close()
    return {"fill": 1000 * fill / steps, "apply": 1000 * apply / steps, "accept": 1000 * accept / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="ab")
    args = parser.parse_args()
    from bench_host import write_model

    from pdserve.engine.tiny_model import make_tiny_model

    rows: list = []
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        if "a" in args.only:
            measure("(a) tiny model", make_tiny_model(Path(tmp) / "tiny"), args, rows)
        if "b" in args.only:
            measure("(b) 128k vocab, 1 layer", write_model(Path(tmp) / "big", vocab_size=128256), args, rows)
    print()
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
