"""Rollout generation: generated tokens per second of each backend of ``lightning_llm.rollout`` against plain HF
``generate``, peak memory, and that memory does not grow over repeated calls.

Candidates (one model, loaded once, shared by all):

- ``hf_generate``: plain ``model.generate`` on the left-padded batch (the baseline every ratio is taken against);
- ``hf_generate_static``: the same with ``cache_implementation="static"`` (``generate`` then compiles its decode
  step; CUDA only);
- ``engine_hf``: :class:`~lightning_llm.rollout.HFGenerateEngine` (``generate`` plus our padding, cutting and lists);
- ``engine_fast``: :class:`~lightning_llm.rollout.FastDecodeEngine` with its defaults (CPU: the lean forward of
  ``rollout/lean.py`` for Llama-family models, else a dynamic cache and eager HF forward; CUDA: static cache,
  ``torch.compile``-d decode step with CUDA graphs);
- ``engine_fast_multinomial``: ``FastDecodeEngine(sampler="multinomial")``: tokens drawn with ``torch.multinomial``
  as ``generate`` does (what ``engine_fast`` did before its inverse-CDF draw);
- ``engine_fast_nolean``: ``FastDecodeEngine(lean=False)`` (CPU: the HF forward with a dynamic cache, eager steps;
  what ``engine_fast`` was before the lean forward);
- ``engine_fast_static``: ``FastDecodeEngine(cache="static", compile=False)`` (static cache, eager steps);
- ``engine_fast_compiled``: ``FastDecodeEngine(cache="static", compile=True)`` on CPU (inductor's C++ backend; on
  CUDA this is ``engine_fast``). The warm-up call includes the compilation.

Every call generates exactly ``new_tokens`` tokens per prompt (the EOS id is one that never occurs), sampling with
temperature 0.9 and top-p 0.95, from prompts of ``prompt_tokens`` random token ids. Reported per batch size:
generated tokens per second (``batch * new_tokens`` over the median of ``reps`` timed calls after ``warmup``
calls, CUDA-synchronised), the ratio to ``hf_generate``, peak memory (CUDA: ``max_memory_allocated`` over the
candidate's calls; CPU: the process's peak RSS so far, which only ever grows), and the memory after call 1 and call
``memory_calls`` (50) of a run of short calls (``memory_new_tokens`` each; CUDA: allocated bytes, CPU: RSS).

    python benchmarks/bench_rollout.py --out rollout.json     # GPU: Qwen2.5-0.5B-shaped random-init model, bf16
    python benchmarks/bench_rollout.py --cpu                  # CPU: tiny-llama (the shipped tokenizer's vocabulary)
    python benchmarks/bench_rollout.py --smoke                # CPU, tiny sizes, few calls (CI keeps it working)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

MIB = 1024**2
CANDIDATES = ("hf_generate", "hf_generate_static", "engine_hf", "engine_fast", "engine_fast_multinomial",
              "engine_fast_nolean", "engine_fast_static", "engine_fast_compiled")
BASELINE = "hf_generate"
PAD = 0


@dataclass
class Setup:
    """What every candidate generates."""

    model: str = "qwen2.5-0.5b-shape"  # or "tiny-llama"
    batch_sizes: list[int] = field(default_factory=lambda: [8, 64])
    prompt_tokens: int = 128
    new_tokens: int = 256
    warmup: int = 1
    reps: int = 3
    memory_calls: int = 50
    memory_new_tokens: int = 16
    temperature: float = 0.9
    top_p: float = 0.95
    seed: int = 0
    device: str = "cuda"

    @classmethod
    def cpu(cls) -> Setup:
        return cls(model="tiny-llama", prompt_tokens=32, new_tokens=64, reps=5, device="cpu")

    @classmethod
    def smoke(cls) -> Setup:
        return cls(model="tiny-llama", batch_sizes=[2], prompt_tokens=6, new_tokens=5, warmup=1, reps=1,
                   memory_calls=3, memory_new_tokens=3, device="cpu")


def build_model(setup: Setup) -> torch.nn.Module:
    """The model: tiny-llama (fp32), or a Qwen2.5-0.5B-shaped Qwen2 with random weights (bf16), as
    ``bench_train_step.py`` builds it."""
    if setup.model == "tiny-llama":
        from lightning_llm.models import tiny_model

        return tiny_model("tiny-llama").to(setup.device).eval()
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(setup.seed)
    return AutoModelForCausalLM.from_config(config).to(torch.bfloat16).to(setup.device).eval()


def make_prompts(setup: Setup, batch: int, vocab: int) -> list[list[int]]:
    """Random prompts of ``prompt_tokens`` ids (the first ids, often special tokens, left out)."""
    generator = torch.Generator().manual_seed(setup.seed + batch)
    return torch.randint(10, vocab, (batch, setup.prompt_tokens), generator=generator).tolist()


def _generator(name: str, setup: Setup, model: torch.nn.Module) -> Callable[[list[list[int]], int], int]:
    """A function ``(prompts, new_tokens) -> number of tokens generated`` running candidate ``name``."""
    from lightning_llm.rollout import FastDecodeEngine, HFGenerateEngine, SamplingSettings
    from lightning_llm.rollout.base import left_pad

    never = model.config.vocab_size + 1000  # an EOS id that no row ever produces
    device = torch.device(setup.device)
    if name.startswith("hf_generate"):
        extra = {"cache_implementation": "static"} if name == "hf_generate_static" else {}

        def run_hf(prompts: list[list[int]], new_tokens: int) -> int:
            input_ids, attention_mask = left_pad(prompts, PAD, device)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                 do_sample=True, temperature=setup.temperature, top_p=setup.top_p, top_k=0,
                                 eos_token_id=never, pad_token_id=PAD, **extra)
            return (out.shape[1] - input_ids.shape[1]) * out.shape[0]

        return run_hf
    engine = {
        "engine_hf": lambda: HFGenerateEngine(),
        "engine_fast": lambda: FastDecodeEngine(),
        "engine_fast_multinomial": lambda: FastDecodeEngine(sampler="multinomial"),
        "engine_fast_nolean": lambda: FastDecodeEngine(lean=False),
        "engine_fast_static": lambda: FastDecodeEngine(cache="static", compile=False),
        "engine_fast_compiled": lambda: FastDecodeEngine(cache="static", compile=True),
    }[name]()
    rng = torch.Generator().manual_seed(setup.seed)

    def run_engine(prompts: list[list[int]], new_tokens: int) -> int:
        settings = SamplingSettings(max_completion_length=new_tokens, temperature=setup.temperature,
                                    top_p=setup.top_p)
        rollouts = engine.generate(model, prompts, settings, eos_token_ids=[never], pad_token_id=PAD, generator=rng)
        return sum(len(ids) for ids in rollouts.completion_ids)

    return run_engine


def available(name: str, setup: Setup) -> str | None:
    """None when ``name`` can run here, else why not."""
    if name == "hf_generate_static" and setup.device != "cuda":
        return "CUDA only (generate compiles its static-cache step there)"
    if name == "engine_fast_compiled" and setup.device == "cuda":
        return "on CUDA this is engine_fast"
    return None


def _synchronize(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.synchronize()


def _memory_mib(setup: Setup) -> float:
    """CUDA: bytes allocated now; CPU: the resident set size now."""
    if setup.device == "cuda":
        return torch.cuda.memory_allocated() / MIB
    with open("/proc/self/statm") as handle:  # Linux; resident pages are the second field
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _peak_mib(setup: Setup) -> float:
    if setup.device == "cuda":
        return torch.cuda.max_memory_allocated() / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_candidate(name: str, batch: int, setup: Setup, model: torch.nn.Module) -> dict[str, Any]:
    generate = _generator(name, setup, model)
    prompts = make_prompts(setup, batch, model.config.vocab_size)
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    for call in range(setup.warmup + setup.reps):
        _synchronize(setup)
        start = time.perf_counter()
        produced = generate(prompts, setup.new_tokens)
        _synchronize(setup)
        if call >= setup.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(produced)
    memory = []
    for _ in range(setup.memory_calls):
        generate(prompts, setup.memory_new_tokens)
        _synchronize(setup)
        memory.append(_memory_mib(setup))
    median = statistics.median(times)
    return {
        "name": name, "batch_size": batch, "device": torch.cuda.get_device_name() if setup.device == "cuda" else "cpu",
        "median_call_s": median, "tokens_per_call": statistics.median(tokens),
        "tokens_per_s": statistics.median(tokens) / median, "peak_mib": _peak_mib(setup),
        "memory_call_1_mib": memory[0] if memory else None, "memory_call_last_mib": memory[-1] if memory else None,
        "memory_calls": setup.memory_calls,
    }


def format_table(results: list[dict[str, Any]]) -> str:
    base = {r["batch_size"]: r for r in results if r["name"] == BASELINE and "tokens_per_s" in r}
    lines = [f"{'batch':>5} {'candidate':24} {'tokens/s':>10} {'vs HF':>7} {'call ms':>9} {'peak MiB':>9} "
             f"{'mem@1 MiB':>10} {'mem@last MiB':>13}"]
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"{r['batch_size']:>5} {r['name']:24} {r.get('skipped') or 'error: ' + r['error'][:70]}")
            continue
        ref = base.get(r["batch_size"])
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        first = f"{r['memory_call_1_mib']:.1f}" if r["memory_call_1_mib"] is not None else "-"
        last = f"{r['memory_call_last_mib']:.1f}" if r["memory_call_last_mib"] is not None else "-"
        lines.append(f"{r['batch_size']:>5} {r['name']:24} {r['tokens_per_s']:10.0f} {ratio:>7} "
                     f"{1e3 * r['median_call_s']:9.1f} {r['peak_mib']:9.1f} {first:>10} {last:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cpu", action="store_true", help="CPU, tiny-llama, 64 new tokens (a few minutes)")
    mode.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, a few calls (CI keeps it working)")
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default 8 64")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per prompt in the timed calls")
    parser.add_argument("--prompt-tokens", type=int, help="tokens per prompt")
    parser.add_argument("--reps", type=int, help="timed calls per candidate and batch size")
    parser.add_argument("--memory-calls", type=int, help="calls of the memory-growth check (default 50)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 makes CPU "
                        "timings less sensitive to other processes on a small machine")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    on_gpu = torch.cuda.is_available() and not (args.cpu or args.smoke)
    setup = Setup.smoke() if args.smoke else Setup() if on_gpu else Setup.cpu()
    for name, value in (("batch_sizes", args.batch_sizes), ("new_tokens", args.new_tokens),
                        ("prompt_tokens", args.prompt_tokens), ("reps", args.reps),
                        ("memory_calls", args.memory_calls)):
        if value is not None:
            setattr(setup, name, value)
    if setup.device == "cpu":
        torch.manual_seed(setup.seed)
    model = build_model(setup)
    results = []
    for batch in setup.batch_sizes:
        for name in args.candidates:
            reason = available(name, setup)
            if reason:
                results.append({"name": name, "batch_size": batch, "skipped": reason})
            else:
                try:
                    results.append(run_candidate(name, batch, setup, model))
                except Exception as error:  # one failing candidate does not lose the others' numbers
                    results.append({"name": name, "batch_size": batch, "error": f"{type(error).__name__}: {error}"})
            print(json.dumps(results[-1]), flush=True)
    print(format_table(results))
    if args.out:
        args.out.write_text(json.dumps({"setup": asdict(setup), "results": results, "torch": torch.__version__,
                                        "threads": torch.get_num_threads()}, indent=2))
    return results


if __name__ == "__main__":
    main()
