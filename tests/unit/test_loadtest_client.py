"""Request bodies, headers and error kinds of loadtest/client.py; the progress line; and
the package staying torch-free and proto-free."""

from __future__ import annotations

import io
import subprocess
import sys

from pdserve.loadtest import LoadTestConfig
from pdserve.loadtest.client import error_kind, headers, request_body
from pdserve.loadtest.metrics import RequestRecord
from pdserve.loadtest.progress import Progress

URL = "http://127.0.0.1:8000"


def test_completions_body_streams_with_usage_and_ignore_eos():
    cfg = LoadTestConfig(base_url=URL, num_requests=1, extra_body=(("top_k", 5),))
    body = request_body(cfg, "m", " the in", 7)
    assert body == {"model": "m", "prompt": " the in", "max_tokens": 7, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, "top_k": 5}
    chat = LoadTestConfig(base_url=URL, num_requests=1, endpoint="chat", ignore_eos=False)
    body = request_body(chat, "m", [{"role": "user", "content": "hi"}], 3)
    assert body["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in body
    assert "ignore_eos" not in body


def test_api_key_header():
    assert headers(LoadTestConfig(base_url=URL, num_requests=1, api_key="k")) == {"Authorization": "Bearer k"}
    assert headers(LoadTestConfig(base_url=URL, num_requests=1)) == {}


def test_error_kinds_from_real_envelopes():
    # pdserve's 401 and 503 envelopes, vLLM's 400 (type and code), a code-only one, and a proxy page.
    assert error_kind(401, b'{"error":{"message":"bad key","type":"authentication_error","param":null,'
                           b'"code":"invalid_api_key"}}') == ("http_401:authentication_error", "bad key")
    assert error_kind(503, b'{"error":{"message":"overloaded","type":"server_error","code":"overloaded"}}')[0] \
        == "http_503:server_error"
    assert error_kind(400, b'{"error":{"message":"too long","type":null,"code":"context_length_exceeded"}}')[0] \
        == "http_400:context_length_exceeded"
    assert error_kind(404, b'{"error":"Not Found"}') == ("http_404", "Not Found")
    assert error_kind(502, b"<html>Bad Gateway</html>") == ("http_502", "<html>Bad Gateway</html>")


def test_progress_line_shows_running_percentiles():
    out = io.StringIO()
    progress = Progress(total=3, enabled=True, stream=out, interval_s=0.0)
    for i, ttft in enumerate((0.1, 0.3)):
        progress.update(RequestRecord(i, i, 0, None, 5, 5, start_s=0.0, end_s=1.0, ttft_s=ttft, e2e_s=ttft + 0.4,
                                      num_output_tokens=5))
    progress.update(RequestRecord(2, 2, 0, None, 5, 5, error="timeout"))
    progress.close()
    text = out.getvalue()
    assert "[####################]" in text and "3/3 done, 1 errors" in text
    assert "TTFT p50/p99 200.0/298.0 ms" in text and "TPOT p50/p99 100.0/100.0" in text
    silent = io.StringIO()
    Progress(total=None, enabled=False, stream=silent).close()
    assert silent.getvalue() == ""


def test_the_package_imports_no_torch_and_no_proto():
    code = ("import sys, pdserve.loadtest, pdserve.loadtest.cli, pdserve.loadtest.sweep, pdserve.loadtest.report; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('pdserve.proto', 'grpc'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
