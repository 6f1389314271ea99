"""``StepwiseDataModule``: stepwise-supervision datasets for process reward models (TRL's ``PRMTrainer`` data).

A row holds a ``prompt`` string, ``completions`` (the reasoning steps, a list of strings) and ``labels`` (one bool per
step: is the step correct). Tokenization follows TRL's ``PRMTrainer.tokenize_row`` token for token:

- the prompt and every step are tokenized on their own, without special tokens;
- the tokens of ``step_separator`` are appended to every step (the last one included), and the step's label (1 or 0)
  sits on the last token of ``step + separator``; every other token carries ``-100``;
- the tokenizer's BOS token, when it has one, is put in front of the prompt;
- ``max_prompt_length`` keeps the prompt's last tokens, ``max_completion_length`` the completion's first ones, and
  ``max_length`` cuts the whole sequence (by default at the end, as TRL does).
"""

from __future__ import annotations

from typing import Any, Sequence

from lightning_llm.data.base import LLMDataModule, RowNotes
from lightning_llm.data.batches import IGNORE_INDEX, StepBatch
from lightning_llm.data.collate import pad_sequences
from lightning_llm.data.formats import DataFormat


class StepwiseDataModule(LLMDataModule):
    """Stepwise-supervision data (``prompt``, ``completions``, ``labels``) for :class:`~lightning_llm.PRMModule`.

    Each example becomes ``input_ids`` and ``labels`` (1 = correct step, 0 = incorrect, ``-100`` on every token but
    the last one of each step), batched right-padded with an ``attention_mask``. Defaults follow TRL's
    ``PRMConfig``.

    Args:
        step_separator: text appended to every step; the step's label goes on its last token. With ``""`` the label
            goes on the step's own last token.
        max_prompt_length: keep at most this many prompt tokens (BOS included), cutting from the start (the end of the
            prompt is kept); ``None`` for no limit (TRL's ``PRMConfig`` before it was moved to ``trl.experimental``
            defaulted to 512).
        max_completion_length: keep at most this many completion tokens (all steps with their separators), cutting
            from the end; ``None`` for no limit.
        train_on_last_step_only: label only the last step of each training example (earlier steps get ``-100``);
            validation examples keep every label, as in TRL.
        drop_unlabelled: drop examples left with no labelled token after truncation (counted in the preparation
            report and logged): they cost compute and teach nothing. ``False`` keeps them, as TRL does.
        **kwargs: see :class:`~lightning_llm.data.base.LLMDataModule` (train_data, val_data, batch_size, max_length,
            truncation_mode, on_overflow, ...). ``max_length`` defaults to 1024 and cuts the end of an example, as
            in TRL.
    """

    accepted_kinds = ("stepwise_supervision",)

    def __init__(
        self,
        train_data: Any = None,
        val_data: Any = None,
        *,
        step_separator: str = "\n",
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        train_on_last_step_only: bool = False,
        drop_unlabelled: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_data, val_data, **kwargs)
        if not isinstance(step_separator, str):
            raise ValueError(f"step_separator must be a string, got {type(step_separator).__name__}")
        for name, value in (("max_prompt_length", max_prompt_length),
                            ("max_completion_length", max_completion_length)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        self.step_separator = step_separator
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length
        self.train_on_last_step_only = train_on_last_step_only
        self.drop_unlabelled = drop_unlabelled

    def preparation_settings(self) -> dict[str, Any]:
        return {**super().preparation_settings(), "step_separator": self.step_separator,
                "max_prompt_length": self.max_prompt_length, "max_completion_length": self.max_completion_length,
                "train_on_last_step_only": self.train_on_last_step_only, "drop_unlabelled": self.drop_unlabelled}

    def example_features(self, columns: Sequence[str], fmt: DataFormat) -> dict[str, Any]:
        import datasets

        ids = datasets.Sequence(datasets.Value("int32"))
        return {"input_ids": ids, "labels": ids}

    def step_labels(self, labels: list[bool], split: str) -> list[int]:
        """Class of each step (1 correct, 0 incorrect), ``-100`` for steps not trained on in ``split``."""
        if self.train_on_last_step_only and split == "train_data":
            return [IGNORE_INDEX] * (len(labels) - 1) + [int(labels[-1])]
        return [int(label) for label in labels]

    def encode(self, row: dict, fmt: DataFormat, index: int, report: RowNotes) -> dict | None:
        tok = self.tokenizer
        name = report.split
        # One tokenizer call per row: the prompt and each step are still encoded independently, as in TRL.
        prompt_ids, *steps_ids = tok([row["prompt"], *row["completions"]], add_special_tokens=False)["input_ids"]
        separator_ids = tok.encode(self.step_separator, add_special_tokens=False)
        completion_ids: list[int] = []
        completion_labels: list[int] = []
        for step, (step_ids, label) in enumerate(zip(steps_ids, self.step_labels(row["labels"], name))):
            step_ids = step_ids + separator_ids
            if not step_ids:
                raise ValueError(
                    f"{name}: row {index}, column 'completions', step {step}: the step and the separator "
                    f"{self.step_separator!r} tokenize to no token, so the step's label has nowhere to go"
                )
            completion_ids += step_ids
            completion_labels += [IGNORE_INDEX] * (len(step_ids) - 1) + [label]
        if tok.bos_token_id is not None:
            prompt_ids = [tok.bos_token_id] + prompt_ids
        if self.max_prompt_length is not None:
            prompt_ids = prompt_ids[-self.max_prompt_length:]
        if self.max_completion_length is not None:
            completion_ids = completion_ids[: self.max_completion_length]
            completion_labels = completion_labels[: self.max_completion_length]
        ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_labels
        if not self.fits(len(ids), name, index, "completions", report):
            return None
        ids, labels = self.cut(ids), self.cut(labels)
        if self.drop_unlabelled and all(label == IGNORE_INDEX for label in labels):
            report.drop("no labelled step left after truncation", index)
            return None
        return {"input_ids": ids, "labels": labels}

    def collate(self, examples: list[dict]) -> StepBatch:
        multiple_of = self.pad_to_multiple_of
        return StepBatch(
            input_ids=pad_sequences([ex["input_ids"] for ex in examples], self.tokenizer.pad_token_id,
                                    multiple_of=multiple_of),
            attention_mask=pad_sequences([[1] * len(ex["input_ids"]) for ex in examples], 0, multiple_of=multiple_of),
            labels=pad_sequences([ex["labels"] for ex in examples], IGNORE_INDEX, multiple_of=multiple_of),
        )
