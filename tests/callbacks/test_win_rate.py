from __future__ import annotations

from types import SimpleNamespace

import pytest
from callback_helpers import RefSFTModule, sft_data
from helpers import quiet_trainer
from lightning import Callback

from lightning_llm import SFTModule, WinRateCallback
from lightning_llm.callbacks._generation import resolve_prompts
from lightning_llm.callbacks.win_rate import average_win_probability, win_rate
from lightning_llm.judges.base import BasePairwiseJudge


class ScriptedJudge(BasePairwiseJudge):
    """Answers from a fixed list (cycled) and records what it was asked."""

    def __init__(self, answers: list) -> None:
        self.answers = answers
        self.calls: list[dict] = []

    def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
        self.calls.append(dict(prompts=list(prompts), completions=[list(p) for p in completions],
                               shuffle_order=shuffle_order, return_scores=return_scores))
        return [self.answers[i % len(self.answers)] for i in range(len(prompts))]


def test_win_rate_leaves_out_undecided_pairs():
    assert win_rate([1, 0, -1, 1]) == pytest.approx(2 / 3)
    assert win_rate([-1, -1]) is None
    assert win_rate([0, 0, 1], policy_index=0) == pytest.approx(2 / 3)
    assert average_win_probability([0.2, 0.9, -1, 0.4]) == pytest.approx((0.8 + 0.1 + 0.6) / 3)


class InitialCompletions(Callback):
    """Generates for the first validation prompts when training starts (before WinRateCallback's hook runs)."""

    def __init__(self, num_prompts: int, max_new_tokens: int) -> None:
        self.num_prompts, self.max_new_tokens = num_prompts, max_new_tokens
        self.prompts: list = []
        self.completions: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.prompts = trainer.datamodule.prompts("val", limit=self.num_prompts)
        self.completions = pl_module.generate(self.prompts, max_new_tokens=self.max_new_tokens)


def _chat_texts(tokenizer, prompts: list) -> list[str]:
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


def test_policy_is_compared_with_its_initial_completions():
    judge = ScriptedJudge([1, 0, -1, 1])
    module = SFTModule("tiny-llama", learning_rate=5e-2)
    initial = InitialCompletions(num_prompts=4, max_new_tokens=6)
    callback = WinRateCallback(judge, num_prompts=4, max_new_tokens=6, shuffle_order=False)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[initial, callback])
    trainer.fit(module, sft_data())

    assert len(judge.calls) == 1  # the validation at the end of training
    call = judge.calls[0]
    assert call["prompts"] == _chat_texts(module.tokenizer, initial.prompts)
    assert [pair[0] for pair in call["completions"]] == initial.completions
    assert [pair[1] for pair in call["completions"]] == module.generate(initial.prompts, max_new_tokens=6)
    assert call["completions"] != [[c, c] for c in initial.completions]  # training changed the completions
    assert call["shuffle_order"] is False and call["return_scores"] is False
    assert trainer.callback_metrics["val/win_rate"].item() == pytest.approx(2 / 3)
    assert callback.state_dict()["initial_completions"] == initial.completions


def test_reference_model_completions_and_soft_judge():
    judge = ScriptedJudge([0.2, 0.9, -1, 0.4])
    module = RefSFTModule("tiny-llama", learning_rate=5e-2)
    prompts = ["The sky is", [{"role": "user", "content": "Name a colour."}], "One, two,", "Hello"]
    callback = WinRateCallback(judge, prompts=prompts, max_new_tokens=5, use_soft_judge=True)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=[callback])
    trainer.fit(module, sft_data())

    call = judge.calls[-1]
    assert call["return_scores"] is True and call["shuffle_order"] is True
    assert call["prompts"][0] == "The sky is" and call["prompts"][1] == _chat_texts(module.tokenizer, prompts[1:2])[0]
    assert [pair[0] for pair in call["completions"]] == module.generate(prompts, model=module.ref_model,
                                                                        max_new_tokens=5)
    assert [pair[1] for pair in call["completions"]] == module.generate(prompts, max_new_tokens=5)
    assert callback.initial_completions is None  # a separate reference needs no stored completions
    # Probabilities that the reference is better: 0.2 and 0.4 are policy wins, 0.9 a loss, -1 undecided.
    assert trainer.callback_metrics["val/win_rate"].item() == pytest.approx(2 / 3)
    assert trainer.callback_metrics["val/avg_win_prob"].item() == pytest.approx(0.5)


def test_validate_without_training_and_undecided_judge_logs_nothing():
    judge = ScriptedJudge([-1])
    module = SFTModule("tiny-llama")
    callback = WinRateCallback(judge, prompts=["a", "b"], max_new_tokens=3)
    trainer = quiet_trainer(limit_val_batches=1, callbacks=[callback])
    with pytest.warns(UserWarning, match="decided none"):
        trainer.validate(module, sft_data())
    assert "val/win_rate" not in trainer.callback_metrics
    # Before any training the reference completions are the current policy's.
    assert [pair[0] for pair in judge.calls[0]["completions"]] == [pair[1] for pair in judge.calls[0]["completions"]]


def test_bad_arguments_and_missing_prompts():
    with pytest.raises(ValueError, match="judge"):
        WinRateCallback(object())
    with pytest.raises(ValueError, match="num_prompts"):
        WinRateCallback(ScriptedJudge([0]), num_prompts=0)
    with pytest.raises(ValueError, match="prompts"):
        WinRateCallback(ScriptedJudge([0]), prompts="one string")
    with pytest.raises(ValueError, match="max_new_tokens"):
        WinRateCallback(ScriptedJudge([0]), max_new_tokens=0)
    with pytest.raises(ValueError, match="pass prompts"):
        resolve_prompts(SimpleNamespace(datamodule=None), None, None)
