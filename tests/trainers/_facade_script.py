"""One TRL-style training run, for ``test_runs.py``: an SFT script as a TRL user writes it, run as a child process.

    python _facade_script.py OUT [--kill-at STEP] [--resume] [--batch-size N] [--rows N] [--dropout P]

(also under torchrun)

Trains the tiny preset with ``SFTTrainer`` for 6 steps, a checkpoint every 2; ``--kill-at`` SIGKILLs the process when
step STEP starts, ``--resume`` continues from ``OUT/last.ckpt``. Rank 0 writes ``OUT/history.json`` (the log history)
at the end; the final model goes to ``OUT/final``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from lightning import Callback

from lightning_llm.trainers import BEMACallback, SFTConfig, SFTTrainer


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--dropout", type=float, default=0.2)
    options = parser.parse_args()
    from lightning_llm.data.sources import load_rows

    rows = load_rows("sample:messages")[: options.rows]
    args = SFTConfig(output_dir=options.out, max_steps=6, save_steps=2, logging_steps=1, learning_rate=5e-3,
                     per_device_train_batch_size=options.batch_size, max_length=96, use_cpu=True, disable_tqdm=True,
                     gradient_checkpointing=False, lr_scheduler_type="cosine", warmup_steps=2,
                     model_init_kwargs={"attention_dropout": options.dropout})
    callbacks = [BEMACallback(update_freq=1, ema_power=0.5)]
    if options.kill_at:
        callbacks.append(KillAt(options.kill_at))
    trainer = SFTTrainer("tiny-llama", args=args, train_dataset=rows, callbacks=callbacks)
    output = trainer.train(resume_from_checkpoint=True if options.resume else None)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(options.out, "history.json"), "w") as handle:
            json.dump({"log_history": trainer.state.log_history, "global_step": output.global_step,
                       "training_loss": output.training_loss}, handle)


if __name__ == "__main__":
    main()
