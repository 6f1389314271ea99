"""A short SFT run whose per-step logged metrics are written to JSON; used by ``test_sft.py`` to compare a 2-process
DDP run (gloo, CPU) with a 1-process run of the same global batch.

    python _ddp_sft_script.py OUT.json --devices 2 --batch-size 4 --steps 3
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
    # one intra-op thread per process keeps two ranks from fighting over the CI's two cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from lightning import Callback, Trainer
from torch.utils.data import DataLoader, DistributedSampler

from lightning_llm.data.sft import SFTDataModule
from lightning_llm.modules.sft import SFTModule

METRICS = ("loss", "entropy", "mean_token_accuracy", "num_tokens")


class DumpMetrics(Callback):
    """Collects the logged metrics after every optimizer step; rank 0 writes them to ``path`` at the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step > len(self.steps):
            self.steps.append({k: float(trainer.callback_metrics[k]) for k in METRICS})

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            with open(self.path, "w") as handle:
                json.dump({"world_size": trainer.world_size, "steps": self.steps}, handle)


class InOrderSFTData(SFTDataModule):
    """Shards the rows in order across ranks (rank r takes rows r, r + W, ...), so one global batch of the W-rank run
    holds the same rows as the 1-rank run's batch. (Lightning's own DistributedSampler shuffles training data even
    when the loader does not.)"""

    def train_dataloader(self) -> DataLoader:
        if self.trainer.world_size == 1:
            return super().train_dataloader()
        sampler = DistributedSampler(self.train_dataset, num_replicas=self.trainer.world_size,
                                     rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)


def run(out: str, devices: int, batch_size: int, steps: int, rows: int = 24) -> None:
    module = SFTModule("tiny-llama", learning_rate=1e-2, optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
                       scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0))
    data = InOrderSFTData(_first_rows(rows), batch_size=batch_size, shuffle=False, max_length=128)
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[DumpMetrics(out)],
    )
    trainer.fit(module, data)


def _first_rows(n: int) -> list[dict]:
    from lightning_llm.data.sources import load_rows

    return load_rows("sample:messages")[:n]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.out, args.devices, args.batch_size, args.steps)
    sys.exit(0)
