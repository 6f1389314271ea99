"""``SFTDataModule``: language-modelling (``text`` / ``messages`` / ShareGPT) and prompt-completion datasets."""

from __future__ import annotations

from typing import Any, Sequence

from lightning_llm.data.base import LLMDataModule, RowNotes
from lightning_llm.data.batches import IGNORE_INDEX, LMBatch
from lightning_llm.data.chat import text_ids, tokenize_conversation, tokenize_prompt_completion
from lightning_llm.data.collate import collate_lm, pack_table
from lightning_llm.data.formats import DataFormat, sharegpt_to_messages

PACKING_STRATEGIES = ("bfd",)


class SFTDataModule(LLMDataModule):
    """Supervised fine-tuning data: each example becomes ``input_ids`` and ``labels`` (``-100`` where no loss),
    batched as :class:`~lightning_llm.data.batches.LMBatch`.

    Conversations go through the tokenizer's chat template; ``text`` rows are used as they are with EOS appended;
    prompt-completion rows get EOS appended to the completion (standard) or the template's end-of-turn
    (conversational). Defaults follow TRL's ``SFTConfig``.

    Args:
        assistant_only_loss: train only on assistant turns (masks from the template's ``{% generation %}`` markers,
            or derived by rendering when it has none; the end-of-turn token is always trained).
        completion_only_loss: for prompt-completion data, train only on the completion (``None`` = on, as in TRL).
        packing: pack examples into rows of ``max_length`` tokens (best fit decreasing, sequences never split);
            packed rows are batched padding-free. Not available for streams (use ``padding_free``).
        packing_strategy: ``bfd`` (best fit decreasing).
        padding_free: batch without padding: all sequences of a batch in one row with restarting ``position_ids``.
        dataset_text_field: column holding plain text for language modelling.
        **kwargs: see :class:`~lightning_llm.data.base.LLMDataModule` (train_data, val_data, batch_size,
            max_length, ...).
    """

    accepted_kinds = ("language_modeling", "prompt_completion")

    def __init__(
        self,
        train_data: Any = None,
        val_data: Any = None,
        *,
        assistant_only_loss: bool = False,
        completion_only_loss: bool | None = None,
        packing: bool = False,
        packing_strategy: str = "bfd",
        padding_free: bool = False,
        dataset_text_field: str = "text",
        **kwargs: Any,
    ) -> None:
        super().__init__(train_data, val_data, **kwargs)
        if packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy must be one of {PACKING_STRATEGIES}, got {packing_strategy!r}")
        if packing and self.max_length is None:
            raise ValueError("packing needs max_length (the packed row length)")
        if packing and self.streaming:
            raise ValueError("packing needs the whole dataset and cannot run on a stream (streaming=True); use "
                             "padding_free=True instead")
        self.assistant_only_loss = assistant_only_loss
        self.completion_only_loss = completion_only_loss
        self.packing = packing
        self.packing_strategy = packing_strategy
        self.padding_free = padding_free or packing
        self.dataset_text_field = dataset_text_field

    def preparation_settings(self) -> dict[str, Any]:
        return {**super().preparation_settings(), "assistant_only_loss": self.assistant_only_loss,
                "completion_only_loss": self.completion_only_loss, "packing": self.packing,
                "dataset_text_field": self.dataset_text_field}

    def example_features(self, columns: Sequence[str], fmt: DataFormat) -> dict[str, Any]:
        import datasets

        ids = datasets.Sequence(datasets.Value("int32"))
        return {"input_ids": ids, "labels": ids}

    def _check_rows(self, rows: list[dict], name: str) -> None:
        field = self.dataset_text_field
        if field != "text" and rows and field in rows[0] and "text" not in rows[0]:
            rows = [{("text" if key == field else key): value for key, value in row.items()} for row in rows]
        super()._check_rows(rows, name)

    def preprocess(self, dataset: Any, name: str) -> Any:
        field = self.dataset_text_field
        columns = dataset.column_names or []
        if field != "text" and field in columns and "text" not in columns:
            # Format detection and validation know plain-text rows by their ``text`` column.
            dataset = dataset.rename_column(field, "text")
        return dataset

    def encode(self, row: dict, fmt: DataFormat, index: int, report: RowNotes) -> dict | None:
        tok = self.tokenizer
        name = report.split
        masks: list[list[int]] = []
        if fmt.kind == "prompt_completion":
            column = "completion"
            completion = row["completion"]
            if isinstance(completion, str) and not completion.endswith(tok.eos_token):
                completion = completion + tok.eos_token
            try:
                ids, completion_mask, assistant_mask = tokenize_prompt_completion(
                    tok, row["prompt"], completion, with_assistant_mask=self.assistant_only_loss and fmt.conversational,
                    tools=row.get("tools"),
                )
            except ValueError as err:
                raise ValueError(f"{name}: row {index}, column 'completion': {err}") from err
            if self.completion_only_loss is not False:
                masks.append(completion_mask)
            if assistant_mask is not None:
                masks.append(assistant_mask)
        elif "messages" in row or "conversations" in row:
            column = "messages" if "messages" in row else "conversations"
            messages = row["messages"] if column == "messages" else sharegpt_to_messages(row[column], name, index)
            try:
                ids, assistant_mask = tokenize_conversation(
                    tok, messages, with_assistant_mask=self.assistant_only_loss, tools=row.get("tools")
                )
            except ValueError as err:
                raise ValueError(f"{name}: row {index}, column {column!r}: {err}") from err
            if assistant_mask is not None:
                masks.append(assistant_mask)
        else:
            column = "text"
            text = row[column]
            if not text.endswith(tok.eos_token):
                text = text + tok.eos_token
            ids = text_ids(tok, text)
        if not self.fits(len(ids), name, index, column, report):
            return None
        if self.packing:
            # Packing keeps each sequence whole, so an overlong one is cut to the row length (TRL's "bfd").
            ids, masks = ids[: self.max_length], [m[: self.max_length] for m in masks]
        else:
            ids, masks = self.cut(ids), [self.cut(m) for m in masks]
        labels = [t if all(m[i] for m in masks) else IGNORE_INDEX for i, t in enumerate(ids)]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            report.drop("no trainable token left after truncation", index)
            return None
        return {"input_ids": ids, "labels": labels}

    def finalize(self, dataset: Any, name: str) -> Any:
        if not self.packing:
            return dataset
        capacity = self.max_length
        packed = self.cached_map(
            dataset.with_format("arrow"), lambda table: pack_table(table, capacity), step="pack", settings=capacity,
            batched=True, batch_size=None, remove_columns=dataset.column_names, desc=f"Packing {name}",
        )
        return packed.with_format(None)

    def collate(self, examples: list[dict]) -> LMBatch:
        return collate_lm(
            examples, self.tokenizer.pad_token_id, padding_free=self.padding_free, multiple_of=self.pad_to_multiple_of
        )
