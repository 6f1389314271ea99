"""End-to-end training steps: SFT and DPO on a Qwen2.5-0.5B-shaped random-init model, lightning_llm vs TRL 1.16.

Candidates (each in a fresh process on GPU, so that peak memory is its own):

- ``ours_sft`` / ``ours_dpo``: ``SFTModule`` / ``DPOModule`` under ``Trainer(precision="bf16-mixed")`` with the
  log-prob kernel on (``logprob_impl="auto"``: Triton on CUDA);
- ``ours_sft_fused``: ``SFTModule(fuse_loss=True)``, the NLL's head gradient computed in the forward
  (:func:`lightning_llm.ops.linear_token_loss`) instead of the Triton path's recomputing backward;
- ``ours_sft_fused_gemm`` / ``ours_dpo_fused_gemm``: ``logprob_tiles={"fused_gemm": True}``, the Triton path
  whose logits never leave the GEMM kernel (:mod:`lightning_llm.kernels.gemm`);
- ``ours_sft_nokernel`` / ``ours_dpo_nokernel``: the same with ``logprob_impl="eager"`` (full logits);
- ``trl_sft`` / ``trl_dpo``: TRL 1.16's ``SFTTrainer`` / ``DPOTrainer`` (``bf16=True``) on the same model and data;
- ``trl_sft_liger`` / ``trl_dpo_liger``: the same with ``use_liger_kernel=True`` when Liger-Kernel is installed.

Same model config and initial weights, same AdamW, batch 8, prompts of 128 and completions of 384 tokens (DPO: a
chosen and a rejected completion per prompt), random words of the tiny tokenizer that are single tokens. Reported:
tokens/s (tokens fed to the policy per optimizer step over the median step time after warm-up; CUDA-synchronised),
peak GPU memory, and ratios against TRL.

    python benchmarks/bench_train_step.py --out train_step.json      # one GPU (needs `datasets` and `trl`)
    python benchmarks/bench_train_step.py --smoke                    # CPU, tiny sizes, in-process (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

GIB = 1024**3
CANDIDATES = (
    "ours_sft", "ours_sft_fused", "ours_sft_fused_gemm", "ours_sft_nokernel", "trl_sft", "trl_sft_liger",
    "ours_dpo", "ours_dpo_fused_gemm", "ours_dpo_nokernel", "trl_dpo", "trl_dpo_liger",
)


@dataclass
class Setup:
    """What every candidate trains on."""

    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    batch_size: int = 8
    prompt_tokens: int = 128
    completion_tokens: int = 384
    warmup: int = 3
    steps: int = 10
    seed: int = 0
    smoke: bool = False

    @classmethod
    def tiny(cls) -> Setup:
        return cls(vocab_size=1024, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   batch_size=2, prompt_tokens=12, completion_tokens=20, warmup=1, steps=2, smoke=True)


def build_model(setup: Setup) -> torch.nn.Module:
    """The Qwen2-shaped causal LM, random weights drawn from ``setup.seed`` (fp32 master weights)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=setup.vocab_size, hidden_size=setup.hidden_size, intermediate_size=setup.intermediate_size,
        num_hidden_layers=setup.num_layers, num_attention_heads=setup.num_heads,
        num_key_value_heads=setup.num_kv_heads, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(setup.seed)
    return AutoModelForCausalLM.from_config(config)


def single_token_words(tokenizer) -> list[str]:
    """Words that the tokenizer keeps as one token when preceded by a space (so lengths are exact)."""
    words = []
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        if text.startswith(" ") and text[1:].isalpha() and len(tokenizer(text)["input_ids"]) == 1:
            words.append(text)
    return sorted(words)


def make_rows(setup: Setup, tokenizer) -> tuple[list[dict], list[dict]]:
    """Prompt-completion rows (SFT) and preference rows (DPO) of random single-token words."""
    rng = random.Random(setup.seed)
    words = single_token_words(tokenizer)
    n_rows = setup.batch_size * (setup.warmup + setup.steps)

    def text(n: int) -> str:
        return "".join(rng.choice(words) for _ in range(n))

    # the EOS appended to completions is one of the completion tokens
    sft, dpo = [], []
    for _ in range(n_rows):
        prompt = text(setup.prompt_tokens)
        sft.append({"prompt": prompt, "completion": text(setup.completion_tokens - 1)})
        dpo.append({"prompt": prompt, "chosen": text(setup.completion_tokens - 1),
                    "rejected": text(setup.completion_tokens - 1)})
    return sft, dpo


class _Clock:
    """Wall time of each optimizer step, synchronised with the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def run_ours(name: str, setup: Setup, device: torch.device) -> dict[str, Any]:
    import lightning as L

    from lightning_llm.data import SFTDataModule
    from lightning_llm.data.preference import PreferenceDataModule
    from lightning_llm.models import tiny_tokenizer
    from lightning_llm.modules.dpo import DPOModule
    from lightning_llm.modules.sft import SFTModule

    tokenizer = tiny_tokenizer()
    sft_rows, dpo_rows = make_rows(setup, tokenizer)
    impl = "eager" if name.endswith("nokernel") else "auto"
    model = build_model(setup)
    tiles = {"fused_gemm": True} if name.endswith("fused_gemm") else None  # only the Triton path reads it
    common = dict(tokenizer=tokenizer, logprob_impl=impl, logprob_tiles=tiles, learning_rate=1e-6)
    if "_sft" in name:
        module = SFTModule(model, fuse_loss=True if name.endswith("fused") else None, **common)
        data = SFTDataModule(sft_rows, tokenizer=tokenizer, batch_size=setup.batch_size, shuffle=False,
                             max_length=2048)
    else:
        module = DPOModule(model, **common)
        data = PreferenceDataModule(dpo_rows, tokenizer=tokenizer, batch_size=setup.batch_size, shuffle=False,
                                    max_length=2048)
    clock = _Clock(device)
    tokens: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.start()
            tokens.append(float(batch.num_tokens()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.stop()

    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision="32" if setup.smoke else "bf16-mixed",
        max_steps=setup.warmup + setup.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Timer()],
    )
    trainer.fit(module, data)
    return {"step_times": clock.times, "tokens_per_step": tokens}


def run_trl(name: str, setup: Setup, device: torch.device) -> dict[str, Any]:
    import datasets
    from transformers import TrainerCallback

    from lightning_llm.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    sft_rows, dpo_rows = make_rows(setup, tokenizer)
    model = build_model(setup)
    clock = _Clock(device)
    tokens: list[float] = []
    out_dir = tempfile.mkdtemp(prefix="bench_trl_")

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

    common = dict(
        output_dir=out_dir, per_device_train_batch_size=setup.batch_size, max_steps=setup.warmup + setup.steps,
        learning_rate=1e-6, logging_steps=10_000, save_strategy="no", report_to=[], bf16=not setup.smoke,
        use_cpu=device.type == "cpu", dataloader_num_workers=0, max_length=2048, seed=setup.seed,
        use_liger_kernel=name.endswith("liger"),
    )
    if "_sft" in name:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=datasets.Dataset.from_list(sft_rows),
                             processing_class=tokenizer, callbacks=[Timer()])
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(**common),
                             train_dataset=datasets.Dataset.from_list(dpo_rows), processing_class=tokenizer,
                             callbacks=[Timer()])
    # the data are the same rows as ours: count the tokens the policy sees per step the same way
    for batch in trainer.get_train_dataloader():
        tokens.append(float(batch["attention_mask"].sum()))
    trainer.train()
    return {"step_times": clock.times, "tokens_per_step": tokens[: len(clock.times)]}


def available(name: str) -> str | None:
    """None when ``name`` can run here, else why not."""
    import importlib.util

    if name.startswith("trl") and importlib.util.find_spec("trl") is None:
        return "trl not installed"
    if name.startswith("trl") and importlib.util.find_spec("datasets") is None:
        return "datasets not installed"
    if name.endswith("liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel not installed"
    return None


def run_candidate(name: str, setup: Setup) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not setup.smoke else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    raw = (run_trl if name.startswith("trl") else run_ours)(name, setup, device)
    times = raw["step_times"][setup.warmup:] or raw["step_times"]
    tokens = statistics.median(raw["tokens_per_step"]) if raw["tokens_per_step"] else 0.0
    median = statistics.median(times)
    return {
        "name": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "median_step_s": median, "tokens_per_step": tokens, "tokens_per_s": tokens / median if median else 0.0,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None,
        "steps_timed": len(times),
    }


def _in_subprocess(name: str, setup: Setup) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--only", name, "--result", f.name, "--warmup", str(setup.warmup),
               "--steps", str(setup.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"name": name, "error": proc.stderr[-2000:]}
        return json.loads(Path(f.name).read_text())


def format_table(results: list[dict[str, Any]]) -> str:
    base = {r["name"].split("_")[1]: r for r in results if r["name"] in ("trl_sft", "trl_dpo") and "error" not in r}
    lines = [f"{'candidate':22} {'tokens/s':>10} {'step ms':>9} {'peak GiB':>9} {'vs TRL tok/s':>13} "
             f"{'vs TRL mem':>11}"]
    for r in results:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['name']:22} {r.get('skipped') or 'error: ' + r['error'].splitlines()[-1][:60]}")
            continue
        ref = base.get(r["name"].split("_")[1])
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        memory = f"{r['peak_gib'] / ref['peak_gib']:.2f}x" if ref and r["peak_gib"] and ref["peak_gib"] else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"{r['name']:22} {r['tokens_per_s']:10.0f} {1e3 * r['median_step_s']:9.1f} {peak:>9} "
                     f"{speed:>13} {memory:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, in-process (CI keeps it working)")
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--only", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup = Setup.tiny() if args.smoke else Setup()
    if args.warmup is not None:
        setup.warmup = args.warmup
    if args.steps is not None:
        setup.steps = args.steps
    if args.only:  # child process of a GPU run
        args.result.write_text(json.dumps(run_candidate(args.only, setup)))
        return []
    results = []
    for name in args.candidates:
        reason = available(name)
        if reason:
            results.append({"name": name, "skipped": reason})
        elif setup.smoke or not torch.cuda.is_available():
            results.append(run_candidate(name, setup))
        else:
            results.append(_in_subprocess(name, setup))
        print(json.dumps(results[-1]), flush=True)
    print(format_table(results))
    if args.out:
        args.out.write_text(json.dumps({"setup": asdict(setup), "results": results,
                                        "torch": torch.__version__}, indent=2))
    return results


if __name__ == "__main__":
    main()
