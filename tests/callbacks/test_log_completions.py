from __future__ import annotations

import csv

import pytest
from callback_helpers import sft_data
from helpers import quiet_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_llm import LogCompletionsCallback, SFTModule
from lightning_llm.callbacks.log_completions import log_to_logger, markdown_table

PROMPTS = ["The sky is", [{"role": "user", "content": "Name a colour."}]]


def _read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_csv_rows_every_n_steps_and_at_validation(tmp_path, capsys):
    module = SFTModule("tiny-llama", learning_rate=5e-2)
    every_two = LogCompletionsCallback(prompts=PROMPTS, every_n_steps=2, max_new_tokens=5)
    at_validation = LogCompletionsCallback(num_prompts=3, max_new_tokens=4, name="val_completions", console=False)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1, logger=logger,
                            callbacks=[every_two, at_validation])
    trainer.fit(module, sft_data())

    rows = _read_csv(tmp_path / "run" / "version_0" / "completions.csv")
    rendered = module.tokenizer.apply_chat_template(PROMPTS[1], tokenize=False, add_generation_prompt=True)
    assert [(r["step"], r["prompt"]) for r in rows] == [("2", "The sky is"), ("2", rendered),
                                                        ("4", "The sky is"), ("4", rendered)]
    assert [r["completion"] for r in rows] == [c for _, _, c in every_two.rows]
    # The last rows are the final policy's completions (greedy, same batch).
    assert [r["completion"] for r in rows[2:]] == module.generate(PROMPTS, max_new_tokens=5)
    assert [r["completion"] for r in rows[:2]] != [r["completion"] for r in rows[2:]]

    val_rows = _read_csv(tmp_path / "run" / "version_0" / "val_completions.csv")
    val_prompts = trainer.datamodule.prompts("val", limit=3)
    assert [r["step"] for r in val_rows] == ["4"] * 3
    assert [r["completion"] for r in val_rows] == module.generate(val_prompts, max_new_tokens=4)

    printed = capsys.readouterr().out
    assert "completions at step 2" in printed and "completions at step 4" in printed
    assert "val_completions" not in printed


class RecordingWandb(WandbLogger):
    """A WandbLogger stand-in (no wandb needed) that records log_table calls."""

    def __init__(self) -> None:
        self.tables: list[dict] = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None) -> None:
        self.tables.append(dict(key=key, columns=columns, data=data, step=step))


class FakeExperiment:
    def __init__(self) -> None:
        self.texts: list[tuple] = []

    def add_text(self, tag, text, global_step=None) -> None:
        self.texts.append((tag, text, global_step))


class RecordingTensorBoard(TensorBoardLogger):
    """A TensorBoardLogger stand-in (no tensorboard needed) whose experiment records add_text calls."""

    def __init__(self) -> None:
        self._fake = FakeExperiment()

    @property
    def experiment(self):
        return self._fake


def test_wandb_gets_the_whole_table_and_tensorboard_the_new_rows():
    first, second = [(1, "p", "a")], [(2, "p", "b|c\nd")]
    wandb, tensorboard = RecordingWandb(), RecordingTensorBoard()
    for logger in (wandb, tensorboard):
        assert log_to_logger(logger, "completions", first, first, 1)
        assert log_to_logger(logger, "completions", second, first + second, 2)
    assert wandb.tables[-1] == dict(key="completions", columns=["step", "prompt", "completion"],
                                    data=[[1, "p", "a"], [2, "p", "b|c\nd"]], step=2)
    tag, text, step = tensorboard.experiment.texts[-1]
    assert (tag, step) == ("completions", 2)
    assert text == markdown_table(second) == "| step | prompt | completion |\n|---|---|---|\n| 2 | p | b\\|c<br>d |"
    assert not log_to_logger(object(), "completions", first, first, 1)


def test_real_tensorboard_logger_receives_the_text(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callback = LogCompletionsCallback(prompts=["The sky is"], every_n_steps=1, max_new_tokens=3, console=False)
    quiet_trainer(max_steps=1, limit_val_batches=0, logger=logger, callbacks=[callback]).fit(
        SFTModule("tiny-llama"), sft_data())
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    tensors = events.Tensors("completions/text_summary")
    text = tensors[0].tensor_proto.string_val[0].decode()
    assert "The sky is" in text and callback.rows[0][2].replace("|", "\\|") in text


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        LogCompletionsCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="name"):
        LogCompletionsCallback(name="")
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        LogCompletionsCallback(prompts=["ok", 3])
    with pytest.raises(ValueError, match="top_p"):
        LogCompletionsCallback(top_p=0.0)
