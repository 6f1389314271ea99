"""PRMModule: the loss against the token classifier's own loss (what TRL's PRMTrainer computes; TRL 1.16 has none), the
step-level token normalisation under gradient accumulation, learning on the sample data, logged metrics, model
checks, LoRA, and the YAML configs."""

from __future__ import annotations

import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import as_dict
from transformers import AutoModelForTokenClassification

from lightning_llm.data.base import LLMDataModule
from lightning_llm.data.sources import load_rows
from lightning_llm.data.stepwise import StepwiseDataModule
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.modules.base import LLMModule
from lightning_llm.modules.prm import PRMModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "prm"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return load_rows("sample:stepwise")


def token_classifier(num_labels: int = 2):
    return tiny_model("tiny-llama", task="token_classification", num_labels=num_labels)


def batch_of(rows, tokenizer, **kwargs):
    dm = StepwiseDataModule(rows, tokenizer=tokenizer, **kwargs)
    dm.setup("fit")
    return dm.collate(dm.train_dataset.to_list())


def trainer(**kwargs) -> L.Trainer:
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
              **kwargs}
    return L.Trainer(**kwargs)


def test_loss_and_accuracy_are_the_token_classifiers(tok, rows):
    """PRMTrainer's loss is the transformers token classifier's own loss (``model(..., labels=...).loss``)."""
    module = PRMModule(token_classifier(), tokenizer=tok, average_tokens_across_steps=False)
    module.configure_model()
    batch = batch_of(rows[:6], tok)
    reference = token_classifier()
    reference.train()
    for mod in reference.modules():  # PRM training runs without dropout, as TRL's does by default
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    out = reference(**as_dict(batch))
    loss = module.training_step(batch, 0)
    assert loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    labelled = batch.labels != -100
    correct = (out.logits.argmax(-1) == batch.labels) & labelled
    metrics = module.flush_metrics("train")
    assert metrics["loss"] == pytest.approx(out.loss.item(), abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(correct.sum().item() / labelled.sum().item())
    assert metrics["num_tokens"] == batch.attention_mask.sum().item()


def test_gradient_accumulation_averages_over_the_steps_labelled_tokens(tok, rows):
    """Two micro-batches of 2 rows give the gradient of one batch of 4: the loss summed over the step's labelled
    tokens divided by their count (transformers' num_items_in_batch), not the mean of two micro-batch means."""
    rows = [rows[0], dict(rows[1], completions=rows[1]["completions"][:1], labels=rows[1]["labels"][:1])] + rows[2:4]
    module = PRMModule(
        token_classifier(), tokenizer=tok, optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
    )
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    data = StepwiseDataModule(rows, tokenizer=tok, batch_size=2, shuffle=False)
    trainer(max_steps=1, accumulate_grad_batches=2).fit(module, data)

    reference = token_classifier()
    for mod in reference.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    batch = batch_of(rows, tok)
    reference(**as_dict(batch)).loss.backward()  # mean over the labelled tokens of all four rows
    for name, param in reference.named_parameters():
        step = before[name] - module.model.get_parameter(name).detach()
        torch.testing.assert_close(step, param.grad, atol=1e-6, rtol=1e-4, msg=name)


class LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["loss"]))


@pytest.mark.slow
def test_learns_and_logs_trl_metrics(rows):
    """45 steps on 16 sample rows (22 epochs; the loss plateaus for a while, at a number of steps that depends on
    the shuffle): the training loss falls, and so does the loss on those rows."""
    module = PRMModule("tiny-llama", learning_rate=3e-3)
    subset = rows[:16]
    data = StepwiseDataModule(subset, val_data=subset, batch_size=8, val_batch_size=10)  # uneven val batches
    history = LossHistory()
    fit = trainer(max_steps=45, log_every_n_steps=1, num_sanity_val_steps=0, callbacks=[history])
    before = fit.validate(module, data, verbose=False)[0]
    fit.fit(module, data)
    assert {"loss", "accuracy", "num_tokens", "learning_rate"} <= set(fit.logged_metrics)
    after = fit.validate(module, data, verbose=False)[0]
    assert len(history.losses) == 45
    assert sum(history.losses[-5:]) / 5 < sum(history.losses[:5]) / 5 - 0.1
    assert after["val/loss"] < before["val/loss"] - 0.08

    # val/accuracy is token-weighted over the whole validation set (TRL's compute_accuracy), not a mean of batches
    module.eval()
    correct = labelled = 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = module.step_logits(batch)
            mask = batch.labels != -100
            correct += ((logits.argmax(-1) == batch.labels) & mask).sum().item()
            labelled += mask.sum().item()
    assert after["val/accuracy"] == pytest.approx(correct / labelled)


def test_model_checks_and_dropout(tok):
    with pytest.raises(ValueError, match="needs a token-classification model"):
        PRMModule(tiny_model("tiny-llama"), tokenizer=tok).configure_model()
    with pytest.raises(ValueError, match="num_labels=2 .* got num_labels=3"):
        PRMModule(token_classifier(3), tokenizer=tok).configure_model()
    built = PRMModule("tiny-qwen2")
    built.configure_model()
    assert type(built.model).__name__ == "Qwen2ForTokenClassification" and built.model.config.num_labels == 2
    assert all(m.p == 0.0 for m in built.model.modules() if isinstance(m, torch.nn.Dropout))
    kept = PRMModule("tiny-llama", disable_dropout=False)
    kept.configure_model()
    assert kept.model.dropout.p == pytest.approx(0.1)  # transformers' default classifier dropout, left on


def test_lora_trains_adapters_and_the_head_only(tok, rows):
    module = PRMModule("tiny-llama", peft_config={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                       learning_rate=1e-2)
    module.configure_model()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer(max_steps=2).fit(module, StepwiseDataModule(rows[:8], batch_size=4))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, start[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)


# ---------------------------------------------------------------------------------------------------- configs
def test_tiny_config_instantiates_and_trains(tmp_path):
    from lightning_llm.cli import LLMCLI

    cli = LLMCLI(
        run=False,
        args=["--config", str(CONFIGS / "tiny.yaml"), "--trainer.max_steps=2", "--trainer.val_check_interval=2",
              "--trainer.logger=false", "--trainer.enable_checkpointing=false",
              f"--trainer.default_root_dir={tmp_path}", f"--model.export_dir={tmp_path / 'hf'}"],
    )
    assert isinstance(cli.model, PRMModule) and isinstance(cli.datamodule, StepwiseDataModule)
    assert cli.model.learning_rate == 3e-3 and cli.datamodule.step_separator == "\n"
    cli.trainer.fit(cli.model, cli.datamodule)
    assert "val/accuracy" in cli.trainer.callback_metrics
    exported = AutoModelForTokenClassification.from_pretrained(tmp_path / "hf")
    assert exported.config.num_labels == 2


def test_real_model_config_names_real_arguments():
    """The hub config cannot be instantiated offline; its keys must still be arguments of the classes it names."""
    config = yaml.safe_load((CONFIGS / "qwen2.5-0.5b.yaml").read_text())
    assert config["model"]["class_path"] == "lightning_llm.PRMModule"
    assert config["data"]["class_path"] == "lightning_llm.StepwiseDataModule"
    accepted = {
        "model": set(inspect.signature(PRMModule).parameters) | set(inspect.signature(LLMModule).parameters),
        "data": set(inspect.signature(StepwiseDataModule).parameters)
        | set(inspect.signature(LLMDataModule).parameters),
    }
    for section, names in accepted.items():
        assert set(config[section]["init_args"]) <= names, section
    assert set(config["trainer"]) <= set(inspect.signature(L.Trainer).parameters)
