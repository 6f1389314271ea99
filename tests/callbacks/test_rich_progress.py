from __future__ import annotations

import io

import pytest
import rich
import torch
from callback_helpers import sft_data
from helpers import quiet_trainer

from lightning_llm import RichProgressCallback, SFTModule
from lightning_llm.callbacks.rich_progress import format_value, group_metrics, scalar_metrics


def test_group_metrics_by_prefix():
    grouped = group_metrics({"loss": 1.0, "rewards/chosen": 2.0, "rewards/rejected": 3.0, "val/rewards/chosen": 4.0,
                             "logps/chosen": 5.0})
    assert grouped == {"": {"loss": 1.0}, "logps": {"chosen": 5.0},
                       "rewards": {"chosen": 2.0, "rejected": 3.0}, "val": {"rewards/chosen": 4.0}}
    assert list(grouped) == ["", "logps", "rewards", "val"]


def test_scalar_metrics_and_formatting():
    values = scalar_metrics({"a": torch.tensor(1.5), "b": 2, "c": torch.ones(3), "d": "text", "e": True})
    assert values == {"a": 1.5, "b": 2.0}
    assert format_value(3.0, ".4g") == "3" and format_value(0.123456, ".4g") == "0.1235"
    assert format_value(float("nan"), ".3f") == "nan"
    with pytest.raises(ValueError, match="float_format"):
        RichProgressCallback(float_format="%d")


class PreferenceLikeSFT(SFTModule):
    """Also logs grouped metrics, as the preference modules do."""

    def training_step(self, batch, batch_idx):
        self.log("rewards/chosen", 1.25)
        self.log("rewards/margins", 0.5)
        self.log("logps/rejected", -42.0)
        return super().training_step(batch, batch_idx)


def test_fit_renders_grouped_metrics_without_a_terminal():
    buffer = io.StringIO()
    callback = RichProgressCallback(console_kwargs={"file": buffer, "width": 160, "force_terminal": False})
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, enable_progress_bar=True,
                            callbacks=[callback])
    try:
        trainer.fit(PreferenceLikeSFT("tiny-llama"), sft_data())
    finally:
        rich.reconfigure()  # RichProgressBar reconfigures rich's global console; give others a default one back

    output = buffer.getvalue()
    for title in ("rewards/", "logps/", "val/"):
        assert title in output, title
    for row in ("chosen", "margins", "rejected", "mean_token_accuracy", "learning_rate", "num_tokens"):
        assert row in output, row
    assert "1.25" in output and "-42" in output
    assert f"{trainer.callback_metrics['val/loss'].item():.4g}" in output
    assert "step 3" in output
    assert callback.metrics["rewards/chosen"] == pytest.approx(1.25)
