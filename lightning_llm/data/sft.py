"""``SFTDataModule``: language-modelling (``text`` / ``messages`` / ShareGPT) and prompt-completion datasets."""

from __future__ import annotations

from typing import Any

from lightning_llm.data.base import LLMDataModule, PreparationReport
from lightning_llm.data.chat import text_ids, tokenize_conversation, tokenize_prompt_completion
from lightning_llm.data.collate import IGNORE_INDEX, collate_lm, pack_examples
from lightning_llm.data.formats import DataFormat, sharegpt_to_messages

PACKING_STRATEGIES = ("bfd",)


class SFTDataModule(LLMDataModule):
    """Supervised fine-tuning data: each example becomes ``input_ids`` and ``labels`` (``-100`` where no loss).

    Conversations go through the tokenizer's chat template; ``text`` rows are used as they are with EOS appended;
    prompt-completion rows get EOS appended to the completion (standard) or the template's end-of-turn
    (conversational). Defaults follow TRL's ``SFTConfig``.

    Args:
        assistant_only_loss: train only on assistant turns (masks from the template's ``{% generation %}`` markers,
            or derived by rendering when it has none; the end-of-turn token is always trained).
        completion_only_loss: for prompt-completion data, train only on the completion (``None`` = on, as in TRL).
        packing: pack examples into rows of ``max_length`` tokens (best fit decreasing, sequences never split);
            packed rows are batched padding-free.
        packing_strategy: ``bfd`` (best fit decreasing).
        padding_free: batch without padding: all sequences of a batch in one row with restarting ``position_ids``.
        dataset_text_field: column holding plain text for language modelling.
        **kwargs: see :class:`~lightning_llm.data.base.LLMDataModule` (train_data, val_data, batch_size, max_length, ...).
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
        self.assistant_only_loss = assistant_only_loss
        self.completion_only_loss = completion_only_loss
        self.packing = packing
        self.packing_strategy = packing_strategy
        self.padding_free = padding_free or packing
        self.dataset_text_field = dataset_text_field

    def encode(self, row: dict, fmt: DataFormat, index: int, report: PreparationReport) -> dict | None:
        tok = self.tokenizer
        name = report.split
        masks: list[list[int]] = []
        column = "text"
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
            column = self.dataset_text_field if self.dataset_text_field in row else "text"
            text = row[column]
            if not text.endswith(tok.eos_token):
                text = text + tok.eos_token
            ids = text_ids(tok, text)
        if self.packing:
            # Packing keeps each sequence whole, so an overlong one is cut to the row length first (TRL's "bfd").
            fitted = self.fit_length(ids, masks, name, index, column, report) if self.on_overflow != "truncate" \
                else (ids[: self.max_length], [m[: self.max_length] for m in masks])
        else:
            fitted = self.fit_length(ids, masks, name, index, column, report)
        if fitted is None:
            return None
        ids, masks = fitted
        labels = [t if all(m[i] for m in masks) else IGNORE_INDEX for i, t in enumerate(ids)]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            report.drop("no trainable token left after truncation", index)
            return None
        return {"input_ids": ids, "labels": labels}

    def prepare(self, rows: list[dict], name: str) -> list[dict]:
        field = self.dataset_text_field
        if field != "text" and rows and field in rows[0] and "text" not in rows[0]:
            # Format detection and validation know plain-text rows by their ``text`` column.
            rows = [{("text" if key == field else key): value for key, value in row.items()} for row in rows]
        return super().prepare(rows, name)

    def finalize(self, examples: list[dict], split: str) -> list[dict]:
        if self.packing:
            return pack_examples(examples, self.max_length)
        return examples

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        return collate_lm(
            examples, self.tokenizer.pad_token_id, padding_free=self.padding_free, multiple_of=self.pad_to_multiple_of
        )
