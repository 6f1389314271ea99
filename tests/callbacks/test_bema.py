from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from callback_helpers import sft_data
from helpers import quiet_trainer
from lightning import Callback, LightningModule
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_llm import BEMACallback, SFTModule

NUM_STEPS = 9
# Every knob away from its default, so each enters the check; the EMA floor is hit at step 9.
SCHEDULE = dict(update_freq=2, update_after=3, lag=2, multiplier=0.5, ema_power=0.6, bias_power=0.3,
                min_ema_multiplier=0.35)


def _trajectory() -> list[dict[str, torch.Tensor]]:
    """Hand-made weights of the trainable layer after each optimizer step (index 0: before training)."""
    generator = torch.Generator().manual_seed(0)
    return [{"0.weight": torch.randn(2, 3, generator=generator, dtype=torch.float64),
             "0.bias": torch.randn(2, generator=generator, dtype=torch.float64)} for _ in range(NUM_STEPS + 1)]


class ScriptedOptimizer(torch.optim.Optimizer):
    """An "optimizer" that sets the trainable parameters to the next point of a fixed trajectory."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], trajectory: list[dict], module: LightningModule):
        super().__init__([p for _, p in named_params], {})
        self.named_params, self.trajectory, self.module = named_params, trajectory, module

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        target = self.trajectory[self.module.trainer.global_step + 1]  # global_step counts steps already taken
        for name, param in self.named_params:
            param.copy_(target[name])


class ScriptedModule(LightningModule):
    """A policy (trainable Linear + frozen Linear) and a reference model; weights follow the trajectory."""

    def __init__(self, trajectory: list[dict]) -> None:
        super().__init__()
        self.trajectory = trajectory
        self.model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
        self.model[1].requires_grad_(False)
        self.ref_model = nn.Linear(3, 2).requires_grad_(False)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in trajectory[0]:
                    param.copy_(trajectory[0][name])
        self.seen_in_validation: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        return self.model(batch).sum() * 0.0

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append({n: p.detach().double().clone() for n, p in self.model.named_parameters()})

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        return ScriptedOptimizer(named, self.trajectory, self)

    def train_dataloader(self):
        return DataLoader(torch.randn(64, 3), batch_size=1)

    def val_dataloader(self):
        return DataLoader(torch.randn(1, 3), batch_size=1)


def expected_bema(trajectory: list[dict], *, update_freq, update_after, lag, multiplier, ema_power, bias_power,
                  min_ema_multiplier, decay=None) -> dict[int, dict[str, torch.Tensor]]:
    """BEMA after every step, straight from the paper's formulas, in float64 (``decay``: a constant EMA decay)."""
    theta0 = ema = bema = trajectory[0]
    out = {}
    for t in range(1, len(trajectory)):
        theta = trajectory[t]
        if t == update_after:
            theta0 = ema = bema = theta
        elif t > update_after and (t - update_after) % update_freq == 0:
            beta = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier) if decay is None else 1 - decay
            alpha = (lag + multiplier * t) ** -bias_power
            ema = {n: (1 - beta) * ema[n] + beta * theta[n] for n in theta}
            bema = {n: ema[n] + alpha * (theta[n] - theta0[n]) for n in theta}
        out[t] = bema
    return out


class RecordBEMA(Callback):
    """After BEMACallback (later in the list): the BEMA values after every step, and the policy after validation."""

    def __init__(self, bema: BEMACallback) -> None:
        self.bema = bema
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}
        self.after_validation: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self.by_step[trainer.global_step] = {n: v.double().clone() for n, v in zip(self.bema.names, self.bema.bema)}

    def on_validation_end(self, trainer, pl_module) -> None:
        self.after_validation.append({n: p.detach().double().clone() for n, p in pl_module.model.named_parameters()})


def _fit_scripted(tmp_path, max_steps: int, ckpt_path=None, evaluate_with_bema=False, checkpoint_cb=None, beta=None):
    trajectory = _trajectory()
    module = ScriptedModule(trajectory)
    bema = BEMACallback(**SCHEDULE, evaluate_with_bema=evaluate_with_bema, save=False, beta=beta)
    record = RecordBEMA(bema)
    callbacks = [bema, record] + ([checkpoint_cb] if checkpoint_cb else [])
    trainer = quiet_trainer(max_steps=max_steps, val_check_interval=4, callbacks=callbacks,
                            enable_checkpointing=checkpoint_cb is not None, default_root_dir=tmp_path)
    trainer.fit(module, ckpt_path=ckpt_path)
    return trajectory, module, bema, record


def test_bema_follows_the_formula_step_by_step(tmp_path):
    trajectory, module, bema, record = _fit_scripted(tmp_path, NUM_STEPS, evaluate_with_bema=True)
    expected = expected_bema(trajectory, **SCHEDULE)
    assert bema.names == ["0.weight", "0.bias"]  # frozen layer and reference model are not averaged
    assert sorted(record.by_step) == list(range(1, NUM_STEPS + 1))
    for step, values in record.by_step.items():
        for name, value in values.items():
            torch.testing.assert_close(value, expected[step][name], rtol=0, atol=1e-6, msg=f"{name} at step {step}")
    # The floor of the EMA weight was active at step 9, and the BEMA differs from the EMA and the iterate.
    assert (2 + 0.5 * 9) ** -0.6 < SCHEDULE["min_ema_multiplier"]
    assert not torch.allclose(record.by_step[9]["0.weight"], trajectory[9]["0.weight"].double())

    # Validation after steps 4 and 8 ran on the BEMA weights, then the trained weights came back.
    assert len(module.seen_in_validation) == 2
    for seen, restored, step in zip(module.seen_in_validation, record.after_validation, (4, 8)):
        torch.testing.assert_close(seen["0.weight"], expected[step]["0.weight"], rtol=0, atol=1e-6)
        torch.testing.assert_close(restored["0.weight"], trajectory[step]["0.weight"], rtol=0, atol=1e-6)
    assert module.model[0].weight.requires_grad and not module.model[1].weight.requires_grad


def test_a_constant_decay_replaces_the_ema_schedule(tmp_path):
    """BEMACallback(beta=0.9): the EMA keeps 0.9 of itself at each update; the bias correction is the schedule's."""
    trajectory, _, bema, record = _fit_scripted(tmp_path, NUM_STEPS, beta=0.9)
    expected = expected_bema(trajectory, **SCHEDULE, decay=0.9)
    scheduled = expected_bema(trajectory, **SCHEDULE)
    assert bema.ema_beta(5) == pytest.approx(0.1) and bema.ema_beta(500) == pytest.approx(0.1)
    for step, values in record.by_step.items():
        for name, value in values.items():
            torch.testing.assert_close(value, expected[step][name], rtol=0, atol=1e-6, msg=f"{name} at step {step}")
    assert not torch.allclose(expected[NUM_STEPS]["0.weight"], scheduled[NUM_STEPS]["0.weight"])
    assert "beta" in bema.state_key and "beta" not in BEMACallback().state_key


def test_bema_schedule_matches_trl_formulas():
    callback = BEMACallback(lag=10, multiplier=1.0, ema_power=0.5, bias_power=0.2, min_ema_multiplier=0.0)
    for step in (1, 7, 400):
        assert math.isclose(callback.ema_beta(step), (10 + step) ** -0.5)
        assert math.isclose(callback.bema_alpha(step), (10 + step) ** -0.2)
    assert BEMACallback(min_ema_multiplier=0.5).ema_beta(10_000) == 0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"update_freq": 0}, "update_freq"), ({"update_after": -1}, "update_after"), ({"ema_power": -1}, "ema_power"),
    ({"bias_power": -0.5}, "bias_power"), ({"min_ema_multiplier": 1.5}, "min_ema_multiplier"),
    ({"multiplier": 0}, "multiplier"), ({"beta": 1.0}, "beta"), ({"beta": -0.1}, "beta"), ({"beta": "0.9"}, "beta"),
])
def test_bema_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BEMACallback(**kwargs)


def test_bema_resumes_from_a_lightning_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    _fit_scripted(tmp_path, 6, checkpoint_cb=checkpoint)
    path = tmp_path / "ckpt" / "epoch=0-step=6.ckpt"
    assert path.exists()
    trajectory, _, resumed, _ = _fit_scripted(tmp_path, NUM_STEPS, ckpt_path=str(path))
    expected = expected_bema(trajectory, **SCHEDULE)[NUM_STEPS]
    for name, value in zip(resumed.names, resumed.bema):
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6)


def _policy_with(module: SFTModule, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: values.get(name, param).detach().double() for name, param in module.model.named_parameters()}


def test_bema_saves_an_hf_model_after_a_real_fit(tmp_path):
    module = SFTModule("tiny-qwen2", learning_rate=1e-2)  # tied input/output embeddings
    bema = BEMACallback(update_freq=1, lag=1, save_dir=str(tmp_path / "bema"))
    quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[bema]).fit(module, sft_data())

    averaged = dict(zip(bema.names, bema.bema))
    assert len(averaged) == len(list(module.model.parameters()))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bema")
    reloaded_params = dict(reloaded.named_parameters())
    for name, value in averaged.items():
        torch.testing.assert_close(reloaded_params[name].detach(), value, rtol=0, atol=0, msg=name)
    assert module.model.config.tie_word_embeddings
    torch.testing.assert_close(reloaded.lm_head.weight.detach(), averaged["model.embed_tokens.weight"], rtol=0, atol=0)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(averaged[weight], module.model.get_parameter(weight).detach())
    assert (tmp_path / "bema" / "tokenizer_config.json").exists()


def test_bema_of_lora_adapters_saves_merged_and_adapter_only_models(tmp_path):
    module = SFTModule("tiny-llama", learning_rate=5e-2,
                       peft_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    bema = BEMACallback(update_freq=1, lag=1, save_dir=str(tmp_path / "merged"))
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[bema])
    trainer.fit(module, sft_data())

    averaged = dict(zip(bema.names, bema.bema))
    assert averaged and all("lora_" in name for name in averaged)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    base = module.model.get_parameter(f"{prefix}.base_layer.weight").detach()
    lora_a, lora_b = averaged[f"{prefix}.lora_A.default.weight"], averaged[f"{prefix}.lora_B.default.weight"]
    assert lora_b.abs().max() > 0
    expected = base.double() + (8 / 4) * lora_b.double() @ lora_a.double()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded.get_parameter("model.layers.0.self_attn.q_proj.weight").double(), expected,
                               rtol=0, atol=1e-6)

    module.merge_adapters = False  # the module exports adapters alone: so does BEMA
    bema.save_bema(trainer, module, tmp_path / "adapters")
    adapter = load_file(tmp_path / "adapters" / "adapter_model.safetensors")
    saved_a = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    torch.testing.assert_close(saved_a, lora_a, rtol=0, atol=0)
