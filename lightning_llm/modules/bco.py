"""``BCOModule``: Binary Classifier Optimization on unpaired feedback (TRL's ``BCOTrainer``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_llm.data.batches import UnpairedBatch
from lightning_llm.losses.bco import bco_loss, bco_rewards, bco_udm_weights
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.preference import PreferenceModule
from lightning_llm.utils.running_moments import RunningMoments

#: ``prompts -> [N, D]`` embeddings, used to match the prompt distributions of the two classes (UDM)
EmbeddingFunc = Callable[[list[str]], Tensor]


def fit_prompt_classifier(embeddings: Tensor, labels: Tensor, l2: float = 1.0, steps: int = 100
                          ) -> Callable[[Tensor], Tensor]:
    """Fit an L2-regularised logistic regression ``p(desirable | prompt embedding)`` (LBFGS, standardised inputs);
    returns the probability function. ``l2`` is the inverse of scikit-learn's ``C``.

    The classes are weighted ``n / (2 n_class)`` (scikit-learn's ``class_weight="balanced"``, as TRL's BCO): the odds
    ``p / (1 - p)`` then estimate the density ratio ``p_D(x) / p_U(x)`` whatever the class sizes, instead of carrying
    the prior ``n_D / n_U`` into every weight."""
    x = embeddings.detach().double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-8)
    x = (x - mean) / std
    y = labels.double()
    positives = y.sum()
    if positives == 0 or positives == y.numel():
        raise ValueError("the prompt classifier needs embeddings of both classes")
    sample_weights = torch.where(y > 0.5, y.numel() / (2 * positives), y.numel() / (2 * (y.numel() - positives)))
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = x @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=sample_weights, reduction="sum")
        loss = loss + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()

    def probability(new: Tensor) -> Tensor:
        z = (new.detach().double().to(mean.device) - mean) / std
        return torch.sigmoid(z @ weight + bias).float()

    return probability


class BCOModule(PreferenceModule):
    """BCO (Jung et al., 2024, arXiv:2404.04656) on an :class:`~lightning_llm.UnpairedPreferenceDataModule`
    (use ``kl_pairs=False``; BCO needs no mismatched pairs).

    The implicit reward ``r = β log(π/π_ref)`` is trained as the logit of a desirable-vs-undesirable classifier,
    shifted by ``δ``, the running mean of every reward seen so far (a :class:`~lightning_llm.RunningMoments` merged
    across processes and saved in checkpoints). With ``embedding_func`` (UDM), a logistic-regression prompt
    classifier fitted before training reweights the undesirable examples by the clipped density ratio
    ``p(x)/(1-p(x))`` so both classes look drawn from the same prompt distribution.

    Logs: ``loss``, ``delta``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``logps/*``,
    ``logits/*``, ``entropy``, ``num_tokens``.

    Args:
        model: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        tokenizer: see :class:`~lightning_llm.modules.preference.PreferenceModule`.
        embedding_func: prompts -> ``[N, D]`` embeddings, enabling UDM (None = off).
        prompt_sample_size: training prompts sampled per class to fit the UDM classifier.
        min_density_ratio: lower clip of the UDM weights.
        max_density_ratio: upper clip of the UDM weights.
        learning_rate: TRL's BCO default, 5e-7.
        **kwargs: the :class:`~lightning_llm.modules.preference.PreferenceModule` arguments (beta, ref_model,
            precompute_ref_log_probs, ...) and the :class:`~lightning_llm.modules.base.LLMModule` ones.
    """

    reference_keys = ("ref_logps",)

    def __init__(self, model: ModelArg, tokenizer: TokenizerArg = None, *,
                 embedding_func: EmbeddingFunc | None = None, prompt_sample_size: int = 1024,
                 min_density_ratio: float = 0.5, max_density_ratio: float = 10.0, learning_rate: float = 5e-7,
                 **kwargs: Any) -> None:
        super().__init__(model, tokenizer, learning_rate=learning_rate, **kwargs)
        if not 0 < min_density_ratio <= max_density_ratio:
            raise ValueError(f"need 0 < min_density_ratio <= max_density_ratio, got {min_density_ratio}, "
                             f"{max_density_ratio}")
        self.embedding_func = embedding_func
        self.prompt_sample_size = prompt_sample_size
        self.min_density_ratio = min_density_ratio
        self.max_density_ratio = max_density_ratio
        self.running = RunningMoments()
        self.prompt_classifier: Callable[[Tensor], Tensor] | None = None

    def reference_values(self, batch: UnpairedBatch) -> dict[str, Tensor]:
        return {"ref_logps": self.reduce_logps(self.reference_completion_logps(batch.sequences))}

    def _prompt_texts(self, batch: UnpairedBatch) -> list[str]:
        sequences = batch.sequences
        prompts = []
        for ids, mask, completion in zip(sequences.input_ids, sequences.attention_mask, sequences.completion_mask):
            prompts.append(self.tokenizer.decode(ids[mask.bool() & ~completion.bool()], skip_special_tokens=False))
        return prompts

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.embedding_func is None or self.prompt_classifier is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "prompt_sample"):
            raise ValueError("UDM (embedding_func) samples training prompts of both classes from the data module: use "
                             "an UnpairedPreferenceDataModule")
        texts, labels = datamodule.prompt_sample(self.prompt_sample_size)
        embeddings = self.embedding_func(texts)
        self.prompt_classifier = fit_prompt_classifier(torch.as_tensor(embeddings),
                                                       torch.tensor(labels, dtype=torch.float32))

    def compute_loss(self, batch: UnpairedBatch) -> Tensor:
        policy = self.completion_logps(self.model, batch.sequences, return_entropy=True, return_mean_logits=True)
        policy_logps = self.reduce_logps(policy)
        ref_logps = batch.ref_logps if batch.ref_logps is not None else self.reference_values(batch)["ref_logps"]
        if self.training:
            self.running.update(bco_rewards(policy_logps.detach(), ref_logps, beta=self.beta))
        delta = torch.tensor(self.running.mean, device=policy_logps.device)
        weights = None
        if self.prompt_classifier is not None:
            embeddings = torch.as_tensor(self.embedding_func(self._prompt_texts(batch)))
            prob = self.prompt_classifier(embeddings).to(policy_logps.device)
            weights = bco_udm_weights(prob, self.min_density_ratio, self.max_density_ratio)
        out = bco_loss(policy_logps, ref_logps, batch.label, delta, beta=self.beta, udm_weights=weights)
        self.record("delta", out.delta)
        self.record_unpaired_metrics(policy, batch.label, out.chosen_rewards, out.rejected_rewards)
        return out.losses.mean()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lightning_llm"]["running_moments"] = self.running.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lightning_llm", {}).get("running_moments")
        if state is not None:
            self.running.load_state_dict(state)
