"""The offline demo: SFT, then a reward model, DPO and GRPO, on a tiny model and the shipped data, on a CPU.

    lightning-llm-demo --output-dir outputs/demo        # or: python -m lightning_llm.demo

1. SFT of a tiny random-init Llama on the shipped chat data (sums, capitals, opposites, colours, animal sounds),
   metrics printed as it trains, a checkpoint and a Hugging Face export written, then a few answers generated.
2. A reward model trained on the shipped preference pairs (correct vs wrong answers), starting from the SFT model.
3. DPO (sigmoid plus an NLL term on the chosen answers) from the SFT model on the same pairs, with its reward
   margin and accuracy printed as they rise.
4. The reward model scores the SFT and the DPO model's answers.
5. GRPO from the DPO model on 32 of the shipped questions (``sample:prompt_only``), rewarding exact answers (the
   completion's last word against the row's ``solution``): on the same questions before and after, the share of
   sampled answers that are exact and the number of exact greedy answers, for the questions GRPO trained on and for
   26 held-out ones, and whether the change is larger than the sampling noise.

Everything lands in ``--output-dir``: ``sft/``, ``reward/``, ``dpo/``, ``grpo/`` (each with a checkpoint, a Hugging
Face export in ``hf/`` and its metrics CSV), ``curves.png`` and ``summary.json``. No network is used.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from lightning_llm.data import SFTDataModule  # noqa: E402
from lightning_llm.data.preference import PreferenceDataModule  # noqa: E402
from lightning_llm.data.prompts import PromptDataModule  # noqa: E402
from lightning_llm.data.sources import load_rows  # noqa: E402
from lightning_llm.modules.dpo import DPOModule  # noqa: E402
from lightning_llm.modules.grpo import GRPOModule  # noqa: E402
from lightning_llm.modules.reward import RewardModule  # noqa: E402
from lightning_llm.modules.sft import SFTModule  # noqa: E402

#: the demo's model: the tiny-llama preset made a little wider (0.35 M parameters), so it learns the facts quickly
DEMO_MODEL_KWARGS = {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}


def _trainer(stage_dir: Path, max_steps: int, val_every: int, callbacks: list | None = None) -> L.Trainer:
    from lightning_llm.callbacks.rich_progress import RichProgressCallback

    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=val_every,
        check_val_every_n_epoch=None, log_every_n_steps=max(1, val_every // 4), gradient_clip_val=1.0,
        logger=CSVLogger(str(stage_dir), name="", version=""), default_root_dir=str(stage_dir),
        callbacks=[RichProgressCallback(), ModelCheckpoint(dirpath=str(stage_dir / "checkpoints"), save_last=True),
                   *(callbacks or [])],
        enable_model_summary=False, num_sanity_val_steps=0,
    )


def _read_metrics(stage_dir: Path) -> list[dict[str, float]]:
    path = stage_dir / "metrics.csv"
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _series(rows: list[dict[str, float]], name: str) -> tuple[list[float], list[float]]:
    points = [(row["step"], row[name]) for row in rows if name in row]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(stages: dict[str, Path], path: Path) -> None:
    """Loss and reward curves of every stage in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("sft", ["loss", "val/loss"], "SFT loss"),
        ("sft", ["mean_token_accuracy", "val/mean_token_accuracy"], "SFT token accuracy"),
        ("reward", ["accuracy", "val/accuracy"], "reward model accuracy"),
        ("dpo", ["loss", "val/loss"], "DPO loss"),
        ("dpo", ["rewards/margins", "val/rewards/margins"], "DPO reward margin"),
        ("dpo", ["rewards/accuracies", "val/rewards/accuracies"], "DPO reward accuracy"),
        ("grpo", ["reward", "val/reward"], "GRPO: share of exact answers"),
        ("grpo", ["completions/mean_length", "val/completions/mean_length"], "GRPO completion length"),
        ("grpo", ["entropy", "val/entropy"], "GRPO: entropy of the sampled tokens"),
    ]
    fig, axes = plt.subplots(3, 3, figsize=(14, 11))
    for ax, (stage, names, title) in zip(axes.flat, panels):
        rows = _read_metrics(stages[stage])
        for name in names:
            steps, values = _series(rows, name)
            if steps:
                ax.plot(steps, values, marker="o" if name.startswith("val/") else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class DemoSettings:
    """Steps and learning rates of the four stages (the defaults take about a minute on 2 CPU cores)."""

    sft_steps: int = 150
    sft_lr: float = 3e-3
    reward_steps: int = 400
    reward_lr: float = 3e-4
    dpo_steps: int = 300
    dpo_lr: float = 3e-4
    beta: float = 0.1
    dpo_sft_weight: float = 1.0
    grpo_steps: int = 150
    grpo_lr: float = 2e-4
    grpo_beta: float = 0.0
    num_generations: int = 8
    grpo_questions: int = 32
    seed: int = 0
    num_samples: int = 32


def _pairs(seed: int, tokenizer: Any = None) -> PreferenceDataModule:
    return PreferenceDataModule("sample:preference", val_split=0.15, batch_size=8, max_length=128, seed=seed,
                                tokenizer=tokenizer)


def _questions(datamodule: PreferenceDataModule, limit: int) -> tuple[list[list[dict]], list[str], list[str]]:
    """Prompts, correct and wrong answers of the first ``limit`` training pairs."""
    rows = datamodule.rows("train", limit)
    return ([r["prompt"] for r in rows], [r["chosen"][0]["content"] for r in rows],
            [r["rejected"][0]["content"] for r in rows])


def _exact(answers: list[str], truths: list[str]) -> int:
    return sum(a.strip() == t for a, t in zip(answers, truths))


def _last_word(text: str) -> str:
    words = text.strip().rstrip(".!?").split()
    return words[-1].lower() if words else ""


def exact_answer_reward(completions: list, solution: list, **kwargs: Any) -> list[float]:
    """1 when the completion's last word is the row's ``solution`` (the shipped answers end the sentence: "The
    capital of France is Paris."), else 0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(_last_word(text) == str(answer).lower()) for text, answer in zip(texts, solution)]


SAMPLES_PER_QUESTION = 8
HELD_OUT_QUESTIONS = 26


def sampled_gain(before: dict[str, float], after: dict[str, float], samples: int) -> tuple[float, float]:
    """The change of the sampled exact share, and two standard errors of that difference (binomial, ``samples``
    answers on each side)."""
    variance = sum(p * (1 - p) / samples for p in (before["sampled"], after["sampled"]))
    return after["sampled"] - before["sampled"], 2 * variance**0.5


def answer_accuracy(module: Any, rows: list[dict], seed: int) -> dict[str, float]:
    """How well ``module`` answers the questions of ``rows`` (``prompt`` and ``solution`` columns): the share of
    sampled answers that are exact (temperature 1, :data:`SAMPLES_PER_QUESTION` per question, drawn from ``seed``)
    and the number of exact greedy answers."""
    prompts, answers = [r["prompt"] for r in rows], [r["solution"] for r in rows]
    greedy = exact_answer_reward(module.generate(prompts, max_new_tokens=24, batch_size=64), answers)
    torch.manual_seed(seed)
    repeated = prompts * SAMPLES_PER_QUESTION
    sampled = exact_answer_reward(module.generate(repeated, max_new_tokens=24, do_sample=True, batch_size=64),
                                  answers * SAMPLES_PER_QUESTION)
    return {"sampled": sum(sampled) / len(sampled), "greedy": int(sum(greedy))}


def run(output_dir: str = "outputs/demo", settings: DemoSettings | None = None) -> dict[str, Any]:
    """Run the four stages; return (and write) the summary."""
    cfg = settings or DemoSettings()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = {name: out / name for name in ("sft", "reward", "dpo", "grpo")}
    summary: dict[str, Any] = {"settings": asdict(cfg)}
    started = time.time()

    # 1. SFT ---------------------------------------------------------------------------------------------------
    print("\n=== 1/4 SFT: a tiny Llama learns the shipped chat data ===")
    L.seed_everything(cfg.seed, verbose=False)
    sft = SFTModule("tiny-llama", model_kwargs=DEMO_MODEL_KWARGS, learning_rate=cfg.sft_lr, warmup_ratio=0.05,
                    export_dir=str(stages["sft"] / "hf"))
    sft_data = SFTDataModule("sample:messages", val_split=0.1, batch_size=16, max_length=128,
                             assistant_only_loss=True, seed=cfg.seed)
    _trainer(stages["sft"], cfg.sft_steps, max(1, cfg.sft_steps // 4)).fit(sft, sft_data)
    summary["sft"] = {k: float(v) for k, v in sft.trainer.callback_metrics.items()}

    pairs = _pairs(cfg.seed, sft.tokenizer)
    pairs.setup("fit")  # the same split as the reward and DPO stages below (same seed)
    prompts, correct, wrong = _questions(pairs, cfg.num_samples)
    sft_answers = sft.generate(prompts, max_new_tokens=24)
    print(f"\nThe SFT model answers {_exact(sft_answers, correct)}/{len(prompts)} questions exactly, e.g.:")
    for prompt, answer, truth in list(zip(prompts, sft_answers, correct))[:6]:
        mark = "ok   " if answer.strip() == truth else "wrong"
        print(f"  {mark} {prompt[-1]['content']!r:42} -> {answer!r}")

    # 2. Reward model ------------------------------------------------------------------------------------------
    print("\n=== 2/4 A reward model, from the SFT model, learns correct-vs-wrong answer pairs ===")
    L.seed_everything(cfg.seed, verbose=False)
    reward = RewardModule(str(stages["sft"] / "hf"), learning_rate=cfg.reward_lr, warmup_ratio=0.1,
                          export_dir=str(stages["reward"] / "hf"))
    _trainer(stages["reward"], cfg.reward_steps, max(1, cfg.reward_steps // 3)).fit(reward, _pairs(cfg.seed))
    summary["reward"] = {k: float(v) for k, v in reward.trainer.callback_metrics.items()}

    # 3. DPO ---------------------------------------------------------------------------------------------------
    print("\n=== 3/4 DPO from the SFT model, on the same pairs ===")
    L.seed_everything(cfg.seed, verbose=False)
    # sigmoid DPO plus an NLL term on the chosen answers (RPO), so the model does not unlearn the right answers
    # while it pushes the wrong ones down
    loss_type, loss_weights = (["sigmoid", "sft"], [1.0, cfg.dpo_sft_weight]) if cfg.dpo_sft_weight else ("sigmoid",
                                                                                                           None)
    dpo = DPOModule(str(stages["sft"] / "hf"), beta=cfg.beta, loss_type=loss_type, loss_weights=loss_weights,
                    learning_rate=cfg.dpo_lr, warmup_ratio=0.1, export_dir=str(stages["dpo"] / "hf"))
    _trainer(stages["dpo"], cfg.dpo_steps, max(1, cfg.dpo_steps // 3)).fit(dpo, _pairs(cfg.seed))
    summary["dpo"] = {k: float(v) for k, v in dpo.trainer.callback_metrics.items()}
    dpo_rows = _read_metrics(stages["dpo"])
    _, margins = _series(dpo_rows, "rewards/margins")
    _, accuracies = _series(dpo_rows, "rewards/accuracies")
    print(f"\nDPO reward margin {margins[0]:+.3f} -> {margins[-1]:+.3f}, pair accuracy {accuracies[0]:.2f} -> "
          f"{accuracies[-1]:.2f} (first vs last logged step)")

    # 4. The reward model judges the SFT and DPO answers -------------------------------------------------------
    dpo_answers = dpo.generate(prompts, max_new_tokens=24)
    sft_scores = reward.score(prompts, sft_answers)
    dpo_scores = reward.score(prompts, dpo_answers)
    correct_scores, wrong_scores = reward.score(prompts, correct), reward.score(prompts, wrong)
    summary["comparison"] = {
        "questions": len(prompts),
        "sft_exact_answers": _exact(sft_answers, correct),
        "dpo_exact_answers": _exact(dpo_answers, correct),
        "mean_reward_sft": sum(sft_scores) / len(prompts),
        "mean_reward_dpo": sum(dpo_scores) / len(prompts),
        "reward_model_prefers_dpo": sum(d > s for d, s in zip(dpo_scores, sft_scores)),
        "reward_model_prefers_sft": sum(d < s for d, s in zip(dpo_scores, sft_scores)),
        "reward_model_ranks_correct_above_wrong": sum(c > w for c, w in zip(correct_scores, wrong_scores)),
    }
    print("\nSFT vs DPO answers, scored by the reward model:")
    for prompt, s, d, sa, da in list(zip(prompts, sft_scores, dpo_scores, sft_answers, dpo_answers))[:8]:
        print(f"  {prompt[-1]['content']!r:40} SFT {s:+6.2f} {sa!r:38} DPO {d:+6.2f} {da!r}")
    c = summary["comparison"]
    n = len(prompts)
    print(f"\nOn {n} questions of the preference pairs: exact answers SFT {c['sft_exact_answers']}/{n} -> DPO "
          f"{c['dpo_exact_answers']}/{n}; mean reward SFT {c['mean_reward_sft']:+.2f} -> DPO "
          f"{c['mean_reward_dpo']:+.2f}; the reward model prefers the DPO answer {c['reward_model_prefers_dpo']} "
          f"times and the SFT answer {c['reward_model_prefers_sft']} times (identical answers tie). It ranks the "
          f"correct answer above the wrong one for {c['reward_model_ranks_correct_above_wrong']}/{n} of these pairs, "
          f"and for {summary['reward'].get('val/accuracy', float('nan')):.0%} of the held-out pairs (val/accuracy): "
          "a model this small memorises facts more than it learns to check them.")

    # 5. GRPO: exact answers rewarded --------------------------------------------------------------------------
    print("\n=== 4/4 GRPO from the DPO model: exact answers to the shipped questions are rewarded ===")
    L.seed_everything(cfg.seed, verbose=False)
    # a fixed set of questions, each drawn many times (GRPO's signal on one question is its group's spread), and
    # held-out questions it never trains on (validated on under val/)
    shuffled = load_rows("sample:prompt_only")
    random.Random(cfg.seed).shuffle(shuffled)
    held_out, trained = shuffled[:HELD_OUT_QUESTIONS], shuffled[HELD_OUT_QUESTIONS:][: cfg.grpo_questions]
    grpo = GRPOModule(str(stages["dpo"] / "hf"), reward_funcs=[exact_answer_reward],
                      num_generations=cfg.num_generations, max_completion_length=24, beta=cfg.grpo_beta,
                      learning_rate=cfg.grpo_lr, export_dir=str(stages["grpo"] / "hf"))
    questions = PromptDataModule(trained, val_data=held_out, batch_size=cfg.num_generations * 4,
                                 tokenizer=grpo.tokenizer, seed=cfg.seed)
    splits = {"trained": trained, "held_out": held_out}
    before = {name: answer_accuracy(grpo, rows, cfg.seed) for name, rows in splits.items()}
    _trainer(stages["grpo"], cfg.grpo_steps, max(1, cfg.grpo_steps // 3)).fit(grpo, questions)
    summary["grpo"] = {k: float(v) for k, v in grpo.trainer.callback_metrics.items()}
    after = {name: answer_accuracy(grpo, rows, cfg.seed) for name, rows in splits.items()}
    summary["comparison"]["grpo"] = {name: {"questions": len(rows), "before": before[name], "after": after[name]}
                                     for name, rows in splits.items()}
    for name, rows in splits.items():
        b, a = before[name], after[name]
        print(f"GRPO, {len(rows)} {name.replace('_', '-')} questions: sampled answers exact {b['sampled']:.1%} -> "
              f"{a['sampled']:.1%} ({SAMPLES_PER_QUESTION} per question, same seed), greedy answers exact "
              f"{b['greedy']} -> {a['greedy']}")
    gain, noise = sampled_gain(before["trained"], after["trained"], len(trained) * SAMPLES_PER_QUESTION)
    summary["comparison"]["grpo"]["trained"].update(gain=gain, two_standard_errors=noise)
    verdict = "went up" if gain > noise else "went down" if gain < -noise else "did not change beyond sampling noise"
    print(f"Answer accuracy on the questions GRPO trained on {verdict} ({gain:+.1%}; two standard errors of the "
          f"difference: {noise:.1%}). The reward curve in curves.png also moves with which questions each logging "
          "window drew; the numbers above are the same questions before and after.")

    plot_curves(stages, out / "curves.png")
    summary["seconds"] = round(time.time() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nDone in {summary['seconds']} s. Wrote {out}/curves.png, {out}/summary.json, and per stage a checkpoint "
          f"(checkpoints/last.ckpt), a Hugging Face export (hf/) and metrics.csv under {out}/sft, reward, dpo, grpo.")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``lightning-llm-demo``."""
    from lightning_llm.cli import quiet_console

    quiet_console()
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything is written")
    for field in fields(DemoSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name), help=f"default {getattr(defaults, field.name)}")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.WARNING)
    output_dir = args.pop("output_dir")
    run(output_dir, DemoSettings(**args))


if __name__ == "__main__":
    main()
