"""Two-process CPU DDP run for ``test_sync_ref_model.py``: ``python ddp_sync_ref_script.py OUT_DIR``.

Each rank trains a tiny policy with a frozen reference, TR-DPO-synced every 2 steps, and saves (per rank) the final
reference and the policy after every step; it also logs completions of three prompts through the ranks' split.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from callback_helpers import PolicySnapshots, RefSFTModule, float64_state, sft_data  # noqa: E402
from lightning import Trainer, seed_everything  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from lightning_llm.callbacks import LogCompletionsCallback, SyncRefModelCallback  # noqa: E402

PROMPTS = ["The sky is", [{"role": "user", "content": "Name a colour."}], "One, two,"]


def main(out_dir: Path) -> None:
    seed_everything(0)
    torch.set_num_threads(1)
    module = RefSFTModule("tiny-llama", learning_rate=1e-2)
    snapshots = PolicySnapshots()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        logger=CSVLogger(out_dir, name="logs", version=0),
        callbacks=[
            snapshots,
            SyncRefModelCallback(sync_steps=2, alpha=0.5),
            LogCompletionsCallback(prompts=PROMPTS, every_n_steps=4, max_new_tokens=4, batch_size=1, console=False),
        ],
    )
    trainer.fit(module, sft_data(batch_size=4))
    torch.save({"ref": float64_state(module.ref_model), "policy": snapshots.by_step},
               out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
