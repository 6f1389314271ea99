"""Process reward model loss: token classification of reasoning steps (TRL 1.16 ``PRMTrainer``).

A process reward model (Lightman et al., 2023, "Let's Verify Step by Step", https://huggingface.co/papers/2305.20050;
Uesato et al., 2022, https://huggingface.co/papers/2211.14275) scores every step of a solution. As in TRL, each step's
label (correct / incorrect) sits on the step's last token, every other token carries the ignore index, and the model
is a token classifier trained with cross-entropy on the labelled tokens only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PRMLossOutput", "prm_loss"]


class PRMLossOutput(NamedTuple):
    """Result of :func:`prm_loss`.

    - ``loss`` scalar: cross-entropy over the labelled tokens (the training loss; already reduced, because the
      natural unit is the labelled token, not the sequence).
    - ``accuracy`` scalar (detached): fraction of labelled tokens whose arg-max class is the label -> ``accuracy``.
      0 when no token is labelled.
    - ``num_labeled`` scalar int64: number of labelled tokens, for a token-weighted average across processes.
    """

    loss: Tensor
    accuracy: Tensor
    num_labeled: Tensor


def prm_loss(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
) -> PRMLossOutput:
    """Token-classification cross-entropy over labelled step tokens::

        loss = -(1/N) Σ_{(i,t): labels_it ≠ ignore} log softmax(logits_it)[labels_it]

    with ``N`` the number of labelled tokens in the batch, or ``num_items_in_batch`` when given (the labelled-token
    count of the whole accumulated step, so gradient accumulation averages over tokens, as transformers' loss does).
    Logits are upcast to float32. A batch with no labelled token (possible with ``train_on_last_step_only`` and
    truncation) gives a loss of 0 that is still connected to the graph, instead of cross-entropy's NaN.

    Args:
        logits: ``[B, T, C]`` per-token class scores (``C = 2`` for correct / incorrect steps).
        labels: ``[B, T]`` class index per token, ``ignore_index`` where no step ends.
        ignore_index: label value of unlabelled tokens.
        num_items_in_batch: optional normaliser replacing ``N``; must be > 0.

    Returns:
        :class:`PRMLossOutput`.
    """
    if logits.dim() != 3:
        raise ValueError(f"`logits` must be [batch, tokens, classes]; got shape {tuple(logits.shape)}.")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"`labels` must have shape {tuple(logits.shape[:2])} (logits' first two); got {tuple(labels.shape)}."
        )
    labelled = labels != ignore_index
    num_classes = logits.shape[-1]
    if bool((labels[labelled] < 0).any() or (labels[labelled] >= num_classes).any()):
        raise ValueError(f"`labels` must be in [0, {num_classes}) or equal `ignore_index` ({ignore_index}).")
    if num_items_in_batch is not None and not num_items_in_batch > 0:
        raise ValueError(f"`num_items_in_batch` must be > 0; got {num_items_in_batch}.")

    flat_logits = logits.reshape(-1, num_classes).to(torch.promote_types(logits.dtype, torch.float32))
    flat_labels = labels.reshape(-1)
    num_labeled = labelled.sum()
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=loss_sum.device, dtype=loss_sum.dtype)
    else:
        denominator = num_labeled.clamp(min=1).to(loss_sum.dtype)
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == labels) & labelled
        accuracy = correct.sum().to(flat_logits.dtype) / num_labeled.clamp(min=1)
    return PRMLossOutput(loss=loss_sum / denominator, accuracy=accuracy, num_labeled=num_labeled)
