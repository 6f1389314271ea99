"""Direct Preference Optimization and its variants, as pure functions of sequence log-probabilities.

DPO (Rafailov et al., 2023, https://huggingface.co/papers/2305.18290) trains the policy ``π`` directly on preference
pairs ``(x, y_w, y_l)``: the implicit reward of a completion is ``β · log(π(y|x) / π_ref(y|x))`` and the loss is a
function of the chosen-minus-rejected reward difference. Every TRL 1.16 ``loss_type`` is a small function in
:data:`DPO_LOSSES`; :func:`dpo_loss` validates the hyperparameters, applies the f-divergence score transform, combines
several loss types with ``loss_weights`` and applies per-pair (WPO) weights.

Conventions: ``B`` is the number of preference pairs; every ``*_logps`` input is the log-probability of a whole
completion, summed over its tokens (or the LD-DPO mix of :func:`ld_dpo_logps`), shape ``[B]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_llm.losses._common import upcast as _upcast

__all__ = [
    "check_dpo_arguments",
    "DPO_LOSSES",
    "F_DIVERGENCE_LOSS_TYPES",
    "F_DIVERGENCE_SCORES",
    "DPOLossOutput",
    "DPOTerms",
    "dpo_loss",
    "dpo_sft_loss",
    "ld_dpo_logps",
    "wpo_weights",
]



# --------------------------------------------------------------------------------------------------------------------
# f-divergence score transforms (f-DPO, Wang et al., 2023, https://huggingface.co/papers/2309.16240)
# --------------------------------------------------------------------------------------------------------------------


def reverse_kl_scores(logratios: Tensor, alpha: float) -> Tensor:
    """Reverse KL (standard DPO): ``f'(u) = log u``, so the score is the log-ratio ``log u`` itself."""
    return logratios


def forward_kl_scores(logratios: Tensor, alpha: float) -> Tensor:
    """Forward KL: ``f'(u) = 1 - 1/u``, i.e. ``1 - exp(-log u)``."""
    return 1.0 - torch.exp(-logratios)


def js_divergence_scores(logratios: Tensor, alpha: float) -> Tensor:
    """Jensen-Shannon: ``f'(u) = log(2u / (1 + u)) = log 2 + log σ(log u)``."""
    return math.log(2.0) + F.logsigmoid(logratios)


def alpha_divergence_scores(logratios: Tensor, alpha: float) -> Tensor:
    """α-divergence: ``f'(u) = (u^(α-1) - 1) / (α - 1)``, which tends to ``log u`` (reverse KL) as ``α → 1``.

    The exponent is clamped at 80 so ``exp`` stays finite in float32 (TRL clamps the same way, at 11 for fp16 inputs;
    inputs here are upcast to float32 first, so 80 applies to every dtype).
    """
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    exponent = torch.clamp((alpha - 1.0) * logratios, max=80.0)
    return torch.expm1(exponent) / (alpha - 1.0)


F_DIVERGENCE_SCORES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": reverse_kl_scores,
    "forward_kl": forward_kl_scores,
    "js_divergence": js_divergence_scores,
    "alpha_divergence": alpha_divergence_scores,
}
"""``f_divergence_type`` -> score transform ``(log-ratio [B], f_alpha_divergence_coef) -> score [B]``."""

F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
"""Loss types built on the chosen-minus-rejected score difference. f-DPO's reparameterisation leaves a ``β log Z(x)``
term that cancels only in that difference, so only these accept an ``f_divergence_type`` other than reverse KL."""


# --------------------------------------------------------------------------------------------------------------------
# The loss variants: each maps the prepared terms of a batch to per-pair losses [B]
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPOTerms:
    """Everything a DPO variant may read, prepared once by :func:`dpo_loss` (all tensors ``[B]``, float32 or wider).

    ``*_logratios`` are ``log π(y|x) - log π_ref(y|x)``; ``*_scores`` are the log-ratios after the f-divergence
    transform (equal to the log-ratios under reverse KL). ``*_lengths`` are completion token counts (``None`` when
    not given) and ``sft_loss`` the mean chosen-token NLL (``None`` when not given).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_logratios: Tensor
    rejected_logratios: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    sft_loss: Tensor | None
    beta: float
    label_smoothing: float
    discopop_tau: float

    @property
    def delta_score(self) -> Tensor:
        """``Δ = s_w - s_l``, the chosen-minus-rejected score; ``β·Δ`` is the DPO logit."""
        return self.chosen_scores - self.rejected_scores

    @property
    def length_normalized_delta(self) -> Tensor:
        """``s_w / |y_w| - s_l / |y_l|``: the score difference per completion token (lengths clamped at 1)."""
        chosen = self.chosen_scores / self.chosen_lengths.clamp(min=1)
        rejected = self.rejected_scores / self.rejected_lengths.clamp(min=1)
        return chosen - rejected


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1-ε) log σ(z) - ε log σ(-z)``: binary cross-entropy against the soft label ``1 - ε``."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def sigmoid_loss(t: DPOTerms) -> Tensor:
    """DPO (https://huggingface.co/papers/2305.18290, Eq. 7): ``-log σ(β Δ)``."""
    return -F.logsigmoid(t.beta * t.delta_score)


def hinge_loss(t: DPOTerms) -> Tensor:
    """SLiC (Zhao et al., 2023, https://huggingface.co/papers/2305.10425): ``max(0, 1 - β Δ)``."""
    return torch.relu(1.0 - t.beta * t.delta_score)


def ipo_loss(t: DPOTerms) -> Tensor:
    """IPO (Azar et al., 2023, https://huggingface.co/papers/2310.12036, Eq. 17): ``(Δ̄ - 1/(2β))²``.

    ``Δ̄`` is the score difference averaged per completion token (TRL's choice, confirmed with the IPO authors): a
    token-summed difference would make the squared loss grow with completion length. ``β`` plays the paper's ``τ``.
    """
    return (t.length_normalized_delta - 1.0 / (2.0 * t.beta)) ** 2


def exo_pair_loss(t: DPOTerms) -> Tensor:
    """EXO-pref (Ji et al., 2024, https://huggingface.co/papers/2402.00856, Eq. 16), pairwise case.

    ``KL(p_θ || p_ε)`` between ``p_θ = (σ(βΔ), σ(-βΔ))`` and the smoothed label ``p_ε = (1-ε, ε)``:
    ``σ(βΔ)(log σ(βΔ) - log(1-ε)) + σ(-βΔ)(log σ(-βΔ) - log ε)``, with ``ε = label_smoothing`` in ``(0, 1)``.
    """
    logits = t.beta * t.delta_score
    eps = t.label_smoothing
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(eps))
    return chosen_term + rejected_term


def nca_pair_loss(t: DPOTerms) -> Tensor:
    """NCA (Chen et al., 2024, https://huggingface.co/papers/2402.05369), pairwise case.

    With rewards ``r = β · log-ratio``: ``-log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l)``.
    """
    chosen_rewards = t.beta * t.chosen_logratios
    rejected_rewards = t.beta * t.rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def robust_loss(t: DPOTerms) -> Tensor:
    """Robust DPO (Chowdhury et al., 2024, https://huggingface.co/papers/2403.00409, Eq. 21).

    Unbiased under preference labels flipped with probability ``ε`` (``label_smoothing`` in ``[0, ½)``):
    ``(-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)``.
    """
    logits = t.beta * t.delta_score
    eps = t.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)


def bco_pair_loss(t: DPOTerms) -> Tensor:
    """BCO, paired form (Jung et al., 2024, https://huggingface.co/papers/2404.04656).

    Chosen and rejected are classified separately: ``-log σ(r_w) - log σ(-r_l)`` with ``r = β · log-ratio``.
    """
    return -F.logsigmoid(t.beta * t.chosen_logratios) - F.logsigmoid(-t.beta * t.rejected_logratios)


def sppo_hard_loss(t: DPOTerms) -> Tensor:
    """SPPO with hard labels (Wu et al., 2024, https://huggingface.co/papers/2405.00675, Eq. 4.7, ``P(y_w ≻ y_l) = 1``).

    ``(ρ_w - 1/(2β))² + (ρ_l + 1/(2β))²`` with ``ρ`` the log-ratios: the winner's log-ratio is pulled to ``+1/(2β)``,
    the loser's to ``-1/(2β)``.
    """
    half_inverse_beta = 0.5 / t.beta
    return (t.chosen_logratios - half_inverse_beta) ** 2 + (t.rejected_logratios + half_inverse_beta) ** 2


def aot_loss(t: DPOTerms) -> Tensor:
    """AOT, paired (Melnyk et al., 2024, https://huggingface.co/papers/2406.05882).

    Distributional alignment by optimal transport in one dimension: sort the policy margins
    ``m = log π(y_w) - log π(y_l)`` and the reference margins ``m_ref`` across the batch, pair them by rank, and apply
    the smoothed logistic loss ``-(1-ε) log σ(β d) - ε log σ(-β d)`` to ``d = sort(m) - sort(m_ref)``.

    Entry ``i`` of the result belongs to rank ``i``, not to pair ``i``; only the batch mean has a meaning.
    """
    margins, _ = torch.sort(t.chosen_logps - t.rejected_logps, dim=0)
    ref_margins, _ = torch.sort(t.ref_chosen_logps - t.ref_rejected_logps, dim=0)
    return _smoothed_logistic(t.beta * (margins - ref_margins), t.label_smoothing)


def aot_unpaired_loss(t: DPOTerms) -> Tensor:
    """AOT, unpaired (https://huggingface.co/papers/2406.05882): ``d = sort(ρ_w) - sort(ρ_l)`` over the batch.

    The chosen and rejected log-ratios are sorted independently, so the pairing in the data is not used; loss as in
    :func:`aot_loss`, and likewise entry ``i`` belongs to rank ``i``.
    """
    chosen_sorted, _ = torch.sort(t.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(t.rejected_logratios, dim=0)
    return _smoothed_logistic(t.beta * (chosen_sorted - rejected_sorted), t.label_smoothing)


def apo_zero_loss(t: DPOTerms) -> Tensor:
    """APO-zero (D'Oosterlinck et al., 2024, https://huggingface.co/papers/2408.06266, Eq. 7).

    For chosen answers better than the model's own: ``(1 - σ(β ρ_w)) + σ(β ρ_l)`` raises the chosen likelihood and
    lowers the rejected one.
    """
    return 1.0 - torch.sigmoid(t.beta * t.chosen_logratios) + torch.sigmoid(t.beta * t.rejected_logratios)


def apo_down_loss(t: DPOTerms) -> Tensor:
    """APO-down (https://huggingface.co/papers/2408.06266, Eq. 8).

    For chosen answers worse than the model's own: ``σ(β ρ_w) + (1 - σ(β (ρ_w - ρ_l)))`` lowers both likelihoods,
    the rejected one more.
    """
    chosen_term = torch.sigmoid(t.beta * t.chosen_logratios)
    margin_term = 1.0 - torch.sigmoid(t.beta * (t.chosen_logratios - t.rejected_logratios))
    return chosen_term + margin_term


def discopop_loss(t: DPOTerms) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chan et al., 2024, https://huggingface.co/papers/2406.08414, Eq. 5).

    With ``z = β Δ`` and mixing weight ``m = σ(z / τ)`` (``τ = discopop_tau``): ``(1 - m) · (-log σ(z)) + m · exp(-z)``,
    a blend of the logistic and the exponential loss steered by the sign and size of the margin.
    """
    logits = t.beta * t.delta_score
    mixing = torch.sigmoid(logits / t.discopop_tau)
    return (1.0 - mixing) * -F.logsigmoid(logits) + mixing * torch.exp(-logits)


def supervised_loss(t: DPOTerms) -> Tensor:
    """Supervised term: the batch's mean negative log-likelihood of chosen completion tokens, repeated per pair.

    Used inside a mixture, e.g. MPO (https://huggingface.co/papers/2411.10442) = sigmoid + bco_pair + sft. The value
    is a batch quantity (see :func:`dpo_sft_loss`), so every pair carries the same number and the batch mean is it.
    """
    return t.sft_loss.expand_as(t.chosen_logratios)


def sigmoid_norm_loss(t: DPOTerms) -> Tensor:
    """Length-normalised DPO: ``-log σ(β Δ̄)``, ``Δ̄`` the per-token score difference (as in :func:`ipo_loss`)."""
    return -F.logsigmoid(t.beta * t.length_normalized_delta)


DPO_LOSSES: dict[str, Callable[[DPOTerms], Tensor]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": supervised_loss,
    "sigmoid_norm": sigmoid_norm_loss,
}
"""TRL's ``loss_type`` name -> per-pair loss ``DPOTerms -> [B]``."""

_LENGTH_NORMALIZED = frozenset({"ipo", "sigmoid_norm"})
_SORTING = frozenset({"aot", "aot_unpaired"})


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


class DPOLossOutput(NamedTuple):
    """Result of :func:`dpo_loss`.

    - ``losses`` ``[B]``: per-pair loss, unreduced; the training loss is ``losses.mean()``. With ``aot`` /
      ``aot_unpaired`` in the mixture the entries follow sorted rank, not pair order.
    - ``chosen_rewards`` ``[B]`` (detached): ``β (log π(y_w) - log π_ref(y_w))`` -> TRL's ``rewards/chosen``.
    - ``rejected_rewards`` ``[B]`` (detached): likewise -> ``rewards/rejected``; TRL's ``rewards/margins`` and
      ``rewards/accuracies`` derive from the two.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor




def _check_same_shape(reference_name: str, reference: Tensor, **others: Tensor | None) -> None:
    if reference.dim() != 1:
        raise ValueError(f"`{reference_name}` must be 1-D [batch]; got shape {tuple(reference.shape)}.")
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(
                f"`{name}` must have the shape of `{reference_name}` {tuple(reference.shape)}; "
                f"got {tuple(tensor.shape)}."
            )


def check_dpo_arguments(
    loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None, beta: float = 0.1,
    label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl", discopop_tau: float = 0.05,
) -> list[str]:
    """Validate the hyperparameters of :func:`dpo_loss` (the module calls it at construction, to fail before
    training); return the loss types as a list."""
    loss_types = _normalize_loss_types(loss_type, loss_weights)
    _check_hyperparameters(loss_types, beta, label_smoothing, f_divergence_type, discopop_tau)
    return loss_types


def _normalize_loss_types(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None) -> list[str]:
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not loss_types:
        raise ValueError(f"`loss_type` must name at least one of {sorted(DPO_LOSSES)}.")
    unknown = [name for name in loss_types if name not in DPO_LOSSES]
    if unknown:
        raise ValueError(f"Unknown `loss_type` {unknown}; valid values are {sorted(DPO_LOSSES)}.")
    if loss_weights is not None and len(loss_weights) != len(loss_types):
        raise ValueError(
            f"`loss_weights` must have one weight per `loss_type`: got {len(loss_weights)} weights for "
            f"{len(loss_types)} loss types {loss_types}."
        )
    return loss_types


def _check_hyperparameters(
    loss_types: list[str], beta: float, label_smoothing: float, f_divergence_type: str, discopop_tau: float
) -> None:
    if beta <= 0:
        raise ValueError(f"`beta` must be > 0; got {beta}.")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must lie in [0, 1); got {label_smoothing}.")
    if "robust" in loss_types and not label_smoothing < 0.5:
        raise ValueError(
            f"`label_smoothing` is the label-flip probability of the 'robust' loss and must lie in [0, 0.5); "
            f"got {label_smoothing}."
        )
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError("`label_smoothing` must be > 0 for the 'exo_pair' loss (the EXO paper suggests 1e-3).")
    if "discopop" in loss_types and discopop_tau <= 0:
        raise ValueError(f"`discopop_tau` must be > 0; got {discopop_tau}.")
    if f_divergence_type not in F_DIVERGENCE_SCORES:
        raise ValueError(
            f"Unknown `f_divergence_type` {f_divergence_type!r}; valid values are {sorted(F_DIVERGENCE_SCORES)}."
        )
    incompatible = sorted(set(loss_types) - F_DIVERGENCE_LOSS_TYPES)
    if f_divergence_type != "reverse_kl" and incompatible:
        raise ValueError(
            f"`f_divergence_type={f_divergence_type!r}` only applies to loss types {sorted(F_DIVERGENCE_LOSS_TYPES)}; "
            f"{incompatible} need `f_divergence_type='reverse_kl'`."
        )


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    sft_loss: Tensor | float | None = None,
    weights: Tensor | None = None,
) -> DPOLossOutput:
    """The DPO family of preference losses (TRL 1.16 ``DPOTrainer`` semantics).

    With log-ratios ``ρ = log π(y|x) - log π_ref(y|x)``, scores ``s = f'(exp ρ)`` (the f-divergence transform, ``s = ρ``
    for reverse KL) and ``Δ = s_w - s_l``, the per-pair loss is::

        losses = w_pair · Σ_k loss_weights[k] · DPO_LOSSES[loss_type[k]](terms)

    e.g. ``-log σ(β Δ)`` for ``"sigmoid"`` (https://huggingface.co/papers/2305.18290). The mean of ``losses`` equals
    TRL's ``Σ_k loss_weights[k] · mean(per-pair loss_k · w_pair)``.

    Args:
        chosen_logps: ``[B]`` policy log-probability of each chosen completion (summed over its tokens).
        rejected_logps: ``[B]`` same for the rejected completions.
        ref_chosen_logps: ``[B]`` reference-model log-probability of the chosen completions.
        ref_rejected_logps: ``[B]`` same for the rejected completions.
        beta: temperature ``β`` of the implicit reward; for ``ipo`` the regulariser ``τ``. Must be > 0.
        loss_type: one name or a list of names from :data:`DPO_LOSSES`, combined as a weighted sum.
        loss_weights: one weight per loss type (default: all 1.0).
        label_smoothing: ``ε``: label-flip probability for ``robust`` (``[0, ½)``), smoothing of ``exo_pair``
            (``> 0``), soft label of ``aot``/``aot_unpaired``. Ignored by the other types, as in TRL.
        f_divergence_type: one of :data:`F_DIVERGENCE_SCORES`; non-default values only with
            :data:`F_DIVERGENCE_LOSS_TYPES`.
        f_alpha_divergence_coef: ``α`` of the α-divergence.
        discopop_tau: temperature ``τ`` of the ``discopop`` mixing weight.
        chosen_lengths: ``[B]`` completion token counts of the chosen answers; required by ``ipo``, ``sigmoid_norm``.
        rejected_lengths: ``[B]`` same for the rejected answers.
        sft_loss: scalar mean NLL of the chosen completion tokens (:func:`dpo_sft_loss`); required by ``sft``.
        weights: ``[B]`` per-pair weights multiplying every loss type, e.g. :func:`wpo_weights`. Treated as constants
            (detached). Not allowed with ``aot``/``aot_unpaired``, whose entries are not in pair order.

    Returns:
        :class:`DPOLossOutput` with per-pair ``losses`` and the detached rewards TRL logs.

    Raises:
        ValueError: on an unknown or empty ``loss_type``, mismatched ``loss_weights``, out-of-range ``beta`` /
            ``label_smoothing`` / ``discopop_tau``, an unknown or incompatible ``f_divergence_type``, a missing
            input that a loss type needs, or inputs of different shapes.
    """
    loss_types = check_dpo_arguments(loss_type, loss_weights, beta, label_smoothing, f_divergence_type, discopop_tau)
    _check_same_shape(
        "chosen_logps",
        chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        weights=weights,
    )
    needs_lengths = sorted(_LENGTH_NORMALIZED.intersection(loss_types))
    if needs_lengths and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"`chosen_lengths` and `rejected_lengths` are required by loss types {needs_lengths}.")
    if "sft" in loss_types and sft_loss is None:
        raise ValueError("`sft_loss` (mean NLL of the chosen completion tokens) is required by the 'sft' loss type.")
    if weights is not None and _SORTING.intersection(loss_types):
        raise ValueError(
            f"`weights` cannot be used with {sorted(_SORTING.intersection(loss_types))}: those losses sort the batch, "
            "so their entries no longer line up with pairs."
        )

    chosen_logps, rejected_logps = _upcast(chosen_logps), _upcast(rejected_logps)
    ref_chosen_logps, ref_rejected_logps = _upcast(ref_chosen_logps), _upcast(ref_rejected_logps)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    to_score = F_DIVERGENCE_SCORES[f_divergence_type]
    if sft_loss is not None:
        sft_loss = _upcast(torch.as_tensor(sft_loss, device=chosen_logps.device))
        if sft_loss.numel() != 1:
            raise ValueError(f"`sft_loss` must be a scalar; got shape {tuple(sft_loss.shape)}.")
        sft_loss = sft_loss.reshape(())
    terms = DPOTerms(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=to_score(chosen_logratios, f_alpha_divergence_coef),
        rejected_scores=to_score(rejected_logratios, f_alpha_divergence_coef),
        chosen_lengths=None if chosen_lengths is None else _upcast(chosen_lengths),
        rejected_lengths=None if rejected_lengths is None else _upcast(rejected_lengths),
        sft_loss=sft_loss,
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
    )

    loss_weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    losses = sum(weight * DPO_LOSSES[name](terms) for name, weight in zip(loss_types, loss_weights))
    if weights is not None:
        losses = losses * _upcast(weights).detach()
    return DPOLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


# --------------------------------------------------------------------------------------------------------------------
# Helpers the DPO module uses to build the inputs
# --------------------------------------------------------------------------------------------------------------------


def dpo_sft_loss(chosen_token_logps: Tensor, chosen_mask: Tensor) -> Tensor:
    """Mean negative log-likelihood of the chosen completion tokens, over every such token of the batch.

    ``-Σ_{i,t} m_it log π(y_it) / Σ_{i,t} m_it`` (the ``sft`` term of :func:`dpo_loss`; TRL's token-level mean).

    Args:
        chosen_token_logps: ``[B, T]`` per-token log-probs of the chosen sequences.
        chosen_mask: ``[B, T]`` 1 on completion tokens, 0 elsewhere.
    """
    if chosen_token_logps.shape != chosen_mask.shape:
        raise ValueError(
            f"`chosen_mask` must have the shape of `chosen_token_logps` {tuple(chosen_token_logps.shape)}; "
            f"got {tuple(chosen_mask.shape)}."
        )
    mask = chosen_mask.bool()
    if not mask.any():
        raise ValueError("`chosen_mask` marks no completion token; the SFT term is undefined.")
    return -_upcast(chosen_token_logps)[mask].mean()


def ld_dpo_logps(token_logps: Tensor, completion_mask: Tensor, ld_alpha: float) -> Tensor:
    """Length-desensitised sequence log-probs (LD-DPO, Liu et al., 2024, https://huggingface.co/papers/2409.06411).

    For a pair whose completions have ``n_w`` and ``n_l`` tokens, let ``n = min(n_w, n_l)``. Each completion's
    log-prob keeps its first ``n`` tokens in full and down-weights the verbose tail::

        log π_LD(y) = Σ_{t ≤ n} log π(y_t) + α · Σ_{t > n} log π(y_t)

    ``α = 1`` gives the plain sum; ``α = 0`` drops every token past the shorter completion. Use the same masks for the
    reference model's per-token log-probs.

    Args:
        token_logps: ``[2B, T]`` per-token log-probs of the concatenated batch, chosen rows first, then rejected
            (row ``i`` and row ``B + i`` form pair ``i``).
        completion_mask: ``[2B, T]`` 1 on completion tokens, 0 on prompt and padding.
        ld_alpha: ``α`` in ``[0, 1]``.

    Returns:
        ``[2B]`` LD sequence log-probs, chosen first then rejected.
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"`ld_alpha` must lie in [0, 1]; got {ld_alpha}.")
    if token_logps.shape != completion_mask.shape or token_logps.dim() != 2:
        raise ValueError(
            f"`token_logps` and `completion_mask` must both be [2B, T]; got {tuple(token_logps.shape)} and "
            f"{tuple(completion_mask.shape)}."
        )
    if token_logps.shape[0] % 2:
        raise ValueError(
            f"`token_logps` must have an even number of rows (chosen then rejected); got {token_logps.shape[0]}."
        )
    mask = completion_mask.bool()
    position = mask.long().cumsum(dim=1)  # 1-based index among completion tokens; [2B, T]
    chosen_lengths, rejected_lengths = mask.sum(dim=1).chunk(2)
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2).unsqueeze(1)  # [2B, 1]
    token_logps = _upcast(token_logps)
    zeros = torch.zeros_like(token_logps)
    shared_logps = torch.where(mask & (position <= shared), token_logps, zeros).sum(dim=1)
    tail_logps = torch.where(mask & (position > shared), token_logps, zeros).sum(dim=1)
    return shared_logps + ld_alpha * tail_logps


@torch.no_grad()
def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, completion_mask: Tensor) -> Tensor:
    """Per-pair WPO weights (Zhou et al., 2024, https://huggingface.co/papers/2406.11827, Eq. 2, aligned form).

    Each completion gets ``w(y) = exp( (1/|y|) Σ_t [log π(y_t) - log Σ_v π(v)²] )``: its length-normalised
    probability, measured against the policy's own sampling "peakiness" ``Σ_v π(v)²`` at each position so that
    weights are comparable across contexts. A pair's weight is ``w(y_w) · w(y_l)``. Computed without gradient.

    Args:
        token_logps: ``[2B, T]`` per-token log-probs of the concatenated batch (chosen rows, then rejected).
        log_sum_sq_probs: ``[2B, T]`` ``log Σ_v π(v | context)²`` at each position.
        completion_mask: ``[2B, T]`` 1 on completion tokens.

    Returns:
        ``[B]`` pair weights, to pass as ``weights`` to :func:`dpo_loss`.
    """
    if not token_logps.shape == log_sum_sq_probs.shape == completion_mask.shape or token_logps.dim() != 2:
        raise ValueError(
            "`token_logps`, `log_sum_sq_probs` and `completion_mask` must all be [2B, T]; got "
            f"{tuple(token_logps.shape)}, {tuple(log_sum_sq_probs.shape)}, {tuple(completion_mask.shape)}."
        )
    if token_logps.shape[0] % 2:
        raise ValueError(
            f"`token_logps` must have an even number of rows (chosen then rejected); got {token_logps.shape[0]}."
        )
    mask = completion_mask.bool()
    aligned = torch.where(mask, _upcast(token_logps) - _upcast(log_sum_sq_probs), 0.0)
    lengths = mask.sum(dim=1).clamp(min=1)
    sequence_weights = torch.exp(aligned.sum(dim=1) / lengths)  # [2B]
    chosen_weights, rejected_weights = sequence_weights.chunk(2)
    return chosen_weights * rejected_weights
