"""SFTModule: training on the tiny model, nll/dft against hand-computed values, gradient-accumulation and DDP
equivalence, validation metrics, and parity with TRL 1.16's SFTTrainer."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from helpers import IGNORE, StepMetrics, constant_lr, quiet_trainer, sample_rows, sgd

from lightning_llm.data.sft import SFTDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.sft import SFTModule


def reference_token_logps(model, examples):
    """Float64 per-token log-probs of each example's labels (the model alone on each unpadded sequence), and
    whether each target is the argmax, and the entropies; lists over examples of 1-D tensors."""
    ref = copy.deepcopy(model).double().eval()
    logps, top1, entropy = [], [], []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            target = torch.tensor(ex["labels"])[1:]
            keep = target != IGNORE
            logp_all = torch.log_softmax(ref(input_ids=ids, use_cache=False).logits[0, :-1], dim=-1)[keep]
            logps.append(logp_all.gather(-1, target[keep].unsqueeze(-1)).squeeze(-1))
            top1.append(logp_all.argmax(-1) == target[keep])
            entropy.append(-(logp_all.exp() * logp_all).sum(-1))
    return logps, top1, entropy


def prepared_examples(rows, **kwargs):
    dm = SFTDataModule(rows, tokenizer=tiny_tokenizer(), shuffle=False, **kwargs)
    dm.setup("fit")
    return list(dm.train_dataset)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_trains_and_first_loss_is_the_hand_value(loss_type):
    rows = sample_rows("messages", 64)
    module = SFTModule("tiny-llama", loss_type=loss_type, learning_rate=3e-3, warmup_steps=2)
    data = SFTDataModule(rows, batch_size=8, shuffle=False, max_length=128)
    metrics = StepMetrics()
    quiet_trainer(max_steps=30, callbacks=[metrics]).fit(module, data)
    assert len(metrics.steps) == 30
    assert {"loss", "entropy", "mean_token_accuracy", "num_tokens", "learning_rate"} <= set(metrics.steps[0])

    # step 1 is logged from the initial weights: check it against float64 sums over the first 8 rows
    first = prepared_examples(rows[:8], max_length=128)
    logps, top1, entropy = reference_token_logps(tiny_model("tiny-llama"), first)
    logp = torch.cat(logps)
    per_token = -logp if loss_type == "nll" else -logp.exp() * logp
    assert metrics.steps[0]["loss"] == pytest.approx(per_token.mean().item(), abs=1e-5, rel=1e-5)
    assert metrics.steps[0]["entropy"] == pytest.approx(torch.cat(entropy).mean().item(), rel=1e-5)
    assert metrics.steps[0]["mean_token_accuracy"] == pytest.approx(torch.cat(top1).double().mean().item())
    assert metrics.steps[0]["num_tokens"] == sum(len(e["input_ids"]) for e in first)
    assert metrics.steps[1]["num_tokens"] > metrics.steps[0]["num_tokens"]
    # linear warm-up over 2 steps, then cosine over the remaining 28
    lrs = metrics.series("learning_rate")
    assert lrs[:3] == pytest.approx([1.5e-3, 3e-3, 3e-3], rel=1e-6)
    assert lrs[16] == pytest.approx(3e-3 * 0.5 * (1 + math.cos(math.pi * 14 / 28)), rel=1e-5)

    # the model learned: the NLL of held-out rows fell well below its initial value (for dft too)
    held_out = prepared_examples(rows[-8:], max_length=128)
    before = -torch.cat(reference_token_logps(tiny_model("tiny-llama"), held_out)[0]).mean().item()
    after = -torch.cat(reference_token_logps(module.model, held_out)[0]).mean().item()
    assert before > 6.0 and after < before - 2.0, (before, after)
    if loss_type == "nll":
        losses = metrics.series("loss")
        assert sum(losses[-5:]) / 5 < losses[0] - 2.0


def test_validation_metrics_are_the_float64_means():
    rows = sample_rows("messages", 20)
    module = SFTModule("tiny-llama", learning_rate=1e-2)
    data = SFTDataModule(rows[:12], val_data=rows[12:], batch_size=4, val_batch_size=3, shuffle=False)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1.0)
    trainer.fit(module, data)
    (out,) = trainer.validate(module, data, verbose=False)
    val = prepared_examples(rows[12:])
    logps, top1, entropy = reference_token_logps(module.model, val)
    assert out["val/loss"] == pytest.approx(-torch.cat(logps).mean().item(), rel=1e-5)
    assert out["val/entropy"] == pytest.approx(torch.cat(entropy).mean().item(), rel=1e-5)
    assert out["val/mean_token_accuracy"] == pytest.approx(torch.cat(top1).double().mean().item())


# ----------------------------------------------------------------------------------------- gradient accumulation
ACCUMULATION_LR = 0.5


def one_step_update(batch_size, accumulate, rows, **module_kwargs):
    module = SFTModule("tiny-llama", optimizer=sgd(ACCUMULATION_LR), scheduler=constant_lr, **module_kwargs)
    data = SFTDataModule(rows, batch_size=batch_size, shuffle=False)
    quiet_trainer(max_steps=1, accumulate_grad_batches=accumulate).fit(module, data)
    start = tiny_model("tiny-llama")
    return torch.cat([(p.detach() - q).flatten() for p, q in zip(module.model.parameters(), start.parameters())])


class GradCapture(L.Callback):
    """The parameter gradients of the first optimizer step, as one flat float64 vector."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not hasattr(self, "grads"):
            self.grads = torch.cat([p.grad.double().flatten() for p in pl_module.model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss_type, impl", [("nll", "chunked"), ("dft", "chunked"), ("nll", "triton"), ("dft", "eager")]
)
def test_fused_loss_gives_the_unfused_gradients(loss_type, impl):
    # The gradient computed in the forward (linear_token_loss) equals autograd through linear_logprobs; the
    # fused path is the default on CPU, so both ways are forced explicitly
    if impl == "triton":
        pytest.importorskip("triton")
    rows = sample_rows("messages", 8)
    grads = {}
    for fuse in (True, False):
        module = SFTModule("tiny-llama", loss_type=loss_type, logprob_impl=impl, fuse_loss=fuse)
        capture = GradCapture()
        quiet_trainer(max_steps=1, callbacks=[capture]).fit(module, SFTDataModule(rows, batch_size=8, shuffle=False))
        grads[fuse] = capture.grads
    assert grads[False].abs().max() > 0
    assert (grads[True] - grads[False]).abs().max() <= 1e-5 * grads[False].abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("fuse_loss", [False, True])
def test_triton_fused_gemm_tiles_give_the_chunked_gradients(fuse_loss):
    # logprob_tiles reaches the Triton path from the module (here under the interpreter): same gradients
    pytest.importorskip("triton")
    rows = sample_rows("messages", 4)
    grads = {}
    for impl, tiles in (("triton", {"fused_gemm": True, "vocab_chunk": 256}), ("chunked", None)):
        module = SFTModule("tiny-llama", logprob_impl=impl, logprob_tiles=tiles, fuse_loss=fuse_loss)
        capture = GradCapture()
        quiet_trainer(max_steps=1, callbacks=[capture]).fit(module, SFTDataModule(rows, batch_size=4, shuffle=False))
        grads[impl] = capture.grads
    assert (grads["triton"] - grads["chunked"]).abs().max() <= 1e-5 * grads["chunked"].abs().max()


def test_bad_logprob_tiles_are_named():
    with pytest.raises(ValueError, match="logprob_tiles"):
        SFTModule("tiny-llama", logprob_tiles={"fused": True})
    with pytest.raises(ValueError, match="logprob_tiles\\['logits_dtype'\\]"):
        SFTModule("tiny-llama", logprob_tiles={"logits_dtype": "int8"})


def test_gradient_accumulation_is_token_normalised_over_the_step():
    rows = sample_rows("messages", 8)
    examples = prepared_examples(rows)
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 2  # rows of different lengths, so per-micro-batch means would weigh them differently

    # the hand reference: one SGD step on (sum of every loss token's NLL) / (number of loss tokens), in float64
    reference = tiny_model("tiny-llama").double()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        target = torch.tensor(ex["labels"])[1:]
        logp = torch.log_softmax(reference(input_ids=ids, use_cache=False).logits[0, :-1], -1)
        total = total - logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[target != IGNORE].sum()
        count += int((target != IGNORE).sum())
    (total / count).backward()
    expected = torch.cat([-ACCUMULATION_LR * p.grad.flatten() for p in reference.parameters()]).float()
    scale = expected.abs().max().item()

    for batch_size, accumulate in [(8, 1), (1, 8), (4, 2)]:
        update = one_step_update(batch_size, accumulate, rows)
        torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-5 * scale,
                                   msg=f"batch {batch_size} x accumulation {accumulate}")

    # the per-micro-batch mean (average_tokens_across_steps=False) is a different update ...
    per_micro = one_step_update(1, 8, rows, average_tokens_across_steps=False)
    assert (per_micro - expected).abs().max().item() > 1e-2 * scale
    # ... except with a single micro-batch, where the two agree
    single = one_step_update(8, 1, rows, average_tokens_across_steps=False)
    torch.testing.assert_close(single, expected, rtol=1e-4, atol=1e-5 * scale)


# --------------------------------------------------------------------------------------------------------- DDP
# ---------------------------------------------------------------------------------------------- TRL parity
@pytest.mark.parametrize("sample", ["messages", "prompt_completion", "prompt_completion_conversational"])
def test_parity_with_trl_sft_trainer(sample, tmp_path):
    """TRL 1.16 SFTTrainer and SFTModule, same tiny model, tokenizer, 8 rows (one batch = all of them, so the order
    does not matter), AdamW at a constant LR with gradient clipping at 1.0: the same loss, entropy and accuracy at
    each of 3 steps (step 1 is the initial model, steps 2-3 check the optimizer too)."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    rows = sample_rows(sample, 8)
    steps, lr = 3, 1e-2

    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=steps, learning_rate=lr,
        lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no",
        bf16=False, use_cpu=True, gradient_checkpointing=False, disable_tqdm=True, max_length=1024,
        assistant_only_loss=False, loss_type="nll",
    )
    trainer = trl.SFTTrainer(model=tiny_model("tiny-llama"), args=args, processing_class=tiny_tokenizer(),
                             train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    trl_steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(trl_steps) == steps

    module = SFTModule("tiny-llama", learning_rate=lr, scheduler=constant_lr)
    data = SFTDataModule(rows, batch_size=8, shuffle=False, max_length=1024)
    metrics = StepMetrics()
    quiet_trainer(max_steps=steps, gradient_clip_val=1.0, callbacks=[metrics]).fit(module, data)

    for k, (ours, theirs) in enumerate(zip(metrics.steps, trl_steps)):
        assert ours["num_tokens"] == theirs["num_tokens"], k
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-4), k
        assert ours["entropy"] == pytest.approx(theirs["entropy"], abs=1e-4), k
        assert ours["mean_token_accuracy"] == pytest.approx(theirs["mean_token_accuracy"], abs=1e-6), k
    assert metrics.steps[-1]["loss"] < metrics.steps[0]["loss"]
