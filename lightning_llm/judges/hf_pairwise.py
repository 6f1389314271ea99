"""A local (or hub) causal LM as a pairwise judge, read from its next-token likelihoods: no generation, no API."""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_llm.judges._local import batched, check_batch_size, has_chat_template, resolve_device
from lightning_llm.judges.base import (
    DEFAULT_PAIRWISE_SYSTEM_PROMPT,
    BasePairwiseJudge,
    apply_flips,
    check_pairwise_prompt,
    choices_from_scores,
    draw_flips,
    render_pairwise_prompt,
    restore_scores,
    validate_pairwise_inputs,
)
from lightning_llm.models.loading import ModelLike, TokenizerLike, load_model, load_tokenizer


def single_token_id(tokenizer: PreTrainedTokenizerBase, answer: str) -> int:
    """The id of the one token that spells ``answer``.

    SentencePiece tokenizers may prepend a bare word-boundary piece (``"▁"``); pieces that decode to whitespace only
    are ignored for that reason.
    """
    ids = tokenizer.encode(answer, add_special_tokens=False)
    meaningful = [token for token in ids if tokenizer.decode([token]).strip()]
    if len(meaningful) != 1:
        raise ValueError(
            f"The judge's tokenizer spells the answer {answer!r} with tokens {ids}; HfPairwiseJudge needs answers that "
            "are a single token"
        )
    return meaningful[0]


def judge_texts(tokenizer: PreTrainedTokenizerBase, requests: Sequence[str]) -> list[str]:
    """Each judge request as the model sees it: a user turn plus the assistant header when there is a chat template,
    else the bare request."""
    if not has_chat_template(tokenizer):
        return list(requests)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True
        )
        for request in requests
    ]


@torch.no_grad()
def next_token_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, vocab]`` (float32) of the token after each *left-padded* sequence.

    Positions are counted from each row's first real token, so padding does not shift them; only the last position's
    logits are computed when the model supports ``logits_to_keep``.
    """
    accepted = inspect.signature(model.forward).parameters
    kwargs = {}
    if "position_ids" in accepted:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    return logits[:, -1, :].float()


class HfPairwiseJudge(BasePairwiseJudge):
    """Pairwise judge that reads a causal LM's preference from the probabilities of it answering ``"0"`` or ``"1"``.

    The judge prompt (with the chat template when the tokenizer has one) asks which of two completions is better;
    instead of generating, the judge compares the next-token logits of the two answer tokens. The probability that
    the first shown completion is better is ``softmax([logit("0"), logit("1")])[0]``. Works fully offline with a local
    model directory or a model object.

    Args:
        model: a hub id, a local ``save_pretrained`` directory, a tiny preset name, or a ``PreTrainedModel``.
        tokenizer: tokenizer or where to load it from (default: the model's).
        system_prompt: the judge prompt with the fields ``{prompt}``, ``{response0}``, ``{response1}`` (default: this
            package's ``DEFAULT_PAIRWISE_SYSTEM_PROMPT``), asking for a one-character answer.
        device: where to run (default: CUDA if present for a model loaded here; a model object stays where it is).
        dtype: parameter dtype when loading (``"bfloat16"``, ...).
        batch_size: judge requests per forward pass.
        answers: the two answer strings, each a single token (for prompts that ask for e.g. ``("A", "B")``).
        seed: seed of the order flips (``None``: a fresh random seed).
        trust_remote_code: allow custom modelling code from the checkpoint.
    """

    def __init__(
        self,
        model: ModelLike,
        tokenizer: TokenizerLike | None = None,
        system_prompt: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 4,
        answers: tuple[str, str] = ("0", "1"),
        seed: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if len(answers) != 2 or answers[0] == answers[1]:
            raise ValueError(f"answers must be two different strings, got {answers!r}")
        self.system_prompt = check_pairwise_prompt(system_prompt or DEFAULT_PAIRWISE_SYSTEM_PROMPT)
        self.batch_size = check_batch_size(batch_size)
        self.tokenizer = load_tokenizer(tokenizer, model, trust_remote_code=trust_remote_code)
        loaded = not isinstance(model, PreTrainedModel)
        self.model = load_model(model, task="causal_lm", dtype=dtype, trust_remote_code=trust_remote_code)
        self.device = resolve_device(device, self.model, loaded)
        self.model.to(self.device).eval()
        self.answer_ids = (single_token_id(self.tokenizer, answers[0]), single_token_id(self.tokenizer, answers[1]))
        self.rng = random.Random(seed)

    def first_better_probabilities(self, prompts: Sequence[str], pairs: Sequence[Sequence[str]]) -> list[float]:
        """P(first completion of each pair, in the order given, is better) under the judge model; no flipping."""
        texts = judge_texts(
            self.tokenizer, [render_pairwise_prompt(self.system_prompt, p, pair) for p, pair in zip(prompts, pairs)]
        )
        # a chat template already writes the special tokens the model expects
        add_special_tokens = not has_chat_template(self.tokenizer)
        probabilities: list[float] = []
        for chunk in batched(texts, self.batch_size):
            encoded = self.tokenizer(
                list(chunk), return_tensors="pt", padding=True, padding_side="left",
                add_special_tokens=add_special_tokens,
            ).to(self.device)
            logits = next_token_logits(self.model, encoded["input_ids"], encoded["attention_mask"])
            pair_logits = logits[:, list(self.answer_ids)]  # [batch, 2]
            probabilities.extend(torch.softmax(pair_logits, dim=-1)[:, 0].tolist())
        return probabilities

    def judge(
        self,
        prompts: list[str],
        completions: list[list[str]],
        shuffle_order: bool = True,
        return_scores: bool = False,
    ) -> list[int] | list[float]:
        """Index of the better completion per prompt (0/1), or with ``return_scores`` P(first is better).

        -1 where the model's answer logits are not finite.
        """
        validate_pairwise_inputs(prompts, completions)
        flips = draw_flips(len(prompts), self.rng) if shuffle_order else [False] * len(prompts)
        scores = restore_scores(self.first_better_probabilities(prompts, apply_flips(completions, flips)), flips)
        if return_scores:
            return scores
        return choices_from_scores(scores)

    def __repr__(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__
        return f"HfPairwiseJudge(model={name!r}, device={str(self.device)!r})"
