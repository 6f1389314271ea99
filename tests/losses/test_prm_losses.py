"""PRM: token-classification cross-entropy against hand arithmetic and transformers' own token-classification loss,
accuracy, the ignore index, the no-label batch, and validation."""

from __future__ import annotations

import math
import types

import pytest
import torch

from lightning_llm.losses.prm import prm_loss


def test_hand_values():
    logits = torch.tensor(
        [
            [[0.0, 0.0], [2.0, 0.5], [0.3, -0.2]],
            [[1.0, 3.0], [0.0, 1.0], [-1.0, 1.0]],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 1]])
    out = prm_loss(logits, labels)
    # -log softmax: token (0,1) label 0: log(1 + e^-1.5); (0,2) label 1: log(1 + e^0.5); (1,2) label 1: log(1 + e^-2)
    expected = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(-2.0))) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    # arg-max: class 0, class 0 (wrong), class 1 -> 2 of 3 right
    assert out.accuracy.item() == pytest.approx(2 / 3)
    assert out.num_labeled.item() == 3
    half = prm_loss(logits, labels, num_items_in_batch=6).loss
    assert half.item() == pytest.approx(expected / 2, rel=1e-12)


def test_matches_transformers_token_classification_loss():
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 2, dtype=torch.bfloat16)
    labels = torch.randint(0, 2, (3, 8))
    labels[torch.rand(3, 8) < 0.6] = -100
    config = types.SimpleNamespace(num_labels=2)
    expected = loss_utils.ForTokenClassification(logits, labels, config)
    out = prm_loss(logits, labels)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected)


def test_gradient_and_empty_batch():
    logits = torch.tensor([[[0.5, -0.5], [1.0, 2.0]]], requires_grad=True)
    out = prm_loss(logits, torch.tensor([[1, -100]]))
    out.loss.backward()
    # d/dz CE = softmax - onehot on the labelled token; zero elsewhere
    p = 1 / (1 + math.exp(-1.0))  # softmax([0.5, -0.5])[0]
    torch.testing.assert_close(logits.grad, torch.tensor([[[p, -p], [0.0, 0.0]]]))

    empty = prm_loss(logits, torch.full((1, 2), -100))
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad
    assert empty.num_labeled.item() == 0 and empty.accuracy.item() == 0.0


@pytest.mark.parametrize(
    ("logits", "labels", "kwargs", "message"),
    [
        (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {}, "`logits`"),
        (torch.zeros(2, 3, 2), torch.zeros(2, 4, dtype=torch.long), {}, "`labels` must have shape"),
        (torch.zeros(1, 2, 2), torch.tensor([[0, 2]]), {}, "`labels` must be in"),
        (torch.zeros(1, 2, 2), torch.tensor([[0, 1]]), {"num_items_in_batch": 0}, "`num_items_in_batch`"),
    ],
)
def test_validation_errors(logits, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prm_loss(logits, labels, **kwargs)
