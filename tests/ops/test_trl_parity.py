"""linear_logprobs against TRL 1.16's own chunked log-prob (trl.kernels.ChunkedLogProbFunction) on CPU."""

from __future__ import annotations

import pytest
import torch
from logprob_reference import rel_err

from lightning_llm.ops import linear_logprobs

trl_kernels = pytest.importorskip("trl.kernels")


@pytest.mark.parametrize(
    "options",
    [dict(), dict(temperature=0.8, softcap=6.0, logit_scale=1.5)],
    ids=["plain", "transformed"],
)
def test_matches_trl_chunked_logprob(options: dict) -> None:
    torch.manual_seed(0)
    rows, vocab, width = 14, 71, 16
    hidden = torch.randn(rows, width, requires_grad=True)
    weight = (torch.randn(vocab, width) / 2).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    upstream = torch.randn(rows)

    ours = linear_logprobs(
        hidden, weight, targets, impl="chunked", return_entropy=True, return_is_top1=True,
        return_mean_logits=True, return_log_sum_sq_probs=True, **options,
    )
    theirs = trl_kernels.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, options.get("temperature", 1.0), 32, options.get("softcap"),
        options.get("logit_scale", 1.0),
    )
    trl_logps, trl_entropy, trl_log_sum_sq, trl_mean, trl_top1 = theirs
    assert rel_err(ours.logps, trl_logps) <= 1e-5
    assert rel_err(ours.entropy, trl_entropy) <= 1e-5
    assert rel_err(ours.log_sum_sq_probs, trl_log_sum_sq) <= 1e-5
    assert rel_err(ours.mean_logits, trl_mean) <= 1e-5
    assert torch.equal(ours.is_top1, trl_top1)

    got = torch.autograd.grad((ours.logps * upstream).sum() + ours.entropy.sum(), (hidden, weight))
    want = torch.autograd.grad((trl_logps * upstream).sum() + trl_entropy.sum(), (hidden, weight))
    assert rel_err(got[0], want[0]) <= 1e-4
    assert rel_err(got[1], want[1]) <= 1e-4
