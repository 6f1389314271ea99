"""Next-token logits processing and token selection, with the semantics of HF ``generate``'s logits processors.

``generate`` turns the model's next-token logits (cast to float32) into sampling scores in this order:

1. repetition penalty (when != 1): for each token already present in the sequence, prompt included and left
   padding excluded, a positive logit is divided by the penalty and a negative one multiplied by it;
2. then, only when sampling: temperature (when != 1), top-k (when > 0), top-p (when < 1), min-p (when set);

and samples from ``softmax(scores)`` (or takes the argmax of the scores when greedy). Filtered tokens get ``-inf``.
Every filter keeps at least one token. The functions here do the same on a ``[B, V]`` tensor with no Python loop,
so that :class:`~lightning_llm.rollout.fast.FastDecodeEngine` samples from exactly the distribution of
:class:`~lightning_llm.rollout.hf.HFGenerateEngine`; ``tests/rollout/test_sampling.py`` checks them against
``transformers``' own processors.

Two ways to draw from that distribution (:data:`SAMPLERS`): ``"multinomial"``, ``generate``'s own call
(``torch.multinomial``, which for one sample per row draws ``V`` exponential variates per row: the same random stream
as ``generate`` for the same generator), and ``"inverse_cdf"`` (:func:`draw_by_inverse_cdf`: one uniform variate per
row against the cumulative distribution; the same distribution, a different stream, and on CPU a fraction of the
cost at small batch sizes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_llm.rollout.base import SamplingSettings

NEG_INF = float("-inf")
#: the ways :class:`~lightning_llm.rollout.fast.FastDecodeEngine` can draw a token (see the module docstring)
SAMPLERS = ("inverse_cdf", "multinomial")


def token_presence(token_ids: Tensor, vocab_size: int, attention_mask: Tensor | None = None) -> Tensor:
    """``[B, V]`` booleans: whether each vocabulary id occurs in row ``b`` of ``token_ids`` ``[B, L]``.

    Positions where ``attention_mask`` is 0 (padding) do not count; ids outside the vocabulary are ignored (the
    model cannot emit them, so there is nothing to penalise).
    """
    ids = token_ids.clamp(min=0, max=vocab_size)
    if attention_mask is not None:
        ids = ids.masked_fill(attention_mask == 0, vocab_size)
    # one spare column absorbs the ignored positions, then is dropped
    presence = torch.zeros((ids.shape[0], vocab_size + 1), dtype=torch.bool, device=ids.device)
    presence.scatter_(1, ids, True)
    return presence[:, :vocab_size]


def mark_present_(presence: Tensor, tokens: Tensor) -> Tensor:
    """Record the new ``tokens`` ``[B]`` in ``presence`` ``[B, V]`` (in place); returns ``presence``."""
    return presence.scatter_(1, tokens.unsqueeze(1), True)


def apply_repetition_penalty(scores: Tensor, presence: Tensor, penalty: float) -> Tensor:
    """Penalise tokens already present (CTRL, Keskar et al. 2019): ``s / penalty`` where ``s > 0``, ``s * penalty``
    where ``s < 0``, for the tokens marked in ``presence`` ``[B, V]``; others unchanged."""
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(presence, penalised, scores)


def apply_temperature(scores: Tensor, temperature: float) -> Tensor:
    """``scores / temperature``."""
    return scores / temperature


def apply_top_k(scores: Tensor, top_k: int) -> Tensor:
    """Keep the tokens whose score is at least the ``top_k``-th highest (ties with it kept); others ``-inf``."""
    k = min(max(top_k, 1), scores.shape[-1])
    kth_highest = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth_highest, NEG_INF)


def apply_top_p(scores: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most probable tokens whose probability adds
    up to at least ``top_p``, and always the most probable one; others ``-inf``.

    Works from the least probable end, as ``generate`` does: with the scores sorted ascending, a token is dropped
    while the probability mass up to and including it is at most ``1 - top_p``. Ties at the boundary are resolved
    by the order of ``torch.sort``, the same call ``generate`` makes.
    """
    ascending, order = torch.sort(scores, dim=-1, descending=False)
    mass_up_to = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= (1 - top_p)
    drop_sorted[..., -1] = False  # the most probable token always stays
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return scores.masked_fill(drop, NEG_INF)


def apply_min_p(scores: Tensor, min_p: float) -> Tensor:
    """Min-p filtering (Nguyen et al. 2024): drop tokens whose probability is below ``min_p`` times the most
    probable token's; the most probable token always stays."""
    probs = scores.softmax(dim=-1)
    top_prob = probs.amax(dim=-1, keepdim=True)
    drop = probs < min_p * top_prob
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return scores.masked_fill(drop, NEG_INF)


def process_logits(logits: Tensor, settings: SamplingSettings, presence: Tensor | None = None) -> Tensor:
    """The scores ``generate`` samples from (``softmax``) or takes the argmax of, from next-token ``logits``
    ``[B, V]`` (any float dtype; computed in float32, as ``generate`` does).

    Args:
        logits: the model's next-token logits.
        settings: the sampling settings.
        presence: ``[B, V]`` booleans of the tokens present so far (see :func:`token_presence`); needed when
            ``settings.repetition_penalty != 1``.
    """
    scores = logits.float()
    if settings.repetition_penalty != 1.0:
        if presence is None:
            raise ValueError("process_logits needs `presence` (the tokens seen so far) when repetition_penalty != 1")
        scores = apply_repetition_penalty(scores, presence, settings.repetition_penalty)
    if not settings.do_sample:
        return scores
    if settings.temperature != 1.0:
        scores = apply_temperature(scores, settings.temperature)
    if settings.top_k != 0:
        scores = apply_top_k(scores, settings.top_k)
    if settings.top_p < 1.0:
        scores = apply_top_p(scores, settings.top_p)
    if settings.min_p is not None:
        scores = apply_min_p(scores, settings.min_p)
    return scores


def processed_logprobs(logits: Tensor, settings: SamplingSettings, presence: Tensor | None = None) -> Tensor:
    """``[B, V]`` log-probs of the distribution the next token is drawn from (``-inf`` for filtered tokens)."""
    return torch.log_softmax(process_logits(logits, settings, presence), dim=-1)


def select_tokens(scores: Tensor, do_sample: bool, generator: torch.Generator | None = None) -> Tensor:
    """``[B]`` next tokens from processed ``scores`` ``[B, V]``: drawn from ``softmax(scores)`` (with ``generator``,
    else torch's global RNG), or the argmax when not sampling; the same calls ``generate`` makes."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def draw_by_inverse_cdf(logprobs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``[B]`` tokens drawn from ``exp(logprobs)`` ``[B, V]`` (a normalised distribution, ``-inf`` for filtered
    tokens) by inverting its cumulative distribution: with ``C_i = sum_{j <= i} p_j`` and one uniform ``u`` in
    ``[0, 1)`` per row, the token is the first ``i`` with ``C_i > u * C_V``, so token ``i`` comes with probability
    ``p_i / C_V``.

    The cumulative sums are taken in float64, so that rounding shifts an interval's width by about ``1e-16`` of the
    mass (in float32 it would be ``1e-7``, larger than the probability of a rare token). Tokens of probability 0
    have empty intervals and are never drawn; a draw that rounds onto the total mass takes the last token of
    positive probability. ``u`` comes from ``generator`` (else torch's global RNG): one float64 per row.
    """
    cumulative = logprobs.exp().double().cumsum(dim=-1)  # [B, V]
    total = cumulative[:, -1:]
    target = torch.rand(total.shape, dtype=torch.float64, device=total.device, generator=generator) * total
    token = torch.searchsorted(cumulative, target, right=True)
    last_positive = torch.searchsorted(cumulative, total, right=False)  # the first index holding the whole mass
    return torch.minimum(token, last_positive).squeeze(1)
