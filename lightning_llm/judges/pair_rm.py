"""Pairwise judging with a local reward model (any ``transformers`` sequence classifier)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_llm.judges._local import batched, check_batch_size, has_chat_template, resolve_device
from lightning_llm.judges.base import FAILED, BasePairwiseJudge, choices_from_scores, validate_pairwise_inputs
from lightning_llm.models.loading import ModelLike, TokenizerLike, load_model, load_tokenizer


def reward_texts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
    """Each (prompt, completion) as the reward model reads it: a user and an assistant turn through the chat template
    when the tokenizer has one, else the prompt followed by the completion."""
    if not has_chat_template(tokenizer):
        return [prompt + completion for prompt, completion in zip(prompts, completions)]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], tokenize=False
        )
        for prompt, completion in zip(prompts, completions)
    ]


def bradley_terry_probability(first: float, second: float, temperature: float = 1.0) -> float:
    """P(first beats second) = sigmoid((r_first - r_second) / temperature); -1.0 if a reward is not finite."""
    if not (math.isfinite(first) and math.isfinite(second)):
        return float(FAILED)
    margin = (first - second) / temperature
    # the two branches avoid overflow of exp for large |margin|
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    exp_margin = math.exp(margin)
    return exp_margin / (1.0 + exp_margin)


class PairRMJudge(BasePairwiseJudge):
    """Pairwise judge backed by a reward model: score each (prompt, completion), prefer the higher reward.

    TRL's ``PairRMJudge`` ran the ``llm-blender/PairRM`` ranker; this one takes any local reward model or sequence
    classifier (a model trained with ``RewardModule``, a hub reward model, a local directory), so it needs no extra
    library. The reward is the classifier's logit ``score_index`` on the conversation (chat template applied when the
    tokenizer has one); with ``return_scores`` the judge gives the Bradley-Terry probability
    ``sigmoid((r_0 - r_1) / temperature)`` that the first completion is better.

    Each completion is scored on its own, so the judge has no position bias: ``shuffle_order`` is accepted for the
    common signature and changes nothing.

    Args:
        model: a hub id, a local ``save_pretrained`` directory, a tiny preset name, or a ``PreTrainedModel`` with a
            sequence-classification head.
        tokenizer: tokenizer or where to load it from (default: the model's).
        device: where to run (default: CUDA if present for a model loaded here; a model object stays where it is).
        dtype: parameter dtype when loading.
        batch_size: sequences per forward pass.
        max_length: truncate each conversation to this many tokens (default: no truncation).
        score_index: which logit is the reward; ``None`` requires a single-logit reward model.
        temperature: divides the reward margin in ``return_scores`` probabilities.
        trust_remote_code: allow custom modelling code from the checkpoint.
    """

    def __init__(
        self,
        model: ModelLike,
        tokenizer: TokenizerLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        score_index: int | None = None,
        temperature: float = 1.0,
        trust_remote_code: bool = False,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive integer or None, got {max_length}")
        self.batch_size = check_batch_size(batch_size)
        self.max_length = max_length
        self.temperature = float(temperature)
        self.tokenizer = load_tokenizer(tokenizer, model, trust_remote_code=trust_remote_code)
        loaded = not isinstance(model, PreTrainedModel)
        self.model = load_model(model, task="sequence_classification", dtype=dtype, trust_remote_code=trust_remote_code)
        num_labels = self.model.config.num_labels
        if score_index is None:
            if num_labels != 1:
                raise ValueError(
                    f"The model has {num_labels} output logits; set score_index to the one that is the reward"
                )
            score_index = 0
        if not 0 <= score_index < num_labels:
            raise ValueError(f"score_index must be in [0, {num_labels}), got {score_index}")
        self.score_index = score_index
        # sequence classifiers read the reward at the last non-pad token, so they must know the pad id
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = resolve_device(device, self.model, loaded)
        self.model.to(self.device).eval()

    @torch.no_grad()
    def rewards(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """The reward of each ``completions[i]`` as an answer to ``prompts[i]``."""
        if len(prompts) != len(completions):
            raise ValueError(
                f"prompts and completions must have the same length, got {len(prompts)} and {len(completions)}"
            )
        texts = reward_texts(self.tokenizer, prompts, completions)
        add_special_tokens = not has_chat_template(self.tokenizer)
        rewards: list[float] = []
        for chunk in batched(texts, self.batch_size):
            encoded = self.tokenizer(
                list(chunk), return_tensors="pt", padding=True, padding_side="right",
                truncation=self.max_length is not None, max_length=self.max_length,
                add_special_tokens=add_special_tokens,
            ).to(self.device)
            logits = self.model(**encoded).logits  # [batch, num_labels]
            rewards.extend(logits[:, self.score_index].float().tolist())
        return rewards

    def judge(
        self,
        prompts: list[str],
        completions: list[list[str]],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int] | list[float]:
        """Index of the higher-reward completion per prompt (0 on a tie), or with ``return_scores`` the probability
        that the first is better; -1 where a reward is not finite."""
        validate_pairwise_inputs(prompts, completions)
        # both completions of every pair in one pass: [first of each pair..., second of each pair...]
        flat_prompts = list(prompts) + list(prompts)
        flat_completions = [pair[0] for pair in completions] + [pair[1] for pair in completions]
        rewards = self.rewards(flat_prompts, flat_completions)
        count = len(prompts)
        scores = [
            bradley_terry_probability(rewards[i], rewards[count + i], self.temperature) for i in range(count)
        ]
        return scores if return_scores else choices_from_scores(scores)

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return f"PairRMJudge(model={name!r}, device={str(self.device)!r})"
