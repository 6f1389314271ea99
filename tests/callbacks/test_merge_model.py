from __future__ import annotations

import copy
import math

import pytest
import torch
from callback_helpers import sft_data
from helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from lightning_llm import MergeModelCallback, SFTModule
from lightning_llm.callbacks import linear_merge, merge_state_dicts, slerp
from lightning_llm.models.loading import load_model

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def slerp_float64(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Textbook SLERP of the flattened tensors, in float64 (no fallback)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    omega = math.acos(float(a64 @ b64 / (a64.norm() * b64.norm())))
    return ((math.sin((1 - t) * omega) * a64 + math.sin(t * omega) * b64) / math.sin(omega)).reshape(a.shape)


def test_linear_merge_against_float64():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    for weight in (0.0, 0.3, 1.0):
        expected = (1 - weight) * a.double() + weight * b.double()
        torch.testing.assert_close(linear_merge(a, b, weight).double(), expected, rtol=0, atol=1e-6)
    assert linear_merge(a.half(), b.half(), 0.5).dtype == torch.float16


def test_slerp_against_float64_and_known_values():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
    for t in (0.25, 0.5, 0.9):
        torch.testing.assert_close(slerp(a, b, t).double(), slerp_float64(a, b, t), rtol=0, atol=1e-5)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=0, atol=1e-6)
    # Halfway between orthogonal unit vectors is their normalised sum (linear interpolation would be shorter).
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(e0, e1, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_slerp_falls_back_to_linear_for_parallel_and_zero_tensors():
    a = torch.tensor([1.0, 2.0, 3.0])
    nearly_parallel = a * 2.0 + torch.tensor([1e-4, 0.0, 0.0])
    torch.testing.assert_close(slerp(a, nearly_parallel, 0.3), 0.7 * a + 0.3 * nearly_parallel)
    torch.testing.assert_close(slerp(a, -a, 0.25), 0.75 * a - 0.25 * a)
    zero = torch.zeros(3)
    torch.testing.assert_close(slerp(zero, a, 0.4), 0.4 * a)
    assert torch.isfinite(slerp(a, nearly_parallel, 0.5)).all()


def test_merge_state_dicts_checks_the_architecture():
    state = {"w": torch.ones(2, 2), "step": torch.tensor([3])}
    merged = merge_state_dicts(state, {"w": torch.zeros(2, 2), "step": torch.tensor([9])}, "linear", 0.25)
    torch.testing.assert_close(merged["w"], torch.full((2, 2), 0.75))
    assert merged["step"].item() == 3  # integer tensors are kept, not interpolated
    with pytest.raises(ValueError, match="target_model"):
        merge_state_dicts(state, {"w": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="shape"):
        merge_state_dicts(state, {"w": torch.ones(3, 2), "step": torch.tensor([1])})
    with pytest.raises(ValueError, match="method"):
        merge_state_dicts(state, state, method="ties")


@pytest.mark.parametrize("kwargs, match", [
    ({"merge_at": "sometimes"}, "merge_at"), ({"method": "dare"}, "method"), ({"weight": 1.5}, "weight"),
    ({"every_n_checkpoints": 0}, "every_n_checkpoints"), ({"target_model": 3}, "target_model"),
])
def test_callback_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MergeModelCallback(str(tmp_path), **kwargs)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_lora_merged_at_the_end_matches_the_peft_model(tmp_path):
    module = SFTModule("tiny-llama", learning_rate=5e-2, peft_config=LORA)
    callback = MergeModelCallback(str(tmp_path / "merged"))
    quiet_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback]).fit(module, sft_data())

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    input_ids = torch.randint(0, module.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_logits = _logits(module.model, input_ids)
    with module.model.disable_adapter():
        base_logits = _logits(module.model, input_ids)
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the adapters do change the outputs
    torch.testing.assert_close(_logits(merged, input_ids), peft_logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_weight_merge_with_a_target_model(tmp_path, method):
    target = load_model("tiny-llama")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in target.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    target_dir = tmp_path / "target"
    target.save_pretrained(target_dir)

    module = SFTModule("tiny-llama", learning_rate=5e-2, peft_config=LORA)
    callback = MergeModelCallback(str(tmp_path / "out"), method=method, target_model=str(target_dir), weight=0.3)
    quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(module, sft_data())

    trained = copy.deepcopy(module.model).merge_and_unload().state_dict()
    target_state = target.state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert set(merged) == set(trained)
    for name, value in merged.items():
        a, b = trained[name], target_state[name]
        if method == "linear":
            expected = 0.7 * a.double() + 0.3 * b.double()
        else:
            expected = slerp_float64(a, b, 0.3)
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=2e-5, msg=name)


def test_merge_at_every_second_checkpoint(tmp_path):
    module = SFTModule("tiny-llama")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, save_last=True)
    callback = MergeModelCallback(str(tmp_path / "merged"), merge_at="every_checkpoint", every_n_checkpoints=2)
    trainer = quiet_trainer(max_steps=6, limit_val_batches=0, enable_checkpointing=True,
                            callbacks=[callback, checkpoints])
    trainer.fit(module, sft_data(batch_size=4))

    # Checkpoints at steps 2, 4 and 6 (plus "last" at the same steps, which does not count twice).
    written = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert written == ["checkpoint-4"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "checkpoint-4").state_dict()
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)["state_dict"]
    for name, value in reloaded.items():
        torch.testing.assert_close(value, saved[f"model.{name}"], rtol=0, atol=0, msg=name)
    final = module.model.get_parameter("model.embed_tokens.weight").detach()
    assert not torch.equal(reloaded["model.embed_tokens.weight"], final)  # step 4's weights, not the last ones
