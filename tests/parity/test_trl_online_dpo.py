"""OnlineDPOModule against TRL 1.16's experimental OnlineDPOTrainer, trained side by side on fixed rollouts.

Both sides start from the same tiny model (saved to a directory; each side builds its reference as a frozen copy),
get the same two completions for each prompt (a deterministic function of the prompt and of which of its two copies
it is: TRL through a subclass that overrides ``_generate``, ours through ``FixedRollouts``) and score them with the
same reward functions. Every step trains on all four prompts (TRL's ``per_device_train_batch_size=4`` prompts, our
``batch_size=8`` completions), so the loader orders do not matter. A large SGD step makes the second step's policy
differ from the reference, so log-ratios, rewards/* and the KL are not zero there.

Compared at both steps: the loss, ``rewards/*``, ``logps/*``, ``objective/scores*``, ``val/contain_eos_token``,
``beta`` and every parameter's gradient, within 1e-4 relative; with completions of one length (no padding) also
``objective/kl``, ``objective/entropy``, ``objective/non_score_reward`` and ``objective/rlhf_reward``, and with
ragged ones those four under ``count_padding_in_objectives=True`` (TRL sums them over the padding too).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("trl")

from helpers import StepMetrics, constant_lr, id_reward, quiet_trainer, sample_rows, sgd
from lightning import Callback

from lightning_llm.data.prompts import PromptDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.online_dpo import OnlineDPOModule
from lightning_llm.rollout import FixedRollouts

pytestmark = pytest.mark.slow

TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id
MAX_COMPLETION = 12
LR = 2.0
PROMPTS = 4
PAIR_METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "val/contain_eos_token", "beta"]
SCORE_METRICS = ["objective/scores", "objective/scores_margin"]
OBJECTIVES = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("tiny-llama").save_pretrained(directory)
    TOKENIZER.save_pretrained(directory)
    return str(directory)


def rows() -> list[dict]:
    return sample_rows("prompt_only", PROMPTS)


def ragged_completion(prompt_ids: list[int], copy: int) -> list[int]:
    """3 to 11 tokens, a function of the prompt and of the copy (0 or 1); about one in three has no EOS."""
    generator = torch.Generator().manual_seed(sum(prompt_ids) * 31 + copy)
    length = int(torch.randint(3, MAX_COMPLETION, (1,), generator=generator))
    ids = torch.randint(3, 800, (length,), generator=generator).tolist()
    return ids if (sum(prompt_ids) + copy) % 3 == 0 else ids + [EOS]


def even_completion(prompt_ids: list[int], copy: int) -> list[int]:
    """Exactly ``MAX_COMPLETION`` tokens: no padding anywhere; some end with EOS, the others are cut."""
    ids = ragged_completion(prompt_ids, copy)
    body = (ids * MAX_COMPLETION)[: MAX_COMPLETION - 1]
    body = [t for t in body if t != EOS] + [5] * MAX_COMPLETION
    return body[: MAX_COMPLETION - 1] + ([EOS] if ids[-1] == EOS else [7])


def pair_source(completion):
    """A FixedRollouts callable: each prompt's copies, counted in order, get ``completion(prompt, copy)``."""
    def complete(prompt_ids):
        seen: dict[tuple[int, ...], int] = {}
        out = []
        for ids in prompt_ids:
            out.append(completion(list(ids), seen.get(tuple(ids), 0)))
            seen[tuple(ids)] = seen.get(tuple(ids), 0) + 1
        return out
    return complete


def length_reward(completions, solution, **kwargs):
    """A second reward, reading the text and a dataset column (not ``completion_ids``: TRL passes them padded)."""
    texts = [c[0]["content"] for c in completions]
    return [len(t) / 40 + (0.5 if s in t else 0.0) for t, s in zip(texts, solution)]


@dataclass
class Run:
    logs: list[dict[str, float]] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ TRL's side
def run_trl(model_dir: str, tmp_path, completion, *, steps: int, reward_funcs, **config) -> Run:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    run = Run()
    losses: list[float] = []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            run.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    class FixedOnlineDPO(OnlineDPOTrainer):
        def _generate(self, model, prompts, images=None):
            pad = TOKENIZER.pad_token_id
            ids = [TOKENIZER.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                   ["input_ids"] for p in prompts]
            width = max(map(len, ids))
            prompt_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids]).repeat(2, 1)
            prompt_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids]).repeat(2, 1)
            completions = [completion(r, 0)[:MAX_COMPLETION] for r in ids] + \
                          [completion(r, 1)[:MAX_COMPLETION] for r in ids]
            longest = max(map(len, completions))
            completion_ids = torch.tensor([c + [pad] * (longest - len(c)) for c in completions])
            completion_mask = torch.tensor([[1] * len(c) + [0] * (longest - len(c)) for c in completions])
            return prompt_ids, prompt_mask, completion_ids, completion_mask, None

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss))  # the logged loss is rounded to 4 decimals
            return loss

    args = OnlineDPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_steps=steps,
        per_device_train_batch_size=PROMPTS, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=42,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
        gradient_checkpointing=False, max_new_tokens=MAX_COMPLETION, **config,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = FixedOnlineDPO(model=model_dir, reward_funcs=reward_funcs, args=args, processing_class=TOKENIZER,
                                 train_dataset=Dataset.from_list(rows()), callbacks=[Grab()])
        trainer.train()
    run.logs = [{k: float(v) for k, v in entry.items()} for entry in trainer.state.log_history if "loss" in entry]
    for log, loss in zip(run.logs, losses, strict=True):
        assert abs(log["loss"] - loss) <= 5e-5
        log["loss"] = loss
    return run


# ------------------------------------------------------------------------------------------------------ our side
class _Grab(Callback):
    def __init__(self, run: Run) -> None:
        self.run = run

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.run.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                               if p.grad is not None})


def run_ours(model_dir: str, completion, *, steps: int, reward_funcs, **kwargs) -> Run:
    run = Run()
    module = OnlineDPOModule(model_dir, reward_funcs=reward_funcs, rollout=FixedRollouts(pair_source(completion)),
                             max_completion_length=MAX_COMPLETION, optimizer=sgd(LR), scheduler=constant_lr, **kwargs)
    metrics = StepMetrics()
    quiet_trainer(max_steps=steps, callbacks=[metrics, _Grab(run)]).fit(
        module, PromptDataModule(rows(), batch_size=2 * PROMPTS, seed=42))
    run.logs = metrics.logged
    return run


# ------------------------------------------------------------------------------------------------------ comparison
def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def assert_runs_match(ours: Run, theirs: Run, names: list[str]) -> None:
    assert len(ours.logs) == len(theirs.logs) == 2
    for step, (mine, trl) in enumerate(zip(ours.logs, theirs.logs)):
        missing = [n for n in names if n not in mine or n not in trl]
        assert not missing, f"step {step + 1}: missing {missing} (ours: {sorted(mine)}, TRL: {sorted(trl)})"
        bad = {n: (mine[n], trl[n]) for n in names if not close(mine[n], trl[n])}
        assert not bad, f"step {step + 1}: ours vs TRL: {bad}"
    # the second step is off the reference: the comparison is not of zeros
    assert theirs.logs[1]["rewards/chosen"] != 0 and theirs.logs[1]["rewards/margins"] != 0
    assert len(ours.grads) == len(theirs.grads) == 2
    for step, (mine, trl) in enumerate(zip(ours.grads, theirs.grads)):
        assert mine.keys() == trl.keys()
        for name in trl:
            scale = trl[name].abs().max().item()
            error = (mine[name] - trl[name]).abs().max().item()
            assert error <= 1e-4 * scale + 1e-7, f"step {step + 1}, grad of {name}: max error {error} (scale {scale})"


@pytest.mark.parametrize("settings", [
    {"loss_type": "sigmoid"},
    {"loss_type": "ipo", "beta": 0.5},
    {"missing_eos_penalty": 0.7, "max_length": 20},
    {"reward_weights": [1.0, -0.5], "beta": 0.3, "max_length": 24},
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_online_dpo_matches_trl_on_ragged_completions(model_dir, tmp_path, settings):
    funcs = [id_reward, length_reward] if "reward_weights" in settings else [id_reward]
    theirs = run_trl(model_dir, tmp_path, ragged_completion, steps=2, reward_funcs=funcs, **settings)
    ours = run_ours(model_dir, ragged_completion, steps=2, reward_funcs=funcs, **settings)
    assert_runs_match(ours, theirs, PAIR_METRICS + SCORE_METRICS)
    # some completions lack an EOS, and the pairs are not all decided by a tie
    assert 0 < theirs.logs[0]["val/contain_eos_token"] < 1 and theirs.logs[0]["objective/scores_margin"] > 0


def test_online_dpo_objectives_match_trl(model_dir, tmp_path):
    """objective/*: over completions of one length as they are; over ragged ones with the padding counted."""
    theirs = run_trl(model_dir, tmp_path, even_completion, steps=2, reward_funcs=[id_reward], max_length=20)
    ours = run_ours(model_dir, even_completion, steps=2, reward_funcs=[id_reward], max_length=20)
    assert_runs_match(ours, theirs, PAIR_METRICS + SCORE_METRICS + OBJECTIVES)
    assert theirs.logs[1]["objective/kl"] != 0

    theirs = run_trl(model_dir, tmp_path, ragged_completion, steps=2, reward_funcs=[id_reward])
    ours = run_ours(model_dir, ragged_completion, steps=2, reward_funcs=[id_reward], count_padding_in_objectives=True)
    assert_runs_match(ours, theirs, PAIR_METRICS + SCORE_METRICS + OBJECTIVES)
