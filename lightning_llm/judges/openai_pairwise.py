"""A pairwise judge behind the OpenAI chat-completions API, or any server that speaks it (vLLM, llama.cpp, ...)."""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lightning_llm.judges.base import (
    DEFAULT_PAIRWISE_SYSTEM_PROMPT,
    FAILED,
    BasePairwiseJudge,
    apply_flips,
    check_pairwise_prompt,
    draw_flips,
    render_pairwise_prompt,
    restore_choices,
    restore_scores,
    validate_pairwise_inputs,
)

log = logging.getLogger(__name__)

ANSWERS = ("0", "1")
# HTTP statuses worth another try: request timeout, conflict, rate limit, and server-side failures
_RETRY_STATUSES = frozenset({408, 409, 429})
# statuses that no retry can fix and that mean the judge is misconfigured (key, permissions, model name)
_CONFIG_STATUSES = frozenset({401, 403, 404})


def parse_choice(content: Any) -> int:
    """0 or 1 from the judge's reply text, or -1 when the reply is anything else."""
    if not isinstance(content, str):
        return FAILED
    answer = content.strip()
    return ANSWERS.index(answer) if answer in ANSWERS else FAILED


def first_better_from_logprobs(top_logprobs: Sequence[tuple[str, float]]) -> float | None:
    """P("0") / (P("0") + P("1")) from the first answer token's top log-probs; ``None`` if neither answer is listed.

    An answer missing from the list is less likely than every listed token; it is counted as probability zero.
    """
    best: dict[str, float] = {}
    for token, logprob in top_logprobs:
        answer = token.strip()
        if answer in ANSWERS and math.isfinite(logprob):
            best[answer] = max(logprob, best.get(answer, -math.inf))
    if not best:
        return None
    reference = max(best.values())  # subtract the max for a stable softmax
    weight = {answer: math.exp(best.get(answer, -math.inf) - reference) for answer in ANSWERS}
    return weight["0"] / (weight["0"] + weight["1"])


def _top_logprobs(completion: Any) -> list[tuple[str, float]]:
    """(token, logprob) pairs of the first generated token's alternatives, empty when the reply has none."""
    logprobs = getattr(completion.choices[0], "logprobs", None)
    content = getattr(logprobs, "content", None) if logprobs is not None else None
    if not content:
        return []
    first = content[0]
    alternatives = list(getattr(first, "top_logprobs", None) or [])
    pairs = [(alt.token, float(alt.logprob)) for alt in alternatives]
    return pairs or [(first.token, float(first.logprob))]


def _status(error: Exception) -> int | None:
    return getattr(error, "status_code", None)


class OpenAIPairwiseJudge(BasePairwiseJudge):
    """Pairwise judge that asks a chat model, over the OpenAI API, which of two completions is better.

    Each pair is one chat request with ``max_tokens=1``; the reply ``"0"`` or ``"1"`` is the choice, anything else is
    -1. With ``return_scores`` the judge asks for the first token's log-probs and returns
    ``P("0") / (P("0") + P("1"))`` (a server that sends no log-probs gives 1.0 or 0.0 from the reply).

    The API key comes from ``api_key`` or the ``OPENAI_API_KEY`` environment variable; it is handed to the client and
    never stored on the judge, logged or shown by ``repr``. Requests run in a small thread pool, each bounded by
    ``timeout`` seconds; failed requests (connection errors, timeouts, HTTP 408/409/429/5xx) are retried up to
    ``max_retries`` times with exponential backoff, then judged -1. An invalid key, a forbidden or unknown model
    (HTTP 401/403/404) raises a ``RuntimeError`` instead, since no retry can fix it. After ``max_requests`` requests
    (retries included) the judge answers -1 without calling the API and warns once.

    Args:
        model: the judge model's name on the server.
        system_prompt: the judge prompt with ``{prompt}``, ``{response0}``, ``{response1}`` (default:
            ``DEFAULT_PAIRWISE_SYSTEM_PROMPT``), asking for a one-character answer.
        max_requests: cap on the number of API requests over the judge's life; ``None`` for no cap.
        base_url: the server's API root, e.g. ``http://localhost:8000/v1`` (default: the client's, i.e.
            ``OPENAI_BASE_URL`` or OpenAI's).
        api_key: the API key (default: ``OPENAI_API_KEY``).
        timeout: seconds allowed to each request.
        max_retries: further attempts after a failed request.
        backoff: seconds before the first retry; doubled before each next one.
        max_workers: concurrent requests.
        seed: seed of the order flips (``None``: a fresh random seed).
    """

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        system_prompt: str | None = None,
        max_requests: int | None = 1_000,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_workers: int = 8,
        seed: int | None = None,
    ) -> None:
        if max_requests is not None and max_requests < 0:
            raise ValueError(f"max_requests must be non-negative or None, got {max_requests}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be non-negative, got {max_retries}")
        if backoff < 0:
            raise ValueError(f"backoff must be non-negative, got {backoff}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ValueError(
                "OpenAIPairwiseJudge needs an API key: pass api_key=... or set the OPENAI_API_KEY environment variable "
                "(any non-empty string for a local server that does not check keys)."
            )
        try:
            from openai import OpenAI
        except ImportError as error:
            raise ImportError(
                "OpenAIPairwiseJudge needs the openai client: pip install 'lightning-llm[openai]'"
            ) from error
        # the client's own retries are off: this judge retries itself, with its own budget and request count
        self.client = OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
        self.model = model
        self.system_prompt = check_pairwise_prompt(system_prompt or DEFAULT_PAIRWISE_SYSTEM_PROMPT)
        self.max_requests = max_requests
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_workers = max_workers
        self.num_requests = 0
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self._warned_cap = False

    def __repr__(self) -> str:
        return (
            f"OpenAIPairwiseJudge(model={self.model!r}, base_url={str(self.client.base_url)!r}, "
            f"max_requests={self.max_requests}, num_requests={self.num_requests})"
        )

    def _reserve_request(self) -> bool:
        """Count one request against the cap; False (and a one-time warning) when the cap is reached."""
        with self._lock:
            if self.max_requests is None or self.num_requests < self.max_requests:
                self.num_requests += 1
                return True
            warn = not self._warned_cap
            self._warned_cap = True
        if warn:
            warnings.warn(
                f"OpenAIPairwiseJudge reached max_requests={self.max_requests}; from now on it answers -1 without "
                "calling the API. Raise max_requests (or set it to None) to judge more.",
                RuntimeWarning,
                stacklevel=2,
            )
        return False

    def _request(self, content: str, with_logprobs: bool) -> Any | None:
        """One chat completion, retried on transient errors; ``None`` when it failed or the cap was reached."""
        import openai

        extra = {"logprobs": True, "top_logprobs": 5} if with_logprobs else {}
        for attempt in range(self.max_retries + 1):
            if not self._reserve_request():
                return None
            try:
                return self.client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": content}], max_tokens=1, **extra
                )
            except openai.APIStatusError as error:
                status = _status(error)
                if status in _CONFIG_STATUSES:
                    raise RuntimeError(
                        f"The judge server rejected the request with HTTP {status} ({type(error).__name__}); check "
                        f"the API key, the model name {self.model!r} and base_url."
                    ) from error
                retryable = status is not None and (status in _RETRY_STATUSES or status >= 500)
                failure: Exception = error
            except (openai.APIConnectionError, openai.APIResponseValidationError) as error:  # timeouts included
                retryable = isinstance(error, openai.APIConnectionError)
                failure = error
            if not retryable or attempt == self.max_retries:
                log.warning("Judge request failed (%s: %s); judging -1.", type(failure).__name__, failure)
                return None
            time.sleep(self.backoff * 2**attempt)
        return None

    def _judge_one(self, prompt: str, pair: Sequence[str], return_scores: bool) -> float:
        """P(first shown is better) (``return_scores``) or the shown index chosen, as a float; -1.0 on failure."""
        completion = self._request(render_pairwise_prompt(self.system_prompt, prompt, pair), return_scores)
        if completion is None:
            return float(FAILED)
        try:
            choice = parse_choice(completion.choices[0].message.content)
            top = _top_logprobs(completion) if return_scores else []
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:
            log.warning("Unreadable reply from the judge server (%s: %s); judging -1.", type(error).__name__, error)
            return float(FAILED)
        if choice == FAILED:
            log.debug("The judge answered %r, which is not 0 or 1; judging -1.", completion.choices[0].message.content)
        if not return_scores:
            return float(choice)
        probability = first_better_from_logprobs(top)
        if probability is not None:
            return probability
        return float(FAILED) if choice == FAILED else 1.0 - choice

    def judge(
        self,
        prompts: list[str],
        completions: list[list[str]],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int] | list[float]:
        """Index of the better completion per prompt (0/1), or with ``return_scores`` P(first is better); -1 where
        the request failed, the reply was not 0 or 1, or the request cap was reached."""
        validate_pairwise_inputs(prompts, completions)
        if not prompts:
            return []
        flips = draw_flips(len(prompts), self.rng) if shuffle_order else [False] * len(prompts)
        shown = apply_flips(completions, flips)
        workers = min(self.max_workers, len(prompts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda args: self._judge_one(*args, return_scores), zip(prompts, shown)))
        if return_scores:
            return restore_scores(results, flips)
        return restore_choices([int(result) for result in results], flips)

