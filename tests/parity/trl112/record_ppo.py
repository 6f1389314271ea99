"""Record TRL 1.12.0's PPOTrainer on a fixed tiny setup, for ``tests/parity/test_trl112_ppo.py``.

TRL dropped PPO after 1.12, so CI (which has TRL 1.16) compares against what this script wrote. To regenerate::

    python -m venv --system-site-packages /tmp/venv112
    /tmp/venv112/bin/pip install --no-deps trl==1.12.0
    /tmp/venv112/bin/python tests/parity/trl112/record_ppo.py

The versions it ran with are written into the fixture. The setup: the policy is the committed tiny-llama of
``../trl113/tiny-llama``; the reward model (and, as in TRL's recipe, the value model's starting point) is a one-label
tiny-llama classifier saved beside this script (``tiny-llama-rm/``); 8 prompts of one token length from the shipped
prompt-only sample (no prompt padding), 4 per rollout, two rollouts; two PPO epochs per rollout in one mini-batch of
one micro-batch (so the order TRL shuffles them in does not matter), plain SGD at a constant learning rate. TRL's
generation is replaced by fixed completions, a function of the prompt's token ids (their log-probs are the policy's
own temperature-scaled logits, what sampling returns). Per rollout the fixture holds TRL's logged metrics and the
prompts it drew (row numbers, in order); per optimizer step each parameter's gradient norm, sum and projection on a
seeded random direction.

TRL 1.12's loop never clips gradients (it calls ``optimizer.step()`` after ``accelerator.backward`` without
``clip_grad_norm_``), whatever ``max_grad_norm`` says: our side runs with ``max_grad_norm=None``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
POLICY_DIR = HERE.parent / "trl113" / "tiny-llama"
REWARD_DIR = HERE / "tiny-llama-rm"
PROMPTS_PER_ROLLOUT = 4
ROLLOUTS = 2
MAX_COMPLETION = 10
LR = 0.5
TEMPERATURE = 0.7
CASES = {
    "k1": {"kl_coef": 0.05, "kl_estimator": "k1", "num_ppo_epochs": 2},
    # (TRL refuses whiten_rewards below 8 prompts per mini-batch and process)
    "k3_eos_penalty": {"kl_coef": 0.3, "kl_estimator": "k3", "num_ppo_epochs": 2, "missing_eos_penalty": 1.0,
                       "cliprange": 0.1, "cliprange_value": 0.05, "vf_coef": 0.5, "gamma": 0.9, "lam": 0.8},
}


def fixed_completion(prompt_ids: list[int], eos: int) -> list[int]:
    """A function of the prompt: 3 to 9 tokens and EOS, or, for one in three, ``MAX_COMPLETION`` tokens without EOS."""
    generator = torch.Generator().manual_seed(sum(prompt_ids) * 13 + len(prompt_ids))
    length = int(torch.randint(3, MAX_COMPLETION, (1,), generator=generator))
    if sum(prompt_ids) % 3 == 0:
        return torch.randint(3, 800, (MAX_COMPLETION,), generator=generator).tolist()
    return torch.randint(3, 800, (length,), generator=generator).tolist() + [eos]


def probe(size: int) -> torch.Tensor:
    """The seeded random direction a gradient is projected on (float64)."""
    return torch.randn(size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)


def all_rows() -> list[dict]:
    from lightning_llm.assets import sample_path

    with open(sample_path("prompt_only"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def prompt_ids(row: dict) -> list[int]:
    from lightning_llm.data.chat import sequence_ids
    from lightning_llm.models import tiny_tokenizer

    return sequence_ids(tiny_tokenizer(), [(row["prompt"], True, None)])[0]


def row_indices() -> list[int]:
    """The first ``PROMPTS_PER_ROLLOUT * ROLLOUTS`` rows whose prompts share one token length."""
    from collections import defaultdict

    by_length = defaultdict(list)
    for index, row in enumerate(all_rows()):
        ids = prompt_ids(row)
        by_length[len(ids)].append(index)
        if len(by_length[len(ids)]) == PROMPTS_PER_ROLLOUT * ROLLOUTS:
            return by_length[len(ids)]
    raise AssertionError("no prompt length is shared by enough rows")


def save_reward_model() -> None:
    from lightning_llm.models import tiny_model, tiny_tokenizer

    if not (REWARD_DIR / "config.json").is_file():
        tiny_model("tiny-llama", task="sequence_classification", num_labels=1, seed=5).save_pretrained(REWARD_DIR)
        tiny_tokenizer().save_pretrained(REWARD_DIR)


def record_case(settings: dict, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from lightning_llm.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    indices = row_indices()
    by_ids = {json.dumps(prompt_ids(all_rows()[i])): i for i in indices}
    out: dict = {"settings": settings, "rollouts": [], "steps": []}

    def fixed_generation(model, queries, batch_size, pad_token_id, generation_config):
        rows = []
        for query in queries.tolist():
            prompt = [t for t in query if t != pad]
            rows.append(query + fixed_completion(prompt, eos))
        width = max(map(len, rows))
        query_responses = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        context = queries.shape[1]
        output = trl_ppo.forward(model, query_responses, pad_token_id)
        logits = output.logits[:, context - 1: -1] / (generation_config.temperature)
        drawn.append([by_ids[json.dumps([t for t in q if t != pad])] for q in queries.tolist()])
        return query_responses, logits

    drawn: list[list[int]] = []
    trl_ppo.batch_generation = fixed_generation

    dataset = Dataset.from_list([{"input_ids": prompt_ids(all_rows()[i])} for i in indices])
    args = PPOConfig(
        output_dir=str(tmp / "trl"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4,
        gradient_accumulation_steps=1, num_mini_batches=1, total_episodes=PROMPTS_PER_ROLLOUT * ROLLOUTS,
        response_length=MAX_COMPLETION, temperature=TEMPERATURE, logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=42, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        num_sample_generations=0, gradient_checkpointing=False, **settings,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
        reward = AutoModelForSequenceClassification.from_pretrained(REWARD_DIR)
        value = AutoModelForSequenceClassification.from_pretrained(REWARD_DIR)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                             reward_model=reward, train_dataset=dataset, value_model=value)
        optimizer = trainer.optimizer
        inner_step = optimizer.step

        def step(*a, **k):
            if trainer.accelerator.sync_gradients:
                grads = {}
                for name, param in trainer.model.named_parameters():
                    if param.grad is not None:
                        g = param.grad.detach().double()
                        grads[name] = {"norm": g.norm().item(), "sum": g.sum().item(),
                                       "projection": (g.flatten() * probe(g.numel())).sum().item()}
                out["steps"].append(grads)
            return inner_step(*a, **k)

        optimizer.step = step
        trainer.train()
    logs = [dict(entry) for entry in trainer.state.log_history if "objective/kl" in entry]
    out["metrics"] = [{k: float(v) for k, v in log.items()} for log in logs]
    out["rollouts"] = drawn
    return out


def main() -> None:
    import tempfile

    import accelerate
    import datasets
    import transformers
    import trl

    if trl.__version__ != "1.12.0":
        sys.exit(f"needs trl 1.12.0, found {trl.__version__} (see this script's docstring)")
    save_reward_model()
    versions = {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "accelerate": accelerate.__version__, "datasets": datasets.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {name: record_case(settings, Path(tmp)) for name, settings in CASES.items()}
    fixture = {"versions": versions, "max_completion": MAX_COMPLETION, "lr": LR, "temperature": TEMPERATURE,
               "prompts_per_rollout": PROMPTS_PER_ROLLOUT, "cases": cases}
    (HERE / "ppo.json").write_text(json.dumps(fixture))
    print(f"wrote {HERE / 'ppo.json'} with {versions}")


if __name__ == "__main__":
    main()
