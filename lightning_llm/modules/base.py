"""``LLMModule``: the base every algorithm module stands on.

It owns the policy (built in ``configure_model`` from a hub id, a local directory, a tiny preset or a model object;
optionally wrapped with PEFT adapters; optionally with gradient checkpointing), the tokenizer, the optimizer and LR
schedule (built from trainable parameters only), the one log-prob path (:meth:`LLMModule.token_logprobs`), metric
logging under TRL's names, generation, and the Hugging Face export at the end of ``fit``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_llm.data.batches import IGNORE_INDEX, Batch, PromptBatch
from lightning_llm.data.chat import conversation_text, with_chat_template
from lightning_llm.data.sampling import finish_epoch_of_last_batch_checkpoint
from lightning_llm.models.export import build_replica
from lightning_llm.models.loading import ModelSpec, load_model, load_tokenizer, model_name, model_spec
from lightning_llm.models.parts import causal_lm_parts, unwrap_model
from lightning_llm.models.peft import apply_peft, check_peft_config, is_peft_model, peft_config_dict
from lightning_llm.models.presets import is_preset
from lightning_llm.models.sharding import (
    SHARDING_KINDS,
    fsdp1_generation_context,
    fsdp1_root,
    full_state_dict,
    is_dtensor,
    is_sharded_fsdp2,
    run_in_forward,
    shard_fsdp2,
    strategy_kind,
)
from lightning_llm.ops import TokenLogProbs, TokenLoss, linear_logprobs, linear_token_loss
from lightning_llm.ops.logprobs import parse_tiles, resolve_impl
from lightning_llm.ops.token_loss import TokenLossFn
from lightning_llm.utils.model import disable_dropout_in_model

log = logging.getLogger(__name__)

#: what ``model=`` accepts: a hub id, a local directory, a tiny preset name, or a model object (and, in checkpoints
#: of a module built from a model object, the :func:`~lightning_llm.models.loading.model_spec` that rebuilds it)
ModelArg = Union[str, PreTrainedModel, ModelSpec]
#: what ``tokenizer=`` accepts: an id/path, a tokenizer object, or None for the model's own
TokenizerArg = Union[str, PreTrainedTokenizerBase, None]
LOGPROB_IMPLS = ("auto", "triton", "chunked", "eager")


class MetricBuffer:
    """Running sums of (total, count) per metric name, reduced across processes once, when flushed.

    ``add("entropy", entropy_sum, num_tokens)`` then ``flush()`` gives the token-weighted mean over every micro-batch
    and every rank since the last flush — TRL's way of weighting, without a device sync per step.
    """

    def __init__(self) -> None:
        self.totals: dict[str, Tensor | float] = {}
        self.counts: dict[str, Tensor | float] = {}
        self.sums: set[str] = set()
        self.extremes: dict[str, tuple[str, Tensor]] = {}

    def add_sum(self, name: str, value: Tensor | float) -> None:
        """Add to a metric flushed as a plain sum (e.g. a token count), not a mean."""
        self.sums.add(name)
        self.add(name, value, 0.0)

    def add(self, name: str, total: Tensor | float, count: Tensor | float = 1.0) -> None:
        if isinstance(total, Tensor):
            total = total.detach().float()
        if isinstance(count, Tensor):
            count = count.detach().float()
        self.totals[name] = self.totals.get(name, 0.0) + total
        self.counts[name] = self.counts.get(name, 0.0) + count

    def add_extreme(self, name: str, value: Tensor | float, op: str) -> None:
        """Keep the smallest (``op="min"``) or largest (``"max"``) value of metric ``name`` since the last flush, over
        micro-batches and processes; NaN values are ignored (a metric that is only NaN is left out)."""
        if op not in ("min", "max"):
            raise ValueError(f"op must be 'min' or 'max', got {op!r}")
        value = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value, dtype=torch.float32)
        value = value.reshape(())
        fill = math.inf if op == "min" else -math.inf
        value = torch.where(torch.isnan(value), torch.full_like(value, fill), value)
        if name in self.extremes:
            pick = torch.minimum if op == "min" else torch.maximum
            value = pick(self.extremes[name][1], value.to(self.extremes[name][1].device))
        self.extremes[name] = (op, value)

    def __bool__(self) -> bool:
        return bool(self.totals) or bool(self.extremes)

    def state_dict(self) -> dict[str, Any]:
        """What the buffer holds, on the CPU (a checkpoint written between two logging steps keeps it)."""
        cpu = lambda v: v.detach().cpu() if isinstance(v, Tensor) else v  # noqa: E731
        return {"totals": {k: cpu(v) for k, v in self.totals.items()},
                "counts": {k: cpu(v) for k, v in self.counts.items()}, "sums": sorted(self.sums),
                "extremes": {k: (op, cpu(v)) for k, (op, v) in self.extremes.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = dict(state.get("totals", {}))
        self.counts = dict(state.get("counts", {}))
        self.sums = set(state.get("sums", []))
        self.extremes = {k: (op, v) for k, (op, v) in state.get("extremes", {}).items()}

    def flush(self, reduce: Callable[[Tensor], Tensor], device: torch.device,
              reduce_extreme: Callable[[Tensor, str], Tensor] | None = None) -> dict[str, float]:
        """Means since the last flush, reduced with ``reduce`` (a cross-process sum), and the extremes of
        :meth:`add_extreme`, reduced with ``reduce_extreme(tensor, "min" | "max")``; then reset."""
        values = self._flush_extremes(device, reduce_extreme)
        return {**self._flush_means(reduce, device), **values}

    def _flush_extremes(self, device: torch.device, reduce_extreme: Callable[[Tensor, str], Tensor] | None
                        ) -> dict[str, float]:
        out: dict[str, float] = {}
        extremes, self.extremes = self.extremes, {}
        for op in ("min", "max"):
            names = sorted(name for name, (kind, _) in extremes.items() if kind == op)
            if not names:
                continue
            stacked = torch.stack([extremes[name][1].to(device) for name in names])
            if reduce_extreme is not None:
                stacked = reduce_extreme(stacked, op)
            out.update({name: value for name, value in zip(names, stacked.tolist()) if math.isfinite(value)})
        return out

    def _flush_means(self, reduce: Callable[[Tensor], Tensor], device: torch.device) -> dict[str, float]:
        names = sorted(self.totals)
        if not names:
            return {}
        stacked = torch.stack(
            [torch.as_tensor(self.totals[n], dtype=torch.float32, device=device).reshape(()) for n in names]
            + [torch.as_tensor(self.counts[n], dtype=torch.float32, device=device).reshape(()) for n in names]
        )
        stacked = reduce(stacked)
        totals, counts = stacked[: len(names)], stacked[len(names):]
        sums, self.totals, self.counts, self.sums = self.sums, {}, {}, set()
        # a mean over nothing (e.g. no undesirable example in the step) is left out rather than logged as 0
        return {
            n: t if n in sums else t / c
            for n, t, c in zip(names, totals.tolist(), counts.tolist()) if n in sums or c > 0
        }


def _is_plain(value: Any) -> bool:
    """Whether a hyperparameter is plain data (what YAML can hold), as opposed to an object."""
    if value is None or isinstance(value, (str, int, float, bool, os.PathLike)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def decay_parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: with weight decay, and without it for biases and normalisation weights
    (the ``transformers.Trainer`` convention TRL inherits)."""
    no_decay_types = (nn.LayerNorm, nn.GroupNorm, nn.Embedding)
    no_decay: set[str] = set()
    for mod_name, mod in module.named_modules():
        is_norm = isinstance(mod, no_decay_types[:2]) or "norm" in type(mod).__name__.lower()
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p_name == "bias":
                no_decay.add(full)
    decay, plain = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (plain if name in no_decay else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` of the peak at
    ``total_steps``."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_scheduler_name(name: str | None, kwargs: dict[str, Any] | None) -> None:
    """A ``ValueError`` unless ``name`` is None or a schedule ``transformers.get_scheduler`` steps per optimizer step
    (``reduce_lr_on_plateau`` needs a metric, so it is refused)."""
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"lr_scheduler_kwargs must be a dict or None, got {type(kwargs).__name__}")
    if name is None:
        if kwargs:
            raise ValueError("lr_scheduler_kwargs was given without lr_scheduler_type")
        return
    from transformers import SchedulerType

    names = [t.value for t in SchedulerType if t.value != "reduce_lr_on_plateau"]
    if name not in names:
        raise ValueError(f"lr_scheduler_type must be None or one of {names}, got {name!r}")


def pass_typed_batches(precision_plugin: Any) -> None:
    """Let the typed batches through ``precision_plugin.convert_input`` unchanged.

    Lightning's FSDP, DeepSpeed and true-half precision plugins rebuild every batch to cast its float tensors
    (DeepSpeed to bf16 even under ``bf16-mixed``), which a frozen dataclass cannot be, and which would round the
    precomputed fp32 reference log-probs a batch carries. The batches hold integer ids and masks plus values that must
    stay fp32, so the model's autocast or dtype sees them as they are. Other batches are converted as before.
    """
    convert = precision_plugin.convert_input
    if getattr(convert, "passes_typed_batches", False):
        return

    def convert_input(data: Any) -> Any:
        return data if isinstance(data, Batch) else convert(data)

    convert_input.passes_typed_batches = True  # type: ignore[attr-defined]
    precision_plugin.convert_input = convert_input


#: PEFT's task type for each kind of model the modules train
_PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS"}

#: the settings ``LLMModule.generate`` takes, with what each must be
GENERATION_SETTINGS = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_p": float,
                       "batch_size": int}


def check_generation_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` for :meth:`LLMModule.generate`, checked: known names, right types, positive numbers."""
    kwargs = dict(kwargs or {})
    for name, value in kwargs.items():
        if name not in GENERATION_SETTINGS:
            raise ValueError(f"generation_kwargs: unknown setting {name!r}; expected some of "
                             f"{sorted(GENERATION_SETTINGS)}")
        kind = GENERATION_SETTINGS[name]
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"generation_kwargs: {name} must be true or false, got {value!r}")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"generation_kwargs: {name} must be a positive number, got {value!r}")
        elif kind is int and int(value) != value:
            raise ValueError(f"generation_kwargs: {name} must be a whole number, got {value!r}")
    if "top_p" in kwargs and kwargs["top_p"] > 1:
        raise ValueError(f"generation_kwargs: top_p must be in (0, 1], got {kwargs['top_p']}")
    return kwargs


class LLMModule(L.LightningModule):
    """Base LightningModule for LLM post-training.

    Args:
        model: hub id, local ``save_pretrained`` directory, tiny offline preset (``tiny-llama``, ``tiny-qwen2``,
            ``tiny-gpt2``) or a ``PreTrainedModel``. A module built from a model object saves the object's
            architecture in its hyperparameters, so ``load_from_checkpoint`` rebuilds it and loads the trained
            weights.
        tokenizer: tokenizer or its id/path; default: the model's.
        dtype: dtype of the loaded weights (``float32`` by default, right for mixed precision; ``bfloat16``, ``auto``).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``, ...
        trust_remote_code: allow custom modelling code from the checkpoint.
        revision: hub revision of model and tokenizer.
        model_kwargs: other ``from_pretrained`` keywords.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        peft_config: a ``peft.LoraConfig`` (or a dict of its fields, e.g. ``{"r": 16, "target_modules":
            "all-linear"}``): train adapters instead of the whole model.
        learning_rate: peak learning rate of the default AdamW (ignored when ``optimizer`` is given).
        weight_decay: weight decay of the default AdamW (not applied to biases and norms).
        warmup_ratio: fraction of the training steps of linear warm-up in the default schedule.
        warmup_steps: warm-up steps (overrides ``warmup_ratio`` when > 0).
        optimizer: a callable ``params -> Optimizer`` (LightningCLI: ``class_path``/``init_args``); default AdamW,
            fused where the parameters allow it (the HF Trainer's default ``adamw_torch_fused``).
        scheduler: a callable ``optimizer -> LRScheduler``; default: the schedule ``lr_scheduler_type`` names.
        lr_scheduler_type: the default schedule (ignored when ``scheduler`` is given): ``None`` for cosine decay to 0
            with a linear warm-up that reaches the peak at the end of the first warm-up step; or a name of
            ``transformers.get_scheduler`` (``linear``, ``cosine``, ``constant``, ``constant_with_warmup``,
            ``cosine_with_min_lr``, ``polynomial``, ``inverse_sqrt``, ``warmup_stable_decay``, ...), stepped once per
            optimizer step exactly as the HF Trainer behind TRL steps it (its warm-up starts at 0).
        lr_scheduler_kwargs: extra arguments of the named schedule (e.g. ``{"min_lr_rate": 0.1}``).
        logprob_tiles: fields of :class:`~lightning_llm.kernels.linear_logprobs.TileConfig` for the Triton path,
            e.g. ``{"fused_gemm": true}`` or ``{"logits_dtype": "bfloat16"}``; ignored where another path runs.
        logprob_impl: token log-prob implementation: ``auto`` (Triton on CUDA, chunked torch elsewhere), ``triton``,
            ``chunked`` or ``eager`` (full logits; for debugging).
        chat_template: a Jinja chat template (string or ``.jinja`` path) replacing the tokenizer's.
        disable_dropout: set every dropout probability of the model to zero (what TRL does by default for preference,
            reward and process reward training; off for SFT, as in TRL).
        generation_kwargs: settings of :meth:`generate` for ``predict`` (``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_p``, ``batch_size``).
        export_dir: where to write the trained model and tokenizer in Hugging Face format at the end of ``fit``; a
            relative path is taken from the trainer's ``default_root_dir`` (the working directory by default).
        merge_adapters: with PEFT, merge the adapters into the exported model (else export the adapters only).
        average_tokens_across_steps: for token-mean losses (SFT, PRM): normalise by the loss tokens of the whole
            optimizer step (every micro-batch and rank, as TRL does with ``average_tokens_across_devices``), so
            8 examples x 1 micro-batch and 1 x 8 with gradient accumulation give the same gradient; ``False``
            averages each micro-batch on its own.
    """

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        peft_config: Any = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        warmup_steps: int = 0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_type: str | None = None,
        lr_scheduler_kwargs: dict[str, Any] | None = None,
        logprob_impl: str = "auto",
        logprob_tiles: dict[str, Any] | None = None,
        chat_template: str | None = None,
        disable_dropout: bool = False,
        generation_kwargs: dict[str, Any] | None = None,
        export_dir: str | None = None,
        merge_adapters: bool = True,
        average_tokens_across_steps: bool = True,
    ) -> None:
        super().__init__()
        if logprob_impl not in LOGPROB_IMPLS:
            raise ValueError(f"logprob_impl must be one of {LOGPROB_IMPLS}, got {logprob_impl!r}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        check_scheduler_name(lr_scheduler_type, lr_scheduler_kwargs)
        if not isinstance(model, (str, os.PathLike, PreTrainedModel, dict)):
            raise ValueError(f"model must be a hub id, a path, a preset name or a PreTrainedModel, got {type(model)}")
        with warnings.catch_warnings():
            # Lightning warns about model objects among the arguments; they are replaced right below.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        # Kept out of the submodule registry: a model object is the policy itself (``self.model``), not a second child.
        object.__setattr__(self, "model_source", model)
        self.model_load_kwargs = dict(
            dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            revision=revision, model_kwargs=model_kwargs,
        )
        self.gradient_checkpointing = gradient_checkpointing
        if peft_config is not None:
            check_peft_config(peft_config, _PEFT_TASKS[self.model_task])
        self.peft_config = peft_config
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.warmup_steps = warmup_steps
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr_scheduler_type = lr_scheduler_type
        self.lr_scheduler_kwargs = dict(lr_scheduler_kwargs or {})
        self.logprob_impl = logprob_impl
        self.logprob_tiles = parse_tiles(logprob_tiles)
        self.export_dir = export_dir
        self.merge_adapters = merge_adapters
        self.average_tokens_across_steps = average_tokens_across_steps
        self._step_loss_tokens: Tensor | float = 0.0
        self.tokenizer: PreTrainedTokenizerBase = with_chat_template(load_tokenizer(
            tokenizer, model if tokenizer is None else None, trust_remote_code=trust_remote_code, revision=revision,
            chat_template=chat_template,
        ))
        self.disable_dropout = disable_dropout
        self.generation_kwargs = check_generation_kwargs(generation_kwargs)
        self._plain_hyperparameters(model, peft_config)
        self.model: nn.Module | None = None
        if isinstance(model, PreTrainedModel):
            self.model = self._prepare_policy(load_model(model, dtype=dtype))
        self._metrics = {"train": MetricBuffer(), "val": MetricBuffer(), "test": MetricBuffer()}
        self.num_tokens_seen = 0.0
        #: the values of the last flush of each mode's metrics, a new dict at each flush (Lightning's
        #: ``callback_metrics`` keep a metric's last value on later steps that do not log it; this holds exactly what
        #: the last step logged: for training, with the running ``num_tokens`` and the ``learning_rate``)
        self.last_metrics: dict[str, dict[str, float]] = {}

    def _plain_hyperparameters(self, model: ModelArg, peft_config: Any) -> None:
        """Keep only plain values in the hyperparameters (objects would be pickled into every checkpoint): a model
        object becomes the spec that rebuilds its architecture, a PEFT config its fields, a tokenizer object the
        name it was loaded from."""
        hparams = self.hparams
        if isinstance(model, PreTrainedModel):
            hparams["model"] = model_spec(model)
        if peft_config is not None and not isinstance(peft_config, dict):
            hparams["peft_config"] = peft_config_dict(peft_config)
        if not _is_plain(hparams.get("tokenizer")) or (hparams.get("tokenizer") is None
                                                         and isinstance(model, PreTrainedModel)):
            hparams["tokenizer"] = getattr(self.tokenizer, "name_or_path", None) or None
        for name in [k for k, v in hparams.items() if not _is_plain(v)]:
            del hparams[name]

    # ------------------------------------------------------------------------------------------------- the model
    @property
    def model_task(self) -> str:
        """``transformers`` task of the policy: ``causal_lm`` here; reward and PRM modules override it."""
        return "causal_lm"

    def build_model(self) -> PreTrainedModel:
        """Load the policy weights (called once, from ``configure_model``)."""
        return load_model(self.model_source, task=self.model_task, **self.model_load_kwargs)

    def _prepare_policy(self, model: PreTrainedModel) -> nn.Module:
        if getattr(model.config, "pad_token_id", None) is None and self.tokenizer.pad_token_id is not None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.peft_config is not None:
            if is_peft_model(model):
                raise ValueError("peft_config was given but the model already carries PEFT adapters")
            model = apply_peft(model, self.peft_config, task_type=_PEFT_TASKS[self.model_task])
        if self.disable_dropout:
            disable_dropout_in_model(model)
        return model

    def configure_model(self) -> None:
        """Build the policy (once). Lightning calls this inside the strategy's context (meta-device / sharded init)."""
        if self.model is None:
            self.model = self._prepare_policy(self.build_model())
        self.shard(self.model)

    def shard(self, model: nn.Module | None) -> nn.Module | None:
        """Shard ``model`` with FSDP2 over the data-parallel dimension of the strategy's device mesh (Lightning's
        ``ModelParallelStrategy``; nothing happens under any other strategy, which shards models itself, or once
        ``model`` is sharded)."""
        mesh = self.device_mesh
        if model is None or mesh is None or is_sharded_fsdp2(model):
            return model
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError("tensor parallelism is not supported: use ModelParallelStrategy(tensor_parallel_size=1)")
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        return shard_fsdp2(model, dp_mesh)

    def ensure_model(self) -> nn.Module:
        """The policy, built now if ``configure_model`` has not run yet (e.g. generation before training)."""
        self.configure_model()
        return self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (adapters only under PEFT; never a reference model)."""
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ the log-prob path
    def _head_inputs(
        self,
        model: nn.Module,
        input_ids: Tensor,
        labels: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        """``(hidden [B, T-1, H], targets [B, T-1], head weight, head options)``: the backbone's last hidden
        states aligned with the next tokens, and what the LM head needs to score them (bias, transform, impl)."""
        parts = causal_lm_parts(model)
        backbone_kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            backbone_kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            backbone_kwargs["position_ids"] = position_ids
        hidden = parts.backbone(**backbone_kwargs).last_hidden_state[:, :-1]  # [B, T-1, H]
        weight, bias = parts.head_weight()
        options = dict(
            bias=bias, ignore_index=IGNORE_INDEX, logit_scale=parts.scaling.logit_scale,
            softcap=parts.scaling.softcap, impl=self.logprob_impl,
        )
        if self.logprob_tiles is not None and resolve_impl(self.logprob_impl, weight.device) == "triton":
            options["tiles"] = self.logprob_tiles
        return hidden.to(weight.device), labels[:, 1:].to(weight.device), weight, options

    def token_logprobs(
        self,
        model: nn.Module,
        input_ids: Tensor,
        labels: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_is_top1: bool = False,
        return_mean_logits: bool = False,
        return_log_sum_sq_probs: bool = False,
    ) -> TokenLogProbs:
        """Per-token log-probs of ``labels[:, 1:]`` given ``input_ids`` (the one log-prob path of every algorithm).

        Runs ``model``'s backbone to its last hidden states and scores the next tokens through the LM head with
        :func:`lightning_llm.ops.linear_logprobs`; the full ``[B, T, V]`` logits are never built. Positions whose
        label is ``-100`` read 0 and cost no head work. Outputs have shape ``[B, T-1]``.
        """
        def score(model: nn.Module) -> TokenLogProbs:
            hidden, targets, weight, options = self._head_inputs(model, input_ids, labels, attention_mask,
                                                                 position_ids)
            return linear_logprobs(
                hidden, weight, targets, temperature=temperature, return_entropy=return_entropy,
                return_is_top1=return_is_top1, return_mean_logits=return_mean_logits,
                return_log_sum_sq_probs=return_log_sum_sq_probs, **options,
            )

        return run_in_forward(model, score)

    def token_loss(
        self,
        model: nn.Module,
        input_ids: Tensor,
        labels: Tensor,
        token_loss: TokenLossFn,
        *,
        token_inputs: dict[str, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_is_top1: bool = False,
    ) -> TokenLoss:
        """Sum of a per-token loss over the tokens of ``labels[:, 1:]``, its head gradient computed in the forward.

        The same backbone and head as :meth:`token_logprobs`, scored by :func:`lightning_llm.ops.linear_token_loss`
        (``token_inputs`` are ``[B, T-1]`` constants handed to ``token_loss``). Per-token outputs are ``[B, T-1]``.
        """
        def score(model: nn.Module) -> TokenLoss:
            hidden, targets, weight, options = self._head_inputs(model, input_ids, labels, attention_mask,
                                                                 position_ids)
            return linear_token_loss(
                hidden, weight, targets, token_loss, token_inputs=token_inputs, temperature=temperature,
                return_entropy=return_entropy, return_is_top1=return_is_top1, **options,
            )

        return run_in_forward(model, score)

    def fuses_token_loss(self, fuse: bool | None, device: torch.device | None = None) -> bool:
        """Whether a per-token loss should go through :meth:`token_loss` rather than :meth:`token_logprobs`.

        ``fuse`` forces the answer; ``None`` fuses where the resolved implementation is the chunked torch path
        (a quarter fewer head FLOPs at the same memory). On the Triton path the unfused vocabulary-outer
        schedule is kept by default: see :mod:`lightning_llm.ops.token_loss`.
        """
        if fuse is not None:
            return fuse
        return resolve_impl(self.logprob_impl, device or self.device) == "chunked"

    # ---------------------------------------------------------------------------------------------------- metrics
    @property
    def mode(self) -> str:
        """``train``, ``val`` or ``test``: which buffer :meth:`record` adds to, and the metric prefix."""
        if self.training:
            return "train"
        return "test" if self._trainer is not None and self.trainer.testing else "val"

    def record(self, name: str, total: Tensor | float, count: Tensor | float = 1.0) -> None:
        """Add to metric ``name`` (logged as the mean ``sum(total) / sum(count)`` over micro-batches and ranks)."""
        self._metrics[self.mode].add(name, total, count)

    def record_extreme(self, name: str, value: Tensor | float, op: str) -> None:
        """Log metric ``name`` as the smallest (``op="min"``) or largest (``"max"``) value recorded in the step, over
        micro-batches and processes (NaN ignored)."""
        self._metrics[self.mode].add_extreme(name, value, op)

    def record_mean(self, name: str, values: Tensor) -> None:
        """Add every element of ``values`` to metric ``name`` (an example-weighted mean)."""
        values = values.detach().float()
        self.record(name, values.sum(), values.numel())

    def reduce_metrics(self, mode: str) -> dict[str, float]:
        """The buffered metrics of ``mode`` (``train``/``val``) reduced across micro-batches and processes, plus the
        derived ones; the buffer is emptied."""
        buffer = self._metrics[mode]
        if not buffer:
            return {}
        return self.derive_metrics(buffer.flush(self._reduce_sum, self.device, self._reduce_extreme))

    def derive_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """Metrics computed from other metrics once they are reduced over micro-batches and processes."""
        return values

    def count_input_tokens(self, batch: Batch) -> None:
        """Add ``batch``'s input tokens (padding excluded) to ``num_tokens``, TRL's running count of the tokens every
        rank has seen."""
        if self.training:
            self._metrics["train"].add_sum("num_tokens", batch.num_tokens())

    def _reduce_sum(self, tensor: Tensor) -> Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(tensor, reduce_op="sum")
        return tensor

    def _reduce_extreme(self, tensor: Tensor, op: str) -> Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(tensor, reduce_op=op)
        return tensor

    def flush_metrics(self, mode: str) -> dict[str, float]:
        """Reduce the buffered metrics across processes and log them (``val/`` or ``test/`` prefix outside
        training)."""
        values = self.reduce_metrics(mode)
        self.last_metrics[mode] = dict(values)
        if not values:
            return {}
        if mode == "train":
            self.num_tokens_seen += values.pop("num_tokens", 0.0)
            values["num_tokens"] = self.num_tokens_seen
            if self._trainer is not None and self.trainer.optimizers:
                values["learning_rate"] = self.trainer.optimizers[0].param_groups[0]["lr"]
            loss = values.pop("loss", None)
            self.log_dict(values, on_step=True, on_epoch=False, batch_size=1, sync_dist=False)
            if loss is not None:
                self.log("loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=1, sync_dist=False)
                values["loss"] = loss
            self.last_metrics[mode] = dict(values)
        else:
            self.log_dict({f"{mode}/{k}": v for k, v in values.items()}, on_step=False, on_epoch=True, batch_size=1,
                          sync_dist=False, prog_bar=False)
        return values

    # ------------------------------------------------------------------------------- token-mean losses
    def _normalise_over_step(self) -> bool:
        return self.average_tokens_across_steps and strategy_kind(self._trainer) != "deepspeed"

    def step_token_mean(self, loss_sum: Tensor, num_tokens: Tensor) -> Tensor:
        """The loss to backpropagate for a micro-batch whose loss is ``loss_sum`` over ``num_tokens`` tokens.

        With ``average_tokens_across_steps``, the optimizer step's gradient becomes that of
        ``sum(loss_sum) / sum(num_tokens)`` over all its micro-batches and ranks. That count is only known once the
        step's last micro-batch has run, so micro-batches backpropagate their sums and the gradient is divided in
        ``on_before_optimizer_step`` (before clipping). Under DeepSpeed, whose engine owns the gradients, each
        micro-batch is normalised by its own count instead.
        """
        if self._normalise_over_step():
            self._step_loss_tokens = self._step_loss_tokens + num_tokens.detach().float()
            return loss_sum
        return loss_sum / num_tokens.clamp(min=1)

    def _rescale_to_step_mean(self) -> None:
        if not isinstance(self._step_loss_tokens, Tensor):
            return  # no token-mean loss this step
        # Lightning divided each micro-batch loss by accumulate_grad_batches and DDP/FSDP averaged over ranks.
        tokens = self._reduce_sum(self._step_loss_tokens.to(self.device))
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens.clamp(min=1).item()
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        self._step_loss_tokens = 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._rescale_to_step_mean()
        if self.logs_this_step():
            self.flush_metrics("train")

    def logs_this_step(self) -> bool:
        """Whether the optimizer step about to be taken is one the trainer logs at (every ``log_every_n_steps``-th,
        and the run's last): training metrics are means over the steps since the last logging step (TRL's
        ``logging_steps`` averaging), reduced across processes once per logging step."""
        if self._trainer is None:
            return True
        trainer = self.trainer
        step = trainer.global_step + 1
        if step % max(1, trainer.log_every_n_steps or 1) == 0 or trainer.should_stop:
            return True
        if trainer.max_steps is not None and 0 < trainer.max_steps <= step:
            return True
        loop = trainer.fit_loop
        last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
        return last_epoch and loop.epoch_loop.batch_progress.is_last_batch

    def on_validation_epoch_end(self) -> None:
        self.flush_metrics("val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """What :meth:`validation_step` does, on the test data; metrics are logged under ``test/``."""
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.flush_metrics("test")

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, Any]]:
        """Completions of a batch of prompts with :meth:`generate` and the module's ``generation_kwargs``: one
        ``{"index", "prompt", "completion"}`` per prompt (``lightning_llm.callbacks.JsonlPredictionWriter`` writes
        them out)."""
        if not isinstance(batch, PromptBatch):
            raise ValueError(f"predict needs prompt batches (a data module's predict_data), got {type(batch).__name__}")
        settings = {"batch_size": max(1, len(batch.prompts)), **self.generation_kwargs}
        completions = self.generate(batch.prompts, **settings)
        return [{"index": index, "prompt": prompt, "completion": completion}
                for index, prompt, completion in zip(batch.indices, batch.prompts, completions)]

    def setup(self, stage: str) -> None:
        pass_typed_batches(self.trainer.precision_plugin)

    def on_train_start(self) -> None:
        # from_pretrained returns eval mode and Lightning keeps each submodule's mode: train with dropout as TRL does
        self.model.train()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_llm"] = {"num_tokens_seen": self.num_tokens_seen, "rng": self._rng_states(),
                                       "train_metrics": self.gather_objects(self._metrics["train"].state_dict())}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("lightning_llm", {})
        self.num_tokens_seen = saved.get("num_tokens_seen", 0.0)
        self._pending_rng = saved.get("rng")
        buffers = saved.get("train_metrics")
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if buffers and len(buffers) == world_size:
            self._metrics["train"].load_state_dict(buffers[self.trainer.global_rank if self._trainer is not None
                                                           else 0])
        if finish_epoch_of_last_batch_checkpoint(checkpoint):
            log.info("The checkpoint was written after the last batch of an epoch: resuming with the next epoch.")

    # ------------------------------------------------------------------------------------------------ resuming
    def gather_objects(self, value: Any) -> list[Any]:
        """``value`` of every process, in rank order (every process calls; picklable values)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.trainer.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def _rng_states(self) -> dict[str, Any]:
        """Every process's torch RNG states (CPU, and CUDA when used), gathered so that rank 0's checkpoint holds
        them all: dropout and sampling continue as in the uninterrupted run."""
        states: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state()
        if self._trainer is None or self.trainer.world_size == 1:
            return {"world_size": 1, "states": [states]}
        strategy = self.trainer.strategy
        gathered = {key: strategy.all_gather(value.to(strategy.root_device)).cpu() for key, value in states.items()}
        per_rank = [{key: value[r].clone() for key, value in gathered.items()} for r in range(self.trainer.world_size)]
        return {"world_size": self.trainer.world_size, "states": per_rank}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored at the first step after resuming, not when the checkpoint loads: building the data loaders in
        # between draws from the generator, which the uninterrupted run did at the start of the epoch.
        pending, self._pending_rng = getattr(self, "_pending_rng", None), None
        if pending is None:
            return
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if pending.get("world_size") != (self.trainer.world_size if self._trainer is not None else 1):
            log.warning("The checkpoint's random states are of %s processes, this run has %s: not restored",
                        pending.get("world_size"), self.trainer.world_size)
            return
        states = pending["states"][rank]
        torch.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])

    # ----------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        groups = decay_parameter_groups(self, self.weight_decay)
        if not any(group["params"] for group in groups):
            raise ValueError("The module has no trainable parameters")
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(groups)
        else:
            params = [param for group in groups for param in group["params"]]
            optimizer = torch.optim.AdamW(groups, lr=self.learning_rate, weight_decay=self.weight_decay,
                                          fused=self._fused_adamw_applies(params))
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = self.total_optimizer_steps()
            warmup = self.warmup_steps or math.ceil(self.warmup_ratio * total)
            if self.lr_scheduler_type is None:
                scheduler = cosine_with_warmup(optimizer, total, warmup)
            else:
                from transformers import get_scheduler

                scheduler = get_scheduler(self.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                          num_training_steps=total,
                                          scheduler_specific_kwargs=self.lr_scheduler_kwargs or None)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_adamw_applies(self, params: list[Tensor]) -> bool:
        """Whether the default AdamW runs fused (one kernel over all parameters, what the HF Trainer behind TRL uses
        by default, CPU included): plain float tensors on one CPU or CUDA device; not for DTensors (FSDP2) or
        DeepSpeed, which bring their own parameter handling, nor under ``16-mixed``/``bf16-mixed`` with
        ``gradient_clip_val`` (Lightning cannot clip a fused optimizer's gradients there)."""
        if strategy_kind(self._trainer) == "deepspeed":
            return False
        if self._trainer is not None and self.trainer.gradient_clip_val:
            from lightning.pytorch.plugins.precision import MixedPrecision

            if isinstance(self.trainer.precision_plugin, MixedPrecision):
                # Lightning's AMP plugin refuses to clip the gradients of an optimizer that unscales them itself
                # (fused), even under bf16-mixed where nothing is scaled
                return False
        if any(is_dtensor(p) or hasattr(p, "ds_id") for p in params):
            return False
        devices = {p.device.type for p in params}
        return devices <= {"cpu", "cuda"} and len(devices) == 1 and all(
            p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, for the learning-rate schedule.

        ``max_steps`` when it bounds the run; else counted from the data module's training loader the way Lightning
        counts them (batches per epoch, ``limit_train_batches``, an optimizer step per ``accumulate_grad_batches``
        batches and at each epoch's end, times ``max_epochs``). ``trainer.estimated_stepping_batches`` would build
        Lightning's own loader before a checkpoint is restored, and that loader would then start the resumed epoch
        from its first batch (Lightning issue #20550).
        """
        if self._trainer is None:
            return 1
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.max_steps != -1 or trainer.max_epochs in (None, -1) or datamodule is None:
            total = trainer.estimated_stepping_batches
        else:
            from lightning.fabric.utilities.data import sized_len

            batches = sized_len(datamodule.train_dataloader())
            if batches is None:
                total = float("inf")
            else:
                limit = trainer.limit_train_batches
                if isinstance(limit, int):
                    batches = min(batches, limit)
                elif limit is not None:
                    batches = int(batches * limit)
                total = math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs
        if total == float("inf"):
            raise ValueError("The training data has no length (a stream), so the learning-rate schedule has no end: "
                             "set Trainer(max_steps=...)")
        return int(total)

    # ---------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str | Sequence[dict]],
        *,
        model: nn.Module | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 16,
    ) -> list[str]:
        """Complete ``prompts`` (strings, or conversations rendered with the chat template and a generation prompt).

        Returns the decoded completions only, special tokens removed. Uses HF ``generate`` with its KV cache.
        """
        model = model if model is not None else self.ensure_model()
        tok = self.tokenizer
        texts = [p if isinstance(p, str) else conversation_text(tok, p, add_generation_prompt=True) for p in prompts]
        was_training = model.training
        model.eval()
        # Sharded weights are gathered layer by layer in every forward, so every rank must keep stepping until all
        # ranks are done (ranks finish at different lengths).
        synced_gpus = (self._trainer is not None and self.trainer.world_size > 1
                       and strategy_kind(self._trainer) in SHARDING_KINDS)
        outputs: list[str] = []
        root = fsdp1_root(self.trainer) if strategy_kind(self._trainer) == "fsdp1" else None
        try:
            device = next(model.parameters()).device
            for start in range(0, len(texts), batch_size):
                chunk = texts[start: start + batch_size]
                enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(device)
                with fsdp1_generation_context(root):  # FSDP1: the root unit's parameters (embeddings, head)
                    generated = model.generate(
                        **enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, synced_gpus=synced_gpus,
                    )
                new_tokens = generated[:, enc["input_ids"].shape[1]:]
                outputs += tok.batch_decode(new_tokens, skip_special_tokens=True)
        finally:
            model.train(was_training)
        return outputs

    # ------------------------------------------------------------------------------------------------- export
    def on_fit_end(self) -> None:
        if self.export_dir:
            directory = Path(self.export_dir)
            if not directory.is_absolute() and self._trainer is not None:
                directory = Path(self.trainer.default_root_dir) / directory
            self.export_hf(directory)

    def export_hf(self, directory: str | os.PathLike, merge_adapters: bool | None = None) -> Path:
        """Write the policy and tokenizer with ``save_pretrained`` (rank 0; gathered first under sharding).

        With PEFT, ``merge_adapters`` (default: the module's setting) writes a plain model with the adapters merged;
        otherwise the adapters alone.
        """
        merge = self.merge_adapters if merge_adapters is None else merge_adapters
        directory = Path(directory)
        model = self.ensure_model()
        distributed = self.gathers_for_export
        if distributed:
            # Every strategy's shards (FSDP1, FSDP2, ZeRO-3) gathered into one CPU replica on rank 0.
            state = full_state_dict(model, root=fsdp1_root(self.trainer), keep=self.trainer.is_global_zero)
            if self.trainer.is_global_zero:
                model = build_replica(model, state)
        self._write_hf(directory, merge, model, copy_before_merging=not distributed)
        if distributed:
            self.trainer.strategy.barrier("export_hf")
        return directory

    @property
    def gathers_for_export(self) -> bool:
        """Whether an export must gather the weights across processes first (rank 0 writes, every rank waits): more
        than one process, or a sharding strategy (FSDP1, FSDP2, ZeRO-3)."""
        return self._trainer is not None and (self.trainer.world_size > 1
                                              or strategy_kind(self._trainer) in SHARDING_KINDS)

    @rank_zero_only
    def _write_hf(self, directory: Path, merge: bool, model: nn.Module, copy_before_merging: bool) -> None:
        from transformers.utils import logging as hf_logging

        # transformers' "Writing model shards" bar would cut into a live progress display
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self._save_pretrained(directory, merge, model, copy_before_merging)
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    def _save_pretrained(self, directory: Path, merge: bool, model: nn.Module, copy_before_merging: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if is_peft_model(model) and merge:
            import copy

            # the live policy keeps its adapters (merging in place and back out is not exact); a replica can merge
            (copy.deepcopy(model) if copy_before_merging else model).merge_and_unload().save_pretrained(directory)
        elif is_peft_model(model):
            self._save_adapters(model, directory)
        else:
            unwrap_model(model).save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        log.info("Exported %s to %s", model_name(self.model_source), directory)

    def _save_adapters(self, model: nn.Module, directory: Path) -> None:
        """The adapters alone, their ``base_model_name_or_path`` naming a base that loads offline: the hub id or the
        directory the policy came from, else (a preset, a model object) the base model written to ``directory/base``.
        """
        import copy

        source = self.model_source
        base: str | None = None
        if isinstance(source, (str, os.PathLike)) and not is_preset(str(source)):
            base = str(Path(source).resolve()) if Path(source).is_dir() else str(source)
        else:
            named = getattr(unwrap_model(model).config, "_name_or_path", "") or ""
            if named and (Path(named).is_dir() or (not is_preset(named) and named.count("/") == 1)):
                base = str(Path(named).resolve()) if Path(named).is_dir() else named
        if base is None:
            base_dir = directory / "base"
            copy.deepcopy(model).unload().save_pretrained(base_dir)
            self.tokenizer.save_pretrained(base_dir)
            base = str(base_dir.resolve())
        configs = model.peft_config
        saved = {name: config.base_model_name_or_path for name, config in configs.items()}
        try:
            for config in configs.values():
                config.base_model_name_or_path = base
            model.save_pretrained(directory)
        finally:
            for name, value in saved.items():
                configs[name].base_model_name_or_path = value

