"""The synthetic Mooncake trace generator (loadtest/trace_gen.py): its file passes the load
test's own reader, a seed fixes it, sessions grow turn by turn, prefixes are skewed."""

from __future__ import annotations

import collections
import dataclasses
import statistics

import pytest

from pdserve.loadtest.trace_gen import TraceSpec, generate_trace, write_trace
from pdserve.loadtest.workloads import read_trace

# Small but with enough sessions to see the Zipf skew: about 200 sessions.
SPEC = TraceSpec(duration_s=20.0, session_rate=10.0, num_prefixes=50, seed=3)


@pytest.fixture(scope="module")
def lines(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "trace.jsonl"
    num = write_trace(SPEC, path)
    entries = list(read_trace(path))  # validates every field and the timestamp order
    assert len(entries) == num > 200
    return entries


def sessions(entries) -> list[list[dict]]:
    """Lines grouped into sessions by their ids alone: a line continues the session whose
    last prompt its hash ids start with (fresh ids are never shared, so at most one does)."""
    by_last: dict[tuple, list] = {}
    out = []
    for e in entries:
        ids = tuple(e["hash_ids"])
        session = next((by_last.pop(ids[:cut]) for cut in range(len(ids) - 1, 0, -1) if ids[:cut] in by_last), None)
        if session is None:
            session = []
            out.append(session)
        session.append(e)
        by_last[ids] = session
    return out


def test_lines_are_well_formed_and_cover_their_prompts(lines):
    bs = SPEC.block_size
    for e in lines:
        assert SPEC.min_output_len <= e["output_length"] <= SPEC.max_output_len
        assert SPEC.min_prefix_blocks * bs < e["input_length"] <= SPEC.max_input_len
        assert len(e["hash_ids"]) == -(-e["input_length"] // bs)  # every token has its block, no more
    assert lines[-1]["timestamp"] > lines[0]["timestamp"]


def test_a_seed_fixes_the_trace_and_another_changes_it(tmp_path):
    write_trace(SPEC, tmp_path / "a.jsonl")
    write_trace(SPEC, tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert generate_trace(dataclasses.replace(SPEC, seed=4)) != generate_trace(SPEC)


def test_later_turns_extend_the_previous_prompt_and_answer(lines):
    groups = sessions(lines)
    multi = [s for s in groups if len(s) > 1]
    assert len(multi) > 20
    bs = SPEC.block_size
    for s in multi:
        for prev, cur in zip(s, s[1:]):
            n = len(prev["hash_ids"])
            assert cur["hash_ids"][:n] == prev["hash_ids"]
            # The previous prompt, its answer and a new message of at least min_message_len.
            assert cur["input_length"] >= prev["input_length"] + prev["output_length"] + SPEC.min_message_len
            assert cur["timestamp"] > prev["timestamp"] + SPEC.response_base_s * 1e3
            assert len(cur["hash_ids"]) == -(-cur["input_length"] // bs)
    assert max(len(s) for s in groups) <= SPEC.max_turns


def test_ids_are_shared_only_through_a_common_prefix(lines):
    """A hash id stands for a block in its context: wherever it appears, the ids before it agree."""
    context = {}
    for e in lines:
        ids = e["hash_ids"]
        for i, h in enumerate(ids):
            assert context.setdefault(h, tuple(ids[:i])) == tuple(ids[:i])


def test_prefix_popularity_is_zipf_skewed(lines):
    groups = sessions(lines)
    by_prefix = collections.Counter(s[0]["hash_ids"][0] for s in groups)
    counts = sorted(by_prefix.values(), reverse=True)
    # Zipf s=1.1 over 50 prefixes: the top one draws ~22% of sessions, the median rank
    # ~1%; among the prefixes drawn at all the median count is a few.
    assert counts[0] >= 8 * statistics.median(counts)
    assert counts[0] / len(groups) > 0.12
    # A uniform pick would leave the top prefix near 2% of sessions: the check can fail.
    flat = generate_trace(dataclasses.replace(SPEC, zipf_s=0.0))
    flat_groups = sessions(flat)
    flat_counts = collections.Counter(s[0]["hash_ids"][0] for s in flat_groups).values()
    assert max(flat_counts) < 4 * statistics.median(flat_counts)


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="session_rate"):
        TraceSpec(session_rate=0)
    with pytest.raises(ValueError, match="max_input_len"):
        TraceSpec(max_input_len=1000)
    with pytest.raises(ValueError, match="mean_turns"):
        TraceSpec(mean_turns=9.0, max_turns=8)
