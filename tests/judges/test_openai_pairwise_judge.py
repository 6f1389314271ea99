"""OpenAIPairwiseJudge against a small OpenAI-compatible server on 127.0.0.1: well-behaved, garbage, flaky, slow."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("openai")

from lightning_llm.judges import OpenAIPairwiseJudge  # noqa: E402

KEY = "sk-test-secret-0123456789"
ANSWERS = re.compile(r"### Answer 0\n(.*?)\n\n### Answer 1\n(.*?)\n\n### Your verdict", re.S)
# the well-behaved server's probabilities for the answer it prefers and the other one
P_PREFERRED, P_OTHER = 0.8, 0.15


class _JudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.reset("good")

    def reset(self, mode: str, failures: int = 0, delay: float = 0.0) -> None:
        self.mode, self.failures_left, self.delay = mode, failures, delay
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def handle_error(self, request, client_address) -> None:
        # the slow mode's client hangs up before the reply; anything else is a bug in the test server
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _JudgeServer

    def log_message(self, *args) -> None:  # keep the test output clean
        return

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            fail = server.failures_left > 0
            server.failures_left -= fail
        if self.path != "/v1/chat/completions":
            return self._send(404, b'{"error": {"message": "no such route"}}')
        if server.mode == "unauthorized":
            return self._send(401, b'{"error": {"message": "bad key", "type": "invalid_request_error"}}')
        if fail:
            return self._send(500, b'{"error": {"message": "overloaded"}}')
        if server.delay:
            time.sleep(server.delay)
        if server.mode == "not_json":
            return self._send(200, b"<html>definitely not an API</html>", "text/html")
        content, logprobs = "banana", None
        if server.mode == "good":
            shown = ANSWERS.search(body["messages"][0]["content"]).groups()
            preferred = "0" if "good" in shown[0] else "1"
            other = "1" if preferred == "0" else "0"
            content = preferred
            if body.get("logprobs"):
                top = [(preferred, P_PREFERRED), (other, P_OTHER), ("x", 1 - P_PREFERRED - P_OTHER)]
                entries = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]
                logprobs = {"content": [{**entries[0], "top_logprobs": entries}]}
        reply = {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "length", "logprobs": logprobs}],
        }
        self._send(200, json.dumps(reply).encode())


@pytest.fixture(scope="module")
def server():
    server = _JudgeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _judge(server: _JudgeServer, **kwargs) -> OpenAIPairwiseJudge:
    options = dict(model="judge-model", base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key=KEY,
                   timeout=5.0, backoff=0.01, seed=0)
    return OpenAIPairwiseJudge(**{**options, **kwargs})


PROMPTS = [f"question {i}" for i in range(8)]
GOOD_FIRST = [True, False, False, True, True, False, True, False]
PAIRS = [["good answer", "meh"] if first else ["meh", "good answer"] for first in GOOD_FIRST]
EXPECTED = [0 if first else 1 for first in GOOD_FIRST]


def test_consistent_server_decisions_survive_order_flips(server) -> None:
    server.reset("good")
    judge = _judge(server)
    assert judge.judge(PROMPTS, PAIRS) == EXPECTED
    assert judge.num_requests == len(PROMPTS)
    requests = server.requests
    assert {r["path"] for r in requests} == {"/v1/chat/completions"}
    assert {r["auth"] for r in requests} == {f"Bearer {KEY}"}
    assert all(r["body"]["model"] == "judge-model" and r["body"]["max_tokens"] == 1 for r in requests)
    # the server saw some pairs, not all, in the reversed order
    reversed_shown = 0
    for request in requests:
        content = request["body"]["messages"][0]["content"]
        index = int(re.search(r"question (\d+)", content).group(1))
        good_shown_first = ANSWERS.search(content).group(1) == "good answer"
        reversed_shown += good_shown_first != GOOD_FIRST[index]
    assert 0 < reversed_shown < len(PROMPTS)
    assert judge.judge(PROMPTS, PAIRS, shuffle_order=False) == EXPECTED


def test_scores_from_logprobs(server) -> None:
    server.reset("good")
    scores = _judge(server).judge(PROMPTS, PAIRS, return_scores=True)
    preferred_first = P_PREFERRED / (P_PREFERRED + P_OTHER)
    expected = [preferred_first if first else 1 - preferred_first for first in GOOD_FIRST]
    assert scores == pytest.approx(expected, rel=1e-9)
    assert all(r["body"]["logprobs"] is True for r in server.requests)


@pytest.mark.parametrize("mode", ["garbage", "not_json"])
def test_garbage_answers_give_minus_one(server, mode: str, caplog) -> None:
    server.reset(mode)
    with caplog.at_level(logging.DEBUG):
        judge = _judge(server)
        assert judge.judge(PROMPTS[:3], PAIRS[:3]) == [-1, -1, -1]
        assert judge.judge(PROMPTS[:3], PAIRS[:3], return_scores=True) == [-1.0, -1.0, -1.0]
    assert len(server.requests) == 6  # a bad answer is not retried
    assert KEY not in caplog.text


def test_server_error_is_retried_then_succeeds(server, caplog) -> None:
    server.reset("good", failures=2)
    with caplog.at_level(logging.DEBUG):
        judge = _judge(server, max_retries=2, max_workers=1)
        assert judge.judge(PROMPTS[:3], PAIRS[:3]) == EXPECTED[:3]
    assert len(server.requests) == 5  # two 500s, then three good answers
    assert judge.num_requests == 5  # retries count against the cap
    assert KEY not in caplog.text


def test_server_error_beyond_retries_gives_minus_one(server) -> None:
    server.reset("good", failures=10)
    judge = _judge(server, max_retries=1, max_workers=1)
    assert judge.judge(PROMPTS[:2], PAIRS[:2]) == [-1, -1]
    assert len(server.requests) == 4


def test_slow_server_times_out_quickly(server) -> None:
    server.reset("good", delay=3.0)
    judge = _judge(server, timeout=0.3, max_retries=1)
    start = time.monotonic()
    assert judge.judge(PROMPTS[:2], PAIRS[:2]) == [-1, -1]
    assert time.monotonic() - start < 2.5  # 2 attempts of 0.3 s each (in parallel), far from the server's 3 s


def test_request_cap_answers_minus_one_and_warns_once(server) -> None:
    server.reset("good")
    judge = _judge(server, max_requests=2, max_workers=1)
    with pytest.warns(RuntimeWarning, match="max_requests=2"):
        assert judge.judge(PROMPTS[:3], PAIRS[:3]) == EXPECTED[:2] + [-1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert judge.judge(PROMPTS[:2], PAIRS[:2]) == [-1, -1]
    assert not caught
    assert len(server.requests) == 2 and judge.num_requests == 2


def test_bad_key_raises_a_clear_error(server) -> None:
    server.reset("unauthorized")
    with pytest.raises(RuntimeError, match="HTTP 401"):
        _judge(server).judge(PROMPTS[:1], PAIRS[:1])


def test_key_from_environment_and_missing_key(server, monkeypatch) -> None:
    server.reset("good")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    judge = _judge(server, api_key=None)
    assert judge.judge(PROMPTS[:1], PAIRS[:1]) == EXPECTED[:1]
    assert server.requests[0]["auth"] == "Bearer sk-from-env"
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        _judge(server, api_key=None)


def test_repr_hides_the_key(server) -> None:
    judge = _judge(server)
    assert KEY not in repr(judge) and KEY not in str(judge)
    assert "judge-model" in repr(judge)
    assert all(KEY not in repr(value) for name, value in vars(judge).items())


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(timeout=0), "timeout"), (dict(max_retries=-1), "max_retries"), (dict(max_requests=-5), "max_requests"),
     (dict(max_workers=0), "max_workers"), (dict(system_prompt="{prompt}"), "placeholders")],
)
def test_bad_arguments(server, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _judge(server, **kwargs)
