"""Host-side costs around the model: the engine loop, the sampler and the serving path.

    python benchmarks/bench_host.py [--only a,b,c,d] [--dtype float32] [--device cpu] [--reps 3]
        [--client raw|loadtest] [--streams 64] [--prompt-len 32] [--output-len 128] [--near-free]

(a) A near-free model (1 layer, hidden 64, vocabulary 1,000): output tok/s of
    ``LLM.generate`` on 256 sequences (16-token prompts, 64 output tokens, ignore_eos),
    greedy and sampled (temperature 0.8, top_p 0.9, a distinct seed per request).
    With the model this cheap, the figure is the engine's per-token host overhead.
(b) The same model with a 128,256-token vocabulary, 64 sequences: mean decode step
    time sampled (temperature 0.8, top_p 0.9, seed) over greedy.
(c) ``Sampler`` alone on [256, 128256] float32 logits, peaked (randn * 4) and flat
    (randn * 0.5): greedy; temperature + top_p; + seed; penalties + logit_bias with 64
    output tokens of history. ``torch.log_softmax`` of the same logits is the bandwidth
    reference; each row is also printed as a ratio to it.
(d) The tiny default model (``pdserve make-tiny-model``) at ``--streams`` concurrent
    streams: served output tok/s through a gateway and one decode worker (plain
    processes, no prefill pool, local prefill) against offline ``LLM.generate`` on the
    same prompts and lengths in the same dtype (``--near-free``: the near-free model of (a)
    with the tiny model's vocabulary, where the serving path's own cost dominates). The
    load client runs in this process:
    ``raw`` is a minimal asyncio HTTP/1.1 client (low overhead, checks the streamed text
    against offline), ``loadtest`` the project's own load tester. Also prints the CPU
    seconds each process spent during the served run.

Timed figures are medians of ``--reps`` runs after one warm-up. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

SECTIONS = "abcd"

# -- models -----------------------------------------------------------------------------------


def write_model(out: Path, vocab_size: int, hidden_size: int = 64, num_layers: int = 1, seed: int = 0) -> Path:
    """A random Llama in the tiny model's format with a real byte-level BPE tokenizer of
    exactly ``vocab_size`` ids. The tokenizer corpus supports about 9k trained tokens; a
    larger vocabulary is filled with plain vocabulary entries ``<rN>`` that no merge
    produces (decodable like any token). Not added tokens: the ``tokenizers`` library's
    cost of some calls grows with the number of added tokens, which real checkpoints keep
    in the hundreds."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pdserve.engine import tiny_model as tm

    out.mkdir(parents=True, exist_ok=True)
    corpus = tm.build_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    base = min(vocab_size, tm.VOCAB_SIZE) - len(tm.SPECIAL_TOKENS)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=base, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]), length=len(corpus))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size - len(tm.SPECIAL_TOKENS)):
        vocab[f"<r{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens(list(tm.SPECIAL_TOKENS))
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    bos, eos = tok.token_to_id(tm.BOS_TOKEN), tok.token_to_id(tm.EOS_TOKEN)
    heads = max(hidden_size // 16, 1)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
        "num_attention_heads": heads, "num_key_value_heads": max(heads // 2, 1), "head_dim": hidden_size // heads,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": bos, "eos_token_id": eos,
    }
    (out / "config.json").write_text(json.dumps(config))
    save_file(tm._llama_weights(config, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tm.BOS_TOKEN, "eos_token": tm.EOS_TOKEN, "chat_template": tm.CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}))
    return out


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 16) for _ in range(length)] for _ in range(n)]


def median_of(reps: int, fn) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(reps))


# -- (a) offline throughput of a near-free model ------------------------------------------------------


def section_a(args, tmp: Path, rows: list) -> None:
    from pdserve.engine import LLM, SamplingParams

    model = write_model(tmp / "a", vocab_size=1000)
    n, out_len = 256, 64
    prompts = random_prompts(n, 16, 1000, args.seed)
    modes = {
        "greedy": [SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)] * n,
        "t0.8 top_p0.9 seed": [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=out_len, ignore_eos=True)
                               for i in range(n)],
    }
    with LLM(model, dtype=args.dtype, device=args.device) as llm:
        for name, params in modes.items():
            def run() -> float:
                start = time.perf_counter()
                outs = llm.generate(prompts, params)
                elapsed = time.perf_counter() - start
                assert sum(len(o.token_ids) for o in outs) == n * out_len
                return n * out_len / elapsed

            tok_s = median_of(args.reps, run)
            print(f"(a) vocab 1000, 1 layer, hidden 64, {n} seqs x {out_len} out, {name}: {tok_s:,.0f} output tok/s")
            rows.append((f"(a) LLM.generate {name}", f"{tok_s:,.0f} tok/s"))


# -- (b) decode step, sampled / greedy, 128k vocabulary ---------------------------------------------


def decode_step_s(llm, prompts: list[list[int]], params_of, steps: int, tag: str) -> float:
    """Mean seconds of a decode-only step with ``prompts`` running (prefill steps excluded)."""
    eng = llm.engine
    rids = [f"{tag}-{i}" for i in range(len(prompts))]
    for i, (rid, prompt) in enumerate(zip(rids, prompts)):
        eng.add_request(rid, prompt, params_of(i))
    try:
        while any(r.is_prefilling or r.num_computed_tokens == 0 for r in eng.scheduler.requests.values()):
            eng.step()
        eng.step()
        eng.step()
        start = time.perf_counter()
        for _ in range(steps):
            eng.step()
        return (time.perf_counter() - start) / steps
    finally:
        for rid in rids:
            eng.abort_request(rid)


def section_b(args, tmp: Path, rows: list) -> None:
    from pdserve.engine import LLM, SamplingParams

    vocab, n, steps = 128256, 64, 32
    model = write_model(tmp / "b", vocab_size=vocab)
    prompts = random_prompts(n, 16, vocab, args.seed)
    greedy = lambda i: SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)  # noqa: E731
    sampled = lambda i: SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=steps + 8,  # noqa: E731
                                       ignore_eos=True)
    times: dict[str, list[float]] = {"greedy": [], "sampled": []}
    with LLM(model, dtype=args.dtype, device=args.device) as llm:
        decode_step_s(llm, prompts, greedy, 4, "warm-g")
        decode_step_s(llm, prompts, sampled, 4, "warm-s")
        for rep in range(args.reps):  # alternate, so drift hits both alike
            times["greedy"].append(decode_step_s(llm, prompts, greedy, steps, f"g{rep}"))
            times["sampled"].append(decode_step_s(llm, prompts, sampled, steps, f"s{rep}"))
    g, s = statistics.median(times["greedy"]), statistics.median(times["sampled"])
    print(f"(b) vocab {vocab}, {n} seqs: decode step greedy {1000 * g:.2f} ms, sampled (t0.8 top_p0.9 seed) "
          f"{1000 * s:.2f} ms: sampled / greedy = {s / g:.2f}")
    rows.append(("(b) step greedy / sampled", f"{1000 * g:.2f} / {1000 * s:.2f} ms"))
    rows.append(("(b) sampled / greedy", f"{s / g:.2f}x"))


# -- (c) the sampler alone -----------------------------------------------------------------------


def section_c(args, rows: list) -> None:
    from pdserve.engine.request import Request
    from pdserve.engine.sampler import Sampler
    from pdserve.engine.sampling_params import SamplingParams

    device = args.device
    batch, vocab = 256, 128256
    rng = random.Random(args.seed)
    bias = {rng.randrange(vocab): rng.uniform(-5, 5) for _ in range(16)}
    configs = {
        "greedy": lambda i: SamplingParams(temperature=0.0),
        "t0.8 top_p0.9": lambda i: SamplingParams(temperature=0.8, top_p=0.9),
        "t0.8 top_p0.9 seed": lambda i: SamplingParams(temperature=0.8, top_p=0.9, seed=i),
        "+ penalties + logit_bias": lambda i: SamplingParams(
            temperature=0.8, top_p=0.9, seed=i, presence_penalty=0.5, frequency_penalty=0.5,
            repetition_penalty=1.1, logit_bias=bias),
    }

    def requests(params_of) -> list:
        reqs = []
        for i in range(batch):
            req = Request(f"c{i}", [rng.randrange(vocab) for _ in range(16)], params_of(i), 16)
            for _ in range(64):
                req.append_token(rng.randrange(vocab))
            reqs.append(req)
        return reqs

    def timed_ms(fn, num: int = 10) -> float:
        fn()
        fn()
        times = []
        for _ in range(num):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    sampler = Sampler()
    gen = torch.Generator().manual_seed(args.seed)
    print(f"(c) Sampler on [{batch}, {vocab}] float32 logits, device {device}; ms (ratio to log_softmax)")
    for kind, scale in (("peaked", 4.0), ("flat", 0.5)):
        logits = (torch.randn(batch, vocab, generator=gen) * scale).to(device)
        ref = timed_ms(lambda: torch.log_softmax(logits, dim=-1))
        line = [f"log_softmax {ref:.2f}"]
        rows.append((f"(c) {kind}: log_softmax", f"{ref:.2f} ms"))
        for name, params_of in configs.items():
            reqs = requests(params_of)
            ms = timed_ms(lambda: sampler(logits, reqs))
            line.append(f"{name} {ms:.2f} ({ms / ref:.1f}x)")
            rows.append((f"(c) {kind}: {name}", f"{ms:.2f} ms = {ms / ref:.1f}x"))
        print(f"    {kind:<6} " + "; ".join(line))


# -- (d) served against offline --------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_busy_seconds() -> float:
    """CPU seconds every process on this host has used since boot (Linux /proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


async def raw_stream(port: int, body: bytes) -> tuple[str, int]:
    """One streaming POST /v1/completions over a fresh connection: (text, completion tokens).

    A minimal HTTP/1.1 client (chunked transfer decoding, SSE split on blank lines), so
    the client's own cost stays small beside the server's on a shared host."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"gateway answered {status!r}: {(await reader.read(2000))!r}")
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        parts, num_tokens, buf = [], 0, b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size + 2))[:-2]
            *events, buf = buf.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                msg = json.loads(data)
                if "error" in msg:
                    raise RuntimeError(f"stream error: {msg['error']}")
                for choice in msg["choices"]:
                    parts.append(choice["text"])
                if msg.get("usage"):
                    num_tokens = msg["usage"]["completion_tokens"]
        return "".join(parts), num_tokens
    finally:
        writer.close()


def served_raw(port: int, name: str, prompts: list[list[int]], out_len: int) -> tuple[float, list[str], int]:
    async def main():
        bodies = [json.dumps({"model": name, "prompt": p, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
                              "stream": True, "stream_options": {"include_usage": True}}).encode() for p in prompts]
        start = time.perf_counter()
        results = await asyncio.gather(*(raw_stream(port, b) for b in bodies))
        return time.perf_counter() - start, [t for t, _ in results], sum(n for _, n in results)

    return asyncio.run(main())


def served_loadtest(url: str, model: str, n: int, prompt_len: int, out_len: int) -> tuple[float, list[str], int]:
    from pdserve.loadtest.config import LoadTestConfig
    from pdserve.loadtest.runner import run_loadtest

    result = run_loadtest(LoadTestConfig(base_url=url, workload="fixed", input_len=prompt_len, output_len=out_len,
                                         concurrency=n, num_requests=n, tokenizer_dir=model, timeout_s=600))
    s = result.summary
    return s["total_output_tokens"] / s["output_throughput"], [], s["total_output_tokens"]


def start_gateway(store_url: str, model: str, port: int):
    import httpx

    from pdserve.deploy.processes import start_gateway as start

    gw, url = start({"store_url": store_url, "model_dir": model}, port)
    return gw, url, httpx.get(url + "/v1/models").json()["data"][0]["id"]


def section_d(args, tmp: Path, rows: list) -> None:
    import socket

    from pdserve.deploy.cli import _resolve_model
    from pdserve.deploy.processes import WorkerProcess
    from pdserve.deploy.store.embedded import ControlPlaneServer
    from pdserve.engine import LLM, SamplingParams
    from pdserve.engine.config import ModelConfig

    if args.near_free:
        model = str(write_model(tmp / "d", vocab_size=8192))
    else:
        model = str(_resolve_model(args.model))
    n, prompt_len, out_len = args.streams, args.prompt_len, args.output_len
    prompts = random_prompts(n, prompt_len, ModelConfig.from_dir(model).vocab_size, args.seed)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)

    with LLM(model, dtype=args.dtype) as llm:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        offline_times, offline_text, foreign = [], [], []
        for _ in range(args.reps):
            busy, cpu0, start = host_busy_seconds(), time.process_time(), time.perf_counter()
            outs = llm.generate(prompts, params)
            offline_times.append(time.perf_counter() - start)
            foreign.append((host_busy_seconds() - busy - (time.process_time() - cpu0)) / offline_times[-1])
            offline_text = [o.text for o in outs]
    offline = n * out_len / statistics.median(offline_times)

    store = ControlPlaneServer()
    store.start()
    procs, worker = [], None
    try:
        worker = WorkerProcess("decode", ["--model", model, "--store", store.url, "--worker-id", "d0", "--dtype",
                                          args.dtype, "--device", "cpu", "--log-level", "WARNING"])
        worker.wait_ready()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        gw, url, name = start_gateway(store.url, model, port)
        procs.append(gw)

        def run(num_tokens: int):
            if args.client == "loadtest":
                return served_loadtest(url, model, n, prompt_len, num_tokens)
            return served_raw(port, name, prompts, num_tokens)

        run(8)
        served_times, cpu = [], []
        for _ in range(args.reps):
            busy = host_busy_seconds()
            before = (cpu_seconds(worker.proc.pid), cpu_seconds(gw.pid), time.process_time())
            elapsed, texts, num_tokens = run(out_len)
            after = (cpu_seconds(worker.proc.pid), cpu_seconds(gw.pid), time.process_time())
            foreign.append((host_busy_seconds() - busy - sum(after) + sum(before)) / elapsed)
            if num_tokens != n * out_len:
                raise RuntimeError(f"served {num_tokens} tokens, expected {n * out_len}")
            served_times.append(elapsed)
            cpu.append([b - a for a, b in zip(before, after)])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        if worker is not None:
            worker.stop()
        store.stop()
    k = sorted(range(len(served_times)), key=served_times.__getitem__)[len(served_times) // 2]
    served = n * out_len / served_times[k]
    equal = f"{sum(a == b for a, b in zip(texts, offline_text))}/{n}" if texts else "-"
    kind = "near-free" if args.near_free else "tiny"
    print(f"(d) {kind} model ({args.dtype}), {n} streams x {prompt_len} in / {out_len} out, 1 decode worker, "
          f"client {args.client}: offline {offline:,.0f} tok/s, served {served:,.0f} tok/s = {served / offline:.0%}"
          f"; texts equal to offline {equal}")
    w, g, c = cpu[k]
    print(f"    CPU seconds in the median served run ({served_times[k]:.1f} s wall): decode worker {w:.1f}, "
          f"gateway {g:.1f}, this process (client, store) {c:.1f}; other processes on the host: up to "
          f"{max(foreign):.2f} cores in a timed run (on a shared host, compare runs where that is near 0)")
    rows.append((f"(d) offline LLM.generate, {n} streams", f"{offline:,.0f} tok/s"))
    rows.append(("(d) served (gateway + 1 decode)", f"{served:,.0f} tok/s"))
    rows.append(("(d) served / offline", f"{served / offline:.0%}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections to run, e.g. a,d (default: all)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(a), (b) and (c); (d) runs on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: torch's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="(d): model directory (default: the embedded tiny model)")
    ap.add_argument("--near-free", action="store_true",
                    help="(d): serve a near-free model (1 layer, hidden 64, vocabulary 8,192) instead of the tiny "
                         "model, so the serving path's own cost dominates")
    ap.add_argument("--client", default="raw", choices=["raw", "loadtest"], help="(d): the load client")
    ap.add_argument("--streams", type=int, default=64, help="(d): concurrent streams")
    ap.add_argument("--prompt-len", type=int, default=32, help="(d)")
    ap.add_argument("--output-len", type=int, default=128, help="(d)")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only <= set(SECTIONS):
        ap.error(f"--only takes sections from {','.join(SECTIONS)}, got {args.only!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device; running on the CPU")
        args.device = "cpu"

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-host-") as tmp:
        if "a" in only:
            section_a(args, Path(tmp), rows)
        if "b" in only:
            section_b(args, Path(tmp), rows)
        if "c" in only:
            section_c(args, rows)
        if "d" in only:
            section_d(args, Path(tmp), rows)

    print()
    width = max(len(r[0]) for r in rows) if rows else 0
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}, dtype {args.dtype}")


if __name__ == "__main__":
    main()
