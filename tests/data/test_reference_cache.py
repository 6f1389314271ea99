"""The on-disk cache of precomputed reference log-probs is keyed by the reference model: the same reference (a model
object with the same weights, the same directory) loads the cached scores, a different one (perturbed weights, a
directory whose files changed) scores the rows again."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb_, sample_rows

from lightning_llm import DPOModule, PreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer

ROWS = 6
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def scored(monkeypatch):
    """The number of pairs the reference model scores (a list, so that the tests can read it as it grows)."""
    count = [0]
    original = DPOModule._score_reference

    def score(module, batch):
        count[0] += batch.num_pairs
        return original(module, batch)

    monkeypatch.setattr(DPOModule, "_score_reference", score)
    return count


def reference_a() -> torch.nn.Module:
    return tiny_model("tiny-llama", seed=5)


def reference_b() -> torch.nn.Module:
    return perturb_(reference_a(), seed=11, scale=0.05)


def precomputed(ref_model, tok, cache) -> torch.Tensor:
    """``[N, 2]`` reference log-probs the data module holds after a DPO module's precompute (all objects new)."""
    module = DPOModule("tiny-llama", tokenizer=tok, ref_model=ref_model, precompute_ref_log_probs=True,
                       precompute_ref_batch_size=4)
    module.configure_model()
    data = PreferenceDataModule(sample_rows("preference", ROWS), tokenizer=tok, shuffle=False, cache_dir=str(cache))
    data.setup("fit")
    module.precompute_reference(data)
    assert module.ref_model is None  # released once the scores are stored
    return torch.tensor([data.train_dataset[c] for c in COLUMNS], dtype=torch.float64).T


def score_files(cache) -> set[str]:
    return {path.name for path in (cache / "scores").glob("*.npy")}


def test_a_different_reference_object_misses_the_cache(tok, tmp_path, scored):
    cache = tmp_path / "cache"
    first = precomputed(reference_a(), tok, cache)
    assert scored[0] == ROWS and len(score_files(cache)) == 1

    # another object with the same weights: loaded, nothing scored
    again = precomputed(reference_a(), tok, cache)
    assert scored[0] == ROWS and len(score_files(cache)) == 1
    assert torch.equal(again, first)

    # the perturbed reference: scored again, stored beside the first, and its own log-probs (not the cached ones)
    other = precomputed(reference_b(), tok, cache)
    assert scored[0] == 2 * ROWS and len(score_files(cache)) == 2
    assert (other - first).abs().max() > 1e-3
    fresh = precomputed(reference_b(), tok, tmp_path / "fresh")  # the same reference, on an empty cache
    assert scored[0] == 3 * ROWS
    torch.testing.assert_close(other, fresh, rtol=0, atol=1e-6)

    # each reference still finds its own entry
    assert torch.equal(precomputed(reference_a(), tok, cache), first)
    assert torch.equal(precomputed(reference_b(), tok, cache), other)
    assert scored[0] == 3 * ROWS


def test_a_reference_directory_is_identified_by_its_files(tok, tmp_path, scored):
    cache, directory = tmp_path / "cache", tmp_path / "reference"
    reference_a().save_pretrained(directory)
    first = precomputed(str(directory), tok, cache)
    assert scored[0] == ROWS
    torch.testing.assert_close(first, precomputed(reference_a(), tok, tmp_path / "object"), rtol=0, atol=1e-6)
    assert scored[0] == 2 * ROWS  # a directory and an object are different keys, even with the same weights

    assert torch.equal(precomputed(str(directory), tok, cache), first)
    assert scored[0] == 2 * ROWS  # the same directory: loaded

    reference_b().save_pretrained(directory)  # new weights under the same path
    changed = precomputed(str(directory), tok, cache)
    assert scored[0] == 3 * ROWS
    assert (changed - first).abs().max() > 1e-3
    torch.testing.assert_close(changed, precomputed(reference_b(), tok, tmp_path / "object_b"), rtol=0, atol=1e-6)
