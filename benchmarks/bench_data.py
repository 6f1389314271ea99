"""Dataset preparation: ours against TRL 1.16's ``DPOTrainer`` / ``SFTTrainer`` preparation, in one run, as ratios.

    python benchmarks/bench_data.py                      # 100k preference rows and 100k chat rows
    python benchmarks/bench_data.py --rows 2000 --smoke  # a quick check of the script itself

The rows are generated (deterministic), written as JSONL, and loaded through ``datasets`` by both sides, with the
same tiny tokenizer. Each measurement runs in a fresh process, so that time and peak memory are its own:

- ``ours``: ``PreferenceDataModule`` / ``SFTDataModule`` ``setup()`` with an empty cache (validation, tokenization,
  Arrow caching);
- ``ours_np2``: the same with ``num_proc=2``;
- ``ours_cached``: a second process preparing the same data, which loads the cache: what every process but the first
  of a multi-process run does (Lightning runs ``prepare_data`` on one process first), so with P processes the peak
  memory of a process is the larger of ``ours`` and ``ours_cached``, whatever P;
- ``trl`` / ``trl_np2``: the trainer's ``_prepare_dataset`` (the same map steps its constructor runs), timed alone,
  with ``dataset_num_proc`` 1 and 2, on an empty ``datasets`` cache.

Time is wall-clock seconds of the preparation only (loading the JSONL into Arrow is done before, untimed, the same
way for both); memory is the process's peak resident set (``ru_maxrss``) minus its resident set before preparing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES = ("ours", "ours_np2", "ours_cached", "trl", "trl_np2")
KINDS = ("preference", "chat")


def make_rows(kind: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` conversational rows of ``kind`` (``preference``: prompt/chosen/rejected; ``chat``: messages) with
    arithmetic questions and answers of varied lengths."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        filler = ["please", "kindly", "now", "carefully", "quickly"]
        words = " ".join(rng.choice(filler) for _ in range(rng.randint(0, 12)))
        question = f"Question {i}: what is {a} plus {b}? Answer {words}."
        right = f"{a} plus {b} is {a + b}." + " That is the sum." * rng.randint(0, 6)
        wrong = f"{a} plus {b} is {a + b + rng.randint(1, 9)}." + " I am sure." * rng.randint(0, 6)
        if kind == "preference":
            rows.append({"prompt": [{"role": "user", "content": question}],
                         "chosen": [{"role": "assistant", "content": right}],
                         "rejected": [{"role": "assistant", "content": wrong}]})
        else:
            rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": right}]})
    return rows


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement (run in its own process): everything but the preparation itself is set up first."""
    os.environ["HF_DATASETS_CACHE"] = spec["hf_cache"]
    import datasets

    from lightning_llm import PreferenceDataModule, SFTDataModule
    from lightning_llm.models import tiny_tokenizer

    datasets.disable_progress_bars()
    tok = tiny_tokenizer()
    dataset = datasets.load_dataset("json", data_files=spec["file"], split="train")
    case, kind = spec["case"], spec["kind"]
    num_proc = 2 if case.endswith("np2") else None
    if case.startswith("ours"):
        cls = PreferenceDataModule if kind == "preference" else SFTDataModule
        data = cls(dataset, tokenizer=tok, max_length=1024, num_proc=num_proc, cache_dir=spec["cache"])

        def prepare():
            data.setup("fit")
            return data.train_dataset
    else:
        prepare = _trl_preparation(kind, dataset, tok, num_proc)
    before = _rss_mib()
    start = time.perf_counter()
    examples = len(prepare())
    seconds = time.perf_counter() - start
    return {"case": case, "kind": kind, "seconds": seconds, "examples": examples,
            "peak_mib": _peak_mib() - before, "peak_rss_mib": _peak_mib()}


def _trl_preparation(kind: str, dataset, tok, num_proc: int | None):
    """A function running the TRL trainer's dataset preparation on ``dataset`` (the trainer is built beforehand, on two
    rows)."""
    import trl

    from lightning_llm.models import tiny_model

    out_dir = tempfile.mkdtemp(prefix="bench_data_trl_")
    common = dict(output_dir=out_dir, report_to=[], dataset_num_proc=num_proc, max_length=1024, use_cpu=True)
    small = dataset.select(range(2))
    model = tiny_model("tiny-llama")
    if kind == "preference":
        args = trl.DPOConfig(**common)
        trainer = trl.DPOTrainer(model=model, ref_model=tiny_model("tiny-llama"), args=args, train_dataset=small,
                                 processing_class=tok)
        return lambda: trainer._prepare_dataset(dataset, tok, args, "train")
    args = trl.SFTConfig(**common)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=small, processing_class=tok)
    return lambda: trainer._prepare_dataset(dataset, tok, args, packing=False, formatting_func=None,
                                            dataset_name="train")


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['case']} {spec['kind']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, help="rows of each kind (default 100000, or 1000 with --smoke)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--smoke", action="store_true", help="a quick run: fewer rows")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return []
    rows = args.rows if args.rows is not None else 1000 if args.smoke else 100_000
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        for kind in args.kinds:
            path = root / f"{kind}.jsonl"
            with open(path, "w") as handle:
                for row in make_rows(kind, rows):
                    handle.write(json.dumps(row) + "\n")
            for case in CASES:
                # every cold case gets empty caches; the cached and rank-1 cases reuse the first case's caches
                fresh = case in ("ours", "ours_np2", "trl", "trl_np2")
                name = case if fresh else "ours"
                spec = {"case": case, "kind": kind, "file": str(path), "hf_cache": str(root / f"hf-{kind}-{name}"),
                        "cache": str(root / f"ours-{kind}-{name}")}
                result = run_worker(spec)
                results.append(result)
                print(f"{kind:10} {case:12} {result['seconds']:8.2f} s  {result['peak_mib']:8.1f} MiB  "
                      f"({result['examples']} examples)", flush=True)
    print()
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def report(results: list[dict[str, Any]]) -> str:
    """The ratios of the issue: ours / TRL time at 1 and 2 processes, cache hit / first run, memory."""
    lines = [f"{'kind':10} {'case':12} {'seconds':>9} {'vs trl':>8} {'vs ours':>8} {'peak MiB':>9}"]
    for kind in KINDS:
        by_case = {r["case"]: r for r in results if r["kind"] == kind}
        if not by_case:
            continue
        trl_time, ours_time = by_case["trl"]["seconds"], by_case["ours"]["seconds"]
        for case in CASES:
            r = by_case[case]
            lines.append(f"{kind:10} {case:12} {r['seconds']:9.2f} {r['seconds'] / trl_time:8.2f} "
                         f"{r['seconds'] / ours_time:8.3f} {r['peak_mib']:9.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
