"""Odds Ratio Preference Optimization (ORPO; Hong et al., 2024, https://huggingface.co/papers/2403.07691).

ORPO needs no reference model: it adds to the supervised NLL of the chosen answer a penalty on the log odds ratio
between chosen and rejected answers, where the odds of ``y`` are ``odds(y) = P(y|x) / (1 - P(y|x))`` and ``P`` is the
length-normalised likelihood ``exp((1/|y|) Σ_t log π(y_t))``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast

__all__ = ["ORPOLossOutput", "log1mexp", "orpo_loss"]



def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range (Mächler, 2012, "Accurately Computing
    log(1 - exp(-|a|))").

    Below ``-log 2`` ``exp(x)`` is small and ``log1p(-exp(x))`` is exact; above it ``1 - exp(x)`` cancels, and
    ``log(-expm1(x))`` keeps the digits.
    """
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class ORPOLossOutput(NamedTuple):
    """Result of :func:`orpo_loss`.

    - ``losses`` ``[B]``: ``nll_loss - β · log σ(log odds ratio)`` per pair, unreduced; the training loss is
      ``losses.mean()``.
    - ``chosen_rewards`` ``[B]`` (detached): ``β · log P(y_w)`` -> TRL's ``rewards/chosen``.
    - ``rejected_rewards`` ``[B]`` (detached): ``β · log P(y_l)`` -> ``rewards/rejected``.
    - ``log_odds_ratio`` ``[B]`` (detached): ``log σ(log odds(y_w) - log odds(y_l))`` -> TRL's ``log_odds_ratio``
      (mean; TRL's name, though the quantity is the log-sigmoid of the log odds ratio).
    - ``log_odds_chosen`` ``[B]`` (detached): ``log odds(y_w) - log odds(y_l)`` -> TRL's ``log_odds_chosen`` (mean).
    - ``nll_loss`` scalar (detached) -> TRL's ``nll_loss``.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    log_odds_ratio: Tensor
    log_odds_chosen: Tensor
    nll_loss: Tensor




def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    nll_loss: Tensor | float,
    beta: float = 0.1,
) -> ORPOLossOutput:
    """ORPO loss, Eqs. 6-7 of https://huggingface.co/papers/2403.07691 (``λ`` is ``beta``)::

        log odds(y)   = log P(y) - log(1 - P(y))
        log OR        = log odds(y_w) - log odds(y_l)
        losses        = L_SFT - β · log σ(log OR)

    ``log(1 - P)`` is computed from ``log P`` with :func:`log1mexp`. As in TRL, ``log P`` is the completion's
    *average* token log-prob, and ``L_SFT`` is the token-mean cross-entropy of the chosen sequences (TRL takes it
    over prompt and completion tokens alike), a batch scalar added to every pair.

    Args:
        chosen_logps: ``[B]`` average per-token log-prob of each chosen completion (``<= 0``).
        rejected_logps: ``[B]`` same for the rejected completions.
        nll_loss: scalar ``L_SFT``.
        beta: weight ``λ`` of the odds-ratio term; must be > 0.

    Returns:
        :class:`ORPOLossOutput`.
    """
    if beta <= 0:
        raise ValueError(f"`beta` must be > 0; got {beta}.")
    if chosen_logps.dim() != 1:
        raise ValueError(f"`chosen_logps` must be 1-D [batch]; got shape {tuple(chosen_logps.shape)}.")
    if rejected_logps.shape != chosen_logps.shape:
        raise ValueError(
            f"`rejected_logps` must have the shape of `chosen_logps` {tuple(chosen_logps.shape)}; "
            f"got {tuple(rejected_logps.shape)}."
        )
    chosen_logps, rejected_logps = _upcast(chosen_logps), _upcast(rejected_logps)
    nll_loss = _upcast(torch.as_tensor(nll_loss, device=chosen_logps.device))
    if nll_loss.numel() != 1:
        raise ValueError(f"`nll_loss` must be a scalar; got shape {tuple(nll_loss.shape)}.")
    nll_loss = nll_loss.reshape(())

    log_odds = (chosen_logps - log1mexp(chosen_logps)) - (rejected_logps - log1mexp(rejected_logps))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    return ORPOLossOutput(
        losses=nll_loss - beta * log_sigmoid_odds,
        chosen_rewards=(beta * chosen_logps).detach(),
        rejected_rewards=(beta * rejected_logps).detach(),
        log_odds_ratio=log_sigmoid_odds.detach(),
        log_odds_chosen=log_odds.detach(),
        nll_loss=nll_loss.detach(),
    )
