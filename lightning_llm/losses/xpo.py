"""Exploratory Preference Optimization (XPO), as pure functions of completion log-probs and pair decisions.

XPO (Xie et al., 2024, "Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for
Sample-Efficient RLHF", https://huggingface.co/papers/2405.21046, Algorithm 1) is online DPO with an exploration
bonus. For each prompt it samples one completion ``y`` from the policy and one ``y'`` from the reference policy, a
reward model ranks the two, the DPO loss is trained on that pair, and ``α log π(y')`` is added: minimising it lowers
the policy's probability of what the reference would say, pushing the policy to explore away from it (the paper's
optimism term, estimated on reference samples). This is TRL 1.13 ``trl.experimental.xpo.XPOTrainer``.

Conventions: ``B`` prompts, each with a policy sample ``y`` and a reference sample ``y'``; every log-prob is of a
whole completion, summed over its tokens (:func:`lightning_llm.losses.online.sequence_logps`), shape ``[B]``:

- ``logps``: ``log π(y)``,            ``ref_logps``: ``log π_ref(y)``;
- ``ref_sample_logps``: ``log π(y')``, ``ref_sample_ref_logps``: ``log π_ref(y')``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast
from lightning_llm.losses.online import (
    ONLINE_DPO_LOSS_TYPES,
    check_online_dpo_arguments,
    first_is_chosen,
    online_dpo_loss,
    pair_up,
)

__all__ = [
    "XPO_ALPHA",
    "XPO_LOSS_TYPES",
    "XPOLossOutput",
    "check_xpo_arguments",
    "xpo_loss",
    "xpo_metrics",
    "xpo_policy_chosen",
]

#: TRL 1.13 ``XPOConfig.alpha`` default: the weight of the exploration term.
XPO_ALPHA = 1e-5
#: TRL 1.13's XPO ``loss_type`` values (those of Online DPO).
XPO_LOSS_TYPES = ONLINE_DPO_LOSS_TYPES


def check_xpo_arguments(
    loss_type: str, betas: Sequence[float], alphas: Sequence[float], missing_eos_penalty: float | None
) -> None:
    """Validate XPO's hyperparameters (``beta`` and ``alpha`` may be lists, one value per epoch, as in TRL)."""
    check_online_dpo_arguments(loss_type, betas, missing_eos_penalty)
    if not alphas:
        raise ValueError("`alpha` must be a number or a non-empty list of numbers (one per epoch).")
    bad = [a for a in alphas if not 0 <= a < float("inf")]
    if bad:
        raise ValueError(
            f"every `alpha` must be finite and >= 0 (a negative weight would reward imitating the reference); got "
            f"{list(alphas)}."
        )


def _interleave(first: Tensor, second: Tensor) -> Tensor:
    """``[B]``, ``[B]`` -> ``[2B]`` with ``first[i]`` at row ``2i`` and ``second[i]`` at ``2i + 1`` (Online DPO's pair
    layout)."""
    return torch.stack([first, second], dim=1).reshape(-1)


def xpo_policy_chosen(scores: Tensor, ref_scores: Tensor) -> Tensor:
    """``[B]`` TRL's pair rule: the policy sample is chosen when its score is at least the reference sample's
    (``s(y) >= s(y')``, a tie goes to the policy sample). Scores are after any missing-EOS penalty
    (:func:`lightning_llm.losses.ppo.apply_missing_eos_penalty`)."""
    if scores.shape != ref_scores.shape or scores.dim() != 1:
        raise ValueError(f"`scores` and `ref_scores` must both be [B]; got {tuple(scores.shape)} and "
                         f"{tuple(ref_scores.shape)}.")
    return first_is_chosen(_interleave(_upcast(scores), _upcast(ref_scores)))


class XPOLossOutput(NamedTuple):
    """Result of :func:`xpo_loss` (``[B]`` unless noted; all but ``loss`` detached).

    - ``loss``: ``mean(dpo_losses + xpo_losses)``, the micro-batch loss (0-d, with gradient).
    - ``dpo_losses``: the per-pair DPO loss -> ``loss/dpo``; ``xpo_losses``: ``α log π(y')`` -> ``loss/xpo``.
    - ``policy_chosen``: the pair decisions the loss used.
    - ``chosen_rewards`` / ``rejected_rewards``: ``β (log π - log π_ref)`` of the chosen / rejected completion.
    - ``chosen_logps`` / ``rejected_logps``: the policy's log-probs of the chosen / rejected completion;
      ``chosen_ref_logps`` / ``rejected_ref_logps``: the reference's.
    - ``logps``, ``ref_logps``, ``ref_sample_logps``, ``ref_sample_ref_logps``: the inputs.
    - ``beta``, ``alpha``: the hyperparameters used.
    """

    loss: Tensor
    dpo_losses: Tensor
    xpo_losses: Tensor
    policy_chosen: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_ref_logps: Tensor
    rejected_ref_logps: Tensor
    logps: Tensor
    ref_logps: Tensor
    ref_sample_logps: Tensor
    ref_sample_ref_logps: Tensor
    beta: float
    alpha: float


def xpo_loss(
    logps: Tensor,
    ref_logps: Tensor,
    ref_sample_logps: Tensor,
    ref_sample_ref_logps: Tensor,
    policy_chosen: Tensor,
    *,
    beta: float,
    alpha: float = XPO_ALPHA,
    loss_type: str = "sigmoid",
) -> XPOLossOutput:
    """The XPO loss of ``B`` prompts (TRL 1.13 ``XPOTrainer._compute_losses``).

    The chosen completion ``y_w`` is the policy sample ``y`` where ``policy_chosen``, else the reference sample
    ``y'``; ``y_l`` is the other. With ``Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))``::

        dpo_i = -log σ(β Δ_i)              (sigmoid)    or    (Δ_i - 1/(2β))²    (ipo, token-summed Δ)
        xpo_i = α log π(y'_i)
        loss  = mean_i(dpo_i + xpo_i)

    The DPO part is :func:`lightning_llm.losses.online.online_dpo_loss` on the pairs ``(y, y')``. The gradient reaches
    ``logps`` and ``ref_sample_logps`` (the policy scores both samples); the reference's log-probs are constants.

    Args:
        logps, ref_logps, ref_sample_logps, ref_sample_ref_logps: ``[B]`` completion log-probs (module docstring).
        policy_chosen: ``[B]`` bool, the policy sample won (:func:`xpo_policy_chosen`).
        beta: ``β > 0`` (TRL default 0.1, a list per epoch there; pass this epoch's value).
        alpha: ``α >= 0``, the exploration weight (TRL default ``1e-5``; a list per epoch there).
        loss_type: ``"sigmoid"`` (default) or ``"ipo"``.
    """
    check_xpo_arguments(loss_type, [beta], [alpha], None)
    for name, tensor in (("ref_logps", ref_logps), ("ref_sample_logps", ref_sample_logps),
                         ("ref_sample_ref_logps", ref_sample_ref_logps)):  # fmt: skip
        if tensor.shape != logps.shape:
            raise ValueError(
                f"`{name}` must have the shape of `logps` {tuple(logps.shape)}; got {tuple(tensor.shape)}."
            )
    if logps.dim() != 1:
        raise ValueError(f"XPO takes completion log-probs [B]; got `logps` of shape {tuple(logps.shape)}.")
    logps, ref_sample_logps = _upcast(logps), _upcast(ref_sample_logps)
    ref_logps, ref_sample_ref_logps = _upcast(ref_logps).detach(), _upcast(ref_sample_ref_logps).detach()
    policy_pairs = _interleave(logps, ref_sample_logps)
    ref_pairs = _interleave(ref_logps, ref_sample_ref_logps)
    pairs = online_dpo_loss(policy_pairs, ref_pairs, policy_chosen, beta=beta, loss_type=loss_type)
    chosen_ref_logps, rejected_ref_logps = pair_up(ref_pairs, policy_chosen)
    xpo_losses = alpha * ref_sample_logps
    loss = (pairs.losses + xpo_losses).mean()
    return XPOLossOutput(
        loss=loss,
        dpo_losses=pairs.losses.detach(),
        xpo_losses=xpo_losses.detach(),
        policy_chosen=policy_chosen.bool(),
        chosen_rewards=pairs.chosen_rewards.detach(),
        rejected_rewards=pairs.rejected_rewards.detach(),
        chosen_logps=pairs.chosen_logps,
        rejected_logps=pairs.rejected_logps,
        chosen_ref_logps=chosen_ref_logps,
        rejected_ref_logps=rejected_ref_logps,
        logps=logps.detach(),
        ref_logps=ref_logps,
        ref_sample_logps=ref_sample_logps.detach(),
        ref_sample_ref_logps=ref_sample_ref_logps,
        beta=float(beta),
        alpha=float(alpha),
    )


@torch.no_grad()
def xpo_metrics(
    output: XPOLossOutput,
    scores: Tensor,
    ref_scores: Tensor,
    *,
    contains_eos: Tensor | None = None,
    ref_contains_eos: Tensor | None = None,
) -> dict[str, Tensor | float]:
    """TRL 1.13's XPO metrics of one micro-batch (``XPOTrainer._log_statistics``), local values.

    - ``loss/dpo``, ``loss/xpo``: means of the two per-pair parts;
    - ``objective/model_scores``, ``objective/ref_scores``, ``objective/scores_margin``: mean ``s(y)``, ``s(y')``,
      ``s(y) - s(y')`` (the penalised scores the decision used);
    - ``logps/chosen``: ``mean(log π(y_w)) + mean(log π_ref(y_w))``: TRL adds the policy's and the reference's means
      (kept as TRL logs it); ``logps/rejected`` likewise;
    - ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (mean of chosen minus rejected),
      ``rewards/accuracies`` (fraction of margins > 0);
    - ``objective/kl``: ``mean_i((log π(y) - log π_ref(y)) + (log π(y') - log π_ref(y'))) / 2``;
    - ``objective/entropy``: ``(mean(-log π(y)) + mean(-log π(y'))) / 2``;
    - ``val/model_contain_eos_token``, ``val/ref_contain_eos_token``: fraction of completions holding EOS (TRL looks
      at the completion tokens only here), when ``contains_eos`` / ``ref_contains_eos`` are given;
    - ``alpha``, ``beta``.

    TRL gathers each value over processes and logs the mean: the same as the global mean for equal per-process
    batches. TRL's ``objective/kl`` sums per-token differences where this differences the sums (equal up to rounding).
    """
    batch = output.logps.shape[0]
    for name, tensor in (("scores", scores), ("ref_scores", ref_scores), ("contains_eos", contains_eos),
                         ("ref_contains_eos", ref_contains_eos)):  # fmt: skip
        if tensor is not None and tensor.shape != (batch,):
            raise ValueError(f"`{name}` must be [B] = [{batch}]; got {tuple(tensor.shape)}.")
    scores, ref_scores = _upcast(scores), _upcast(ref_scores)
    margins = output.chosen_rewards - output.rejected_rewards
    kl = (output.logps - output.ref_logps) + (output.ref_sample_logps - output.ref_sample_ref_logps)
    metrics: dict[str, Tensor | float] = {
        "loss/dpo": output.dpo_losses.mean(),
        "loss/xpo": output.xpo_losses.mean(),
        "objective/model_scores": scores.mean(),
        "objective/ref_scores": ref_scores.mean(),
        "objective/scores_margin": (scores - ref_scores).mean(),
        "logps/chosen": output.chosen_logps.mean() + output.chosen_ref_logps.mean(),
        "logps/rejected": output.rejected_logps.mean() + output.rejected_ref_logps.mean(),
        "rewards/chosen": output.chosen_rewards.mean(),
        "rewards/rejected": output.rejected_rewards.mean(),
        "objective/kl": kl.mean() / 2,
        "objective/entropy": ((-output.logps).mean() + (-output.ref_sample_logps).mean()) / 2,
        "rewards/margins": margins.mean(),
        "rewards/accuracies": (margins > 0).to(margins.dtype).mean(),
    }
    if contains_eos is not None:
        metrics["val/model_contain_eos_token"] = contains_eos.to(margins.dtype).mean()
    if ref_contains_eos is not None:
        metrics["val/ref_contain_eos_token"] = ref_contains_eos.to(margins.dtype).mean()
    metrics["alpha"] = output.alpha
    metrics["beta"] = output.beta
    return metrics
