"""``UnpairedPreferenceDataModule``: ``prompt``/``completion``/``label`` rows for KTO and BCO.

Paired preference data is unpaired on the fly: every chosen completion becomes a desirable row and every rejected
one an undesirable row (all chosen rows first, then all rejected rows, as TRL's ``unpair_preference_dataset``).

For the KL reference point of KTO each example also gets a *mismatched* completion: within consecutive blocks of
``batch_size`` examples (in dataset order) the completions are rotated by one, ``(x_1, y_n), (x_2, y_1), ...,
(x_n, y_{n-1})`` — TRL's construction, so that with ``shuffle=False`` the mismatched completions of a batch are the
batch's own completions. The pairing is fixed at preparation time, which is what lets reference log-probs of the
mismatched pairs be precomputed.

Batches: :class:`~lightning_llm.data.batches.UnpairedBatch` (padded sequences, ``label``; with KL pairs the
mismatched sequences; precomputed ``ref_logps``/``ref_kl_logps`` ``[B]``).
"""

from __future__ import annotations

from typing import Any, Sequence

from lightning_llm.data.base import LLMDataModule, RowNotes
from lightning_llm.data.batches import UnpairedBatch
from lightning_llm.data.chat import common_prefix_length, sequence_ids
from lightning_llm.data.collate import collate_completions, float_column
from lightning_llm.data.formats import DataFormat, detect_format, validate_row
from lightning_llm.data.preference import pair_parts

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def unpair_rows(rows: list[dict], name: str = "data") -> list[dict]:
    """Preference rows -> unpaired rows: all chosen completions (label True), then all rejected ones (False).

    A pair that leaves nothing to learn from (identical, or a completion empty once the implicit prompt is taken out)
    raises ``ValueError`` naming the preference row and column, not the unpaired row it would have become."""
    sides = [_unpaired_side(rows, list(range(len(rows))), name, side) for side in ("chosen", "rejected")]
    return [row for side in sides for row in side]


def _unpaired_side(rows: list[dict], indices: list[int], name: str, side: str) -> list[dict]:
    out = []
    for index, row in zip(indices, rows):
        extra = {k: v for k, v in row.items() if k not in PAIR_COLUMNS}
        prompt, chosen, rejected = pair_parts(row, name, index)
        completion = chosen if side == "chosen" else rejected
        out.append({"prompt": prompt, "completion": completion, "label": side == "chosen", **extra})
    return out


def _unpair_batch(batch: dict[str, list], indices: list[int], name: str, side: str, fmt: DataFormat) -> dict:
    """Batched ``map`` function: one side of each preference row as an unpaired row (validated as a pair first)."""
    from lightning_llm.data.base import plain_row

    columns = list(batch)
    rows = [plain_row({column: batch[column][i] for column in columns}) for i in range(len(indices))]
    if side == "chosen":
        for row, index in zip(rows, indices):
            validate_row(row, fmt, name, index)
    unpaired = _unpaired_side(rows, indices, name, side)
    return {key: [row.get(key) for row in unpaired] for key in ("prompt", "completion", "label")}


class UnpairedPreferenceDataModule(LLMDataModule):
    """Unpaired preference data (desirable / undesirable completions), with mismatched pairs for KTO's KL term.

    Args:
        kl_pairs: add the mismatched (prompt, completion) pairs used to estimate KTO's KL reference point.
        **kwargs: see :class:`~lightning_llm.data.base.LLMDataModule` (train_data, val_data, batch_size,
            max_length, ...).
    """

    accepted_kinds = ("unpaired_preference", "preference")

    def __init__(self, train_data: Any = None, val_data: Any = None, *, kl_pairs: bool = True, **kwargs: Any) -> None:
        super().__init__(train_data, val_data, **kwargs)
        self.kl_pairs = kl_pairs

    def example_features(self, columns: Sequence[str], fmt: DataFormat) -> dict[str, Any]:
        import datasets

        ids = datasets.Sequence(datasets.Value("int32"))
        return {"prompt_ids": ids, "completion_ids": ids, "label": datasets.Value("bool")}

    def preprocess(self, dataset: Any, name: str) -> Any:
        import datasets

        columns = dataset.column_names or []
        if not ("chosen" in columns and "rejected" in columns):
            return dataset
        if isinstance(dataset, datasets.IterableDataset):
            raise ValueError(f"{name}: paired preference data is unpaired by putting every chosen completion before "
                             "every rejected one, which a stream cannot do; stream unpaired rows (prompt, completion, "
                             "label) instead")
        from lightning_llm.data.base import plain_row

        fmt = detect_format(columns, plain_row(dataset[0]))
        drop = [column for column in PAIR_COLUMNS if column in columns]
        sides = [
            self.cached_map(dataset, _unpair_batch, step=f"unpair-{side}", batched=True, with_indices=True,
                            remove_columns=drop, fn_kwargs={"name": name, "side": side, "fmt": fmt},
                            num_proc=self.num_proc, desc=f"Unpairing {name}")
            for side in ("chosen", "rejected")
        ]
        return datasets.concatenate_datasets(sides)

    def encode(self, row: dict, fmt: DataFormat, index: int, report: RowNotes) -> dict | None:
        return self.encode_batch([row], fmt, [index], [report])[0]

    def encode_batch(self, rows: list[dict], fmt: DataFormat, indices: list[int], notes: list[RowNotes]
                     ) -> list[dict | None]:
        tok = self.tokenizer
        items = []
        for row in rows:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str):
                if not completion.endswith(tok.eos_token):
                    completion = completion + tok.eos_token
                items += [(prompt, False, None), (prompt + completion, False, None)]
            else:
                items += [(prompt, True, row.get("tools")), (list(prompt) + list(completion), False, row.get("tools"))]
        ids = sequence_ids(tok, items)
        out: list[dict | None] = []
        for k, (row, index, report) in enumerate(zip(rows, indices, notes)):
            prompt_ids, full = ids[2 * k], ids[2 * k + 1]
            start = common_prefix_length(prompt_ids, full)
            if start == len(full):
                raise ValueError(f"{report.split}: row {index}, column 'completion': the completion has no token of "
                                 "its own")
            if not self.fits(len(full), report.split, index, "completion", report, prompt_length=start):
                out.append(None)
                continue
            out.append({"prompt_ids": prompt_ids[:start], "completion_ids": full[start:], "label": bool(row["label"])})
        return out

    def preparation_settings(self) -> dict[str, Any]:
        return {**super().preparation_settings(), "kl_pairs": self.kl_pairs}

    def finalize_block(self, examples: list[dict], name: str) -> list[dict]:
        """Each example of a block gets the completion of the example before it (the first gets the last's)."""
        if not self.kl_pairs:
            return examples
        rotated = [examples[-1]["completion_ids"]] + [ex["completion_ids"] for ex in examples[:-1]]
        return [{**ex, "kl_completion_ids": kl} for ex, kl in zip(examples, rotated)]

    def finalize(self, dataset: Any, name: str) -> Any:
        if not self.kl_pairs:
            return dataset
        size = self.batch_size if name == "train_data" else self.val_batch_size

        def rotate(batch: dict[str, list]) -> dict[str, list]:
            completions = batch["completion_ids"]
            return {"kl_completion_ids": [completions[-1]] + completions[:-1]}

        return self.cached_map(dataset, rotate, step="kl-pairs", settings=size, batched=True, batch_size=size,
                               desc=f"Pairing {name}")

    def label_counts(self) -> tuple[int, int] | None:
        """``(desirable, undesirable)`` training examples, or ``None`` for a stream (not known in advance)."""
        import pyarrow.compute as pc

        from lightning_llm.data.base import is_stream

        if self.train_dataset is None or is_stream(self.train_dataset):
            return None
        desirable = int(pc.sum(self.train_dataset.with_format("arrow")["label"]).as_py() or 0)
        return desirable, len(self.train_dataset) - desirable

    def prompt_sample(self, per_class: int) -> tuple[list[str], list[bool]]:
        """Decoded prompts of up to ``per_class`` training examples of each class (desirable first), drawn with the
        data module's seed, and their labels: what BCO's UDM fits its prompt classifier on."""
        import numpy as np
        import torch

        from lightning_llm.data.base import is_stream

        if self.train_dataset is None or is_stream(self.train_dataset):
            raise ValueError("a prompt sample needs a prepared map-style training set (not a stream)")
        labels = np.asarray(self.train_dataset.with_format("arrow")["label"].to_numpy(zero_copy_only=False))
        generator = torch.Generator().manual_seed(self.seed)
        picked: list[int] = []
        for wanted in (True, False):
            pool = np.flatnonzero(labels == wanted)
            if not len(pool):
                raise ValueError("UDM needs desirable and undesirable training examples (embedding_func is set)")
            order = torch.randperm(len(pool), generator=generator)[:per_class].tolist()
            picked += [int(pool[i]) for i in order]
        examples = self.train_dataset.__getitems__(picked)
        return [self.tokenizer.decode(ex["prompt_ids"]) for ex in examples], [bool(ex["label"]) for ex in examples]

    def _sequences(self, prompts: list[list[int]], completions: list[list[int]]):
        ids = [self.cut(p + c) for p, c in zip(prompts, completions)]
        masks = [self.cut([0] * len(p) + [1] * len(c)) for p, c in zip(prompts, completions)]
        return collate_completions(ids, masks, self.tokenizer.pad_token_id, multiple_of=self.pad_to_multiple_of)

    def collate(self, examples: list[dict]) -> UnpairedBatch:
        import torch

        prompts = [ex["prompt_ids"] for ex in examples]
        kl = None
        if examples[0].get("kl_completion_ids") is not None:
            kl = self._sequences(prompts, [ex["kl_completion_ids"] for ex in examples])
        return UnpairedBatch(
            sequences=self._sequences(prompts, [ex["completion_ids"] for ex in examples]),
            label=torch.tensor([ex["label"] for ex in examples], dtype=torch.bool),
            kl_sequences=kl, ref_logps=float_column(examples, "ref_logps"),
            ref_kl_logps=float_column(examples, "ref_kl_logps"),
        )
