"""``PreferenceModule``: what the offline preference algorithms share (DPO, ORPO, CPO, KTO, BCO).

* The reference model: a frozen copy of the policy loaded once (eval mode, dropout off, no gradient, never in the
  optimizer, left out of checkpoints); under PEFT the policy itself with its adapters disabled (no second copy);
  or log-probs precomputed once before training by the data module (``precompute_ref_log_probs``: the module hands it
  :meth:`PreferenceModule.reference_values` to score with), after which the copy is released; or nothing at all for
  reference-free losses, which refuse every reference argument.
* Completion log-probs of every sequence of a batch in one policy forward (chosen and rejected concatenated, or packed
  padding-free) and one ``no_grad`` reference forward, through the one log-prob path.
* TR-DPO reference syncing (``sync_ref_model``) with :class:`~lightning_llm.models.reference.ReferenceSync`.

Subclasses implement :meth:`PreferenceModule.compute_loss` with a loss from :mod:`lightning_llm.losses`.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_llm.data.batches import IGNORE_INDEX, Batch, CompletionBatch, PairBatch
from lightning_llm.models.loading import model_spec
from lightning_llm.models.peft import disabled_adapters, is_peft_model
from lightning_llm.models.reference import (
    ReferenceSync,
    drop_reference_weights,
    frozen_reference,
    restore_reference_weights,
)
from lightning_llm.models.sharding import fsdp1_root
from lightning_llm.modules.base import LLMModule, ModelArg, TokenizerArg
from lightning_llm.ops import TokenLogProbs

log = logging.getLogger(__name__)

#: the reference arguments, with their "no reference" values: what a reference-free module refuses
REFERENCE_ARGUMENTS = {"ref_model": None, "precompute_ref_log_probs": False, "precompute_ref_batch_size": None,
                       "sync_ref_model": False, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512}


@dataclass
class CompletionLogps:
    """Log-probs of the completions of a batch of ``R`` sequences (``R = 2B`` for pairs, chosen rows first).

    Token tensors are ``[R, L]`` and aligned the same way whatever the batching (padded or padding-free): column ``t``
    scores the sequence's token ``t + 1``.
    """

    token_logps: Tensor  # [R, L] log p of each scored token, 0 elsewhere
    mask: Tensor  # [R, L] bool, the completion tokens
    outputs: TokenLogProbs  # per-token extras (entropy, is_top1, ...) in the same [R, L] layout
    scored: Tensor  # [R, L] bool, every token scored (the completion, plus the chosen prompts when asked)

    @property
    def completion_token_logps(self) -> Tensor:
        """``[R, L]`` log-probs of the completion tokens only."""
        return torch.where(self.mask, self.token_logps, 0.0)

    @property
    def sums(self) -> Tensor:
        """``[R]`` summed completion log-probs."""
        return self.completion_token_logps.sum(dim=1)

    @property
    def lengths(self) -> Tensor:
        """``[R]`` completion token counts."""
        return self.mask.sum(dim=1)

    @property
    def means(self) -> Tensor:
        """``[R]`` per-token average completion log-probs."""
        return self.sums / self.lengths.clamp(min=1)


def unflatten_tokens(values: Tensor, sequences: CompletionBatch) -> Tensor:
    """Scatter padding-free per-target values ``[1, N-1]`` into a ``[R, L]`` per-sequence layout.

    The value at flat position ``p`` scores token ``p + 1``, which is token ``position_ids[p + 1]`` of sequence
    ``seq_index[p + 1]``; it lands in column ``position_ids[p + 1] - 1`` of that row (as in the padded layout).
    Sequence starts (position 0) score nothing and are skipped.
    """
    seq = sequences.seq_index[0, 1:]  # [N-1]
    pos = sequences.position_ids[0, 1:]
    keep = (seq >= 0) & (pos > 0)
    width = int(pos.max().item()) if keep.any() else 1
    out = values.new_zeros((sequences.num_sequences, width))
    out[seq[keep], pos[keep] - 1] = values[0][keep]
    return out


def model_identity(source: Any, model: nn.Module | None) -> Any:
    """What a model's scores depend on, for caching them: a directory by its files (names, sizes, modification
    times), a preset or hub id by its name, an object by a digest of its weights."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
            return ["directory", str(path.resolve()), files]
        return ["name", str(source)]
    if model is None:
        raise ValueError("a model given as an object needs its weights to be identified")
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return ["weights", digest.hexdigest()]


class PreferenceModule(LLMModule, abc.ABC):
    """Shared base of the offline preference modules; see the module docstring.

    Args:
        model: see :class:`~lightning_llm.modules.base.LLMModule`.
        tokenizer: see :class:`~lightning_llm.modules.base.LLMModule`.
        beta: temperature of the implicit reward ``β log(π/π_ref)`` (or the algorithm's own β).
        ref_model: reference model (hub id, path, preset or model object); default: a frozen copy of the initial
            policy (under PEFT: the policy with adapters disabled).
        precompute_ref_log_probs: let the data module compute the reference log-probs of the whole dataset once
            before training (sharded across processes, cached on disk), and free the reference model.
        precompute_ref_batch_size: batch size of that pass (default: the data module's).
        sync_ref_model: TR-DPO: mix the policy into the reference every ``ref_model_sync_steps`` steps.
        ref_model_mixup_alpha: ``α`` of ``θ_ref ← (1 - α) θ_ref + α θ``.
        ref_model_sync_steps: steps between two syncs.
        disable_dropout: turn dropout off in the policy (TRL's default for preference training; the reference never
            has dropout).
        **kwargs: the other :class:`~lightning_llm.modules.base.LLMModule` arguments.
    """

    #: whether the algorithm needs reference log-probs (ORPO and CPO do not)
    uses_reference: bool = True
    #: batch attributes / dataset columns holding precomputed reference log-probs
    reference_keys: tuple[str, ...] = ("ref_chosen_logps", "ref_rejected_logps")

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        beta: float = 0.1,
        ref_model: ModelArg | None = None,
        precompute_ref_log_probs: bool = False,
        precompute_ref_batch_size: int | None = None,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, tokenizer, disable_dropout=disable_dropout, **kwargs)
        if not self.uses_reference:
            given = dict(ref_model=ref_model, precompute_ref_log_probs=precompute_ref_log_probs,
                         precompute_ref_batch_size=precompute_ref_batch_size, sync_ref_model=sync_ref_model,
                         ref_model_mixup_alpha=ref_model_mixup_alpha, ref_model_sync_steps=ref_model_sync_steps)
            used = [name for name, value in given.items() if value is not REFERENCE_ARGUMENTS[name]
                    and value != REFERENCE_ARGUMENTS[name]]
            if used:
                raise ValueError(f"{type(self).__name__} is reference-free: {', '.join(used)} would not be used")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if sync_ref_model and precompute_ref_log_probs:
            raise ValueError("sync_ref_model changes the reference during training; it cannot be precomputed")
        if not 0.0 < ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {ref_model_mixup_alpha}")
        if ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be >= 1, got {ref_model_sync_steps}")
        if precompute_ref_batch_size is not None and precompute_ref_batch_size < 1:
            raise ValueError(f"precompute_ref_batch_size must be >= 1 or None, got {precompute_ref_batch_size}")
        self.beta = beta
        # Kept out of the submodule registry: a reference given as a model object would otherwise be saved in every
        # checkpoint under this name (the reference that is used, and left out of checkpoints, is ``ref_model``).
        object.__setattr__(self, "ref_model_source", ref_model)
        if isinstance(ref_model, nn.Module):
            # not rebuildable from the hyperparameters: a checkpoint says so instead of rebuilding the wrong model
            self.hparams["ref_model"] = model_spec(ref_model)
        self.precompute_ref_log_probs = precompute_ref_log_probs
        self.precompute_ref_batch_size = precompute_ref_batch_size
        self.sync_ref_model = sync_ref_model
        self.ref_model_mixup_alpha = ref_model_mixup_alpha
        self.ref_model_sync_steps = ref_model_sync_steps
        self.reference_sync = ReferenceSync(ref_model_sync_steps, ref_model_mixup_alpha) if sync_ref_model else None
        self.ref_model: nn.Module | None = None
        self._reference_precomputed = False

    # ------------------------------------------------------------------------------------------------ reference
    def configure_model(self) -> None:
        super().configure_model()
        if self.ref_model is None and self.uses_reference and not self._reference_precomputed:
            self.ref_model = self._build_reference()
        self.shard(self.ref_model)

    def _build_reference(self) -> nn.Module | None:
        if self.ref_model_source is None and is_peft_model(self.model):
            if self.sync_ref_model:
                raise ValueError("sync_ref_model needs a separate reference model; under PEFT the reference is the "
                                 "policy with adapters disabled. Pass ref_model=... to use one.")
            return None  # the policy with its adapters disabled
        source = self.ref_model_source if self.ref_model_source is not None else self.model_source
        if isinstance(source, dict) and not self.sync_ref_model:
            if self.precompute_ref_log_probs:
                return None  # its log-probs are in the data; nothing here could score them again
            raise ValueError(
                f"{type(self).__name__} was built from model objects, and its reference (a frozen copy of "
                f"{'ref_model' if self.ref_model_source is not None else 'the initial policy'}) is not saved in "
                "checkpoints: pass ref_model=... (and model=...) to load_from_checkpoint"
            )
        return frozen_reference(source, task=self.model_task, load_kwargs=self.model_load_kwargs)

    def train(self, mode: bool = True) -> PreferenceModule:
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # the reference is never in training mode (no dropout)
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The reference is rebuilt from its source; unless TR-DPO updates it, it need not be saved.
        if not self.sync_ref_model:
            drop_reference_weights(checkpoint)
        checkpoint["lightning_llm"]["reference_precomputed"] = self._reference_precomputed
        if self.reference_sync is not None:
            checkpoint["lightning_llm"]["reference_sync"] = self.reference_sync.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        restore_reference_weights(checkpoint, self.ref_model)
        sync_state = checkpoint.get("lightning_llm", {}).get("reference_sync")
        if self.reference_sync is not None and sync_state is not None:
            self.reference_sync.load_state_dict(sync_state)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # The frozen reference is in eval mode on purpose; Lightning would warn about it at every fit.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

    def on_fit_start(self) -> None:
        if self.reference_sync is not None and self.ref_model is None:
            raise ValueError(f"sync_ref_model needs a separate reference model, but {type(self).__name__} has none")
        self._precompute_reference()

    def on_validation_start(self) -> None:
        self._precompute_reference()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.reference_sync is not None:
            self.reference_sync.maybe_sync(self.trainer.global_step, self.ref_model, self.model,
                                           root=fsdp1_root(self.trainer))

    # ---------------------------------------------------------------------------------------------- log-probs
    def completion_logps(self, model: nn.Module, sequences: CompletionBatch, *, return_entropy: bool = False,
                         return_is_top1: bool = False, return_mean_logits: bool = False,
                         return_log_sum_sq_probs: bool = False, score_chosen_prompts: bool = False
                         ) -> CompletionLogps:
        """Completion log-probs of every sequence under ``model`` (one forward).

        ``score_chosen_prompts`` also scores the prompt tokens of the chosen sequences (the first half of the rows),
        for losses with an NLL term over the whole chosen sequence (ORPO).
        """
        completion_mask = sequences.completion_mask.bool()
        to_score = completion_mask
        if score_chosen_prompts:
            to_score = completion_mask | sequences.first_half_tokens()
        labels = sequences.input_ids.masked_fill(~to_score, IGNORE_INDEX)
        out = self.token_logprobs(
            model, sequences.input_ids, labels, attention_mask=sequences.attention_mask,
            position_ids=sequences.position_ids, return_entropy=return_entropy, return_is_top1=return_is_top1,
            return_mean_logits=return_mean_logits, return_log_sum_sq_probs=return_log_sum_sq_probs,
        )
        mask, scored = completion_mask[:, 1:], to_score[:, 1:]
        if sequences.padding_free:
            mask = unflatten_tokens(mask, sequences)
            scored = unflatten_tokens(scored, sequences)
            out = TokenLogProbs(*(None if t is None else unflatten_tokens(t, sequences) for t in out))
        return CompletionLogps(token_logps=out.logps, mask=mask, outputs=out, scored=scored)

    @torch.no_grad()
    def reference_completion_logps(self, sequences: CompletionBatch) -> CompletionLogps:
        """Completion log-probs under the reference: the frozen copy, or the policy with adapters disabled."""
        if self.ref_model is not None:
            return self.completion_logps(self.ref_model, sequences)
        if not is_peft_model(self.model):
            raise ValueError(
                f"{type(self).__name__} has no reference model (precomputed log-probs were expected in the batch)"
            )
        with disabled_adapters(self.model):
            return self.completion_logps(self.model, sequences)

    def reduce_logps(self, logps: CompletionLogps) -> Tensor:
        """``[R]`` sequence log-probs the loss uses (the sum; DPO's LD variant overrides it)."""
        return logps.sums

    def reference_values(self, batch: Batch) -> dict[str, Tensor]:
        """Reference log-probs of a pair batch under :attr:`reference_keys`: ``[B]`` chosen and rejected sums."""
        chosen, rejected = self.reduce_logps(self.reference_completion_logps(batch.sequences)).chunk(2)
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def reference_logps(self, batch: PairBatch) -> Tensor:
        """``[2B]`` reference sequence log-probs of a pair batch (chosen then rejected): precomputed ones carried by
        the batch, else a ``no_grad`` reference forward."""
        if batch.has_reference:
            return torch.cat([batch.ref_chosen_logps, batch.ref_rejected_logps])
        values = self.reference_values(batch)
        return torch.cat([values["ref_chosen_logps"], values["ref_rejected_logps"]])

    # ------------------------------------------------------------------------------------------- precompute
    def reference_identity(self) -> Any:
        """What the reference log-probs depend on (the cache key of the data module's precompute): the reference's
        source, its loading settings and how log-probs are reduced."""
        source = self.ref_model_source if self.ref_model_source is not None else self.model_source
        model = self.ref_model if self.ref_model is not None else self.model
        return [type(self).__name__, model_identity(source, model), self.model_load_kwargs, self.reference_keys,
                getattr(self, "ld_alpha", None)]

    def _score_reference(self, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            return self.reference_values(batch.to(self.device))

    def precompute_reference(self, datamodule: Any) -> None:
        """Hand :meth:`reference_values` to ``datamodule``, which stores the reference log-probs of all its data (see
        :meth:`lightning_llm.data.base.LLMDataModule.precompute_reference`); then release the reference model."""
        if not hasattr(datamodule, "precompute_reference"):
            raise ValueError("precompute_ref_log_probs needs the data to come from a lightning_llm data module")
        identity = self.reference_identity()
        if self._trainer is not None and self.trainer.world_size > 1:
            identity = self.trainer.strategy.broadcast(identity, src=0)
        was_training = self.training
        self.eval()
        try:
            datamodule.precompute_reference(self._score_reference, columns=self.reference_keys, identity=repr(identity),
                                            batch_size=self.precompute_ref_batch_size)
        finally:
            self.train(was_training)
        self._reference_precomputed = True
        if self.ref_model is not None:
            log.info("Reference log-probs precomputed; releasing the reference model.")
            self.ref_model = None

    def _precompute_reference(self) -> None:
        if self.precompute_ref_log_probs and self.uses_reference:
            self.precompute_reference(getattr(self.trainer, "datamodule", None))

    # --------------------------------------------------------------------------------------------------- steps
    @abc.abstractmethod
    def compute_loss(self, batch: Batch) -> Tensor:
        """The loss of one batch; records the algorithm's metrics with :meth:`record`."""

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.record("loss", loss)
        self.count_input_tokens(batch)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.record("loss", self.compute_loss(batch))

    def record_pair_metrics(self, policy: CompletionLogps, chosen_rewards: Tensor, rejected_rewards: Tensor,
                            chosen_logps: Tensor, rejected_logps: Tensor) -> None:
        """TRL's pair metrics: rewards/* (margins derived at reduction, see :meth:`derive_metrics`), logps/*,
        logits/*, entropy, mean_token_accuracy."""
        self.record_mean("rewards/chosen", chosen_rewards)
        self.record_mean("rewards/rejected", rejected_rewards)
        self.record_mean("rewards/accuracies", (chosen_rewards > rejected_rewards).float())
        self.record_mean("logps/chosen", chosen_logps)
        self.record_mean("logps/rejected", rejected_logps)
        self.record_token_metrics(policy, paired=True)

    def derive_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """``rewards/margins`` = ``rewards/chosen - rewards/rejected`` of the reduced means (for pairs this is the mean
        pair margin; for unpaired data TRL's difference of the class means, left out when a class is absent)."""
        if "rewards/chosen" in values and "rewards/rejected" in values:
            values["rewards/margins"] = values["rewards/chosen"] - values["rewards/rejected"]
        return values

    def record_unpaired_metrics(self, policy: CompletionLogps, labels: Tensor, chosen_rewards: Tensor,
                                rejected_rewards: Tensor) -> None:
        """TRL's unpaired (KTO/BCO) metrics: per-class rewards, logps and logits, and entropy (the margin is derived
        when the metrics are reduced, see :meth:`derive_metrics`)."""
        labels = labels.bool()
        sums = policy.sums.detach()
        self.record("rewards/chosen", chosen_rewards.sum(), chosen_rewards.numel())
        self.record("rewards/rejected", rejected_rewards.sum(), rejected_rewards.numel())
        self.record("logps/chosen", sums[labels].sum(), labels.sum())
        self.record("logps/rejected", sums[~labels].sum(), (~labels).sum())
        mean_logits = policy.outputs.mean_logits
        if mean_logits is not None:
            for name, rows in (("logits/chosen", labels), ("logits/rejected", ~labels)):
                mask = policy.mask & rows[:, None]
                self.record(name, torch.where(mask, mean_logits, 0.0).sum(), mask.sum())
        self.record_token_metrics(policy, paired=False)

    def record_token_metrics(self, policy: CompletionLogps, paired: bool) -> None:
        """Token-level metrics: entropy over all completions; for pairs, logits/* and accuracy on the chosen side."""
        mask = policy.mask
        out = policy.outputs
        if out.entropy is not None:
            self.record("entropy", torch.where(mask, out.entropy.detach(), 0.0).sum(), mask.sum())
        if not paired:
            return
        chosen_mask, rejected_mask = mask.chunk(2)
        if out.mean_logits is not None:
            chosen_logits, rejected_logits = out.mean_logits.chunk(2)
            self.record("logits/chosen", torch.where(chosen_mask, chosen_logits, 0.0).sum(), chosen_mask.sum())
            self.record("logits/rejected", torch.where(rejected_mask, rejected_logits, 0.0).sum(),
                        rejected_mask.sum())
        if out.is_top1 is not None:
            chosen_top1 = out.is_top1.chunk(2)[0]
            self.record("mean_token_accuracy", (chosen_top1 & chosen_mask).sum(), chosen_mask.sum())
