"""``UnpairedPreferenceDataModule``: ``prompt``/``completion``/``label`` rows for KTO and BCO.

Paired preference data is unpaired on the fly: every chosen completion becomes a desirable row and every rejected
one an undesirable row (all chosen rows first, then all rejected rows, as TRL's ``unpair_preference_dataset``).

For the KL reference point of KTO each example also gets a *mismatched* completion: within consecutive blocks of
``batch_size`` examples (in dataset order) the completions are rotated by one, ``(x_1, y_n), (x_2, y_1), ...,
(x_n, y_{n-1})`` — TRL's construction, so that with ``shuffle=False`` the mismatched completions of a batch are the
batch's own completions. The pairing is fixed at preparation time, which is what lets reference log-probs of the
mismatched pairs be precomputed.

Batches: ``input_ids``, ``attention_mask``, ``completion_mask`` ``[B, T]``, ``label`` ``[B]`` (bool); with KL pairs,
``kl_input_ids``, ``kl_attention_mask``, ``kl_completion_mask``; precomputed ``ref_logps``/``ref_kl_logps`` ``[B]``.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_llm.data.base import LLMDataModule, PreparationReport
from lightning_llm.data.chat import common_prefix_length, render_ids, text_ids
from lightning_llm.data.collate import pad_sequences
from lightning_llm.data.formats import DataFormat
from lightning_llm.data.preference import pair_parts


def unpair_rows(rows: list[dict], name: str = "data") -> list[dict]:
    """Preference rows -> unpaired rows: all chosen completions (label True), then all rejected ones (False).

    A pair that leaves nothing to learn from (identical, or a completion empty once the implicit prompt is taken out)
    raises ``ValueError`` naming the preference row and column, not the unpaired row it would have become."""
    desirable, undesirable = [], []
    for index, row in enumerate(rows):
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        prompt, chosen, rejected = pair_parts(row, name, index)
        desirable.append({"prompt": prompt, "completion": chosen, "label": True, **extra})
        undesirable.append({"prompt": prompt, "completion": rejected, "label": False, **extra})
    return desirable + undesirable


class UnpairedPreferenceDataModule(LLMDataModule):
    """Unpaired preference data (desirable / undesirable completions), with mismatched pairs for KTO's KL term.

    Args:
        kl_pairs: add the mismatched (prompt, completion) pairs used to estimate KTO's KL reference point.
        **kwargs: see :class:`~lightning_llm.data.base.LLMDataModule` (train_data, val_data, batch_size, max_length, ...).
    """

    accepted_kinds = ("unpaired_preference", "preference")

    def __init__(self, train_data: Any = None, val_data: Any = None, *, kl_pairs: bool = True, **kwargs: Any) -> None:
        super().__init__(train_data, val_data, **kwargs)
        self.kl_pairs = kl_pairs

    def prepare(self, rows: list[dict], name: str) -> list[dict]:
        if rows and "chosen" in rows[0] and "rejected" in rows[0]:
            from lightning_llm.data.formats import detect_format, validate_rows

            columns = set().union(*(row.keys() for row in rows[:100]))
            validate_rows(rows, detect_format(columns, rows[0]), name)
            rows = unpair_rows(rows, name)
        return super().prepare(rows, name)

    def encode(self, row: dict, fmt: DataFormat, index: int, report: PreparationReport) -> dict | None:
        tok = self.tokenizer
        name = report.split
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            if not completion.endswith(tok.eos_token):
                completion = completion + tok.eos_token
            prompt_ids = text_ids(tok, prompt)
            full = text_ids(tok, prompt + completion)
        else:
            prompt_ids = render_ids(tok, prompt, add_generation_prompt=True, tools=row.get("tools"))
            full = render_ids(tok, list(prompt) + list(completion), tools=row.get("tools"))
        start = common_prefix_length(prompt_ids, full)
        if start == len(full):
            raise ValueError(f"{name}: row {index}, column 'completion': the completion has no token of its own")
        example = {"prompt_ids": prompt_ids[:start], "completion_ids": full[start:], "label": bool(row["label"])}
        if self.max_length is not None and len(full) > self.max_length:
            if self.on_overflow == "error":
                raise ValueError(f"{name}: row {index}, column 'completion': {len(full)} tokens do not fit "
                                 f"max_length={self.max_length}")
            if self.on_overflow == "drop":
                report.drop("longer than max_length", index)
                return None
            if self.truncation_mode == "keep_start" and start >= self.max_length:
                report.drop("prompt alone fills max_length", index)
                return None
        return example

    def finalize(self, examples: list[dict], split: str) -> list[dict]:
        if self.kl_pairs:
            size = self.batch_size if split == "train_data" else self.val_batch_size
            for start in range(0, len(examples), size):
                block = examples[start: start + size]
                rotated = [block[-1]["completion_ids"]] + [ex["completion_ids"] for ex in block[:-1]]
                for ex, kl_completion in zip(block, rotated):
                    ex["kl_completion_ids"] = kl_completion
        return examples

    def _padded(self, prompts: list[list[int]], completions: list[list[int]], prefix: str) -> dict[str, torch.Tensor]:
        ids = [p + c for p, c in zip(prompts, completions)]
        masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
        if self.max_length is not None:
            cut = slice(None, self.max_length) if self.truncation_mode == "keep_start" \
                else slice(-self.max_length, None)
            ids, masks = [s[cut] for s in ids], [m[cut] for m in masks]
        multiple = self.pad_to_multiple_of
        return {
            f"{prefix}input_ids": pad_sequences(ids, self.tokenizer.pad_token_id, multiple_of=multiple),
            f"{prefix}attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, multiple_of=multiple),
            f"{prefix}completion_mask": pad_sequences(masks, 0, multiple_of=multiple),
        }

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        prompts = [ex["prompt_ids"] for ex in examples]
        batch = self._padded(prompts, [ex["completion_ids"] for ex in examples], "")
        batch["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.bool)
        if "kl_completion_ids" in examples[0]:
            batch.update(self._padded(prompts, [ex["kl_completion_ids"] for ex in examples], "kl_"))
        for key in ("ref_logps", "ref_kl_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        return batch
