"""Online training steps, generation included, lightning_llm against TRL 1.16, side by side in one run, and the
memory of each over the run: GRPO (``--algo grpo``, the default), Online DPO (``--algo online_dpo``) or PPO
(``--algo ppo`` with a separate value model, ``--algo ppo_value_head`` with a value head on the policy; TRL 1.16 has
no PPO, so ours alone).

Candidates (each in a fresh process, so that its time and memory are its own):

- ``ours_hf``: :class:`~lightning_llm.GRPOModule` (or :class:`~lightning_llm.OnlineDPOModule`) with
  ``rollout="hf"`` (HF ``generate`` with its KV cache);
- ``ours_fast``: the same with ``rollout="fast"`` (:class:`~lightning_llm.rollout.FastDecodeEngine`: on CUDA a
  static cache and a compiled decode step, on CPU its eager loop);
- ``trl``: TRL 1.16's ``GRPOTrainer`` (or ``trl.experimental.online_dpo.OnlineDPOTrainer``), transformers
  ``generate``, no vLLM.

Both sides train the same initial weights on the same prompts (the shipped ``sample:prompt_only`` questions under
the tiny tokenizer's chat template) with the same AdamW and learning rate, the same number of prompts per optimizer
step, one optimizer step per generation batch, and a cheap rule reward. Every completion is exactly ``new_tokens``
long: TRL through ``generation_kwargs={"min_new_tokens": ...}``, ours through an EOS id that no token equals, so both
generate and train on the same number of tokens. Metrics are logged every ``log_every`` steps on both sides (TRL's
``logging_steps``, Lightning's ``log_every_n_steps``).

- GRPO: ``num_generations`` completions per prompt, ``beta=0`` (no reference model, TRL's default), lr 1e-6.
- Online DPO: two completions per prompt (TRL's ``per_device_train_batch_size`` counts prompts, our data module's
  ``batch_size`` completions, so it is twice as large), the reference model a frozen copy of the initial policy on
  both sides, the sigmoid loss with ``beta=0.1``, temperature 0.9 and lr 5e-7 (TRL's defaults, given to both), and
  TRL's ``gradient_checkpointing`` off: its config turns it on by default, and then its ``generate`` also runs
  without a KV cache, while ours checkpoints nothing.

Reported: the mean and median wall time of an optimizer step (generation, scoring, the reference forward where
there is one, forward, backward and optimizer step; CUDA-synchronised) over the ``steps`` steps after ``warmup``
untimed ones, the ratio to TRL's mean, and the memory after the first and the last of the ``memory_steps`` steps
after the warm-up (CPU: the process's resident set; CUDA: allocated bytes, and the peak) so that growth over the run
shows.

    python benchmarks/bench_grpo_step.py --cpu          # CPU, tiny-llama, 1 thread: 2 prompts x 4, 16 tokens, 40 steps
    python benchmarks/bench_grpo_step.py --out grpo.json   # GPU: Qwen2.5-0.5B-shaped random init, bf16, 1 x 8 x 128
    python benchmarks/bench_grpo_step.py --smoke        # CPU, a few steps, in-process (CI keeps it working)
    python benchmarks/bench_grpo_step.py --cpu --algo online_dpo   # CPU: 4 prompts x 2, 16 tokens, 40 steps
    python benchmarks/bench_grpo_step.py --algo online_dpo         # GPU: 0.5B shape, bf16, 4 prompts x 2 x 128
    python benchmarks/bench_grpo_step.py --cpu --algo ppo          # CPU: 8 prompts, 16 tokens, one PPO update each
    python benchmarks/bench_grpo_step.py --cpu --algo ppo_value_head

- PPO: one rollout of ``prompts_per_step`` prompts and one PPO update (``num_ppo_epochs=1``, ``num_mini_batches=1``:
  one optimizer step, so a step is a rollout as for the others), the reference a frozen copy of the initial policy,
  the value model a one-label classifier from the policy's weights or a value head on the policy, lr 3e-6 (TRL
  1.12's default). The memory columns compare the two value options.
"""

from __future__ import annotations

import argparse
import json
import os
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

MIB = 1024**2
ALGOS = ("grpo", "online_dpo", "ppo", "ppo_value_head")
CANDIDATES = ("ours_hf", "ours_fast", "trl")
BASELINE = "trl"
NEVER = 10_000_000  # an EOS id that no sampled token equals: every completion of ours is new_tokens long


@dataclass
class Setup:
    """What every candidate trains."""

    algo: str = "grpo"  # or "online_dpo"
    model: str = "qwen2.5-0.5b-shape"  # or "tiny-llama"
    prompts_per_step: int = 1
    num_generations: int = 8  # completions per prompt (Online DPO: 2)
    new_tokens: int = 128
    warmup: int = 2
    steps: int = 20
    memory_steps: int = 20  # memory is read after each of this many steps after the warm-up
    log_every: int = 10
    threads: int = 0  # CPU threads (0: torch's default)
    device: str = "cuda"
    seed: int = 0
    in_process: bool = False

    @classmethod
    def gpu(cls, algo: str = "grpo") -> Setup:
        if algo == "online_dpo":  # 8 completions per step, as GRPO's 1 x 8
            return cls(algo=algo, prompts_per_step=4, num_generations=2)
        return cls(algo=algo)

    @classmethod
    def cpu(cls, algo: str = "grpo") -> Setup:
        prompts, generations = {"online_dpo": (4, 2), "ppo": (8, 1), "ppo_value_head": (8, 1)}.get(algo, (2, 4))
        return cls(algo=algo, model="tiny-llama", prompts_per_step=prompts, num_generations=generations,
                   new_tokens=16, steps=40, memory_steps=50, threads=1, device="cpu")

    @classmethod
    def smoke(cls, algo: str = "grpo") -> Setup:
        return cls(algo=algo, model="tiny-llama", prompts_per_step=1, num_generations=2, new_tokens=3, warmup=1,
                   steps=2, memory_steps=2, log_every=1, threads=1, device="cpu", in_process=True)

    @property
    def total_steps(self) -> int:
        return self.warmup + max(self.steps, self.memory_steps)

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations


def build_model(setup: Setup) -> torch.nn.Module:
    """The policy, random weights drawn from ``setup.seed`` (fp32 master weights)."""
    torch.manual_seed(setup.seed)
    if setup.model == "tiny-llama":
        from lightning_llm.models import tiny_model

        return tiny_model("tiny-llama")
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config)


def prompt_rows(setup: Setup) -> list[dict]:
    from lightning_llm.data.sources import load_rows

    rows = load_rows("sample:prompt_only")
    needed = setup.prompts_per_step * setup.total_steps
    return [rows[i % len(rows)] for i in range(needed)]


def vowel_reward(completions: list, **kwargs: Any) -> list[float]:
    """Share of vowels in the completion's text: cheap, and different across a group."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiou" for ch in text) / max(1, len(text)) for text in texts]


def memory_now(device: torch.device) -> float:
    """MiB: allocated CUDA memory, or the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / MIB
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


class _Clock:
    """Wall time and memory after each optimizer step, synchronised with the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.memory: list[float] = []
        self._start = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        self.memory.append(memory_now(self.device))


def full_length(module_class: type) -> type:
    """``module_class`` whose completions never end early: its EOS id is one that no sampled token equals."""

    class FullLength(module_class):
        def eos_token_ids(self) -> list[int]:
            return [NEVER]

    FullLength.__name__ = f"FullLength{module_class.__name__}"
    return FullLength


# ------------------------------------------------------------------------------------ per-algorithm builders
def ours_grpo(setup: Setup, rollout: str, tokenizer: Any) -> tuple[Any, int]:
    """GRPOModule and the data module's batch size (completions per step)."""
    from lightning_llm.modules.grpo import GRPOModule

    module = full_length(GRPOModule)(
        build_model(setup), tokenizer=tokenizer, reward_funcs=[vowel_reward], rollout=rollout,
        num_generations=setup.num_generations, max_completion_length=setup.new_tokens, beta=0.0, learning_rate=1e-6,
    )
    return module, setup.completions_per_step


def trl_grpo(setup: Setup, common: dict[str, Any], callbacks: list) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        per_device_train_batch_size=setup.completions_per_step, num_generations=setup.num_generations,
        max_completion_length=setup.new_tokens, generation_kwargs={"min_new_tokens": setup.new_tokens}, beta=0.0,
        learning_rate=1e-6, shuffle_dataset=False, **common,
    )
    return GRPOTrainer(model=build_model(setup), reward_funcs=[vowel_reward], args=args,
                       train_dataset=_dataset(setup), processing_class=_tokenizer(), callbacks=callbacks)


ONLINE_DPO_LR = 5e-7  # TRL's OnlineDPOConfig default, given to both sides


def ours_online_dpo(setup: Setup, rollout: str, tokenizer: Any) -> tuple[Any, int]:
    """OnlineDPOModule (reference: a frozen copy of the initial policy) and its batch size: two completions per
    prompt, so twice TRL's per_device_train_batch_size."""
    from lightning_llm.modules.online_dpo import OnlineDPOModule

    module = full_length(OnlineDPOModule)(
        build_model(setup), tokenizer=tokenizer, reward_funcs=[vowel_reward], rollout=rollout,
        max_completion_length=setup.new_tokens, beta=0.1, loss_type="sigmoid", temperature=0.9,
        learning_rate=ONLINE_DPO_LR,
    )
    return module, 2 * setup.prompts_per_step


def trl_online_dpo(setup: Setup, common: dict[str, Any], callbacks: list) -> Any:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    args = OnlineDPOConfig(
        per_device_train_batch_size=setup.prompts_per_step, max_new_tokens=setup.new_tokens,
        generation_kwargs={"min_new_tokens": setup.new_tokens}, beta=0.1, loss_type="sigmoid", temperature=0.9,
        learning_rate=ONLINE_DPO_LR, gradient_checkpointing=False, train_sampling_strategy="sequential", **common,
    )
    # ref_model=None: TRL builds a frozen copy of the initial policy
    return OnlineDPOTrainer(model=build_model(setup), reward_funcs=[vowel_reward], args=args,
                            train_dataset=_dataset(setup), processing_class=_tokenizer(), callbacks=callbacks)


def ours_ppo(setup: Setup, rollout: str, tokenizer: Any) -> tuple[Any, int]:
    """PPOModule (a frozen reference, a separate value model or a value head) and its batch size: one completion per
    prompt."""
    from lightning_llm.modules.ppo import PPOModule

    module = full_length(PPOModule)(
        build_model(setup), tokenizer=tokenizer, reward_funcs=[vowel_reward], rollout=rollout,
        value_head=setup.algo == "ppo_value_head", max_completion_length=setup.new_tokens, num_ppo_epochs=1,
        num_mini_batches=1, learning_rate=3e-6,
    )
    return module, setup.prompts_per_step


#: algorithm -> (our module and its batch size, TRL's trainer; None where TRL 1.16 has none)
BUILDERS = {"grpo": (ours_grpo, trl_grpo), "online_dpo": (ours_online_dpo, trl_online_dpo),
            "ppo": (ours_ppo, None), "ppo_value_head": (ours_ppo, None)}


def _tokenizer() -> Any:
    from lightning_llm.models import tiny_tokenizer

    return tiny_tokenizer()


def _dataset(setup: Setup) -> Any:
    import datasets

    return datasets.Dataset.from_list(prompt_rows(setup))


# ------------------------------------------------------------------------------------------ shared harness
def run_ours(name: str, setup: Setup, device: torch.device) -> _Clock:
    import lightning as L

    from lightning_llm.data.prompts import PromptDataModule

    tokenizer = _tokenizer()
    module, batch_size = BUILDERS[setup.algo][0](setup, name.split("_")[1], tokenizer)
    data = PromptDataModule(prompt_rows(setup), tokenizer=tokenizer, batch_size=batch_size, shuffle=False,
                            val_split=0.0)
    clock = _Clock(device)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.stop()

    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision="bf16-mixed" if device.type == "cuda" else "32",
        max_steps=setup.total_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=setup.log_every,
        callbacks=[Timer()],
    )
    trainer.fit(module, data)
    return clock


def run_trl(name: str, setup: Setup, device: torch.device) -> _Clock:
    from transformers import TrainerCallback

    clock = _Clock(device)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench_{setup.algo}_trl_"), max_steps=setup.total_steps,
        logging_steps=setup.log_every, save_strategy="no", report_to=[], bf16=device.type == "cuda",
        use_cpu=device.type == "cpu", dataloader_num_workers=0, seed=setup.seed, disable_tqdm=True,
    )
    BUILDERS[setup.algo][1](setup, common, [Timer()]).train()
    return clock


def available(name: str, algo: str = "grpo") -> str | None:
    """None when ``name`` can run here, else why not."""
    import importlib.util

    if name == "trl" and BUILDERS[algo][1] is None:
        return "TRL 1.16 has no PPO"

    for package in ("trl", "datasets"):
        if name == "trl" and importlib.util.find_spec(package) is None:
            return f"{package} not installed"
    return None


def run_candidate(name: str, setup: Setup) -> dict[str, Any]:
    device = torch.device(setup.device)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = (run_trl if name == "trl" else run_ours)(name, setup, device)
    times = clock.times[setup.warmup: setup.warmup + setup.steps]
    memory = clock.memory[setup.warmup: setup.warmup + setup.memory_steps]
    return {
        "name": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "mean_step_s": statistics.fmean(times), "median_step_s": statistics.median(times), "steps_timed": len(times),
        "memory_steps": len(memory), "memory_first_mib": memory[0], "memory_last_mib": memory[-1],
        "peak_mib": torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else None,
    }


def _in_subprocess(name: str, setup: Setup) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--only", name, "--result", f.name, "--setup", json.dumps(asdict(setup))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"name": name, "error": proc.stderr[-3000:]}
        return json.loads(Path(f.name).read_text())


def format_table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if r["name"] == BASELINE and "mean_step_s" in r), None)
    lines = [f"{'candidate':10} {'mean ms':>9} {'median ms':>10} {'vs TRL':>7} {'mem first MiB':>14} "
             f"{'mem last MiB':>13} {'peak MiB':>9}"]
    for r in results:
        if "mean_step_s" not in r:
            lines.append(f"{r['name']:10} {r.get('skipped') or 'error: ' + r['error'].strip().splitlines()[-1][:80]}")
            continue
        ratio = f"{r['mean_step_s'] / base['mean_step_s']:.2f}x" if base else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        lines.append(f"{r['name']:10} {1e3 * r['mean_step_s']:9.1f} {1e3 * r['median_step_s']:10.1f} {ratio:>7} "
                     f"{r['memory_first_mib']:14.0f} {r['memory_last_mib']:13.0f} {peak:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true", help="CPU, tiny-llama, one thread")
    mode.add_argument("--smoke", action="store_true", help="CPU, a few tiny steps, in-process (CI keeps it working)")
    parser.add_argument("--algo", choices=ALGOS, default="grpo", help="the algorithm whose steps are timed")
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps")
    parser.add_argument("--memory-steps", type=int, default=None, help="steps over which memory is followed")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--only", choices=CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:  # a candidate's own process
        args.result.write_text(json.dumps(run_candidate(args.only, Setup(**json.loads(args.setup)))))
        return []
    setup = (Setup.smoke if args.smoke else Setup.cpu if args.cpu else Setup.gpu)(args.algo)
    if setup.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu (or --smoke)")
    if args.warmup is not None:
        setup.warmup = args.warmup
    if args.steps is not None:
        setup.steps = args.steps
    if args.memory_steps is not None:
        setup.memory_steps = args.memory_steps
    results = []
    for name in args.candidates:
        reason = available(name, setup.algo)
        if reason:
            results.append({"name": name, "skipped": reason})
        else:
            results.append(run_candidate(name, setup) if setup.in_process else _in_subprocess(name, setup))
        print(json.dumps(results[-1]), flush=True)
    print(format_table(results))
    if args.out:
        args.out.write_text(json.dumps({"setup": asdict(setup), "results": results, "torch": torch.__version__},
                                       indent=2))
    return results


if __name__ == "__main__":
    main()
