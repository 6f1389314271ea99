"""DPOModule against TRL 1.16's DPOTrainer on the same tiny model, reference and data: the first-step loss and
TRL's logged metrics (logps/*, rewards/*, and the token metrics) within 1e-4, for every loss type, a weighted
mixture, LD-DPO (``ld_alpha``), WPO (``use_weighting``) and non-default f-divergences.

Set-up: the policy is the ``tiny-llama`` preset moved off its reference by seeded noise (the reference is an
unperturbed ``tiny-llama``, identical on both sides), so rewards and margins are not zero. The whole small dataset is
one batch, so nothing depends on batch order. TRL's trainer is built once; its loss settings are swapped per case.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")

from _trl_helpers import assert_metrics_close, build_trl_trainer, module_step, perturb_, trl_batch, trl_step
from helpers import StepMetrics, quiet_trainer, sample_rows
from trl import DPOConfig, DPOTrainer

from lightning_llm import DPOModule, PreferenceDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer

PAIR_METRICS = ["loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies"]
TOKEN_METRICS = ["entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"]

#: every TRL 1.16 loss type, with the label smoothing the smoothed ones need (exo_pair requires > 0)
LOSS_TYPES = {
    "sigmoid": {}, "hinge": {}, "ipo": {}, "exo_pair": {"label_smoothing": 0.1}, "nca_pair": {},
    "robust": {"label_smoothing": 0.1}, "bco_pair": {}, "sppo_hard": {}, "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {"label_smoothing": 0.1}, "apo_zero": {}, "apo_down": {}, "discopop": {}, "sft": {},
    "sigmoid_norm": {},
}
#: the other settings that change the loss: a mixture (MPO's), LD-DPO, WPO, f-DPO
VARIANTS = {
    "mixture": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "ld_alpha": {"ld_alpha": 0.5},
    "use_weighting": {"use_weighting": True},
    "use_weighting_ipo": {"loss_type": "ipo", "use_weighting": True},
    "forward_kl": {"f_divergence_type": "forward_kl"},
    "alpha_divergence": {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    "js_divergence_hinge": {"loss_type": "hinge", "f_divergence_type": "js_divergence"},
    "beta": {"beta": 0.5},
}

#: what each DPOModule argument is called on a built DPOTrainer (TRL reads these attributes in ``_compute_loss``)
TRL_DEFAULTS = {"loss_types": ["sigmoid"], "loss_weights": None, "label_smoothing": 0.0, "use_weighting": False,
                "ld_alpha": None, "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "beta": 0.1}


def parity_rows() -> list[dict]:
    """Eight shipped conversational pairs (most have equal-length completions) and four with clearly different
    lengths in both directions, so that LD-DPO, IPO's and sigmoid_norm's length normalisation have work to do."""
    user = lambda text: [{"role": "user", "content": text}]
    bot = lambda text: [{"role": "assistant", "content": text}]
    extra = [
        {"prompt": user("Name a color."), "chosen": bot("Blue."),
         "rejected": bot("I am not sure which color you would like me to name, sorry.")},
        {"prompt": user("What is 2 plus 2?"), "chosen": bot("2 plus 2 is 4, because two and two make four."),
         "rejected": bot("5.")},
        {"prompt": user("Say hello."), "chosen": bot("Hello!"), "rejected": bot("Goodbye, see you some other day.")},
        {"prompt": user("What sound does a cat make?"), "chosen": bot("A cat says meow, and sometimes it purrs."),
         "rejected": bot("Woof.")},
    ]
    return sample_rows("preference", 8) + extra


def trl_settings(case: dict) -> dict:
    settings = dict(TRL_DEFAULTS)
    for key, value in case.items():
        if key == "loss_type":
            settings["loss_types"] = [value] if isinstance(value, str) else list(value)
        else:
            settings[key] = value
    if settings["loss_weights"] is None:
        settings["loss_weights"] = [1.0] * len(settings["loss_types"])
    return settings


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tiny_tokenizer()
    rows = parity_rows()
    policy = perturb_(tiny_model("tiny-llama"), scale=0.05, seed=7)
    reference = tiny_model("tiny-llama")
    # use_weighting=True at construction makes TRL's fused head also return log_sum_sq_probs (WPO needs them); the
    # flag itself is switched per case below.
    trainer = build_trl_trainer(DPOTrainer, DPOConfig, copy.deepcopy(policy), tok, rows,
                                tmp_path_factory.mktemp("trl_dpo"), ref_model=copy.deepcopy(reference),
                                use_weighting=True)
    for attribute in TRL_DEFAULTS:  # the swap below relies on these; fail loudly if TRL renames them
        assert hasattr(trainer, attribute), attribute
    data = PreferenceDataModule(rows, tokenizer=tok, batch_size=len(rows), shuffle=False)
    data.setup("fit")
    return {"tok": tok, "rows": rows, "policy": policy, "reference": reference, "trainer": trainer,
            "trl_batch": trl_batch(trainer), "batch": data.collate(data.train_dataset.to_list())}


_RESULTS: dict[str, tuple[dict, dict]] = {}


def cached(setup, name: str, case: dict) -> tuple[dict, dict]:
    """``run_both`` once per named case (several tests read the same case)."""
    if name not in _RESULTS:
        _RESULTS[name] = run_both(setup, case)
    return _RESULTS[name]


def run_both(setup, case: dict) -> tuple[dict, dict]:
    trainer = setup["trainer"]
    for attribute, value in trl_settings(case).items():
        setattr(trainer, attribute, value)
    theirs = trl_step(trainer, setup["trl_batch"])
    module = DPOModule(setup["policy"], tokenizer=setup["tok"], ref_model=setup["reference"], **case)
    ours = module_step(module, setup["batch"])
    return ours, theirs


def test_batches_are_identical(setup):
    """Same tokenization and collation as TRL, so every difference below would come from the loss side."""
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(getattr(setup["batch"].sequences, key), setup["trl_batch"][key]), key


def test_the_set_up_is_not_degenerate(setup):
    """The policy differs from the reference: rewards are non-zero, the pairs disagree on the sign of the margin, and
    completion lengths differ within pairs."""
    ours, _ = cached(setup, "sigmoid", {"loss_type": "sigmoid"})
    assert abs(ours["rewards/chosen"]) > 1e-3 and abs(ours["rewards/rejected"]) > 1e-3
    assert abs(ours["rewards/margins"]) > 1e-4
    assert 0.0 < ours["rewards/accuracies"] < 1.0
    chosen_len, rejected_len = setup["batch"].sequences.completion_mask.sum(1).chunk(2)
    assert (chosen_len != rejected_len).sum() >= 4


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_each_loss_type_matches_trl(setup, loss_type):
    ours, theirs = cached(setup, loss_type, {"loss_type": loss_type, **LOSS_TYPES[loss_type]})
    assert_metrics_close(ours, theirs, PAIR_METRICS + TOKEN_METRICS, context=loss_type)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_trl(setup, variant):
    ours, theirs = cached(setup, variant, VARIANTS[variant])
    assert_metrics_close(ours, theirs, PAIR_METRICS + TOKEN_METRICS, context=variant)


def test_variants_change_the_loss(setup):
    """The variants are not no-ops on this data (else the comparisons above would prove little)."""
    base, _ = cached(setup, "sigmoid", {"loss_type": "sigmoid"})
    for name in ("ld_alpha", "use_weighting", "forward_kl", "alpha_divergence", "beta"):
        ours, _ = cached(setup, name, VARIANTS[name])
        assert abs(ours["loss"] - base["loss"]) > 1e-5, name
    ld, _ = cached(setup, "ld_alpha", VARIANTS["ld_alpha"])
    assert abs(ld["logps/chosen"] - base["logps/chosen"]) > 1e-3  # LD-DPO reweights the tail tokens


def test_logged_first_step_matches_trl(setup):
    """Through a real Lightning fit (shuffled loader, metric buffer flushed at the optimizer step, self.log): the
    logged step-1 metrics equal TRL's."""
    for attribute, value in trl_settings({}).items():
        setattr(setup["trainer"], attribute, value)
    theirs = trl_step(setup["trainer"], setup["trl_batch"])
    module = DPOModule(copy.deepcopy(setup["policy"]), tokenizer=setup["tok"],
                       ref_model=copy.deepcopy(setup["reference"]))
    data = PreferenceDataModule(setup["rows"], batch_size=len(setup["rows"]))
    steps = StepMetrics()
    quiet_trainer(max_steps=1, callbacks=[steps]).fit(module, data)
    assert_metrics_close(steps.steps[0], theirs, PAIR_METRICS + TOKEN_METRICS, context="fit")
    # TRL's num_tokens is cumulative (and this trainer has run many cases): check ours against the batch itself
    assert steps.steps[0]["num_tokens"] == setup["batch"].sequences.attention_mask.sum().item()
