"""Record TRL 1.13.0's XPOTrainer on a fixed tiny setup, for ``tests/parity/test_trl113.py``.

TRL dropped XPO after 1.13, so CI (which has TRL 1.16) compares against what this script wrote. To regenerate::

    python -m venv --system-site-packages /tmp/venv113
    /tmp/venv113/bin/pip install --no-deps trl==1.13.0
    /tmp/venv113/bin/python tests/parity/trl113/record_xpo.py

Recorded with trl 1.13.0 over torch 2.13.0+cpu, transformers 5.25.0, accelerate and datasets of the dev extras
(the versions are written into the fixture too). The setup: the tiny-llama preset (its weights saved beside this
script, ``tiny-llama/``, and loaded from there on both sides), 4 prompts of one token length from the shipped
prompt-only sample (their row numbers are in the fixture), 4 prompts per step, plain SGD at a large constant
learning rate (so that the second step is off the reference), no gradient clipping. TRL's generation is replaced
by fixed completions (a function of the prompt's token ids and of which model "sampled" it) and its reward model by
a rule on the completion's token ids, both recorded, so our side can replay the same completions and scores. Per
case and step the fixture holds TRL's logged metrics (the loss unrounded) and, per parameter, the gradient's norm,
sum and projection on a seeded random direction, and one parameter's whole gradient.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "tiny-llama"
PROMPTS = 4
MAX_COMPLETION = 10
LR = 2.0
#: the parameter whose whole gradient is kept (the others: norm, sum and a projection on a seeded random vector)
FULL_GRADS = ("model.layers.0.self_attn.q_proj.weight",)
CASES = {
    "sigmoid": {"loss_type": "sigmoid", "beta": 0.1, "alpha": 0.05},
    "ipo": {"loss_type": "ipo", "beta": 0.5, "alpha": 0.2},
}


def fixed_completion(prompt_ids: list[int], source: int, eos: int) -> list[int]:
    """A function of the prompt and of the source (0: the policy, 1: the reference): 3 to 9 tokens and EOS, or, for
    one in three, ``MAX_COMPLETION`` tokens without EOS (cut at the limit, as generation cuts them: TRL 1.13 takes
    every token of a completion without EOS as real, padding included)."""
    generator = torch.Generator().manual_seed(sum(prompt_ids) * 17 + source)
    length = int(torch.randint(3, MAX_COMPLETION, (1,), generator=generator))
    if (sum(prompt_ids) + source) % 3 == 0:
        return torch.randint(3, 800, (MAX_COMPLETION,), generator=generator).tolist()
    return torch.randint(3, 800, (length,), generator=generator).tolist() + [eos]


def probe(size: int) -> torch.Tensor:
    """The seeded random direction a gradient is projected on (float64)."""
    return torch.randn(size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)


def rule_score(completion_ids: list[int]) -> float:
    """The reward: a function of the completion's token ids."""
    return (sum(completion_ids) % 11) / 10.0


def row_indices() -> list[int]:
    """The first ``PROMPTS`` rows of the prompt-only sample whose prompts are of one token length: TRL 1.13's XPO
    calls the model without position ids, so a left-padded prompt would get shifted positions there (ours, like TRL
    1.16's Online DPO, derives positions from the attention mask); prompts of one length need no padding."""
    from collections import defaultdict

    from lightning_llm.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    by_length = defaultdict(list)
    for index, row in enumerate(all_rows()):
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        by_length[len(ids)].append(index)
        if len(by_length[len(ids)]) == PROMPTS:
            return by_length[len(ids)]
    raise AssertionError("no prompt length is shared by enough rows")


def all_rows() -> list[dict]:
    from lightning_llm.assets import sample_path

    with open(sample_path("prompt_only"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def rows() -> list[dict]:
    everything = all_rows()
    return [everything[i] for i in row_indices()]


def save_model() -> None:
    from lightning_llm.models import tiny_model

    if not (MODEL_DIR / "config.json").is_file():
        tiny_model("tiny-llama").save_pretrained(MODEL_DIR)


def record_case(settings: dict, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.xpo import XPOConfig, XPOTrainer

    from lightning_llm.models import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: dict = {"settings": settings, "completions": {}, "steps": []}
    grads: list[dict] = []
    losses: list[float] = []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            step = {}
            for name, param in model.named_parameters():
                if param.grad is not None:
                    g = param.grad.detach().double()
                    step[name] = {"norm": g.norm().item(), "sum": g.sum().item(),
                                  "projection": (g.flatten() * probe(g.numel())).sum().item()}
                    if name in FULL_GRADS:
                        step[name]["full"] = g.flatten().tolist()
            grads.append(step)

    class FixedXPO(XPOTrainer):
        def _generate_completions(self, prompts, model):
            outputs = []
            for source in (0, 1):
                sequences = []
                for ids, mask in zip(prompts["input_ids"].tolist(), prompts["attention_mask"].tolist()):
                    prompt = [t for t, m in zip(ids, mask) if m]
                    completion = fixed_completion(prompt, source, eos)
                    out["completions"][json.dumps([prompt, source])] = completion
                    sequences.append(ids + completion)
                width = max(map(len, sequences))
                outputs.append(torch.tensor([s + [pad] * (width - len(s)) for s in sequences]))
            return outputs[0], outputs[1]

        def _compute_rewards(self, model_data, ref_data, context_length):
            scores = []
            for data in (model_data, ref_data):
                ids = data["input_ids"][:, context_length:]
                mask = data["attention_mask"][:, context_length:]
                scores.append(torch.tensor([rule_score([t for t, m in zip(r, k) if m])
                                            for r, k in zip(ids.tolist(), mask.tolist())]))
            return scores[0], scores[1]

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss))
            return loss

    args = XPOConfig(
        output_dir=str(tmp / "trl"), report_to=[], use_cpu=True, bf16=False, max_steps=2,
        per_device_train_batch_size=PROMPTS, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=42,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
        gradient_checkpointing=False, max_new_tokens=MAX_COMPLETION, **settings,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # TRL 1.13 wants one reward model; it is never called (the rewards come from rule_score)
        reward_model = tiny_model("tiny-llama", task="sequence_classification", num_labels=1)
        trainer = FixedXPO(model=str(MODEL_DIR), reward_funcs=reward_model, reward_processing_classes=tokenizer,
                           args=args,
                           processing_class=tokenizer, train_dataset=Dataset.from_list(rows()), callbacks=[Grab()])
        trainer.train()
    logs = [dict(entry) for entry in trainer.state.log_history if "loss" in entry]
    for log, loss, grad in zip(logs, losses, grads, strict=True):
        log["loss"] = loss  # the logged one is rounded to 4 decimals
        out["steps"].append({"metrics": {k: float(v) for k, v in log.items()}, "grads": grad})
    return out


def main() -> None:
    import tempfile

    import accelerate
    import datasets
    import transformers
    import trl

    if trl.__version__ != "1.13.0":
        sys.exit(f"needs trl 1.13.0, found {trl.__version__} (see this script's docstring)")
    save_model()
    versions = {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__, "datasets": datasets.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {name: record_case(settings, Path(tmp)) for name, settings in CASES.items()}
    fixture = {"versions": versions, "prompts": PROMPTS, "rows": row_indices(), "max_completion": MAX_COMPLETION,
               "lr": LR, "cases": cases}
    (HERE / "xpo.json").write_text(json.dumps(fixture))
    print(f"wrote {HERE / 'xpo.json'} with {versions}")


if __name__ == "__main__":
    main()
