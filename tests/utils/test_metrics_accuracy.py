"""compute_accuracy against hand-computed values and plain-Python loops (TRL's reward / PRM conventions)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from lightning_llm.utils.metrics import compute_accuracy


def test_pairwise_hand_example_ignores_ties_with_warning() -> None:
    predictions = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, 1.0]])
    labels = np.zeros(4, dtype=int)
    with pytest.warns(UserWarning, match="There are 1 out of 4 instances"):
        result = compute_accuracy((predictions, labels))
    assert result == {"accuracy": pytest.approx(2 / 3)}  # rows 0 and 3 right, row 1 wrong, row 2 tied


def test_pairwise_random_rewards_match_loop() -> None:
    rng = np.random.default_rng(0)
    predictions = rng.normal(size=(50, 2)).astype(np.float32)
    labels = rng.integers(0, 2, 50)
    expected = sum(int((row[1] > row[0]) == bool(label)) for row, label in zip(predictions, labels)) / 50
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ties, so no warning
        assert compute_accuracy((predictions, labels))["accuracy"] == pytest.approx(expected)
    # torch tensors (as a LightningModule would pass them) give the same answer
    assert compute_accuracy((torch.from_numpy(predictions), torch.from_numpy(labels)))["accuracy"] == pytest.approx(
        expected
    )


def test_several_options_tie_only_on_the_best() -> None:
    predictions = np.array([[0.1, 0.7, 0.7], [0.5, 0.5, 0.9], [0.9, 0.2, 0.3]])
    labels = np.array([1, 2, 1])
    with pytest.warns(UserWarning, match="There are 1 out of 3"):
        result = compute_accuracy((predictions, labels))
    assert result["accuracy"] == pytest.approx(0.5)  # row 1 right (argmax 2), row 2 wrong; row 0 tied


def test_token_classification_skips_ignored_positions() -> None:
    rng = np.random.default_rng(1)
    predictions = rng.normal(size=(3, 6, 2))
    labels = rng.integers(0, 2, (3, 6))
    labels[0, :2] = -100
    labels[2, 4:] = -100
    correct = total = 0
    for b in range(3):
        for t in range(6):
            if labels[b, t] != -100:
                total += 1
                correct += int(max(range(2), key=lambda c: predictions[b, t, c]) == labels[b, t])
    assert compute_accuracy((predictions, labels))["accuracy"] == pytest.approx(correct / total)


def test_all_tied_gives_nan() -> None:
    with pytest.warns(UserWarning):
        assert math.isnan(compute_accuracy((np.array([[1.0, 1.0], [0.5, 0.5]]), np.array([0, 0])))["accuracy"])


@pytest.mark.parametrize(
    "eval_pred,match",
    [
        ((np.ones(3), np.zeros(3)), "2 or 3 dimensions"),
        ((np.array([[1.0, 0.0]]), np.zeros(2)), "labels must have shape"),
        ((np.zeros((2, 3, 2)) + 1.5, np.zeros((2, 4))), "labels must have shape"),
        ((np.ones((2, 2)), np.zeros(2), np.zeros(2)), "pair"),
    ],
)
def test_bad_input_raises(eval_pred, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_accuracy(eval_pred)
