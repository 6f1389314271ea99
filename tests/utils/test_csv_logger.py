"""``RunCSVLogger``: a run resumed into the same directory keeps one metrics.csv, each step once."""

from __future__ import annotations

import csv

import pytest
from helpers import quiet_trainer, sample_rows
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_llm import SFTDataModule, SFTModule
from lightning_llm.utils.csv_logger import RunCSVLogger


def fit(tmp_path, steps, ckpt_path=None):
    module = SFTModule("tiny-llama", learning_rate=1e-2)
    data = SFTDataModule(sample_rows("messages", 24), batch_size=4, max_length=96)
    trainer = quiet_trainer(max_steps=steps, default_root_dir=tmp_path, log_every_n_steps=1,
                            logger=RunCSVLogger(save_dir=tmp_path, name="", version=""),
                            callbacks=[ModelCheckpoint(every_n_train_steps=3, save_top_k=-1)],
                            enable_checkpointing=True)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return [row for row in csv.DictReader((tmp_path / "metrics.csv").open()) if row.get("loss")]


@pytest.mark.slow
def test_a_resumed_run_keeps_the_earlier_rows_once(tmp_path):
    first = fit(tmp_path, steps=8)
    assert [int(r["step"]) for r in first] == list(range(8))
    resumed = fit(tmp_path, steps=11, ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=6.ckpt"))
    assert [int(r["step"]) for r in resumed] == list(range(11))
    assert resumed[:6] == first[:6]  # the rows before the resumed step are the first run's
