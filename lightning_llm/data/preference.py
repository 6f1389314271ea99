"""``PreferenceDataModule``: ``prompt``/``chosen``/``rejected`` pairs for Reward, DPO, ORPO and CPO.

A row may give its prompt explicitly or leave it implicit in ``chosen`` and ``rejected`` (their longest shared
prefix is then the prompt). Texts are strings or conversations. Standard completions get EOS appended, as in TRL;
conversational ones end with the template's end-of-turn token. An optional numeric ``margin`` column is carried to
reward models.

Batches (:class:`~lightning_llm.data.batches.PairBatch`) put the chosen sequences first and the rejected ones after
them (rows ``i`` and ``B + i`` are one pair), so the policy scores both in one forward, padded ``[2B, T]`` or
padding-free (one row of all ``2B`` sequences; see :func:`~lightning_llm.data.collate.collate_completions`).
Precomputed reference log-probs (``ref_chosen_logps``/``ref_rejected_logps``, ``[B]``) and ``margin`` ride along.
"""

from __future__ import annotations

from typing import Any, Sequence

from lightning_llm.data.base import LLMDataModule, RowNotes
from lightning_llm.data.batches import PairBatch
from lightning_llm.data.chat import common_prefix_length, sequence_ids
from lightning_llm.data.collate import collate_completions, float_column
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


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[Any, Any, Any, list | None]]) -> list[dict[str, list]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of each ``(prompt, chosen, rejected, tools)``, tokenized in
    one call: the completions start where the tokenized prompt and both tokenized prompt+completion sequences stop
    agreeing (TRL's convention), so ``prompt_ids + chosen_ids`` is exactly the tokenized prompt+chosen."""
    items = []
    for prompt, chosen, rejected, tools in pairs:
        if isinstance(prompt, str):
            items += [(prompt, False, None), (prompt + chosen, False, None), (prompt + rejected, False, None)]
        else:
            items += [(prompt, True, tools), (list(prompt) + list(chosen), False, tools),
                      (list(prompt) + list(rejected), False, tools)]
    ids = sequence_ids(tokenizer, items)
    out = []
    for k in range(len(pairs)):
        prompt_ids, chosen_full, rejected_full = ids[3 * k: 3 * k + 3]
        start = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
        out.append({"prompt_ids": prompt_ids[:start], "chosen_ids": chosen_full[start:],
                    "rejected_ids": rejected_full[start:]})
    return out


def tokenize_pair(tokenizer, prompt: Any, chosen: Any, rejected: Any, tools: list | None = None) -> dict[str, list]:
    """:func:`tokenize_pairs` of one pair."""
    return tokenize_pairs(tokenizer, [(prompt, chosen, rejected, tools)])[0]


def present_columns(dataset: Any, columns: Sequence[str]) -> set[str]:
    """Which of ``columns`` some row of ``dataset`` gives a value for (a stream: its first row)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        first = next(iter(dataset), {})
        return {column for column in columns if first.get(column) is not None}
    table = dataset.with_format("arrow")
    return {column for column in columns
            if column in dataset.column_names and table[column].null_count < len(dataset)}


class PreferenceDataModule(LLMDataModule):
    """Preference pairs, tokenized as prompt / chosen / rejected, batched chosen-first.

    Sequences longer than ``max_length`` are cut (``truncation_mode``) at batching time, like TRL; with
    ``keep_start``, a pair whose prompt alone fills ``max_length`` keeps no completion token and is dropped (counted
    and logged). ``on_overflow="drop"`` drops every pair with a sequence over ``max_length`` instead (what TRL's
    ``RewardTrainer`` does), and ``on_overflow="error"`` raises naming the row.

    Args:
        padding_free: batch all sequences into one row with restarting ``position_ids`` (no padding, no wasted
            compute; attention stays within each sequence).
        **kwargs: see :class:`~lightning_llm.data.base.LLMDataModule` (train_data, val_data, batch_size,
            max_length, ...).
    """

    accepted_kinds = ("preference",)
    #: columns that, once some rows of a split give them, every row of that split must give
    all_or_none_columns: tuple[str, ...] = ("prompt", "margin")

    def __init__(self, train_data: Any = None, val_data: Any = None, *, padding_free: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(train_data, val_data, **kwargs)
        self.padding_free = padding_free
        self._present: dict[str, set[str]] = {}

    def example_features(self, columns: Sequence[str], fmt: DataFormat) -> dict[str, Any]:
        import datasets

        ids = datasets.Sequence(datasets.Value("int32"))
        features = {"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids}
        if "margin" in columns:
            features["margin"] = datasets.Value("float64")
        return features

    def preprocess(self, dataset: Any, name: str) -> Any:
        self._present[name] = present_columns(dataset, self.all_or_none_columns)
        return dataset

    def encode(self, row: dict, fmt: DataFormat, index: int, report: RowNotes) -> dict | None:
        return self.encode_batch([row], fmt, [index], [report])[0]

    def encode_batch(self, rows: list[dict], fmt: DataFormat, indices: list[int], notes: list[RowNotes]
                     ) -> list[dict | None]:
        tok = self.tokenizer
        pairs = []
        for row, index, report in zip(rows, indices, notes):
            name = report.split
            for column in sorted(self._present.get(name, ())):
                # A row without the prompt (or margin) its neighbours have is an error, not another format: left
                # alone, a missing prompt would be re-derived as the implicit shared prefix, and a missing margin
                # would break (or silently drop the margins of) whatever batch it lands in.
                if row.get(column) is None:
                    raise ValueError(f"{name}: row {index}, column {column!r}: missing value (other rows give one; "
                                     f"give every row a {column}, or none)")
            prompt, chosen, rejected = pair_parts(row, name, index)
            if not fmt.conversational:
                chosen = chosen if chosen.endswith(tok.eos_token) else chosen + tok.eos_token
                rejected = rejected if rejected.endswith(tok.eos_token) else rejected + tok.eos_token
            pairs.append((prompt, chosen, rejected, row.get("tools")))
        out: list[dict | None] = []
        for row, index, report, example in zip(rows, indices, notes, tokenize_pairs(tok, pairs)):
            name = report.split
            for column in ("chosen", "rejected"):
                if not example[f"{column}_ids"]:
                    raise ValueError(f"{name}: row {index}, column {column!r}: the completion has no token of its own")
            if row.get("margin") is not None:
                example["margin"] = float(row["margin"])
            prompt_len = len(example["prompt_ids"])
            longest = prompt_len + max(len(example["chosen_ids"]), len(example["rejected_ids"]))
            fits = self.fits(longest, name, index, "chosen'/'rejected", report, prompt_length=prompt_len)
            out.append(example if fits else None)
        return out

    def collate(self, examples: list[dict]) -> PairBatch:
        ids, masks = [], []
        for column in ("chosen_ids", "rejected_ids"):  # chosen rows first, then rejected: cut to max_length
            for ex in examples:
                ids.append(self.cut(ex["prompt_ids"] + ex[column]))
                masks.append(self.cut([0] * len(ex["prompt_ids"]) + [1] * len(ex[column])))
        sequences = collate_completions(ids, masks, self.tokenizer.pad_token_id, padding_free=self.padding_free,
                                        multiple_of=self.pad_to_multiple_of)
        return PairBatch(
            sequences=sequences, margin=float_column(examples, "margin"),
            ref_chosen_logps=float_column(examples, "ref_chosen_logps"),
            ref_rejected_logps=float_column(examples, "ref_rejected_logps"),
        )
