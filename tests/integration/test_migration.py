"""Mid-stream migration: a decode worker dies under a stream; the client never notices.

The embedded store, one prefill worker and two decode workers as processes (NIXL) on
the tiny model, and the gateway in-process. Each test starts a stream through the
gateway, SIGKILLs the decode worker serving it after some tokens, and checks that the
client's concatenated stream equals an uninterrupted run of the offline ``LLM``, token
for token (each position's token string and logprob) and text for text, with usage
counted once. Then it replaces the killed worker with a fresh one (a new worker id) and
checks every KV block is free on the workers that survived.

Narrated cases: greedy with logprobs on a prompt prefilled by the prefill worker (so
the resumed request's prompt and output go through P->D again); seeded sampling with
n = 2 (each completion resumed as its own request with its own seed); a stop string
near a boundary, with a long never-matching stop string holding ~40 characters back on
the worker that dies; and the bound: both decode workers killed, the stream ends with
a clear error event. The exactness argument at every cut point, multi-byte characters
split across tokens included, is tested on the engine alone in
``tests/unit/test_engine_resume.py``.
"""

from __future__ import annotations

import itertools
import json

import httpx
import pytest

from pdserve.deploy.processes import WorkerProcess, wait_all_free
from pdserve.deploy.store.embedded import ControlPlaneServer
from pdserve.engine import LLM, SamplingParams
from pdserve.engine.tiny_model import make_tiny_model
from pdserve.engine.tokenizer import Tokenizer
from pdserve.router.app import ServerThread, create_app
from pdserve.router.gateway import GatewayConfig

pytestmark = pytest.mark.integration

NUM_BLOCKS = 128
DISAGG_THRESHOLD = 32
SHORT = "The quick brown fox"
LONG = ("Return a new list containing all items from the iterable in ascending order. A custom key function "
        "can be supplied to customize the sort order, and the reverse flag can be set to request the result "
        "in descending order.")
KILL_AFTER = 6  # chunks the client reads before the serving worker is killed


def Worker(role: str, model_dir, store_url: str, worker_id: str) -> WorkerProcess:
    return WorkerProcess(role, ["--model", str(model_dir), "--store", store_url, "--worker-id", worker_id,
                                "--num-kv-blocks", str(NUM_BLOCKS), "--transfer-backend", "nixl",
                                "--heartbeat-ttl", "5", "--prefill-timeout", "10", "--log-level", "WARNING"])


class Cluster:
    """p0, two live decode workers (replaced as tests kill them) and a gateway."""

    def __init__(self, model_dir, store: ControlPlaneServer) -> None:
        self.model_dir, self.store = model_dir, store
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self._ids = itertools.count(2)
        self.p: WorkerProcess | None = None
        self.decode: list[WorkerProcess] = []
        self.dead: list[WorkerProcess] = []
        self.starting: list[WorkerProcess] = []
        self.server: ServerThread | None = None

    def start(self) -> None:
        # One at a time: three starting at once contend for two cores (about 2x slower).
        self.p = Worker("prefill", self.model_dir, self.store.url, "p0")
        self.p.wait_ready()
        for i in range(2):
            self.decode.append(Worker("decode", self.model_dir, self.store.url, f"d{i}"))
            self.decode[-1].wait_ready()
        self.server = ServerThread(create_app(GatewayConfig(store_url=self.store.url, model_dir=str(self.model_dir),
                                                            disagg_threshold_tokens=DISAGG_THRESHOLD)))
        self.url = self.server.url

    def serving(self) -> WorkerProcess:
        (w,) = [w for w in self.decode if w.stats().num_running > 0]
        return w

    def kill(self, w: WorkerProcess, replace: bool = True) -> None:
        """SIGKILL ``w``; with ``replace`` a fresh decode worker (a new id) starts at once,
        in the background (``settle`` waits for it), so its start overlaps the test."""
        w.proc.kill()
        w.proc.wait()
        self.decode.remove(w)
        self.dead.append(w)
        if replace:
            self.starting.append(Worker("decode", self.model_dir, self.store.url, f"d{next(self._ids)}"))

    def settle(self) -> None:
        """Two live decode workers again (the replacements started)."""
        for w in self.starting:
            w.wait_ready()
        self.decode += self.starting
        self.starting = []

    def all_free(self) -> bool:
        return wait_all_free([self.p, *self.decode], timeout_s=10)

    def metric(self, prefix: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix))

    def migrations(self, outcome: str) -> float:
        """Completions migrated with that outcome, whatever the reason (the kill shows as
        "unavailable" or, if the worker's stream was cut while it stopped, "cancelled")."""
        return self.metric(f'pdserve_gateway_migrations_total{{outcome="{outcome}"')

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        for w in (*self.decode, *self.starting, *self.dead, *([self.p] if self.p else [])):
            w.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("migration") / "tiny-llama")
    store = ControlPlaneServer()
    store.start()
    c = Cluster(model_dir, store)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        store.stop()


@pytest.fixture(scope="module")
def llm(cluster):
    with LLM(cluster.model_dir, num_kv_blocks=NUM_BLOCKS) as engine:
        yield engine


class Stream:
    """One streamed /v1/completions request read as SSE; ``on_chunk(k)`` runs after the
    k-th chunk that carries a choice (from 1)."""

    def __init__(self, url: str, body: dict, on_chunk) -> None:
        self.text: dict[int, str] = {}
        self.tokens: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.finish: dict[int, str] = {}
        self.usage = self.error = None
        num_chunks = 0
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    self.error = event["error"]
                    continue
                if event.get("usage"):
                    self.usage = event["usage"]
                for c in event["choices"]:
                    i = c["index"]
                    self.text[i] = self.text.get(i, "") + c["text"]
                    if c["logprobs"]:
                        self.tokens.setdefault(i, []).extend(c["logprobs"]["tokens"])
                        self.logprobs.setdefault(i, []).extend(c["logprobs"]["token_logprobs"])
                    if c["finish_reason"]:
                        self.finish[i] = c["finish_reason"]
                if event["choices"]:
                    num_chunks += 1
                    on_chunk(num_chunks)


@pytest.fixture(autouse=True)
def two_decode_workers(cluster):
    """Each test starts with two live decode workers (a killed one's replacement is up)."""
    cluster.settle()


def kill_serving(cluster: Cluster, at: int = KILL_AFTER):
    def on_chunk(k: int) -> None:
        if k == at:
            cluster.kill(cluster.serving())
    return on_chunk


def token_strings(cluster: Cluster, token_ids: list[int]) -> list[str]:
    return [cluster.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]


def assert_equal(cluster: Cluster, out: Stream, i: int, ref) -> None:
    """Choice ``i`` of the stream is the uninterrupted completion ``ref``: text, each
    token (its string and logprob) and finish reason."""
    assert out.text[i] == ref.text
    assert out.tokens[i] == token_strings(cluster, ref.token_ids)
    assert out.logprobs[i] == pytest.approx([lp[t] for t, lp in zip(ref.token_ids, ref.logprobs)], abs=1e-4)
    assert out.finish[i] == ref.finish_reason


def test_greedy_with_logprobs_resumes_through_the_prefill_worker(cluster, llm):
    ids = cluster.tokenizer.encode(LONG)
    assert len(ids) >= DISAGG_THRESHOLD  # the first call and the resumed one prefill on p0
    remote0 = cluster.metric('pdserve_gateway_routing_decisions_total{prefill="remote"}')
    resumed0 = cluster.migrations("resumed")
    ref = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=1))[0]
    out = Stream(cluster.url, {"model": cluster.model_dir.name, "prompt": LONG, "max_tokens": 48, "temperature": 0,
                               "logprobs": 1, "ignore_eos": True, "stream_options": {"include_usage": True}},
                 kill_serving(cluster))
    assert out.error is None
    assert_equal(cluster, out, 0, ref.outputs[0])
    assert out.usage["prompt_tokens"] == len(ids) and out.usage["completion_tokens"] == 48
    assert cluster.migrations("resumed") == resumed0 + 1
    assert cluster.metric('pdserve_gateway_routing_decisions_total{prefill="remote"}') == remote0 + 2
    assert cluster.all_free()


def test_seeded_n2_resumes_each_completion_with_its_own_seed(cluster, llm):
    ids = cluster.tokenizer.encode(SHORT)
    params = dict(temperature=1.0, seed=4242, max_tokens=40, ignore_eos=True, presence_penalty=0.5,
                  frequency_penalty=0.3)
    ref = llm.generate([ids], SamplingParams(n=2, logprobs=0, **params))[0]
    assert ref.outputs[0].token_ids != ref.outputs[1].token_ids
    out = Stream(cluster.url, {"model": cluster.model_dir.name, "prompt": SHORT, "n": 2, "logprobs": 0,
                               "stream_options": {"include_usage": True}, **params},
                 kill_serving(cluster, at=2 * KILL_AFTER))
    assert out.error is None
    for i in range(2):
        assert_equal(cluster, out, i, ref.outputs[i])
    assert out.usage["prompt_tokens"] == len(ids) and out.usage["completion_tokens"] == 80
    assert cluster.all_free()


def test_stop_string_held_back_across_the_boundary(cluster, llm):
    """A never-matching 40-character stop string makes the worker hold the last 39
    characters back. The real stop string begins in token 4 and completes in token 11,
    so when the worker dies (the gateway has read some 6 to 10 tokens) it has begun, is
    held back, and can only be found by the worker that resumes."""
    ids = cluster.tokenizer.encode(SHORT)
    params = dict(temperature=1.0, seed=77, max_tokens=48, ignore_eos=True)
    full = llm.generate([ids], SamplingParams(**params))[0].outputs[0]
    ends = [len(cluster.tokenizer.decode(full.token_ids[: k + 1])) for k in range(len(full.token_ids))]
    start, end = ends[4] - 1, ends[10] + 1
    stop = full.text[start:end]
    assert full.text.find(stop) == start and len(stop) < 40, (stop, ends[:12])
    never = "NEVER" + "~" * 35
    ref = llm.generate([ids], SamplingParams(stop=[stop, never], logprobs=0, **params))[0].outputs[0]
    assert ref.finish_reason == "stop" and ref.text == full.text[:start]
    out = Stream(cluster.url, {"model": cluster.model_dir.name, "prompt": SHORT, "stop": [stop, never],
                               "logprobs": 0, **params}, kill_serving(cluster))
    assert out.error is None
    assert_equal(cluster, out, 0, ref)
    assert cluster.all_free()


def test_migrations_are_bounded_when_every_decode_worker_dies(cluster):
    exhausted0 = cluster.migrations("exhausted")

    def kill_both(k: int) -> None:
        if k == KILL_AFTER:
            # The idle one first: killing the serving one first would let its completion
            # migrate to the other and finish there before that one died (a slow client thread).
            serving = cluster.serving()
            for w in [w for w in cluster.decode if w is not serving] + [serving]:
                cluster.kill(w, replace=False)

    out = Stream(cluster.url, {"model": cluster.model_dir.name, "prompt": SHORT, "max_tokens": 64,
                               "temperature": 0, "ignore_eos": True}, kill_both)
    assert out.error is not None and out.error["code"] == "migrations_exhausted", out.error
    assert "max_migrations 3" in out.error["message"]
    assert 0 not in out.finish  # the choice never claimed to finish
    assert cluster.migrations("exhausted") == exhausted0 + 1
    assert wait_all_free([cluster.p], timeout_s=10)
