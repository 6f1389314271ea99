"""Every sharding strategy on one device gives the plain run: SFT, DPO and PPO under FSDP1 (not PPO: it refuses
FSDP1), FSDP2 and DeepSpeed ZeRO 2/3.

    python benchmarks/strategy_check.py --out outputs/device/strategies.json   # a GPU; deepspeed for its cases
    python benchmarks/strategy_check.py --smoke                                # CPU rehearsal: what runs there

Each run (its own process) trains the tiny preset 3 SGD steps on the same 8-example batches and exports it (PPO: 3
rollouts of 8 fixed completions, one optimizer step each, the policy and the value model in one optimizer, so one
DeepSpeed engine); the results compare each strategy's per-step losses and exported weights with the single-device
run of the same algorithm (world size 1, so the sharding code paths run without a second device). A strategy whose
package is not installed, or which cannot run on this device, is reported as skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STRATEGIES = ("single", "fsdp1", "fsdp2", "deepspeed_stage_2", "deepspeed_stage_3")
ALGOS = ("sft", "dpo", "ppo")


def fixed_completions(prompt_ids: list[list[int]]) -> list[list[int]]:
    """Six tokens per prompt, none of them EOS, a function of the prompt (PPO's fixed rollouts)."""
    return [[(sum(ids) * 7 + 13 * j) % 700 + 3 for j in range(6)] for ids in prompt_ids]


def length_reward(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    return [(sum(ids) % 5) / 4 for ids in completion_ids]


def build_strategy(name: str) -> Any:
    if name == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(sharding_strategy="FULL_SHARD", state_dict_type="full", use_orig_params=True)
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    if name.startswith("deepspeed"):
        return name
    return "auto"


def run_one(algo: str, strategy: str, out: Path, accelerator: str) -> dict[str, Any]:
    """One training run in this process: per-step losses; the export under ``out``."""
    import torch
    from lightning import Callback, Trainer, seed_everything

    import lightning_llm as llm
    from lightning_llm.data.sources import load_rows

    seed_everything(0)

    class Losses(Callback):
        losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            Losses.losses.append(float(trainer.callback_metrics["loss"]))

    common = dict(optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
                  scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0),
                  export_dir=str(out / "hf"))
    if algo == "sft":
        module = llm.SFTModule("tiny-llama", **common)
        data = llm.SFTDataModule(load_rows("sample:messages")[:24], batch_size=8, shuffle=False, max_length=96)
    elif algo == "dpo":
        module = llm.DPOModule("tiny-llama", beta=0.5, **common)
        data = llm.PreferenceDataModule(load_rows("sample:preference")[:24], batch_size=8, shuffle=False,
                                        max_length=64)
    else:
        from lightning_llm.rollout import FixedRollouts

        module = llm.PPOModule("tiny-llama", reward_funcs=[length_reward], rollout=FixedRollouts(fixed_completions),
                               num_ppo_epochs=1, num_mini_batches=1, max_completion_length=6, **common)
        data = llm.PromptDataModule(load_rows("sample:prompt_only")[:24], batch_size=8, shuffle=False)
    trainer = Trainer(accelerator=accelerator, devices=1, strategy=build_strategy(strategy), max_steps=3,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, callbacks=[Losses()])
    trainer.fit(module, data)
    return {"losses": Losses.losses, "strategy_class": type(trainer.strategy).__name__}


def skip_reason(strategy: str, accelerator: str, algo: str = "sft") -> str | None:
    import importlib.util

    if algo == "ppo" and strategy == "fsdp1":
        return "PPOModule refuses FSDP1 (several backward passes per training step)"
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    if strategy.startswith("deepspeed") and accelerator != "gpu":
        return "DeepSpeed needs a GPU"
    if strategy == "fsdp1" and accelerator != "gpu":
        return "Lightning's FSDPStrategy needs a GPU"
    return None


def compare(reference: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Largest relative loss difference and largest weight difference against the single-device run."""
    from safetensors.torch import load_file

    ref_weights, weights = load_file(reference["export"]), load_file(result["export"])
    loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(reference["losses"], result["losses"]))
    weight_diff = max((ref_weights[k].float() - weights[k].float()).abs().max().item() for k in ref_weights)
    return {"max_rel_loss_diff": loss_diff, "max_weight_diff": weight_diff,
            "same_keys": set(ref_weights) == set(weights)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU rehearsal")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--worker", nargs=3, metavar=("ALGO", "STRATEGY", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    accelerator = "cpu" if args.smoke else "gpu"
    if args.worker:
        algo, strategy, out = args.worker
        result = run_one(algo, strategy, Path(out), accelerator)
        Path(out, "result.json").write_text(json.dumps(result))
        return []
    results = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory(prefix="strategy_check_") as tmp:
        for algo in ALGOS:
            runs: dict[str, dict[str, Any]] = {}
            for strategy in ["single", *[s for s in args.strategies if s != "single"]]:
                record: dict[str, Any] = {"algo": algo, "strategy": strategy}
                reason = skip_reason(strategy, accelerator, algo)
                if reason:
                    record["skipped"] = reason
                else:
                    out = Path(tmp) / f"{algo}-{strategy}"
                    proc = subprocess.run([sys.executable, __file__, *(["--smoke"] if args.smoke else []),
                                           "--worker", algo, strategy, str(out)], env=env, capture_output=True,
                                          text=True, check=False)
                    if proc.returncode != 0:
                        record["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
                    else:
                        record.update(json.loads((out / "result.json").read_text()))
                        record["export"] = str(out / "hf" / "model.safetensors")
                        runs[strategy] = record
                        if strategy != "single" and "single" in runs:
                            record.update(compare(runs["single"], record))
                results.append(record)
                print(json.dumps({k: v for k, v in record.items() if k not in ("export",)}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps([{k: v for k, v in r.items() if k != "export"} for r in results],
                                             indent=2))
    return results


if __name__ == "__main__":
    # a run that failed makes the whole check fail (device_check.sh records the exit status of each stage)
    sys.exit(1 if any("error" in record for record in main()) else 0)
