"""Data on several processes (DDP, gloo, CPU), for ``test_distributed_data.py``; each rank writes ``OUT.rank<r>.json``.

    python _ddp_data_script.py precompute OUT --devices 2 --cache DIR
        DPO with precompute_ref_log_probs: the rows each rank tokenized and scored, and the reference log-probs it
        ends up with.
    python _ddp_data_script.py stream OUT --devices 2 --rows 30 [--bad 17]
        one epoch of SFT on a stream of numbered text rows: the rows of every batch each rank trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from lightning import Callback, Trainer

from lightning_llm import DPOModule, PreferenceDataModule, SFTDataModule, SFTModule


def trainer(devices: int, **kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, **kwargs)


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class CountingDPO(DPOModule):
    """Counts the pairs it scores for the data module's reference precompute."""

    scored = 0

    def _score_reference(self, batch):
        CountingDPO.scored += batch.num_pairs
        return super()._score_reference(batch)


class CountingPreferenceData(PreferenceDataModule):
    """Counts the rows this process tokenizes (a process that loads the prepared cache tokenizes none)."""

    encoded = 0

    def _encode_rows(self, batch, indices, *args, **kwargs):
        CountingPreferenceData.encoded += len(indices)
        return super()._encode_rows(batch, indices, *args, **kwargs)


def precompute(out: str, devices: int, cache: str) -> None:
    module = CountingDPO("tiny-llama", precompute_ref_log_probs=True, precompute_ref_batch_size=4)
    data = CountingPreferenceData("sample:preference", batch_size=4, max_length=64, cache_dir=cache)
    run = trainer(devices, max_steps=1)
    run.fit(module, data)
    dataset = data.train_dataset
    with open(f"{out}.rank{run.global_rank}.json", "w") as handle:
        json.dump({"rank": run.global_rank, "scored": CountingDPO.scored, "rows": len(dataset),
                   "encoded": CountingPreferenceData.encoded,
                   "chosen": dataset["ref_chosen_logps"][:], "rejected": dataset["ref_rejected_logps"][:]}, handle)


class SeenRows(Callback):
    """The row numbers of every training batch (each row's text starts with its number)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        tok = pl_module.tokenizer
        rows = []
        for ids, mask in zip(batch.input_ids, batch.attention_mask.bool()):
            rows.append(int(tok.decode(ids[mask]).split(":")[0]))
        self.batches.append(rows)


def stream(out: str, devices: int, rows: int, bad: int | None) -> None:
    import datasets

    def generate():
        for i in range(rows):
            yield {"text": 5 if i == bad else f"{i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}."}

    source = datasets.IterableDataset.from_generator(generate)
    module = SFTModule("tiny-llama", scheduler=constant)
    data = SFTDataModule(source, batch_size=2, shuffle=False, max_length=64)
    seen = SeenRows()
    run = trainer(devices, max_epochs=1, callbacks=[seen])
    run.fit(module, data)
    with open(f"{out}.rank{run.global_rank}.json", "w") as handle:
        json.dump({"rank": run.global_rank, "batches": seen.batches, "steps": run.global_step}, handle)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["precompute", "stream"])
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--cache")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--bad", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mode == "precompute":
        precompute(args.out, args.devices, args.cache)
    else:
        stream(args.out, args.devices, args.rows, args.bad)
    sys.exit(0)
