"""Our logits processing gives the distribution of transformers' own processors, built in ``generate``'s order."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import PAD, hf_processors, hf_scores

from lightning_llm.rollout import SamplingSettings
from lightning_llm.rollout.sampling import (
    draw_by_inverse_cdf,
    mark_present_,
    process_logits,
    processed_logprobs,
    select_tokens,
    token_presence,
)

VOCAB = 64
ROWS = 7


def awkward_logits(seed: int = 0) -> torch.Tensor:
    """Random ``[ROWS, VOCAB]`` logits with ties (inside a row and at the top-k / top-p boundaries), ``-inf``
    entries, a row with one finite logit, a row whose probability mass meets top_p=0.75 exactly, and logits of both
    signs (the repetition penalty treats them differently)."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(ROWS, VOCAB, generator=generator)
    logits[0, 10:16] = logits[0, 3]  # a block of ties
    top = logits[1].sort(descending=True).values
    logits[1, logits[1] == top[5]] = top[4]  # the 5th and 6th highest tie (top_k=5 keeps both)
    logits[2, 20:40] = float("-inf")
    logits[3, 1:] = float("-inf")  # only token 0 can be drawn
    logits[4] = logits[4].round()  # many ties everywhere
    logits[5, :8] = torch.tensor([2.0, 2.0, 1.0, 1.0, -1.0, -1.0, 0.5, 0.5])
    logits[6, 4:] = float("-inf")  # four equal logits: probabilities of exactly 1/4, mass exactly on top_p=0.75
    logits[6, :4] = 1.0
    return logits


def history(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids generated so far ``[ROWS, 12]`` with repeats, left padding (whose pad id must not be penalised) and its
    attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (ROWS, 12), generator=generator)
    ids[:, -1] = ids[:, -2]  # a token present twice is penalised once
    mask = torch.ones_like(ids)
    for row, padding in enumerate([0, 3, 1, 0, 5, 2, 0]):
        ids[row, :padding] = PAD
        mask[row, :padding] = 0
    return ids, mask


SETTINGS = {
    "temperature": SamplingSettings(temperature=0.7),
    "hot": SamplingSettings(temperature=2.5),
    "top_k": SamplingSettings(top_k=5),
    "top_k_1": SamplingSettings(top_k=1),
    "top_k_above_vocab": SamplingSettings(top_k=VOCAB + 10),
    "top_p": SamplingSettings(top_p=0.8),
    "top_p_small": SamplingSettings(top_p=0.05),
    "top_p_on_a_boundary": SamplingSettings(top_p=0.75),
    "min_p": SamplingSettings(min_p=0.1),
    "min_p_0": SamplingSettings(min_p=0.0),
    "min_p_1": SamplingSettings(min_p=1.0),
    "repetition_penalty": SamplingSettings(repetition_penalty=1.3),
    "repetition_reward": SamplingSettings(repetition_penalty=0.7),
    "combined": SamplingSettings(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    "combined_sharp": SamplingSettings(temperature=0.5, top_k=7, top_p=0.6, min_p=0.2, repetition_penalty=1.5),
    "greedy_penalised": SamplingSettings(do_sample=False, temperature=0.5, top_k=3, repetition_penalty=1.4),
    "default": SamplingSettings(),
}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processed_probabilities_equal_transformers(model, name, seed):
    settings = SETTINGS[name]
    logits = awkward_logits(seed)
    ids, mask = history(seed)
    with torch.no_grad():
        expected = hf_scores(model, settings, ids, logits, mask)
    ours = process_logits(logits, settings, token_presence(ids, VOCAB, mask))
    # the same tokens are filtered out, and the kept ones have the same probabilities
    assert torch.equal(torch.isneginf(ours), torch.isneginf(expected))
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1), rtol=0, atol=1e-6)
    logps = processed_logprobs(logits, settings, token_presence(ids, VOCAB, mask))
    torch.testing.assert_close(logps.exp(), expected.softmax(-1), rtol=0, atol=1e-6)


def test_the_processors_are_generates_in_its_order(model):
    """The reference the tests compare with: generate's list, repetition penalty first, then the warpers."""
    settings = SETTINGS["combined"]
    names = [type(p).__name__ for p in hf_processors(model, settings, torch.ones(1, 3, dtype=torch.long))]
    assert names == ["RepetitionPenaltyLogitsProcessor", "TemperatureLogitsWarper", "TopKLogitsWarper",
                     "TopPLogitsWarper", "MinPLogitsWarper"]
    greedy = [type(p).__name__ for p in hf_processors(model, SETTINGS["greedy_penalised"],
                                                      torch.ones(1, 3, dtype=torch.long))]
    assert greedy == ["RepetitionPenaltyLogitsProcessor"]


def test_repetition_penalty_counts_the_prompt_and_not_the_padding():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    ids = torch.tensor([[0, 0, 1, 2, 2]])  # two pads (id 0), then 1, 2, 2
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    scores = process_logits(logits, SamplingSettings(repetition_penalty=2.0), token_presence(ids, 5, mask))
    assert scores.tolist() == [[2.0, -4.0, 1.0, -2.0, 1.0]]


def test_top_k_keeps_ties_with_the_kth_and_top_p_keeps_the_top_token():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    kept = ~torch.isneginf(process_logits(logits, SamplingSettings(top_k=2)))
    assert kept.tolist() == [[True, True, True, False]]
    kept = ~torch.isneginf(process_logits(torch.tensor([[10.0, 0.0, 0.0]]), SamplingSettings(top_p=1e-6)))
    assert kept.tolist() == [[True, False, False]]


def test_presence_grows_with_the_generated_tokens():
    presence = token_presence(torch.tensor([[1, 1], [0, 3]]), 5, torch.tensor([[1, 1], [0, 1]]))
    mark_present_(presence, torch.tensor([4, 3]))
    assert presence.tolist() == [[False, True, False, False, True], [False, False, False, True, False]]


def test_token_selection_is_argmax_or_a_draw_from_the_scores():
    scores = torch.tensor([[0.0, 5.0, float("-inf")], [1.0, 0.0, 3.0]])
    assert select_tokens(scores, do_sample=False).tolist() == [1, 2]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([select_tokens(scores, True, generator) for _ in range(2000)])
    assert (draws[:, 0] != 2).all()  # a filtered token is never drawn
    frequency = (draws[:, 0] == 1).float().mean().item()
    assert frequency == pytest.approx(torch.tensor([0.0, 5.0]).softmax(0)[1].item(), abs=0.02)


def test_the_inverse_cdf_draws_follow_the_distribution():
    """200k draws per row against the probabilities, with filtered tokens (-inf), among them the first and the last
    ones, never drawn; a row with one token left always draws it."""
    logits = torch.tensor([
        [float("-inf"), 2.0, 0.5, float("-inf"), -1.0, 1.0, float("-inf")],
        [0.0, float("-inf"), float("-inf"), float("-inf"), float("-inf"), float("-inf"), float("-inf")],
        [-3.0, 0.0, 1.5, 0.2, -0.7, 0.9, 2.2],
    ])
    logprobs = torch.log_softmax(logits, dim=-1)
    generator = torch.Generator().manual_seed(0)
    draws = draw_by_inverse_cdf(logprobs.repeat_interleave(200_000, dim=0), generator).view(3, -1)
    for row in range(3):
        counts = torch.bincount(draws[row], minlength=logits.shape[1]).double()
        probs = logprobs[row].double().exp()
        assert (counts[probs == 0] == 0).all()
        expected = probs * draws.shape[1]
        kept = probs > 0
        chi_square = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
        # 5 degrees of freedom at most: P(chi2 > 25) < 2e-4
        assert chi_square < 25, (row, counts.tolist(), expected.tolist())
    assert (draws[1] == 0).all()
    # the check has power: the draws of row 2 do not pass for row 0's probabilities shifted by one token
    shifted = logprobs[2].roll(1).double().exp() * draws.shape[1]
    counts = torch.bincount(draws[2], minlength=7).double()
    assert float(((counts - shifted) ** 2 / shifted).sum()) > 1000


def test_the_inverse_cdf_draw_at_the_ends_of_the_unit_interval(monkeypatch):
    """u = 0 takes the first token of positive probability; a product that rounds onto the whole mass takes the last
    one (never a filtered token after it)."""
    logprobs = torch.log_softmax(torch.tensor([[float("-inf"), 0.0, 1.0, float("-inf")]]), dim=-1)
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.zeros(1, 1, dtype=torch.float64))
    assert draw_by_inverse_cdf(logprobs).tolist() == [1]
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.ones(1, 1, dtype=torch.float64))
    assert draw_by_inverse_cdf(logprobs).tolist() == [2]


def test_repetition_penalty_without_presence_is_an_error():
    with pytest.raises(ValueError, match="presence"):
        process_logits(torch.zeros(1, 3), SamplingSettings(repetition_penalty=1.1))
