"""Record TRL 1.13.0's NashMDTrainer on a fixed tiny setup, for ``tests/parity/test_trl113.py``.

TRL dropped Nash-MD after 1.13, so CI (which has TRL 1.16) compares against what this script wrote. To regenerate::

    python -m venv --system-site-packages /tmp/venv113
    /tmp/venv113/bin/pip install --no-deps trl==1.13.0
    /tmp/venv113/bin/python tests/parity/trl113/record_nash_md.py

Recorded with trl 1.13.0 over torch 2.13.0+cpu, transformers 5.25.0, accelerate 1.16.0 and datasets 5.2.0 (the
versions are written into the fixture too). The setup is ``record_xpo.py``'s, whose pieces this script imports: the
tiny-llama weights saved beside it (``tiny-llama/``), the same 4 prompts of one token length, 4 prompts per step,
plain SGD at a large constant learning rate (so that the second step is off the reference), no gradient clipping.
TRL's generation is replaced by fixed completions, a function of the prompt's token ids and of the source (0: the
policy, 1: the geometric mixture), and the reward model by a rule on the completion's token ids (patched in as TRL's
``get_reward``, so TRL's own Bradley-Terry probability and loss run on it). Per case and step the fixture holds TRL's
logged metrics (the loss unrounded) and, per parameter, the gradient's norm, sum and projection on a seeded random
direction, and one parameter's whole gradient.

Not recorded: ``missing_eos_penalty``. TRL 1.13 looks for EOS in prompt + completion, and the chat-templated prompts
hold the EOS token (``<|im_end|>``), so TRL never applies the penalty here; ours looks in the completion only.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from record_xpo import (  # noqa: E402  (the XPO recorder's setup, shared)
    FULL_GRADS,
    LR,
    MAX_COMPLETION,
    MODEL_DIR,
    PROMPTS,
    fixed_completion,
    probe,
    row_indices,
    rows,
    rule_score,
    save_model,
)

CASES = {
    "default": {"beta": 0.1, "mixture_coef": 0.5},
    "strong_kl": {"beta": 0.7, "mixture_coef": 0.25},
}


def record_case(settings: dict, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.nash_md import NashMDConfig, NashMDTrainer, nash_md_trainer

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

    def rule_reward_model(model, query_responses, pad_token_id, context_length):
        """TRL's ``get_reward`` contract: ``(logits, scores, sequence lengths)``; the scores only are read. Padding
        (id 0) adds nothing to the rule's sum, so the padded completion scores as the cut one."""
        completions = query_responses[:, context_length:].tolist()
        return None, torch.tensor([rule_score(ids) for ids in completions]), None

    class FixedNashMD(NashMDTrainer):
        def _generate_completions(self, model, prompts):
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

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss))
            return loss

    args = NashMDConfig(
        output_dir=str(tmp / "trl"), report_to=[], use_cpu=True, bf16=False, max_steps=2,
        per_device_train_batch_size=PROMPTS, logging_steps=1, save_strategy="no", disable_tqdm=True, seed=42,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0,
        gradient_checkpointing=False, max_new_tokens=MAX_COMPLETION, **settings,
    )
    original = nash_md_trainer.get_reward
    nash_md_trainer.get_reward = rule_reward_model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # TRL 1.13 wants one reward model; it is never called (the patched get_reward applies the rule)
            reward_model = tiny_model("tiny-llama", task="sequence_classification", num_labels=1)
            trainer = FixedNashMD(model=str(MODEL_DIR), reward_funcs=reward_model, args=args,
                                  processing_class=tokenizer, train_dataset=Dataset.from_list(rows()),
                                  callbacks=[Grab()])
            trainer.train()
    finally:
        nash_md_trainer.get_reward = original
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
    (HERE / "nash_md.json").write_text(json.dumps(fixture))
    print(f"wrote {HERE / 'nash_md.json'} with {versions}")


if __name__ == "__main__":
    main()
