"""``PreferenceDataModule``: ``prompt``/``chosen``/``rejected`` pairs for Reward, DPO, ORPO and CPO.

A row may give its prompt explicitly or leave it implicit in ``chosen`` and ``rejected`` (their longest shared
prefix is then the prompt). Texts are strings or conversations. Standard completions get EOS appended, as in TRL;
conversational ones end with the template's end-of-turn token. An optional numeric ``margin`` column is carried to
reward models.

Batches put the chosen sequences first and the rejected ones after them (rows ``i`` and ``B + i`` are one pair), so
the policy scores both in one forward:

* padded: ``input_ids``, ``attention_mask``, ``completion_mask`` of shape ``[2B, T]``;
* padding-free: one row ``[1, N]`` of all ``2B`` sequences back to back with ``position_ids`` restarting at each
  sequence and ``seq_index`` (the sequence each token belongs to); the completion mask is 0 on each sequence's
  first token, which no token of the same sequence predicts.

Precomputed reference log-probs (``ref_chosen_logps``/``ref_rejected_logps``, ``[B]``) and ``margin`` ride along.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_llm.data.base import LLMDataModule, PreparationReport
from lightning_llm.data.chat import common_prefix_length, render_ids, text_ids
from lightning_llm.data.collate import pad_sequences, position_ids_for
from lightning_llm.data.formats import DataFormat


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into ``(prompt, chosen, rejected)``: the longest shared prefix is the prompt.

    Conversations share whole messages; strings share characters, and a space right before the split goes with the
    completions. Raises ``ValueError`` when the two are identical (nothing to prefer).
    """
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are identical")
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def pair_parts(row: dict, name: str, index: int) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a preference row, the prompt split off when it is implicit.

    Raises ``ValueError`` naming the row and column when a completion is empty or the two are identical.
    """
    if row.get("prompt") is not None:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        try:
            prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
        except ValueError as err:
            raise ValueError(f"{name}: row {index}, column 'chosen': {err}") from err
    for column, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion:
            raise ValueError(f"{name}: row {index}, column {column!r}: the completion is empty")
    if chosen == rejected:
        raise ValueError(f"{name}: row {index}, column 'rejected': identical to 'chosen' (nothing to prefer)")
    return prompt, chosen, rejected


def tokenize_pair(tokenizer, prompt: Any, chosen: Any, rejected: Any, tools: list | None = None) -> dict[str, list]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids``: the completions start where the tokenized prompt and both
    tokenized prompt+completion sequences stop agreeing (TRL's convention), so ``prompt_ids + chosen_ids`` is exactly
    the tokenized prompt+chosen."""
    if isinstance(prompt, str):
        prompt_ids = text_ids(tokenizer, prompt)
        chosen_full = text_ids(tokenizer, prompt + chosen)
        rejected_full = text_ids(tokenizer, prompt + rejected)
    else:
        prompt_ids = render_ids(tokenizer, prompt, add_generation_prompt=True, tools=tools)
        chosen_full = render_ids(tokenizer, list(prompt) + list(chosen), tools=tools)
        rejected_full = render_ids(tokenizer, list(prompt) + list(rejected), tools=tools)
    start = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    return {"prompt_ids": prompt_ids[:start], "chosen_ids": chosen_full[start:], "rejected_ids": rejected_full[start:]}


class PreferenceDataModule(LLMDataModule):
    """Preference pairs, tokenized as prompt / chosen / rejected, batched chosen-first.

    Sequences longer than ``max_length`` are cut (``truncation_mode``) at batching time, like TRL; with
    ``keep_start``, a pair whose prompt alone fills ``max_length`` keeps no completion token and is dropped (counted
    and logged). ``on_overflow="drop"`` drops every pair with a sequence over ``max_length`` instead (what TRL's
    ``RewardTrainer`` does), and ``on_overflow="error"`` raises naming the row.

    Args:
        padding_free: batch all sequences into one row with restarting ``position_ids`` (no padding, no wasted
            compute; attention stays within each sequence).
        **kwargs: see :class:`~lightning_llm.data.base.LLMDataModule` (train_data, val_data, batch_size, max_length, ...).
    """

    accepted_kinds = ("preference",)

    def __init__(self, train_data: Any = None, val_data: Any = None, *, padding_free: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(train_data, val_data, **kwargs)
        self.padding_free = padding_free

    #: columns that, once some rows of a split give them, every row of that split must give
    all_or_none_columns: tuple[str, ...] = ("prompt", "margin")

    def prepare(self, rows: list[dict], name: str) -> list[dict]:
        # A row without the prompt (or margin) its neighbours have is an error, not another format: left alone, a
        # missing prompt would be re-derived as the implicit shared prefix, and a missing margin would break (or
        # silently drop the margins of) whatever batch it lands in.
        for column in self.all_or_none_columns:
            given = [isinstance(row, dict) and row.get(column) is not None for row in rows]
            if any(given) and not all(given):
                index = given.index(False)
                raise ValueError(f"{name}: row {index}, column {column!r}: missing value (other rows give one; give "
                                 f"every row a {column}, or none)")
        return super().prepare(rows, name)

    def encode(self, row: dict, fmt: DataFormat, index: int, report: PreparationReport) -> dict | None:
        tok = self.tokenizer
        name = report.split
        prompt, chosen, rejected = pair_parts(row, name, index)
        if not fmt.conversational:
            chosen = chosen if chosen.endswith(tok.eos_token) else chosen + tok.eos_token
            rejected = rejected if rejected.endswith(tok.eos_token) else rejected + tok.eos_token
        example = tokenize_pair(tok, prompt, chosen, rejected, tools=row.get("tools"))
        for column in ("chosen", "rejected"):
            if not example[f"{column}_ids"]:
                raise ValueError(f"{name}: row {index}, column {column!r}: the completion has no token of its own")
        if row.get("margin") is not None:
            example["margin"] = float(row["margin"])
        if self.max_length is not None:
            prompt_len = len(example["prompt_ids"])
            longest = prompt_len + max(len(example["chosen_ids"]), len(example["rejected_ids"]))
            if longest > self.max_length:
                if self.on_overflow == "error":
                    raise ValueError(
                        f"{name}: row {index}, column 'chosen'/'rejected': {longest} tokens (prompt {prompt_len}) do "
                        f"not fit max_length={self.max_length}"
                    )
                if self.on_overflow == "drop":
                    report.drop("longer than max_length", index)
                    return None
                if self.truncation_mode == "keep_start" and prompt_len >= self.max_length:
                    report.drop("prompt alone fills max_length", index)
                    return None
        return example

    def _sequences(self, examples: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
        """Chosen-then-rejected token sequences and completion masks, truncated to ``max_length``."""
        ids, masks = [], []
        for column in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                ids.append(ex["prompt_ids"] + ex[column])
                masks.append([0] * len(ex["prompt_ids"]) + [1] * len(ex[column]))
        if self.max_length is not None:
            cut = slice(None, self.max_length) if self.truncation_mode == "keep_start" \
                else slice(-self.max_length, None)
            ids, masks = [s[cut] for s in ids], [m[cut] for m in masks]
        return ids, masks

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        ids, masks = self._sequences(examples)
        pad_id = self.tokenizer.pad_token_id
        multiple = self.pad_to_multiple_of
        if self.padding_free:
            lengths = [len(s) for s in ids]
            positions = position_ids_for(lengths)
            flat_mask = [m if p > 0 else 0 for p, m in zip(positions, (x for mask in masks for x in mask))]
            batch = {
                "input_ids": pad_sequences([[t for s in ids for t in s]], pad_id, multiple_of=multiple),
                "position_ids": pad_sequences([positions], 0, multiple_of=multiple),
                "completion_mask": pad_sequences([flat_mask], 0, multiple_of=multiple),
                "seq_index": pad_sequences([[i for i, n in enumerate(lengths) for _ in range(n)]], -1,
                                           multiple_of=multiple),
            }
        else:
            batch = {
                "input_ids": pad_sequences(ids, pad_id, multiple_of=multiple),
                "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, multiple_of=multiple),
                "completion_mask": pad_sequences(masks, 0, multiple_of=multiple),
            }
        for key in ("margin", "ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        return batch
