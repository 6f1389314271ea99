"""Accuracy of reward models (pairwise) and process reward models (token classification)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from lightning_llm.data.batches import IGNORE_INDEX


def _to_numpy(array: Any, name: str) -> np.ndarray:
    """A numpy view of ``array`` (numpy array, torch tensor, or nested lists)."""
    if hasattr(array, "detach"):  # torch tensor, possibly on a device or in bf16
        array = array.detach().float().cpu().numpy()
    result = np.asarray(array)
    if result.dtype == object:
        raise ValueError(f"{name} must be a rectangular numeric array, got a ragged or non-numeric one")
    return result


def compute_accuracy(eval_pred: Any) -> dict[str, float]:
    """Accuracy in TRL's ``compute_accuracy(eval_pred)`` convention, for ``transformers``-style evaluation.

    ``eval_pred`` is a ``(predictions, labels)`` pair (or a ``transformers.EvalPrediction``):

    - predictions ``[batch, seq, num_labels]``, labels ``[batch, seq]``: token classification (process reward
      models); the prediction is the argmax over labels and positions labelled ``-100`` are left out.
    - predictions ``[batch, num_options]``, labels ``[batch]``: a reward model's scores of the options (column 0 the
      chosen reward, column 1 the rejected one, labels 0); the prediction is the argmax. Rows whose best score is
      tied are left out, with a ``UserWarning`` giving their number (for two options this is TRL's "both
      predictions equal" rule).

    Returns:
        ``{"accuracy": fraction of correct predictions}``; NaN when no row is left to score.
    """
    try:
        predictions, labels = eval_pred
    except (TypeError, ValueError) as error:
        raise ValueError("eval_pred must be a (predictions, labels) pair") from error
    predictions = _to_numpy(predictions, "predictions")
    labels = _to_numpy(labels, "labels")

    if predictions.ndim == 3:
        if labels.shape != predictions.shape[:2]:
            raise ValueError(
                f"labels must have shape {predictions.shape[:2]} for predictions of shape {predictions.shape}, "
                f"got {labels.shape}"
            )
        keep = labels != IGNORE_INDEX
        predicted = predictions.argmax(axis=-1)[keep]
        targets = labels[keep]
    elif predictions.ndim == 2:
        if labels.shape != predictions.shape[:1]:
            raise ValueError(
                f"labels must have shape {predictions.shape[:1]} for predictions of shape {predictions.shape}, "
                f"got {labels.shape}"
            )
        best = predictions.max(axis=1, keepdims=True)
        tied = (predictions == best).sum(axis=1) > 1
        if tied.any():
            warnings.warn(
                f"There are {int(tied.sum())} out of {len(predictions)} instances where the predictions for the best "
                "options are equal. These instances are ignored in the accuracy computation.",
                UserWarning,
                stacklevel=2,
            )
        predicted = predictions[~tied].argmax(axis=1)
        targets = labels[~tied]
    else:
        raise ValueError(f"predictions must have 2 or 3 dimensions, got shape {predictions.shape}")

    if predicted.size == 0:
        return {"accuracy": float("nan")}
    return {"accuracy": float(np.mean(predicted == targets))}
