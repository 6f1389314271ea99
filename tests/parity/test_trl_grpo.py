"""GRPOModule and RLOOModule against TRL 1.16's GRPOTrainer and RLOOTrainer, trained side by side on fixed rollouts.

Both sides start from the same tiny model (saved to a directory, so TRL's reference model loads the same weights),
draw the same prompts in the same order (our GenerationSampler and TRL's RepeatSampler agree, see
``tests/data/test_prompts.py``), get the same completions for the same prompts (a deterministic function of the
prompt and of how many times it already occurred in the generation batch: TRL through ``rollout_func``, RLOO through
a subclass that overrides its generation, ours through ``FixedRollouts``), and score them with the same reward
functions. TRL shuffles each generation batch with torch's global generator before splitting it; its permutations
are recorded and replayed on our side (``generation_order``), so every micro-batch holds the same completions.

Compared at every optimizer step: the advantages, the logged loss and metrics (``kl``, ``entropy``, ``clip_ratio/*``,
``reward``, ``completions/*``, ``num_tokens`` ...) and every parameter's gradient, within 1e-4 relative. Two steps on
one generation batch (``num_iterations=2``) with a large SGD step make the second step off-policy, so the importance
ratios, clipping and the KL bias correction are exercised.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("trl")

from helpers import (
    MAX_FIXED_COMPLETION,
    StepMetrics,
    constant_lr,
    fixed_completions,
    id_reward,
    quiet_trainer,
    sample_rows,
    sgd,
)
from lightning import Callback

from lightning_llm.data.prompts import PromptDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.grpo import GRPOModule
from lightning_llm.modules.rloo import RLOOModule
from lightning_llm.rollout import FixedRollouts

pytestmark = pytest.mark.slow

TOKENIZER = tiny_tokenizer()
MAX_COMPLETION = MAX_FIXED_COMPLETION
LR = 0.5
#: TRL log keys that are bookkeeping, or measured differently on purpose (grad_norm: Lightning logs none)
NOT_COMPARED = {"step", "epoch", "learning_rate", "grad_norm", "step_time", "train_runtime", "train_loss",
                "train_samples_per_second", "train_steps_per_second", "total_flos"}
#: metrics TRL averages over the micro-batches of a step, where ours weights by tokens (equal with one per step)
PER_MICRO_BATCH = ("kl", "entropy", "clip_ratio/", "cispo_clip_ratio", "vespo/", "policy_loss")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("tiny-llama").save_pretrained(directory)
    TOKENIZER.save_pretrained(directory)
    return str(directory)


def rows() -> list[dict]:
    return sample_rows("prompt_only", 8)


def length_reward(completions, solution, **kwargs):
    """A second reward reading a dataset column."""
    return [len(c[0]["content"]) / 40 + (0.5 if s in c[0]["content"] else 0.0) for c, s in zip(completions, solution)]


@dataclass
class Run:
    logs: list[dict[str, float]] = field(default_factory=list)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    advantages: list[torch.Tensor] = field(default_factory=list)
    permutations: list[torch.Tensor] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ TRL's side
def run_trl(model_dir: str, tmp_path, algorithm: str, *, steps: int, batch_size: int, accumulate: int,
            reward_funcs, **config) -> Run:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
    from trl.trainer import grpo_trainer, rloo_trainer

    run = Run()

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            run.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    def tokenize(prompts):
        return [TOKENIZER.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                ["input_ids"] for p in prompts]

    def rollout_func(prompts, trainer):
        prompt_ids = tokenize(prompts)
        return {"prompt_ids": prompt_ids, "completion_ids": fixed_completions(prompt_ids), "logprobs": None}

    config_cls, trainer_cls, module = (GRPOConfig, GRPOTrainer, grpo_trainer) if algorithm == "grpo" else (
        RLOOConfig, RLOOTrainer, rloo_trainer)
    args = config_cls(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_steps=steps,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulate, logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=42, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=0.0, max_completion_length=MAX_COMPLETION, **config,
    )
    kwargs = {}
    if algorithm == "grpo":
        kwargs["rollout_func"] = rollout_func
        cls = trainer_cls
    else:
        class FixedRLOO(trainer_cls):
            def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
                return fixed_completions([list(p) for p in prompt_ids])

        cls = FixedRLOO
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model_dir, reward_funcs=reward_funcs, args=args, processing_class=TOKENIZER,
                      train_dataset=Dataset.from_list(rows()), callbacks=[Grab()], **kwargs)
    generate = trainer._generate_and_score_completions

    def recording_generate(inputs):
        out = generate(inputs)
        run.advantages.append(out["advantages"].detach().clone())
        return out

    trainer._generate_and_score_completions = recording_generate
    shuffle = module.shuffle_sequence_dict

    def recording_shuffle(batch):
        state = torch.get_rng_state()
        size = len(next(v for v in batch.values() if v is not None))
        run.permutations.append(torch.randperm(size))
        torch.set_rng_state(state)  # TRL's own shuffle draws the same permutation
        return shuffle(batch)

    module.shuffle_sequence_dict = recording_shuffle
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
    finally:
        module.shuffle_sequence_dict = shuffle
    run.logs = [{k: float(v) for k, v in entry.items() if k not in NOT_COMPARED}
                for entry in trainer.state.log_history if "loss" in entry]
    return run


# ------------------------------------------------------------------------------------------------------ our side
class _Grab(Callback):
    def __init__(self, run: Run) -> None:
        self.run = run

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.run.grads.append({n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                               if p.grad is not None})


def run_ours(model_dir: str, module_cls, *, steps: int, batch_size: int, accumulate: int, permutations, reward_funcs,
             **kwargs) -> Run:
    run = Run()
    replay = list(permutations)

    class Recorded(module_cls):
        def generation_order(self, size):
            return replay.pop(0)

        def compute_advantages(self, rewards_per_func, rollout, num_generations):
            advantages = super().compute_advantages(rewards_per_func, rollout, num_generations)
            run.advantages.append(advantages.detach().clone())
            return advantages

    module = Recorded(model_dir, reward_funcs=reward_funcs, rollout=FixedRollouts(fixed_completions),
                      max_completion_length=MAX_COMPLETION, optimizer=sgd(LR), scheduler=constant_lr, **kwargs)
    data = PromptDataModule(rows(), batch_size=batch_size, seed=42)
    metrics = StepMetrics()
    trainer = quiet_trainer(max_steps=steps, accumulate_grad_batches=accumulate, log_every_n_steps=1,
                            callbacks=[metrics, _Grab(run)])
    trainer.fit(module, data)
    run.logs = metrics.steps
    return run


# ------------------------------------------------------------------------------------------------------ comparison
def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))


def assert_runs_match(ours: Run, theirs: Run, *, per_micro_batch: bool = True) -> None:
    assert len(ours.advantages) == len(theirs.advantages) > 0
    for k, (a, b) in enumerate(zip(ours.advantages, theirs.advantages)):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-6, msg=f"advantages of generation {k}")
    assert len(ours.logs) == len(theirs.logs) > 0
    for step, (mine, trl) in enumerate(zip(ours.logs, theirs.logs)):
        names = [n for n in trl if per_micro_batch or not n.startswith(PER_MICRO_BATCH)]
        missing = [n for n in names if n not in mine]
        assert not missing, f"step {step + 1}: metrics missing on our side: {missing} (ours: {sorted(mine)})"
        bad = {n: (mine[n], trl[n]) for n in names if not close(mine[n], trl[n])}
        assert not bad, f"step {step + 1}: ours vs TRL: {bad}"
    assert len(ours.grads) == len(theirs.grads)
    for step, (mine, trl) in enumerate(zip(ours.grads, theirs.grads)):
        assert mine.keys() == trl.keys()
        for name in trl:
            scale = trl[name].abs().max().item()
            error = (mine[name] - trl[name]).abs().max().item()
            assert error <= 1e-4 * scale + 1e-7, f"step {step + 1}, grad of {name}: max error {error} (scale {scale})"


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("importance_sampling_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_matches_trl_for_every_loss_type(model_dir, tmp_path, loss_type, importance_sampling_level, beta):
    settings = dict(num_generations=4, num_iterations=2, loss_type=loss_type,
                    importance_sampling_level=importance_sampling_level, beta=beta)
    if loss_type == "cispo":
        settings["epsilon_high"] = 0.28
    theirs = run_trl(model_dir, tmp_path, "grpo", steps=2, batch_size=8, accumulate=1, reward_funcs=[id_reward],
                     **settings)
    ours = run_ours(model_dir, GRPOModule, steps=2, batch_size=8, accumulate=1, permutations=theirs.permutations,
                    reward_funcs=[id_reward], **settings)
    assert_runs_match(ours, theirs)
    assert theirs.logs[1].get("clip_ratio/region_mean", 1.0) > 0 or loss_type not in ("grpo", "dapo")


@pytest.mark.parametrize("settings", [
    {"scale_rewards": "batch"},
    {"scale_rewards": "none", "loss_type": "dr_grpo"},
    {"scale_rewards": "group", "loss_type": "bnpo", "beta": 0.04, "use_bias_correction_kl": False},
    {"multi_objective_aggregation": "normalize_then_sum", "reward_weights": [1.0, 0.5]},
    {"reward_weights": [0.7, 2.0], "mask_truncated_completions": True},
    {"epsilon": 0.1, "epsilon_high": 0.3, "delta": 1.5},
    {"top_entropy_quantile": 0.5},
    {"entropy_coef": 0.01, "loss_type": "grpo"},
    {"temperature": 0.7, "beta": 0.04},
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_grpo_matches_trl_for_the_other_settings(model_dir, tmp_path, settings):
    settings = {"num_generations": 4, "num_iterations": 2, **settings}
    funcs = [id_reward, length_reward] if "reward_weights" in settings else [id_reward]
    theirs = run_trl(model_dir, tmp_path, "grpo", steps=2, batch_size=8, accumulate=1, reward_funcs=funcs,
                     **settings)
    ours = run_ours(model_dir, GRPOModule, steps=2, batch_size=8, accumulate=1, permutations=theirs.permutations,
                    reward_funcs=funcs, **settings)
    assert_runs_match(ours, theirs)


@pytest.mark.parametrize("schedule", [
    {"steps_per_generation": 2, "accumulate": 2, "num_iterations": 1},
    {"steps_per_generation": 2, "accumulate": 1, "num_iterations": 2},
    {"steps_per_generation": 4, "accumulate": 2, "num_iterations": 1},
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_grpo_generation_batches_split_like_trl(model_dir, tmp_path, schedule, loss_type):
    schedule = dict(schedule)
    accumulate = schedule.pop("accumulate")
    settings = {"num_generations": 4, "loss_type": loss_type, "beta": 0.04, **schedule}
    theirs = run_trl(model_dir, tmp_path, "grpo", steps=4, batch_size=4, accumulate=accumulate,
                     reward_funcs=[id_reward], **settings)
    ours = run_ours(model_dir, GRPOModule, steps=4, batch_size=4, accumulate=accumulate,
                    permutations=theirs.permutations, reward_funcs=[id_reward], **settings)
    assert_runs_match(ours, theirs, per_micro_batch=accumulate == 1)


@pytest.mark.parametrize("settings", [
    {},
    {"normalize_advantages": True},
    {"beta": 0.0},
    {"reward_clip_range": [0.1, 0.6], "num_generations": 4},
    {"steps_per_generation": 2, "num_iterations": 2, "normalize_advantages": True},
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_rloo_matches_trl(model_dir, tmp_path, settings):
    settings = {"num_iterations": 2, **settings}
    num_generations = settings.get("num_generations", 2)
    batch_size = 4 if "steps_per_generation" in settings else 8
    theirs = run_trl(model_dir, tmp_path, "rloo", steps=2, batch_size=batch_size, accumulate=1,
                     reward_funcs=[id_reward], **settings)
    ours = run_ours(model_dir, RLOOModule, steps=2, batch_size=batch_size, accumulate=1,
                    permutations=theirs.permutations, reward_funcs=[id_reward], **settings)
    assert num_generations in (2, 4)
    assert_runs_match(ours, theirs)
