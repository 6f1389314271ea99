"""``OnlineModule``: what the online algorithms share (GRPO, RLOO; PPO, Online DPO, XPO, Nash-MD build on it).

An online module trains on completions it generates itself. Its data module
(:class:`~lightning_llm.data.prompts.PromptDataModule`) hands it prompt batches in TRL's repeat-sampler order; at the
first batch of each generation batch the module

1. completes every prompt with its rollout engine (:mod:`lightning_llm.rollout`: HF ``generate``, our fast decode,
   fixed rollouts; vLLM can plug in), sampling with :class:`~lightning_llm.rollout.SamplingSettings`;
2. scores the completions with its reward sources (:mod:`lightning_llm.rewards`: functions named by import path,
   reward models, binary judges), gathers the rewards of every process (a prompt's completions may sit on several)
   and turns them into advantages (the algorithm's :meth:`OnlineModule.compute_advantages`);
3. computes, where the algorithm needs them, the per-token log-probs of generation time under the policy (for
   importance ratios) and under the reference model, through the one log-prob path, temperature-scaled as TRL does;
4. shuffles the generation batch (torch's global generator, as TRL) and splits it into ``steps_per_generation``
   micro-batches (:class:`~lightning_llm.data.batches.RolloutBatch`), kept in the *generation buffer*.

Every batch then trains the slice ``repeat % steps_per_generation`` of the buffer with the algorithm's
:meth:`OnlineModule.compute_loss`; a generation batch is used ``num_iterations`` times. The buffer is saved in
checkpoints (every process's), so a run resumed in the middle of a generation batch trains on the completions the
uninterrupted run trained on.

The reference model is a frozen copy of the initial policy (or ``ref_model``), the policy with its adapters disabled
under PEFT, or nothing when ``beta == 0``. Validation generates ``num_generations_eval`` completions for each prompt of
``val_data`` and logs the same metrics under ``val/``.

Metrics carry TRL's names: ``reward``, ``reward_std``, ``rewards/<name>/mean`` and ``/std``, ``frac_reward_zero_std``,
``completions/{mean,min,max}_length``, ``completions/clipped_ratio``, ``completions/{mean,min,max}_terminated_length``,
``num_tokens``, plus the algorithm's (``kl``, ``entropy``, ``clip_ratio/*``, ...). They are reduced per optimizer step:
means weighted by tokens (or sequences) over the step's micro-batches and every process (TRL averages per micro-batch
values; the two agree with one micro-batch per step).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import warnings
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from lightning_llm.data.batches import IGNORE_INDEX, PromptBatch, RolloutBatch
from lightning_llm.data.sampling import GenerationSchedule
from lightning_llm.losses.grpo import PolicyGradientMetrics, nanstd, weighted_rewards
from lightning_llm.models.loading import model_spec
from lightning_llm.models.peft import disabled_adapters, is_peft_model
from lightning_llm.models.reference import drop_reference_weights, frozen_reference, restore_reference_weights
from lightning_llm.models.sharding import (
    SHARDING_KINDS,
    fsdp1_generation_context,
    fsdp1_root,
    strategy_kind,
)
from lightning_llm.modules.base import LLMModule, ModelArg, TokenizerArg
from lightning_llm.rewards import RewardLog, RewardSource, RewardState, compute_rewards, resolve_reward_source
from lightning_llm.rewards.compute import columns_from_rows, reward_names
from lightning_llm.rollout import RolloutEngine, Rollouts, SamplingSettings, make_engine

log = logging.getLogger(__name__)


@dataclass
class GenerationBuffer:
    """The micro-batches of one generation batch of this process (``generation`` numbers it, as the prompt batches
    do), and the table of what was generated (for :class:`~lightning_llm.callbacks.LogCompletionsCallback`)."""

    generation: int
    slices: list[RolloutBatch]

    def state(self) -> dict[str, Any]:
        """Plain CPU tensors, for a checkpoint."""
        return {"generation": self.generation,
                "slices": [{f.name: _to_cpu(getattr(s, f.name)) for f in fields(s)} for s in self.slices]}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> GenerationBuffer:
        slices = [RolloutBatch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in part.items()})
                  for part in state["slices"]]
        return cls(generation=int(state["generation"]), slices=slices)


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, Tensor) else value


def pad_rows(rows: Sequence[Sequence[int]], value: int, *, left: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(ids, mask)`` ``[N, W]`` of ragged id lists padded with ``value`` on the left or the right."""
    width = max([len(row) for row in rows] + [1])
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[k, span] = torch.tensor(list(row), dtype=torch.long)
        mask[k, span] = 1
    return ids.to(device), mask.to(device)


class OnlineModule(LLMModule, abc.ABC):
    """Shared base of the online modules; see the module docstring.

    Args:
        model: see :class:`~lightning_llm.modules.base.LLMModule`.
        tokenizer: see :class:`~lightning_llm.modules.base.LLMModule`. Without a pad token the EOS token pads.
        reward_funcs: one reward source or a list: a function (TRL's calling convention: ``prompts=``,
            ``completions=``, ``completion_ids=``, every other dataset column, ``trainer_state``, ``log_metric``,
            ``log_extra``; sync or ``async``; ``None`` for "does not apply"), an import path of one
            (``lightning_llm.rewards.accuracy_reward``, ``my_pkg.rewards:brevity``), a reward model (hub id, local
            directory, a ``RewardModule`` export, a model object), or a binary judge.
        reward_weights: weight of each reward source in the summed reward (default 1 each).
        reward_tokenizers: tokenizer (object or id) of each reward model, ``None`` for the model's own; one entry
            per reward source (ignored for functions and judges).
        rollout: the generation engine: ``"hf"`` (HF ``generate``, every strategy), ``"fast"`` (our decode loop,
            one device per process), ``"fixed"`` (with ``rollout_kwargs={"completions": ...}``), or an engine object.
        rollout_kwargs: keyword arguments of the named engine.
        num_generations: completions per prompt (a group).
        num_generations_eval: completions per validation prompt (default ``num_generations``).
        steps_per_generation: micro-batches each generation batch is split into (default: the trainer's
            ``accumulate_grad_batches``, TRL's default).
        num_iterations: passes over each generation batch (TRL's μ).
        max_completion_length: the most tokens a completion has.
        temperature: sampling temperature; log-probs are computed at the same temperature, as TRL does.
        top_p: nucleus sampling mass.
        top_k: keep the ``top_k`` most likely tokens (0: all).
        min_p: drop tokens below ``min_p`` times the top probability (``None``: off).
        repetition_penalty: HF's repetition penalty (1: off).
        mask_truncated_completions: leave completions that hit ``max_completion_length`` without an EOS out of the
            loss (DAPO).
        beta: KL coefficient; 0 trains without a reference model.
        ref_model: reference model (hub id, path, preset or model object); default a frozen copy of the initial
            policy (under PEFT: the policy with adapters disabled).
        ds3_gather_for_generation: under DeepSpeed ZeRO-3, gather the whole policy once for generation (fast, one
            full copy per process) instead of layer by layer.
        generation_seed: seed of the sampling streams; each process and each generation batch draws from its own
            stream, a function of this seed, the process rank and the generation number (so a resumed run samples as
            the uninterrupted one, and processes that share a prompt draw different completions).
        **kwargs: the other :class:`~lightning_llm.modules.base.LLMModule` arguments.
    """

    #: whether the loss needs the policy's log-probs of generation time even when training is on-policy
    always_needs_old_logps: bool = False

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        reward_funcs: Any = None,
        reward_weights: Sequence[float] | None = None,
        reward_tokenizers: Sequence[Any] | None = None,
        rollout: str | RolloutEngine = "hf",
        rollout_kwargs: dict[str, Any] | None = None,
        num_generations: int = 8,
        num_generations_eval: int | None = None,
        steps_per_generation: int | None = None,
        num_iterations: int = 1,
        max_completion_length: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        mask_truncated_completions: bool = False,
        beta: float = 0.0,
        ref_model: ModelArg | None = None,
        ds3_gather_for_generation: bool = True,
        generation_seed: int = 0,
        learning_rate: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, tokenizer, learning_rate=learning_rate, **kwargs)
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            raise ValueError(f"{type(self).__name__} needs reward_funcs: a reward function, its import path (e.g. "
                             "lightning_llm.rewards.accuracy_reward), a reward model or a binary judge (or a list)")
        self.reward_specs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if reward_weights is not None:
            reward_weights = [float(w) for w in reward_weights]
            if len(reward_weights) != len(self.reward_specs):
                raise ValueError(f"reward_weights has {len(reward_weights)} values for {len(self.reward_specs)} "
                                 "reward sources; give one weight per source")
        self.reward_weights = reward_weights
        if reward_tokenizers is not None and len(reward_tokenizers) != len(self.reward_specs):
            raise ValueError(f"reward_tokenizers has {len(reward_tokenizers)} entries for {len(self.reward_specs)} "
                             "reward sources; give one per source (None for a model's own)")
        self.reward_tokenizers = list(reward_tokenizers) if reward_tokenizers is not None else None
        if num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages compare the completions of a prompt), got "
                             f"{num_generations}")
        if num_generations_eval is not None and num_generations_eval < 1:
            raise ValueError(f"num_generations_eval must be >= 1 or None, got {num_generations_eval}")
        if steps_per_generation is not None and steps_per_generation < 1:
            raise ValueError(f"steps_per_generation must be >= 1 or None, got {steps_per_generation}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        tok = self.tokenizer
        if tok.eos_token_id is None and tok.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token: completions could not end or be "
                             "padded; give a tokenizer with an EOS token (it also pads when there is no pad token)")
        # checks every sampling value now, with the field named
        self.sampling = SamplingSettings(
            max_completion_length=max_completion_length, temperature=float(temperature), top_p=float(top_p),
            top_k=int(top_k), min_p=None if min_p is None else float(min_p),
            repetition_penalty=float(repetition_penalty), do_sample=True,
        )
        self.engine = self._make_engine(rollout, rollout_kwargs)
        self.num_generations = num_generations
        self.num_generations_eval = num_generations_eval
        self.steps_per_generation = steps_per_generation
        self.num_iterations = num_iterations
        self.max_completion_length = max_completion_length
        self.temperature = float(temperature)
        self.mask_truncated_completions = mask_truncated_completions
        self.beta = beta
        self.ds3_gather_for_generation = ds3_gather_for_generation
        self.generation_seed = generation_seed
        object.__setattr__(self, "ref_model_source", ref_model)
        if isinstance(ref_model, nn.Module):
            self.hparams["ref_model"] = model_spec(ref_model)
        self.ref_model: nn.Module | None = None
        self.reward_sources: list[RewardSource] | None = None
        self.reward_log = RewardLog()
        self._buffer: GenerationBuffer | None = None
        self._pending_buffer: dict[str, Any] | None = None
        #: the rows of the last generation batch of every process: prompt, completion, rewards, advantage
        self.last_rollouts: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _make_engine(rollout: str | RolloutEngine, kwargs: dict[str, Any] | None) -> RolloutEngine:
        if isinstance(rollout, RolloutEngine):
            if kwargs:
                raise ValueError("rollout_kwargs go with an engine named by a string, not an engine object")
            return rollout
        if not isinstance(rollout, str):
            raise ValueError(f"rollout must be an engine name ('hf', 'fast', 'fixed') or a RolloutEngine, got "
                             f"{type(rollout).__name__}")
        return make_engine(rollout, **(kwargs or {}))

    @property
    def uses_reference(self) -> bool:
        """Whether log-probs under the reference model enter the loss (``beta != 0``)."""
        return self.beta != 0

    def configure_model(self) -> None:
        super().configure_model()
        if self.ref_model is None and self.uses_reference:
            self.ref_model = self._build_reference()
        self.shard(self.ref_model)

    def _build_reference(self) -> nn.Module | None:
        if self.ref_model_source is None and is_peft_model(self.model):
            return None  # the policy with its adapters disabled
        source = self.ref_model_source if self.ref_model_source is not None else self.model_source
        if isinstance(source, dict):
            raise ValueError(
                f"{type(self).__name__} was built from model objects, and its reference (a frozen copy of "
                f"{'ref_model' if self.ref_model_source is not None else 'the initial policy'}) is not saved in "
                "checkpoints: pass ref_model=... (and model=...) to load_from_checkpoint"
            )
        return frozen_reference(source, task=self.model_task, load_kwargs=self.model_load_kwargs)

    def train(self, mode: bool = True) -> OnlineModule:
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()
        return self

    def schedule(self) -> GenerationSchedule:
        """The generation schedule (``steps_per_generation`` defaults to the trainer's ``accumulate_grad_batches``)."""
        steps = self.steps_per_generation
        if steps is None:
            steps = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return GenerationSchedule(num_generations=self.num_generations, steps_per_generation=steps,
                                  num_iterations=self.num_iterations, num_generations_eval=self.num_generations_eval)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage in ("fit", "validate", "test"):
            if datamodule is None or not hasattr(datamodule, "connect_schedule"):
                raise ValueError(
                    f"{type(self).__name__} draws its prompts from a PromptDataModule (each prompt num_generations "
                    f"times): pass datamodule=PromptDataModule(...), got "
                    f"{type(datamodule).__name__ if datamodule is not None else 'plain data loaders'}"
                )
            datamodule.connect_schedule(self.schedule())
        self._configure_engine()

    def _configure_engine(self) -> None:
        """Make the engine generate correctly under the trainer's strategy."""
        kind = strategy_kind(self.trainer)
        strategy = type(self.trainer.strategy).__name__
        if kind in SHARDING_KINDS and self.engine.name == "fast":
            raise ValueError(f"rollout='fast' decodes on one device with whole weights; under {strategy} the policy "
                             "is sharded: use rollout='hf'")
        if self.engine.name != "hf":
            return
        if kind == "fsdp1" and self.engine.gather is None:
            trainer = self.trainer
            self.engine.gather = lambda model: fsdp1_generation_context(fsdp1_root(trainer))
        elif kind == "deepspeed":
            self.engine.gather_parameters = self.ds3_gather_for_generation

    def _resolve_rewards(self) -> None:
        if self.reward_sources is not None:
            return
        sources = []
        for index, spec in enumerate(self.reward_specs):
            tokenizer = self.reward_tokenizers[index] if self.reward_tokenizers is not None else None
            sources.append(resolve_reward_source(spec, tokenizer=tokenizer, device=self.device))
        self.reward_sources = sources
        self.reward_names = reward_names(sources)
        weights = self.reward_weights if self.reward_weights is not None else [1.0] * len(sources)
        self.reward_weight_tensor = torch.tensor(weights, dtype=torch.float32)

    def on_fit_start(self) -> None:
        self._resolve_rewards()

    def on_validation_start(self) -> None:
        self._resolve_rewards()

    def on_test_start(self) -> None:
        self._resolve_rewards()

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        drop_reference_weights(checkpoint)
        checkpoint["lightning_llm"]["generation_buffer"] = self.gather_objects(
            self._buffer.state() if self._buffer is not None else None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        restore_reference_weights(checkpoint, self.ref_model)
        self._pending_buffer = checkpoint.get("lightning_llm", {}).get("generation_buffer")

    def _restore_buffer(self) -> None:
        pending, self._pending_buffer = self._pending_buffer, None
        if not pending:
            return
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if len(pending) != world_size:
            log.warning("The checkpoint's generation buffers are of %d processes, this run has %d: generating anew",
                        len(pending), world_size)
            return
        state = pending[self.trainer.global_rank if self._trainer is not None else 0]
        if state is not None:
            self._buffer = GenerationBuffer.from_state(state, self.device)

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        rollouts = self.rollout_slice(batch)
        loss = self.compute_loss(rollouts)
        self.record("loss", loss.detach())
        return loss

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        rollouts = self.generate_and_score(batch, self.schedule().eval_generations, splits=1)[0]
        self.record("loss", self.compute_loss(rollouts).detach())

    def rollout_slice(self, batch: PromptBatch) -> RolloutBatch:
        """The micro-batch to train on for ``batch``: generated (and the buffer refilled) at the first batch of a
        generation batch, else taken from the buffer."""
        if not isinstance(batch, PromptBatch) or batch.prompt_ids is None or batch.generation is None:
            raise ValueError(f"{type(self).__name__} trains on prompt batches of a PromptDataModule, got "
                             f"{type(batch).__name__}")
        self._restore_buffer()
        schedule = self.schedule()
        if self._buffer is None or self._buffer.generation != batch.generation:
            if batch.repeat:
                log.warning("Generation batch %d starts at its draw %d (a checkpoint without its generation buffer): "
                            "generating its completions anew", batch.generation, batch.repeat)
            slices = self.generate_and_score(batch, self.num_generations, splits=schedule.steps_per_generation)
            self._buffer = GenerationBuffer(batch.generation, slices)
        return self._buffer.slices[batch.repeat % schedule.steps_per_generation]

    # --------------------------------------------------------------------------------------------- generation
    def eos_token_ids(self) -> list[int]:
        """The ids that end a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
        ids: list[int] = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        config = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for token in (config if isinstance(config, (list, tuple)) else [config]):
            if token is not None and int(token) not in ids:
                ids.append(int(token))
        if not ids:
            raise ValueError("neither the tokenizer nor the model's generation config has an EOS token: completions "
                             "could never end; give a tokenizer with an EOS token")
        return ids

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def _sampling_generator(self, generation: int, training: bool) -> torch.Generator:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        seed = hash((self.generation_seed, rank, generation, training)) & (2**62 - 1)
        return torch.Generator(device="cpu").manual_seed(seed)

    def decode_completions(self, prompts: Sequence[Any], completion_ids: Sequence[Sequence[int]]) -> list[Any]:
        """Completions as text (special tokens removed); for conversational prompts one assistant message each, as
        TRL shapes them."""
        texts = self.tokenizer.batch_decode(list(completion_ids), skip_special_tokens=True)
        if prompts and not isinstance(prompts[0], str):
            return [[{"role": "assistant", "content": text}] for text in texts]
        return texts

    @torch.no_grad()
    def generate_and_score(self, batch: PromptBatch, num_generations: int, splits: int) -> list[RolloutBatch]:
        """Generate for every prompt of ``batch``, score, compute advantages and generation-time log-probs; return the
        generation batch (shuffled in training) split into ``splits`` micro-batches."""
        self._resolve_rewards()
        device = self.device
        local = len(batch.prompt_ids)
        if local % splits:
            raise ValueError(f"a generation batch of {local} completions cannot be split into {splits} micro-batches")
        rollouts = self.sample_completions(batch)
        if rollouts.extra_fields:  # what the engine measured reaches the reward functions as columns
            rows = batch.rows or [{} for _ in batch.prompts]
            batch = dataclasses.replace(batch, rows=[
                {**row, **{name: values[i] for name, values in rollouts.extra_fields.items()}}
                for i, row in enumerate(rows)])
        completion_lists = rollouts.completion_ids
        completions = self.decode_completions(batch.prompts, completion_lists)
        prompt_ids, prompt_mask = pad_rows(batch.prompt_ids, self.pad_token_id, left=True, device=device)
        completion_ids, completion_mask = pad_rows(completion_lists, self.pad_token_id, left=False, device=device)
        stops = set(self.eos_token_ids()) | {self.pad_token_id}
        truncated = torch.tensor([bool(ids) and ids[-1] not in stops for ids in completion_lists], device=device)
        if self.mask_truncated_completions:
            completion_mask = completion_mask * (~truncated).unsqueeze(1).long()
        self.record_generation_metrics(batch.prompt_ids, completion_lists, truncated)

        sampling_logps = None
        if rollouts.logprobs is not None:
            sampling_logps, _ = _pad_floats(rollouts.logprobs, completion_ids.shape[1], device)
        rollout = RolloutBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, advantages=torch.zeros(local, device=device),
            num_items_in_batch=self._sum_over_processes(completion_mask.sum().float()),
            sampling_per_token_logps=sampling_logps,
        )
        micro = local // splits
        old = None
        if self.needs_old_logps(self.training):
            old = self._chunked_logps(self.model, rollout, micro)
        ref = self.reference_token_logps(rollout, micro) if self.uses_reference else None
        rollout = _replace(rollout, old_per_token_logps=old, ref_per_token_logps=ref)

        rewards_local = self.score_completions(batch, completions, completion_lists)
        rewards = self._gather_rows(rewards_local)  # [W·L, F]: a prompt's group may span processes
        advantages = self.compute_advantages(rewards, rollout, num_generations)
        start = (self.trainer.global_rank if self._trainer is not None else 0) * local
        rollout = _replace(rollout, advantages=advantages[start: start + local].to(device).float())
        self._remember_rollouts(batch, completions, rewards_local, advantages[start: start + local])

        order = self.generation_order(local).to(device) if self.training else torch.arange(local, device=device)
        return [rollout.select(order[k * micro: (k + 1) * micro]) for k in range(splits)]

    def sample_completions(self, batch: PromptBatch) -> Rollouts:
        """One completion of every row of ``batch`` from the policy, through the rollout engine (XPO samples some
        rows from the reference instead)."""
        self.engine.sync_weights(self.model)
        return self.engine.generate(
            self.model, batch.prompt_ids, self.sampling, eos_token_ids=self.eos_token_ids(),
            pad_token_id=self.pad_token_id, generator=self._sampling_generator(batch.generation, self.training),
            prompts=batch.prompts,
        )

    def generation_order(self, size: int) -> Tensor:
        """The order in which a training generation batch of ``size`` completions is split into micro-batches: a
        permutation drawn from torch's global generator, as TRL draws it (restored on resume)."""
        return torch.randperm(size)

    def needs_old_logps(self, training: bool) -> bool:
        """Whether the policy's log-probs of generation time are needed: when the policy changes between generating
        and training on a generation batch (TRL's rule: ``accumulate_grad_batches`` not a multiple of
        ``steps_per_generation · num_iterations``), or always for algorithms that set
        :attr:`always_needs_old_logps`."""
        if self.always_needs_old_logps:
            return True
        if not training:
            return False
        schedule = self.schedule()
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        return accumulate % schedule.repeats != 0

    def completion_token_logps(self, model: nn.Module, rollout: RolloutBatch, *, return_entropy: bool = False
                               ) -> tuple[Tensor, Tensor | None]:
        """``[B, C]`` temperature-scaled log-probs of the completion tokens under ``model`` (0 on padding), and their
        entropies when asked."""
        input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        width = rollout.prompt_ids.shape[1]
        labels[:, :width] = IGNORE_INDEX
        out = self.token_logprobs(model, input_ids, labels, attention_mask=attention_mask,
                                  temperature=self.temperature, return_entropy=return_entropy)
        logps = out.logps[:, width - 1:]
        entropy = out.entropy[:, width - 1:] if return_entropy else None
        return logps, entropy

    def _chunked_logps(self, model: nn.Module, rollout: RolloutBatch, micro: int) -> Tensor:
        parts = [self.completion_token_logps(model, rollout.select(torch.arange(k, min(k + micro, rollout.size),
                                                                                device=self.device)))[0]
                 for k in range(0, rollout.size, micro)]
        width = rollout.completion_ids.shape[1]
        return torch.cat([nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

    def reference_token_logps(self, rollout: RolloutBatch, micro: int) -> Tensor:
        """``[B, C]`` completion log-probs under the reference: the frozen copy, or the policy with its adapters
        disabled."""
        if self.ref_model is not None:
            return self._chunked_logps(self.ref_model, rollout, micro)
        if not is_peft_model(self.model):
            raise ValueError(f"{type(self).__name__} has beta={self.beta} but no reference model")
        with disabled_adapters(self.model):
            return self._chunked_logps(self.model, rollout, micro)

    # ----------------------------------------------------------------------------------------------- rewards
    def score_completions(self, batch: PromptBatch, completions: list[Any], completion_ids: list[list[int]]
                          ) -> Tensor:
        """``[L, F]`` rewards of this process's completions (NaN where a source does not apply); what the reward
        functions log with ``log_metric`` is recorded."""
        rows = batch.rows or [{} for _ in batch.prompts]
        rewards = compute_rewards(
            self.reward_sources, prompts=batch.prompts, completions=completions, completion_ids=completion_ids,
            columns=columns_from_rows(rows), trainer_state=self._reward_state(), log_metric=self.reward_log.log_metric,
            log_extra=self.reward_log.log_extra, row_ids=batch.indices, device=self.device,
        )
        for name, value in self.reward_log.take_metrics().items():
            self.record(name, value)
        return rewards

    def _reward_state(self) -> RewardState:
        return RewardState.from_trainer(self.trainer) if self._trainer is not None else RewardState()

    def weighted_rewards(self, rewards_per_func: Tensor) -> Tensor:
        """``[N]`` weighted sum of the reward sources, NaN where none applies."""
        return weighted_rewards(rewards_per_func, self.reward_weight_tensor.to(rewards_per_func.device))

    def record_reward_metrics(self, rewards_per_func: Tensor, is_std_zero: Tensor) -> None:
        """TRL's reward metrics of a generation batch (computed on the gathered rewards, so the same on every
        process): ``rewards/<name>/mean|std``, ``reward``, ``reward_std``, ``frac_reward_zero_std``."""
        for column, name in enumerate(self.reward_names):
            values = rewards_per_func[:, column]
            self._record_value(f"rewards/{name}/mean", torch.nanmean(values))
            self._record_value(f"rewards/{name}/std", nanstd(values))
        rewards = self.weighted_rewards(rewards_per_func)
        self._record_value("reward", torch.nanmean(rewards))
        self._record_value("reward_std", nanstd(rewards))
        self._record_value("frac_reward_zero_std", is_std_zero.float().mean())

    def _record_value(self, name: str, value: Tensor | float) -> None:
        """Record a value that every process computed alike (each adds it once: the reduced mean is the value)."""
        value = torch.as_tensor(value, dtype=torch.float32)
        if not torch.isnan(value):
            self.record(name, value)

    # ---------------------------------------------------------------------------------------- the algorithm
    @abc.abstractmethod
    def compute_advantages(self, rewards_per_func: Tensor, rollout: RolloutBatch, num_generations: int) -> Tensor:
        """``[W·L]`` advantages of the whole generation batch of every process, from its ``[W·L, F]`` rewards (rows
        in process order, groups of ``num_generations`` consecutive rows) and this process's rollouts; records the
        reward metrics."""

    @abc.abstractmethod
    def compute_loss(self, rollout: RolloutBatch) -> Tensor:
        """The loss of one micro-batch of rollouts; records the algorithm's metrics."""

    # ---------------------------------------------------------------------------------------------- metrics
    def record_generation_metrics(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                                  truncated: Tensor) -> None:
        """TRL's ``completions/*`` metrics over the generation batch of every process, and the ``num_tokens`` it
        adds (prompts and completions)."""
        device = self.device
        lengths = torch.tensor([len(ids) for ids in completion_ids], dtype=torch.float32, device=device)
        if self.training:
            prompt_tokens = sum(len(ids) for ids in prompt_ids)
            self._metrics["train"].add_sum("num_tokens", lengths.sum() + prompt_tokens)
        all_lengths = self._gather_rows(lengths)
        all_truncated = self._gather_rows(truncated)
        self._record_value("completions/mean_length", all_lengths.mean())
        self._record_value("completions/min_length", all_lengths.min())
        self._record_value("completions/max_length", all_lengths.max())
        self._record_value("completions/clipped_ratio", all_truncated.float().mean())
        terminated = all_lengths[~all_truncated.bool()]
        if terminated.numel() == 0:
            terminated = torch.zeros(1, device=device)
        self._record_value("completions/mean_terminated_length", terminated.mean())
        self._record_value("completions/min_terminated_length", terminated.min())
        self._record_value("completions/max_terminated_length", terminated.max())

    def record_policy_metrics(self, metrics: PolicyGradientMetrics) -> None:
        """Record a loss's :class:`~lightning_llm.losses.grpo.PolicyGradientMetrics`: sums as weighted means, per
        sequence minima and maxima as the step's extremes."""
        for name, pair in metrics.sums.items():
            self.record(name, pair[0], pair[1])
        for extremes, op in ((metrics.sequence_minima, "min"), (metrics.sequence_maxima, "max")):
            for name, values in extremes.items():
                values = values.detach().float()
                finite = values[~torch.isnan(values)]
                if finite.numel():
                    self.record_extreme(name, finite.min() if op == "min" else finite.max(), op)

    def _remember_rollouts(self, batch: PromptBatch, completions: list[Any], rewards: Tensor,
                           advantages: Tensor) -> None:
        extra = self.reward_log.take_extra()
        rows = []
        for k, (prompt, completion) in enumerate(zip(batch.prompts, completions)):
            row = {"prompt": prompt, "completion": completion}
            row.update({f"rewards/{name}": float(rewards[k, i]) for i, name in enumerate(self.reward_names)})
            row["advantage"] = float(advantages[k])
            row.update({column: values[k] for column, values in extra.items() if k < len(values)})
            rows.append(row)
        self.last_rollouts = rows

    def rollout_table(self) -> list[dict[str, Any]]:
        """The rows of the last generation batch of every process (every process must call)."""
        gathered = self.gather_objects(self.last_rollouts)
        return [row for rows in gathered for row in (rows or [])]

    # ----------------------------------------------------------------------------------------- distribution
    def _gather_rows(self, tensor: Tensor) -> Tensor:
        """``tensor`` (``[L, ...]``, the same ``L`` on every process) of every process, concatenated in rank order."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        gathered = self.trainer.strategy.all_gather(tensor.contiguous())  # [W, L, ...]
        return gathered.reshape(-1, *tensor.shape[1:])

    def _sum_over_processes(self, tensor: Tensor) -> Tensor:
        return self._reduce_sum(tensor.clone())


def _pad_floats(rows: Sequence[Sequence[float]], width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    values = torch.zeros((len(rows), width), dtype=torch.float32)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for k, row in enumerate(rows):
        values[k, : len(row)] = torch.tensor(list(row), dtype=torch.float32)
        mask[k, : len(row)] = True
    return values.to(device), mask.to(device)


def _replace(rollout: RolloutBatch, **changes: Any) -> RolloutBatch:
    from dataclasses import replace

    return replace(rollout, **changes)
