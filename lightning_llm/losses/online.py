"""Online preference losses (Online DPO), as pure functions of rewards, pair decisions and sequence log-probs.

Online DPO (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback",
https://huggingface.co/papers/2402.04792) samples two completions of each prompt from the current policy, lets a
reward source (or a pairwise judge) pick the better one, and trains the DPO family's loss on that fresh pair
(TRL 1.16 ``trl.experimental.online_dpo.OnlineDPOTrainer``).

Conventions: ``N = 2B`` completions in a micro-batch, the two completions of a prompt in consecutive rows
(``2i`` is the *first*, ``2i + 1`` the *second*); ``B`` pairs; ``T`` completion positions; ``mask`` ``[N, T]`` is 1 on
the completion tokens (up to and with the first EOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast
from lightning_llm.losses.dpo import DPOLossOutput, dpo_loss

__all__ = [
    "ONLINE_DPO_LOSS_TYPES",
    "OnlineDPOPairs",
    "check_online_dpo_arguments",
    "first_is_chosen",
    "online_dpo_loss",
    "online_dpo_scores",
    "pair_up",
    "sequence_logps",
]

ONLINE_DPO_LOSS_TYPES = ("sigmoid", "ipo")
"""TRL 1.16's Online DPO ``loss_type`` values."""


def check_online_dpo_arguments(loss_type: str, betas: Sequence[float], missing_eos_penalty: float | None) -> None:
    """Validate Online DPO's hyperparameters (the module calls it at construction, to fail before training)."""
    if loss_type not in ONLINE_DPO_LOSS_TYPES:
        raise ValueError(f"`loss_type` must be one of {list(ONLINE_DPO_LOSS_TYPES)}; got {loss_type!r}.")
    if not betas:
        raise ValueError("`beta` must be a number or a non-empty list of numbers (one per epoch).")
    bad = [b for b in betas if not b > 0]
    if bad:
        raise ValueError(f"every `beta` must be > 0; got {list(betas)}.")
    if missing_eos_penalty is not None and missing_eos_penalty < 0:
        raise ValueError(f"`missing_eos_penalty` must be >= 0 (it is subtracted); got {missing_eos_penalty}.")


def online_dpo_scores(rewards_per_func: Tensor, reward_weights: Tensor, contains_eos: Tensor,
                      missing_eos_penalty: float | None = None) -> Tensor:
    """``[N]`` score of each completion: ``s_i = Σ_k w_k R_ik`` over the sources that scored it (TRL's ``nansum``: a
    completion no source scored has score 0), minus ``missing_eos_penalty`` where the completion has no EOS.

    Args:
        rewards_per_func: ``[N, F]`` rewards, NaN where a source does not apply.
        reward_weights: ``[F]`` weights.
        contains_eos: ``[N]`` whether each completion holds an EOS token.
        missing_eos_penalty: subtracted from the score of every completion without EOS; ``None``: off.
    """
    if rewards_per_func.dim() != 2 or reward_weights.shape != (rewards_per_func.shape[1],):
        raise ValueError(f"`rewards_per_func` must be [N, F] and `reward_weights` [F]; got "
                         f"{tuple(rewards_per_func.shape)} and {tuple(reward_weights.shape)}.")
    if contains_eos.shape != (rewards_per_func.shape[0],):
        raise ValueError(f"`contains_eos` must be [N] = [{rewards_per_func.shape[0]}]; got "
                         f"{tuple(contains_eos.shape)}.")
    scores = (_upcast(rewards_per_func) * reward_weights.to(rewards_per_func.device)).nansum(dim=1)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~contains_eos.bool()).to(scores.dtype)
    return scores


def first_is_chosen(scores: Tensor) -> Tensor:
    """``[B]`` TRL's pair rule on ``[N = 2B]`` scores: the first completion of a pair is chosen when its score is at
    least the second's (``s_2i >= s_2i+1``; a tie goes to the first)."""
    first, second = _pairs(scores)
    return first >= second


def pair_up(values: Tensor, first_chosen: Tensor) -> tuple[Tensor, Tensor]:
    """``(chosen [B, ...], rejected [B, ...])`` rows of ``values`` ``[N = 2B, ...]`` by the pair decision."""
    first, second = _pairs(values)
    if first_chosen.shape != (first.shape[0],):
        raise ValueError(f"`first_chosen` must be [B] = [{first.shape[0]}]; got {tuple(first_chosen.shape)}.")
    keep = first_chosen.bool().reshape(-1, *([1] * (first.dim() - 1)))
    return torch.where(keep, first, second), torch.where(keep, second, first)


def _pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    if values.shape[0] % 2:
        raise ValueError(f"Online DPO needs whole pairs (two consecutive rows per prompt); got {values.shape[0]} rows.")
    return values[0::2], values[1::2]


def sequence_logps(per_token_logps: Tensor, mask: Tensor) -> Tensor:
    """``log π(y_i) = Σ_t m_it log π(y_it)``: ``[N, T]`` per-token log-probs -> ``[N]`` completion log-probs."""
    if per_token_logps.shape != mask.shape or per_token_logps.dim() != 2:
        raise ValueError(f"`per_token_logps` and `mask` must both be [N, T]; got {tuple(per_token_logps.shape)} and "
                         f"{tuple(mask.shape)}.")
    per_token_logps = _upcast(per_token_logps)
    return (per_token_logps * mask.to(per_token_logps.dtype)).sum(dim=1)


class OnlineDPOPairs(NamedTuple):
    """Result of :func:`online_dpo_loss` (all ``[B]`` but ``loss``).

    - ``loss``: the mean of ``losses``, the training loss of the micro-batch.
    - ``losses``: per-pair loss.
    - ``chosen_rewards`` / ``rejected_rewards`` (detached): ``β (log π(y) - log π_ref(y))`` -> ``rewards/chosen``,
      ``rewards/rejected`` (``rewards/margins`` and ``rewards/accuracies`` derive from the two).
    - ``chosen_logps`` / ``rejected_logps`` (detached): the policy's completion log-probs -> ``logps/*``.
    """

    loss: Tensor
    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor


def online_dpo_loss(logps: Tensor, ref_logps: Tensor, first_chosen: Tensor, *, beta: float,
                    loss_type: str = "sigmoid") -> OnlineDPOPairs:
    """The Online DPO loss of ``B`` pairs, from ``[N = 2B]`` completion log-probs and the pair decisions.

    With ``Δ = (log π(y_w) - log π(y_l)) - (log π_ref(y_w) - log π_ref(y_l))`` (token-summed log-probs):

    - ``sigmoid``: ``-log σ(β Δ)`` (DPO, https://huggingface.co/papers/2305.18290, Eq. 7);
    - ``ipo``: ``(Δ - 1/(2β))²`` (IPO, https://huggingface.co/papers/2310.12036, Eq. 17, ``β`` as the paper's ``τ``).

    Both are the DPO table's losses (:data:`lightning_llm.losses.dpo.DPO_LOSSES`). TRL's online trainer squares the
    token-*summed* difference for ``ipo``, where its ``DPOTrainer`` averages it per token; completion lengths of 1
    make the table's per-token IPO exactly the summed one, so it is called with those.

    Args:
        logps: ``[N]`` policy log-probs of the completions (:func:`sequence_logps`); carries the gradient.
        ref_logps: ``[N]`` reference log-probs of the same completions.
        first_chosen: ``[B]`` pair decisions (:func:`first_is_chosen` or a judge's).
        beta: ``β > 0``.
        loss_type: ``sigmoid`` or ``ipo``.
    """
    check_online_dpo_arguments(loss_type, [beta], None)
    if logps.shape != ref_logps.shape or logps.dim() != 1:
        raise ValueError(f"`logps` and `ref_logps` must both be [N]; got {tuple(logps.shape)} and "
                         f"{tuple(ref_logps.shape)}.")
    chosen, rejected = pair_up(logps, first_chosen)
    ref_chosen, ref_rejected = pair_up(ref_logps.detach(), first_chosen)
    lengths = {}
    if loss_type == "ipo":
        ones = torch.ones_like(_upcast(chosen))
        lengths = {"chosen_lengths": ones, "rejected_lengths": ones}
    out: DPOLossOutput = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                                  **lengths)
    return OnlineDPOPairs(
        loss=out.losses.mean(), losses=out.losses, chosen_rewards=out.chosen_rewards,
        rejected_rewards=out.rejected_rewards, chosen_logps=chosen.detach(), rejected_logps=rejected.detach(),
    )
