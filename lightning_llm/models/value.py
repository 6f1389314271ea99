"""Value and reward models read token by token: what PPO needs besides the policy.

PPO (TRL 1.12's ``trl.experimental.ppo``) reads two sequence classifiers with one label *per token* rather than once
per sequence: the value model gives a value at every position, the reward model is read at the last non-pad token of
the policy's own token ids. Both run their backbone to the final hidden states and apply their score head to every
position (:func:`token_scores`), so they must speak the policy's vocabulary (:func:`check_same_vocabulary`).
:class:`ValueHead` is the lighter option: one linear layer on the policy's own final hidden states.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ValueHead",
    "check_one_label",
    "check_same_vocabulary",
    "load_score_model",
    "score_head",
    "token_scores",
]


class ValueHead(nn.Module):
    """``V(h) = w·h + b`` on the policy's final hidden states ``[B, T, H] -> [B, T]``.

    The weight is drawn with std ``1/sqrt(H + 1)`` and the bias is 0 (the critic initialisation of Huang et al., 2024,
    "The N+ implementation details of RLHF with PPO"), so the first values are small.
    """

    def __init__(self, hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.summary.weight.copy_(torch.randn(self.summary.weight.shape, generator=generator)
                                      / math.sqrt(hidden_size + 1))
            self.summary.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def score_head(model: nn.Module, what: str = "the model") -> nn.Module:
    """The score head (``model.score``) of a sequence classifier; a ``ValueError`` naming ``what`` without one."""
    head = getattr(model, "score", None)
    if not isinstance(head, nn.Module):
        raise ValueError(f"{what} ({type(model).__name__}) has no `score` head; PPO reads a value or reward at every "
                         "token through it, so it must be an AutoModelForSequenceClassification of a decoder "
                         "(Llama, Qwen2, GPT-2, ...)")
    return head


def check_one_label(model: nn.Module, what: str) -> None:
    """Refuse a classifier whose head is not one label (PPO reads one number per token)."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
    if num_labels != 1:
        raise ValueError(f"{what} must be a sequence classifier with one label (num_labels=1); it has "
                         f"num_labels={num_labels}")


def token_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
    """``[B, T]`` the score head of a one-label sequence classifier applied at every position (TRL's
    ``get_reward``: the backbone's last hidden states through ``model.score``)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # [B, T, H]
    head = score_head(model)
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def check_same_vocabulary(policy_tokenizer: PreTrainedTokenizerBase, tokenizer: PreTrainedTokenizerBase,
                          what: str) -> None:
    """Refuse ``tokenizer`` unless it maps every token to the id the policy's tokenizer does: the model it belongs to
    reads the policy's token ids as they are."""
    ours, theirs = policy_tokenizer.get_vocab(), tokenizer.get_vocab()
    if ours == theirs:
        return
    differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
    raise ValueError(
        f"{what}'s tokenizer differs from the policy's ({len(theirs)} vs {len(ours)} tokens; e.g. "
        f"{', '.join(f'{token!r}->{index}' for token, index in differing)} is in one and not the other). PPO feeds it "
        "the policy's token ids, so it must use the policy's tokenizer; score completions as text instead with "
        "reward_funcs (a reward model there is re-tokenized with its own tokenizer)"
    )


def _config_of(source: str | os.PathLike) -> Any | None:
    """The config saved at ``source`` (a directory or hub id), ``None`` for a tiny preset."""
    from transformers import AutoConfig

    from lightning_llm.models.presets import is_preset

    name = str(source)
    if not Path(name).expanduser().is_dir() and is_preset(name):
        return None
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the config of {name!r}: {error}") from error


def is_sequence_classifier(config: Any) -> bool:
    """Whether a config was saved by a ``...ForSequenceClassification`` model."""
    return any(str(arch).endswith("ForSequenceClassification") for arch in (getattr(config, "architectures", None)
                                                                               or []))


def check_source(source: Any, what: str, *, must_be_classifier: bool) -> None:
    """Check before loading what a source says about its head: a classifier needs one label; a reward model must be a
    classifier (a causal LM would get a random score head)."""
    if isinstance(source, nn.Module):
        if is_sequence_classifier_object(source):
            check_one_label(source, what)
        elif must_be_classifier:
            raise ValueError(f"{what} is a {type(source).__name__}; it must be a sequence classifier with one label "
                             "(AutoModelForSequenceClassification, num_labels=1), e.g. a RewardModule export")
        return
    if isinstance(source, dict):
        return
    config = _config_of(source)
    if config is None:
        return
    if is_sequence_classifier(config):
        if config.num_labels != 1:
            raise ValueError(f"{what} ({source}) must be a sequence classifier with one label (num_labels=1); it has "
                             f"num_labels={config.num_labels}")
    elif must_be_classifier:
        saved_as = ", ".join(config.architectures or ["a model without a head"])
        raise ValueError(f"{what} ({source}) was saved as {saved_as}; it must be a sequence classifier with one "
                         "label (AutoModelForSequenceClassification, "
                         "num_labels=1), e.g. a RewardModule export: a language model would get a random score head")


def is_sequence_classifier_object(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def load_score_model(source: Any, *, load_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """A one-label sequence classifier from ``source``: a copy of a classifier object; the backbone of a causal-LM
    object under a fresh one-label score head; or loaded from an id, directory or preset (a causal-LM checkpoint gets a
    fresh one-label head, as ``AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`` gives)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lightning_llm.models.loading import load_model

    if isinstance(source, nn.Module):
        if is_sequence_classifier_object(source):
            return copy.deepcopy(source)
        fields = source.config.to_dict()
        config = AutoConfig.for_model(fields.pop("model_type"), **{k: v for k, v in fields.items()
                                                                    if k not in ("architectures",)})
        config.num_labels = 1
        classifier = AutoModelForSequenceClassification.from_config(config)
        classifier.load_state_dict(source.state_dict(), strict=False)  # the backbone's weights; the head is new
        return classifier.to(next(source.parameters()).dtype)
    kwargs = dict(load_kwargs or {})
    return load_model(source, task="sequence_classification", num_labels=1, **kwargs)
