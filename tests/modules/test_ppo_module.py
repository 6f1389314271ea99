"""PPOModule as a user meets it: its first update on fixed rollouts equals the pure PPO functions applied to an
independent forward of the same models (separate value model, value head, reward model); it raises a rule reward on
the tiny model; ``global_step`` counts optimizer steps while the learning rate steps per rollout; ``step()`` drives it
by hand; the value model is exported beside the policy; bad arguments and mismatched score models stop with named
errors. (The losses themselves: ``tests/losses/test_ppo*.py``.)"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    StepMetrics,
    constant_lr,
    perturbed_policy_model,
    quiet_trainer,
    sample_rows,
    sgd,
    sharp_reference_model,
)
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from lightning_llm import LogCompletionsCallback, PPOModule, PromptDataModule
from lightning_llm.losses.ppo import (
    gae_advantages,
    ppo_loss,
    ppo_response_mask,
    ppo_rewards,
    truncate_response,
)
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.rewards import make_contains_reward
from lightning_llm.rollout import FixedRollouts

PAD, EOS, STOP = 0, 2, 77
MAX_COMPLETION = 12


def completion_of(prompt_ids: list[int]) -> list[int]:
    """A fixed completion of 3 to 10 tokens, a function of the prompt; two in three end with EOS, one in two holds the
    stop token 77 at position 2."""
    total = sum(prompt_ids)
    ids = [(total * 7 + 13 * k) % 700 + 3 for k in range(3 + total % 8)]
    ids = [i if i not in (PAD, EOS, STOP) else i + 1 for i in ids]
    if total % 2 == 0:
        ids[2] = STOP
    return ids + [EOS] if total % 3 else ids


class Recorder:
    """A FixedRollouts source that remembers the prompts it completed."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    def __call__(self, prompt_ids):
        self.prompts += [list(p) for p in prompt_ids]
        return [completion_of(list(p)) for p in prompt_ids]


def rule_score(completion_ids, **kwargs):
    """A reward read off the token ids."""
    return [(sum(ids) % 5) / 4 for ids in completion_ids]


def reward_model_dir(tmp_path, num_labels: int = 1, tokenizer=None, task: str = "sequence_classification"):
    """A tiny classifier (or causal LM) written with save_pretrained, as a RewardModule export is."""
    model = tiny_model("tiny-llama", task=task, seed=5, **({"num_labels": num_labels} if task != "causal_lm" else {}))
    path = tmp_path / f"rm-{num_labels}-{task}"
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


def batches(rows: int = 4, batch_size: int = 4) -> PromptDataModule:
    return PromptDataModule(sample_rows("prompt_only", rows), batch_size=batch_size)


# ------------------------------------------------------------------------------------ the first update by hand
def forward_inputs(query_responses):
    mask = query_responses != PAD
    return query_responses.masked_fill(~mask, 0), mask, mask.cumsum(1) - mask.long()


def response_logps(model, query_responses, responses, context, temperature):
    ids, mask, positions = forward_inputs(query_responses)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, context - 1: -1]
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logps.gather(-1, responses.unsqueeze(-1)).squeeze(-1)


def classifier_values(model, query_responses):
    ids, mask, positions = forward_inputs(query_responses)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    return model.score(hidden).squeeze(-1)  # [B, T]


def head_values(policy, head, query_responses):
    ids, mask, positions = forward_inputs(query_responses)
    hidden = policy.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    return head(hidden)


CASES = {
    "value_model_rule_k1": dict(reward_funcs=[rule_score], kl_coef=0.2),
    "reward_model_k3_stop_whiten_eos_penalty": dict(kl_estimator="k3", stop_token_id=STOP, whiten_rewards=True,
                                                    missing_eos_penalty=0.5, kl_coef=0.1, cliprange_value=0.05),
    "value_head": dict(reward_funcs=[rule_score], value_head=True, vf_coef=0.5, cliprange=0.1),
    "two_micro_batches": dict(reward_funcs=[rule_score], gradient_accumulation_steps=2, kl_coef=0.1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_first_update_is_the_pure_losses_on_an_independent_forward(case, tmp_path, monkeypatch):
    """One rollout of 4 prompts, one PPO epoch in one mini-batch (of one or two micro-batches), plain SGD: the logged
    statistics and the update of every weight (policy and value) are those of ``ppo_rewards``/``gae_advantages``/
    ``ppo_loss`` on log-probs and values computed here from the models' own logits and score heads."""
    kwargs = dict(CASES[case])
    accumulation = kwargs.pop("gradient_accumulation_steps", 1)
    permutations = []
    randperm = torch.randperm

    def recording_randperm(n, *args, **options):  # the mini-batch order (the sampler draws with its own generator)
        drawn = randperm(n, *args, **options)
        if "generator" not in options:
            permutations.append(drawn.clone())
        return drawn

    monkeypatch.setattr(torch, "randperm", recording_randperm)
    if "reward_funcs" not in kwargs:
        kwargs["reward_model"] = str(reward_model_dir(tmp_path))
    torch.manual_seed(0)
    lr, temperature = 0.5, 0.8
    recorder = Recorder()
    module = PPOModule(perturbed_policy_model(), tiny_tokenizer(), ref_model=sharp_reference_model(),
                       rollout=FixedRollouts(recorder), max_completion_length=MAX_COMPLETION, temperature=temperature,
                       num_ppo_epochs=1, num_mini_batches=1, gradient_accumulation_steps=accumulation,
                       max_grad_norm=None,
                       optimizer=sgd(lr), **kwargs)
    module.configure_model()
    policy, ref = copy.deepcopy(module.model), copy.deepcopy(module.ref_model)
    value = copy.deepcopy(module.value_model if module.value_model is not None else module.v_head)
    reward = copy.deepcopy(module.reward_model)
    metrics = StepMetrics()
    quiet_trainer(max_steps=1, callbacks=[metrics]).fit(module, batches())
    logged = metrics.logged[0]

    prompts = recorder.prompts
    completions = [completion_of(p) for p in prompts]
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    queries = torch.tensor([[PAD] * (width_p - len(p)) + p for p in prompts])
    responses = torch.tensor([c + [PAD] * (width_c - len(c)) for c in completions])
    if kwargs.get("stop_token_id") is not None:
        responses = truncate_response(responses, STOP, PAD)
    mask = ppo_response_mask(responses, PAD)
    query_responses = torch.cat([queries, responses], dim=1)
    with torch.no_grad():
        old_logps = response_logps(policy, query_responses, responses, width_p, temperature)
        ref_logps = response_logps(ref, query_responses, responses, width_p, temperature)
        if kwargs.get("value_head"):
            old_values = head_values(policy, value, query_responses)[:, width_p - 1: -1]
        else:
            old_values = classifier_values(value, query_responses)[:, width_p - 1: -1]
        if reward is not None:
            last = width_p + mask.sum(1) - 1
            scores = classifier_values(reward, query_responses)[torch.arange(4), last]
        else:
            scores = torch.tensor(rule_score([c[: int(n)] for c, n in zip(responses.tolist(), mask.sum(1))]))
    contains_eos = (responses == EOS).any(dim=1)
    rewards = ppo_rewards(old_logps, ref_logps, scores, mask, kl_coef=module.kl_coef,
                          kl_estimator=module.kl_estimator, missing_eos_penalty=module.missing_eos_penalty,
                          contains_eos=contains_eos, whiten_rewards=module.whiten_rewards)
    gae = gae_advantages(rewards.rewards, old_values, mask, gamma=module.gamma, lam=module.lam)

    trained = [policy, value]
    for model in trained:
        model.zero_grad()
    logps = response_logps(policy, query_responses, responses, width_p, temperature)
    if kwargs.get("value_head"):
        values = head_values(policy, value, query_responses)[:, width_p - 1: -1]
    else:
        values = classifier_values(value, query_responses)[:, width_p - 1: -1]
    order, micro = permutations[-1], 4 // accumulation
    outs = []
    for k in range(accumulation):  # TRL's micro-batches: each loss divided by their count, one optimizer step
        rows = order[k * micro: (k + 1) * micro]
        outs.append(ppo_loss(logps[rows], old_logps[rows], gae.advantages[rows], values[rows], gae.values[rows],
                             gae.returns[rows], mask[rows], cliprange=module.cliprange,
                             cliprange_value=module.cliprange_value, vf_coef=module.vf_coef))
    (sum(out.loss for out in outs) / accumulation).backward()

    def mean(field: str) -> torch.Tensor:
        return torch.stack([getattr(out, field).detach() for out in outs]).mean()

    expected = {"loss": mean("loss"), "loss/policy_avg": mean("policy_loss"), "loss/value_avg": mean("value_loss"),
                "policy/clipfrac_avg": mean("policy_clipfrac"), "val/clipfrac_avg": mean("value_clipfrac"),
                "policy/approxkl_avg": mean("approxkl"), "val/ratio": mean("ratio_mean"), **rewards.metrics(),
                "val/num_eos_tokens": (responses == EOS).sum()}
    if accumulation > 1:
        expected["val/ratio_var"] = torch.stack([out.ratio_mean for out in outs]).var()
    for name, value_ in expected.items():
        assert logged[name] == pytest.approx(float(value_.detach()), rel=1e-4, abs=1e-6), name
    assert abs(logged["objective/kl"]) > 1e-3  # the reference differs from the policy: the KL term is exercised
    assert module.trainer.global_step == 1

    trained_now = [module.model, module.v_head if module.v_head is not None else module.value_model]
    compared = 0
    for before, after in zip(trained, trained_now):
        for (name, p0), (_, p1) in zip(before.named_parameters(), after.named_parameters()):
            if p0.grad is None:
                continue
            torch.testing.assert_close((p0.detach() - p1.detach().cpu()) / lr, p0.grad, rtol=2e-3, atol=2e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")
            compared += 1
    assert compared == sum(1 for model in trained for _ in model.parameters())


# ------------------------------------------------------------------------------------------------ learning
def test_ppo_raises_a_rule_reward_on_cpu():
    """The share of completions that contain a "2" rises within 40 rollouts (measured 0.23 over the first 10, 0.80
    over the last 10)."""
    torch.manual_seed(0)
    module = PPOModule("tiny-llama", reward_funcs=[make_contains_reward("2")], max_completion_length=16,
                       learning_rate=1e-2, temperature=1.0, num_ppo_epochs=1, num_mini_batches=1,
                       gradient_accumulation_steps=1)
    metrics = StepMetrics()
    quiet_trainer(max_steps=40, callbacks=[metrics]).fit(module, PromptDataModule("sample:prompt_only", batch_size=8))
    scores = [step["objective/scores"] for step in metrics.logged]
    first, last = sum(scores[:10]) / 10, sum(scores[-10:]) / 10
    assert first < 0.4 and last > 0.55, (first, last)


# ------------------------------------------------------------------------------------- steps and rollouts
def test_global_step_counts_optimizer_steps_and_the_schedule_steps_per_rollout():
    module = PPOModule("tiny-llama", reward_funcs=[rule_score], rollout=FixedRollouts(Recorder()),
                       max_completion_length=MAX_COMPLETION, num_ppo_epochs=2, num_mini_batches=2,
                       gradient_accumulation_steps=2, learning_rate=1e-3, lr_scheduler_type="linear")
    metrics, table = StepMetrics(), LogCompletionsCallback(num_prompts=2, every_n_steps=4, console=False)
    trainer = quiet_trainer(max_steps=8, callbacks=[metrics, table])
    trainer.fit(module, batches(rows=8, batch_size=8))
    assert trainer.global_step == 8  # two rollouts of 2 epochs x 2 mini-batches
    assert [row[0] for row in table.rows] == [4, 4, 8, 8]  # each rollout's completions logged once
    assert "rewards/rule_score" in table.columns
    assert len(metrics.logged) == 2
    # a linear decay over the 2 rollouts: the first logged at the peak, the second at half of it
    assert [m["learning_rate"] for m in metrics.logged] == pytest.approx([1e-3, 5e-4])
    assert all(m["val/ratio_var"] >= 0 for m in metrics.logged)


def test_max_grad_norm_clips_each_optimizer_step_under_bf16_mixed():
    module = PPOModule("tiny-llama", reward_funcs=[rule_score], rollout=FixedRollouts(Recorder()),
                       max_completion_length=MAX_COMPLETION, num_ppo_epochs=1, max_grad_norm=1e-3,
                       optimizer=sgd(1.0), scheduler=constant_lr)
    module.configure_model()
    before = [p.detach().clone() for p in module.trainable_parameters()]
    quiet_trainer(max_steps=1, precision="bf16-mixed").fit(module, batches())
    moved = torch.stack([(p.detach() - b).pow(2).sum() for p, b in zip(module.trainable_parameters(), before)])
    assert moved.sum().sqrt().item() == pytest.approx(1e-3, rel=1e-2)  # SGD at lr 1: the clipped gradient's norm


def test_step_runs_by_hand_and_keeps_its_optimizer():
    module = PPOModule("tiny-llama", reward_funcs=[rule_score], rollout=FixedRollouts(Recorder()),
                       max_completion_length=MAX_COMPLETION, num_ppo_epochs=2, num_mini_batches=1,
                       learning_rate=1e-3, total_episodes=8, lr_scheduler_type="linear")
    prompts = [row["prompt"] for row in sample_rows("prompt_only", 4)]
    first = module.step(prompts)
    optimizer = module._step_optimizer
    second = module.step(prompts)
    assert module._step_optimizer is optimizer
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {4}  # Adam's state continued: 2 calls x 2 epochs
    for metrics in (first, second):
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
        assert {"objective/kl", "loss/policy_avg", "val/ratio_var", "objective/scores"} <= set(metrics)
    assert (first["learning_rate"], second["learning_rate"]) == pytest.approx((1e-3, 5e-4))  # 8 episodes: 2 calls


def test_step_with_a_trainer_is_one_more_training_step_of_its_run(tmp_path, monkeypatch):
    """After a fit, ``step(prompts, trainer=...)`` runs as further training steps of the same trainer: global_step
    goes on, the callbacks run at each call (LogCompletions logs each rollout, keyed by a new generation; a metrics
    callback sees the step's metrics), the step's optimizer is kept between calls, the reward functions get the
    rows' columns, and nothing is exported again."""
    module = PPOModule("tiny-llama", reward_funcs=[rule_score, column_reward], rollout=FixedRollouts(Recorder()),
                       max_completion_length=MAX_COMPLETION, num_ppo_epochs=2, num_mini_batches=1,
                       learning_rate=1e-3, total_episodes=8, lr_scheduler_type="linear", export_dir=str(tmp_path))
    metrics, table = StepMetrics(), LogCompletionsCallback(num_prompts=2, every_n_steps=2, console=False)
    trainer = quiet_trainer(max_steps=2, callbacks=[metrics, table])
    trainer.fit(module, batches(rows=4, batch_size=4))
    assert trainer.global_step == 2 and len(metrics.logged) == 1 and (tmp_path / "value_model").is_dir()
    exports = []
    monkeypatch.setattr(module, "export_hf", lambda *args, **kwargs: exports.append(args))
    prompts = [row["prompt"] for row in sample_rows("prompt_only", 4)]
    rows = [{"bonus": float(k)} for k in range(4)]
    first = module.step(prompts, rows, trainer=trainer)
    optimizer = module._step_optimizer
    second = module.step(prompts, rows, trainer=trainer)
    assert trainer.global_step == 6 and exports == []
    assert module._step_optimizer is optimizer and {int(s["step"]) for s in optimizer.state.values()} == {4}
    assert len(metrics.logged) == 3 and metrics.logged[-1]["loss/policy_avg"] == second["loss/policy_avg"]
    assert [row[0] for row in table.rows] == [2, 2, 4, 4, 6, 6]  # each step's rollout logged once
    assert (first["learning_rate"], second["learning_rate"]) == pytest.approx((1e-3, 5e-4))  # 8 episodes: 2 calls
    assert first["rewards/column_reward/mean"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="autocast_dtype is for steps without a trainer"):
        module.step(prompts, trainer=trainer, autocast_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="4 prompts and 1 rows"):
        module.step(prompts, rows[:1], trainer=trainer)


def column_reward(completions, bonus=None, **kwargs):
    """The row's ``bonus`` column as the reward (0 where the data has none)."""
    return [0.0] * len(completions) if bonus is None else list(bonus)


def test_step_under_autocast_runs_the_forwards_in_bf16_and_the_backward_outside(monkeypatch):
    """``step(autocast_dtype=torch.bfloat16)``: every forward of the rollout and of the update under CPU autocast,
    every backward outside it (as Lightning's precision plugin does in fit), and no autocast left behind."""
    module = PPOModule("tiny-llama", reward_funcs=[rule_score], rollout=FixedRollouts(Recorder()),
                       max_completion_length=MAX_COMPLETION, num_ppo_epochs=1, learning_rate=1e-3)
    seen = {"forward": [], "backward": [], "logits_dtype": []}
    forward, backward = module.policy_outputs, module._backward

    def spy_forward(*args, **kwargs):
        seen["forward"].append(torch.is_autocast_enabled("cpu"))
        out = forward(*args, **kwargs)
        return out

    def spy_backward(loss):
        seen["backward"].append(torch.is_autocast_enabled("cpu"))
        return backward(loss)

    monkeypatch.setattr(module, "policy_outputs", spy_forward)
    monkeypatch.setattr(module, "_backward", spy_backward)
    prompts = [row["prompt"] for row in sample_rows("prompt_only", 4)]
    metrics = module.step(prompts, autocast_dtype=torch.bfloat16)
    assert seen["forward"] and all(seen["forward"]) and seen["backward"] and not any(seen["backward"])
    assert not torch.is_autocast_enabled("cpu")
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    seen["forward"].clear()
    module.step(prompts)  # without the dtype: plain float32
    assert seen["forward"] and not any(seen["forward"])


# ------------------------------------------------------------------------------------- reward model, export
def test_the_reward_model_starts_the_value_model_and_both_are_exported(tmp_path):
    path = reward_model_dir(tmp_path)
    module = PPOModule("tiny-llama", reward_model=str(path), rollout=FixedRollouts(Recorder()),
                       max_completion_length=MAX_COMPLETION, num_ppo_epochs=1, learning_rate=1e-3, export_dir="hf")
    module.configure_model()
    saved = AutoModelForSequenceClassification.from_pretrained(path)
    for (name, a), (_, b) in zip(module.value_model.named_parameters(), saved.named_parameters()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in module.reward_model.parameters())
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(module, batches())
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf" / "value_model")
    assert exported.config.num_labels == 1
    for (name, a), (_, b) in zip(exported.named_parameters(), module.value_model.named_parameters()):
        assert torch.equal(a, b.detach().cpu()), name
    assert not torch.equal(exported.score.weight, saved.score.weight)  # the value model trained
    assert (tmp_path / "hf" / "config.json").is_file()
    assert (tmp_path / "hf" / "value_model" / "tokenizer.json").is_file()
    # checkpoints hold the trained value model, not the frozen reward and reference models (rebuilt on load)
    checkpoint = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    keys = torch.load(checkpoint, weights_only=False)["state_dict"].keys()
    assert any(k.startswith("value_model.") for k in keys)
    assert not any(k.startswith(("reward_model.", "ref_model.")) for k in keys)
    loaded = PPOModule.load_from_checkpoint(checkpoint)
    for (name, a), (_, b) in zip(loaded.value_model.named_parameters(), module.value_model.named_parameters()):
        assert torch.equal(a, b.detach().cpu()), name


def test_the_value_head_option_exports_its_head(tmp_path):
    module = PPOModule("tiny-llama", reward_funcs=[rule_score], value_head=True, rollout=FixedRollouts(Recorder()),
                       max_completion_length=MAX_COMPLETION, num_ppo_epochs=1, learning_rate=1e-3, export_dir="hf")
    data = PromptDataModule(sample_rows("prompt_only", 4), val_data=sample_rows("prompt_only", 6)[4:], batch_size=4)
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path, val_check_interval=1, limit_val_batches=1)
    trainer.fit(module, data)
    assert module.value_model is None
    assert {"val/objective/kl", "val/objective/scores"} <= set(trainer.callback_metrics)  # validation rolls out too
    head = load_file(tmp_path / "hf" / "value_head.safetensors")
    assert torch.equal(head["summary.weight"], module.v_head.summary.weight.detach().cpu())


# ------------------------------------------------------------------------------------------- named errors
@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "either reward_model"),
    ({"reward_funcs": [rule_score], "reward_model": "tiny-llama"}, "not both"),
    ({"reward_funcs": [rule_score], "value_head": True, "value_model": "tiny-llama"}, "one or the other"),
    ({"reward_funcs": [rule_score], "num_generations": 4}, "num_generations must be 1"),
    ({"reward_funcs": [rule_score], "num_mini_batches": 0}, "num_mini_batches must be"),
    ({"reward_funcs": [rule_score], "kl_estimator": "k2"}, "kl_estimator"),
    ({"reward_funcs": [rule_score], "stop_token": "eos", "stop_token_id": 5}, "not both"),
    ({"reward_funcs": [rule_score], "max_grad_norm": 0.0}, "max_grad_norm"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOModule("tiny-llama", **kwargs)


def test_a_reward_model_with_two_labels_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"reward_model .* one label \(num_labels=1\); it has num_labels=2"):
        PPOModule("tiny-llama", reward_model=str(reward_model_dir(tmp_path, num_labels=2)))


def test_a_value_model_with_two_labels_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"value_model .* num_labels=2"):
        PPOModule("tiny-llama", reward_funcs=[rule_score], value_model=str(reward_model_dir(tmp_path, 2)))


def test_a_language_model_is_no_reward_model(tmp_path):
    with pytest.raises(ValueError, match="reward_model .* LlamaForCausalLM; it must be a sequence classifier"):
        PPOModule("tiny-llama", reward_model=str(reward_model_dir(tmp_path, task="causal_lm")))


@pytest.mark.parametrize("which", ["reward_model", "value_model"])
def test_a_score_model_with_another_tokenizer_is_refused(which, tmp_path):
    other = tiny_tokenizer()
    other.add_tokens(["<an-extra-token>"])
    path = str(reward_model_dir(tmp_path, tokenizer=other))
    kwargs = {"reward_model": path} if which == "reward_model" else {"reward_funcs": [rule_score], "value_model": path}
    with pytest.raises(ValueError, match=f"{which}'s tokenizer differs from the policy's"):
        PPOModule("tiny-llama", **kwargs)


def test_trainer_accumulation_is_refused_and_the_rollout_must_split_evenly():
    def module(**kwargs):
        return PPOModule("tiny-llama", reward_funcs=[rule_score], rollout=FixedRollouts(Recorder()),
                         max_completion_length=MAX_COMPLETION, **kwargs)

    with pytest.raises(Exception, match="accumulate_grad_batches"):
        quiet_trainer(max_steps=1, accumulate_grad_batches=2).fit(module(), batches())
    with pytest.raises(ValueError, match="cannot be split into num_mini_batches=3"):
        quiet_trainer(max_steps=1).fit(module(num_mini_batches=3), batches())


def test_fsdp1_is_refused_by_name_before_the_first_step():
    """FSDP1's root unit reshards after the first backward, and PPO backpropagates several times per training step:
    refused in ``setup``, with the strategies that work named. (A trainer stand-in holding an FSDPStrategy: the real
    one needs two processes; ``test_strategies.py`` runs PPO under DDP and FSDP2.)"""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    class Subclassed(FSDPStrategy):
        pass

    module = PPOModule("tiny-llama", reward_funcs=[rule_score], rollout=FixedRollouts(Recorder()),
                       max_completion_length=MAX_COMPLETION)
    for strategy in (FSDPStrategy(), Subclassed()):
        module._trainer = SimpleNamespace(strategy=strategy)
        with pytest.raises(ValueError, match="FSDP1 .FSDPStrategy. does not support.*ModelParallelStrategy"):
            module.setup("fit")
