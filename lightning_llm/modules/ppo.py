"""``PPOModule``: Proximal Policy Optimization with a learned value function (TRL 1.12's
``trl.experimental.ppo.PPOTrainer``, the last TRL that shipped it)."""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from lightning_llm.data.batches import IGNORE_INDEX, PromptBatch, RolloutBatch
from lightning_llm.data.chat import sequence_ids
from lightning_llm.losses.ppo import (
    CLIPRANGE,
    CLIPRANGE_VALUE,
    GAMMA,
    KL_COEF,
    KL_ESTIMATOR,
    LAM,
    VF_COEF,
    check_ppo_arguments,
    gae_advantages,
    ppo_loss,
    ppo_response_mask,
    ppo_rewards,
    truncate_response,
)
from lightning_llm.models.loading import load_tokenizer
from lightning_llm.models.parts import unwrap_model
from lightning_llm.models.peft import disabled_adapters, is_peft_model
from lightning_llm.models.sharding import run_in_forward, strategy_kind
from lightning_llm.models.value import (
    ValueHead,
    check_same_vocabulary,
    check_source,
    load_score_model,
    token_scores,
)
from lightning_llm.modules.base import ModelArg, TokenizerArg
from lightning_llm.modules.online import OnlineModule, pad_rows
from lightning_llm.ops import linear_logprobs
from lightning_llm.rewards import RewardError, RewardSource

__all__ = ["PPOModule", "PPORollout"]

log = logging.getLogger(__name__)

#: where the frozen reward model sits in the module (its weights are left out of checkpoints, like the reference's)
REWARD_PREFIX = "reward_model."


class _TokenRewardModel(RewardSource):
    """The name under which :class:`PPOModule`'s reward model appears among the reward sources; PPO scores it on the
    policy's token ids itself, never through the text path."""

    kind = "reward model"
    wrap_errors = False

    def __init__(self, name: str) -> None:
        self.name = name

    def score(self, batch: Any) -> list[float]:
        raise RewardError(f"{self.describe()} reads the policy's token ids; PPOModule scores it itself")


@dataclass
class PPORollout:
    """One rollout of this process, every tensor over the whole response width ``C`` (as TRL keeps it).

    ``query_responses`` ``[B, P + C]`` is the left-padded prompt then the stop-token-truncated, right-padded response;
    ``responses`` ``[B, C]`` the response before truncation; ``mask`` the PPO response mask
    (:func:`~lightning_llm.losses.ppo.ppo_response_mask`); ``logprobs``, ``ref_logprobs``, ``values``, ``advantages``,
    ``returns`` ``[B, C]``; ``scores`` ``[B]`` (after the missing-EOS penalty); ``metrics`` TRL's ``objective/*``.
    """

    query_responses: Tensor
    context_length: int
    responses: Tensor
    mask: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    scores: Tensor
    advantages: Tensor
    returns: Tensor
    metrics: dict[str, Tensor]

    @property
    def size(self) -> int:
        return self.query_responses.shape[0]


class PPOModule(OnlineModule):
    """PPO for language models (Schulman et al., 2017, arXiv:1707.06347; as in Ziegler et al., 2019 and Huang et al.,
    2024, arXiv:2403.17031) on a :class:`~lightning_llm.PromptDataModule`, following TRL 1.12's ``PPOTrainer``.

    Each training batch is one *rollout*: the data module's ``batch_size`` prompts (TRL's ``local_batch_size``,
    ``per_device_train_batch_size · gradient_accumulation_steps``) are completed once each by the policy. Per
    completion: the response is cut after ``stop_token`` (or ``stop_token_id``); the log-probs of the sampled tokens
    under the policy and the frozen reference (temperature-scaled), the values, and the score of the reward model read
    at the last non-pad token of the policy's own token ids (or, our extension of TRL 1.12, the reward functions of the
    online base on the decoded completion) are computed; completions without EOS lose ``missing_eos_penalty``. The
    per-token reward is ``-kl_coef · KL`` (``kl_estimator`` k1 or k3) plus the score after the last response token,
    optionally whitened; GAE (``gamma``, ``lam``) gives advantages, whitened over the rollout, and the value targets
    (:mod:`lightning_llm.losses.ppo`). The whitening is over the rollouts of every process (TRL whitens each process's
    own, so there its update depends on the number of processes; with one process the two agree): with micro-batches
    that hold the same number of response tokens on every process, as TRL's per-micro-batch token means need, several
    processes make the update one process makes on the global batch. Then ``num_ppo_epochs`` times: the rollout is
    shuffled and cut into ``num_mini_batches`` mini-batches, each of ``gradient_accumulation_steps`` micro-batches
    whose loss ``policy_loss + vf_coef · value_loss`` (clipped with ``cliprange`` and ``cliprange_value``) is
    backpropagated, then the gradient is clipped to ``max_grad_norm`` and the optimizer steps once. The policy and the
    value model (or value head) share one optimizer, so under DeepSpeed one engine. This is Lightning's manual
    optimization, so the Trainer's ``gradient_clip_val`` and ``accumulate_grad_batches`` stay unset:
    ``max_grad_norm`` and ``gradient_accumulation_steps`` are this module's.

    Steps and rollouts: ``trainer.global_step`` counts optimizer steps, ``num_ppo_epochs · num_mini_batches`` per
    rollout, so ``Trainer(max_steps=S)`` runs ``ceil(S / (num_ppo_epochs · num_mini_batches))`` rollouts (a run stops
    after the rollout that reaches ``S``; pick a multiple). TRL 1.12's ``total_episodes`` counts prompts: it runs
    ``ceil(total_episodes / (batch_size · processes))`` rollouts, i.e. ``max_steps = that · num_ppo_epochs ·
    num_mini_batches`` here. The learning-rate schedule steps once per rollout (as TRL's), over that many rollouts.

    The value model is a separate one-label ``AutoModelForSequenceClassification``, initialised from the reward model
    (TRL's recipe), from ``value_model`` when given, or, with reward functions, from the policy's checkpoint under a
    fresh head; ``value_head=True`` puts a linear value head on the policy's own backbone instead (one full model fewer
    in memory; the policy's backbone then also learns from the value loss). At the end of ``fit`` it is exported
    beside the policy: ``<export_dir>/value_model`` (``save_pretrained``, with the tokenizer), or
    ``<export_dir>/value_head.safetensors``.

    :meth:`step` runs one rollout and update on given prompts outside ``Trainer.fit``, keeping its optimizer and
    learning-rate schedule between calls.

    Logs TRL 1.12's metrics once per rollout: ``objective/kl``, ``objective/entropy``, ``objective/non_score_reward``,
    ``objective/rlhf_reward``, ``objective/scores``, ``policy/approxkl_avg``, ``policy/clipfrac_avg``,
    ``loss/policy_avg``, ``loss/value_avg``, ``val/clipfrac_avg``, ``policy/entropy_avg``, ``val/ratio``,
    ``val/ratio_var``, ``val/num_eos_tokens``; plus ``loss`` (the mean micro-batch loss), ``learning_rate`` (TRL's
    ``lr``), ``completions/*``, ``num_tokens`` and, with reward functions, ``rewards/<name>/mean|std``. Validation logs
    the ``objective/*`` ones under ``val/``.

    Differences from TRL 1.12, on purpose: generation ends at EOS (the rollout engines' rule; TRL 1.12 without a stop
    token samples all ``response_length`` tokens, which changes nothing the masks keep when the pad token is the EOS
    token, the usual TRL setup). The log-probs of generation time come from a forward of the policy (TRL: the sampler's
    logits), equal up to rounding; every forward reads the stop-token truncated response (TRL: the sampled one, which
    differs only at padding, e.g. in ``policy/entropy_avg``'s padding positions). The mini-batch order is drawn with
    ``torch.randperm`` (TRL: ``numpy``). ``val/num_eos_tokens`` is averaged over processes (TRL logs rank 0's count). A
    reward function's ``None`` counts as a score of 0. The LR schedule is the house default (cosine;
    ``lr_scheduler_type="linear"`` gives TRL's). ``max_grad_norm`` (default 1.0, TRL's configured value) is applied at
    every optimizer step; TRL 1.12's loop never clips, whatever its ``max_grad_norm``, so ``max_grad_norm=None``
    reproduces its numbers (``tests/parity/test_trl112_ppo.py``).

    Args:
        model: the policy; see :class:`~lightning_llm.modules.online.OnlineModule`.
        tokenizer: see :class:`~lightning_llm.modules.online.OnlineModule`.
        reward_model: a one-label sequence classifier: hub id, local directory (e.g. a ``RewardModule`` export), tiny
            preset or model object. Its tokenizer must be the policy's (it reads the policy's token ids).
        reward_funcs: reward functions of the online base instead of ``reward_model`` (our extension of TRL 1.12).
        value_model: the value model's source (id, directory, preset, model object); default the reward model, or the
            policy's checkpoint with reward functions.
        value_head: a linear value head on the policy's backbone instead of a separate value model.
        num_ppo_epochs: passes over each rollout (TRL default 4).
        num_mini_batches: mini-batches per pass, one optimizer step each (TRL default 1).
        gradient_accumulation_steps: micro-batches per mini-batch (TRL's name).
        max_grad_norm: the gradient norm each optimizer step clips to (1.0); ``None``: no clipping (TRL 1.12's
            behaviour).
        kl_coef: ``β`` of the per-token KL penalty (0.05).
        kl_estimator: ``k1`` (default) or ``k3``.
        whiten_rewards: whiten the per-token rewards of the rollout (scaled, not shifted).
        cliprange: ``ε`` of the policy's clipped surrogate (0.2).
        vf_coef: weight of the value loss (0.1).
        cliprange_value: ``ε_v`` of the clipped value loss (0.2).
        gamma: GAE's discount (1.0).
        lam: GAE's ``λ`` (0.95).
        missing_eos_penalty: subtracted from the score of a completion without EOS; ``None``: off.
        stop_token: ``"eos"`` to cut responses after the first EOS token; ``None``: no cut (unless
            ``stop_token_id``).
        stop_token_id: cut responses after the first occurrence of this id (not with ``stop_token``).
        local_rollout_forward_batch_size: sequences per no-grad forward of the rollout (64).
        total_episodes: prompts :meth:`step` calls will see in all (TRL's name), for the length of its learning-rate
            schedule; ``None``: a constant learning rate there. ``fit`` takes the length from the Trainer.
        max_completion_length: TRL's ``response_length`` (53).
        temperature: sampling temperature (TRL's PPO default 0.7); log-probs use it too.
        learning_rate: TRL's PPO default, 3e-6.
        disable_dropout: TRL disables dropout in all four models (default True).
        **kwargs: the :class:`~lightning_llm.modules.online.OnlineModule` arguments (rollout, rollout_kwargs, top_p,
            top_k, ref_model, generation_seed, ...) and the :class:`~lightning_llm.modules.base.LLMModule` ones.
    """

    def __init__(
        self,
        model: ModelArg,
        tokenizer: TokenizerArg = None,
        *,
        reward_model: ModelArg | None = None,
        reward_funcs: Any = None,
        value_model: ModelArg | None = None,
        value_head: bool = False,
        num_ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        kl_coef: float = KL_COEF,
        kl_estimator: str = KL_ESTIMATOR,
        whiten_rewards: bool = False,
        cliprange: float = CLIPRANGE,
        vf_coef: float = VF_COEF,
        cliprange_value: float = CLIPRANGE_VALUE,
        gamma: float = GAMMA,
        lam: float = LAM,
        missing_eos_penalty: float | None = None,
        stop_token: str | None = None,
        stop_token_id: int | None = None,
        local_rollout_forward_batch_size: int = 64,
        total_episodes: int | None = None,
        max_completion_length: int = 53,
        temperature: float = 0.7,
        learning_rate: float = 3e-6,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        if (reward_model is None) == (reward_funcs is None):
            raise ValueError("PPOModule needs either reward_model (a one-label sequence classifier that reads the "
                             "policy's token ids, as TRL 1.12) or reward_funcs (reward functions on the decoded "
                             "completions), not both and not neither")
        if value_head and value_model is not None:
            raise ValueError("value_head=True puts the value head on the policy's backbone; value_model names a "
                             "separate value model: give one or the other")
        for name, value in (("num_ppo_epochs", num_ppo_epochs), ("num_mini_batches", num_mini_batches),
                            ("gradient_accumulation_steps", gradient_accumulation_steps),
                            ("local_rollout_forward_batch_size", local_rollout_forward_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm}")
        if total_episodes is not None and total_episodes < 1:
            raise ValueError(f"total_episodes must be >= 1 or None, got {total_episodes}")
        check_ppo_arguments(kl_coef=kl_coef, kl_estimator=kl_estimator, cliprange=cliprange, vf_coef=vf_coef,
                            cliprange_value=cliprange_value, gamma=gamma, lam=lam,
                            missing_eos_penalty=missing_eos_penalty)
        if stop_token is not None and stop_token_id is not None:
            raise ValueError("give stop_token or stop_token_id, not both")
        if stop_token not in (None, "eos"):
            raise ValueError(f"stop_token must be 'eos' or None, got {stop_token!r}")
        if kwargs.get("num_generations", 1) != 1 or kwargs.get("num_generations_eval", 1) not in (1, None):
            raise ValueError("PPOModule completes each prompt once: num_generations must be 1")
        kwargs.pop("num_generations", None)
        kwargs.pop("num_generations_eval", None)
        if kwargs.get("num_iterations", 1) != 1 or kwargs.get("steps_per_generation") not in (None, 1):
            raise ValueError("PPOModule trains each rollout num_ppo_epochs times in num_mini_batches mini-batches; "
                             "num_iterations and steps_per_generation are GRPO's: leave them unset")
        sources = reward_funcs if reward_funcs is not None else [_TokenRewardModel(_source_name(reward_model))]
        # the base refuses fewer than two generations (group advantages); PPO has one per prompt, set right below
        super().__init__(model, tokenizer, reward_funcs=sources, num_generations=2, num_generations_eval=1,
                         max_completion_length=max_completion_length, temperature=temperature,
                         learning_rate=learning_rate, disable_dropout=disable_dropout, **kwargs)
        self.num_generations = 1
        self.num_generations_eval = 1
        for name in ("num_generations", "num_generations_eval"):  # the base's, not PPO's: load_from_checkpoint
            self.hparams.pop(name, None)
        self.automatic_optimization = False
        object.__setattr__(self, "reward_model_source", reward_model)
        object.__setattr__(self, "value_model_source", value_model)
        self.uses_value_head = value_head
        self.num_ppo_epochs = num_ppo_epochs
        self.num_mini_batches = num_mini_batches
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.kl_coef = float(kl_coef)
        self.kl_estimator = kl_estimator
        self.whiten_rewards = whiten_rewards
        self.cliprange = float(cliprange)
        self.vf_coef = float(vf_coef)
        self.cliprange_value = float(cliprange_value)
        self.gamma = float(gamma)
        self.lam = float(lam)
        self.missing_eos_penalty = None if missing_eos_penalty is None else float(missing_eos_penalty)
        self.stop_token_id = self.tokenizer.eos_token_id if stop_token == "eos" else stop_token_id
        self.local_rollout_forward_batch_size = local_rollout_forward_batch_size
        self.total_episodes = total_episodes
        self.reward_model: nn.Module | None = None
        self.value_model: nn.Module | None = None
        self.v_head: ValueHead | None = None
        self._ratio_means: list[Tensor] = []
        self._step_optimizer: torch.optim.Optimizer | None = None
        self._step_scheduler: Any = None
        self._step_autocast: torch.dtype | None = None  # set during a by-hand step() under autocast
        self._continuing_run = False  # a step() running as one more training step of a Lightning trainer's run
        self._step_prompts = 0  # prompts per step() call, for the step schedule's length
        self._step_rollouts = 1
        self.rollout_generation: int | None = None
        self._check_score_models()

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """``num_ppo_epochs · num_mini_batches``: how far ``global_step`` moves per rollout."""
        return self.num_ppo_epochs * self.num_mini_batches

    @property
    def uses_reference(self) -> bool:
        return True  # the KL penalty and objective/kl read it whatever kl_coef is

    # ------------------------------------------------------------------------------------------------ set-up
    def _check_score_models(self) -> None:
        """Named errors before anything is loaded: a head that is not one label, a tokenizer that is not the
        policy's."""
        if self.reward_model_source is not None:
            check_source(self.reward_model_source, "reward_model", must_be_classifier=True)
            self._check_tokenizer(self.reward_model_source, "reward_model")
        value_source = self._value_source()
        if not self.uses_value_head and value_source is not None:
            check_source(value_source, "value_model", must_be_classifier=False)
            self._check_tokenizer(value_source, "value_model")

    def _value_source(self) -> Any:
        if self.value_model_source is not None:
            return self.value_model_source
        return self.reward_model_source if self.reward_model_source is not None else self.model_source

    def _check_tokenizer(self, source: Any, what: str) -> None:
        if source is self.model_source or isinstance(source, dict):
            return
        try:
            tokenizer = load_tokenizer(None, source)
        except (ValueError, OSError) as error:
            log.warning("Cannot load the tokenizer of %s (%s): its vocabulary is not checked against the policy's",
                        what, error)
            return
        check_same_vocabulary(self.tokenizer, tokenizer, what)

    def configure_model(self) -> None:
        super().configure_model()
        if self.reward_model is None and self.reward_model_source is not None:
            reward = load_score_model(self.reward_model_source, load_kwargs=self.model_load_kwargs)
            reward.requires_grad_(False)
            self.reward_model = self._prepare_score_model(reward).eval()
        if self.uses_value_head:
            if self.v_head is None:
                config = unwrap_model(self.model).config
                hidden = config.get_text_config().hidden_size if hasattr(config, "get_text_config") else \
                    config.hidden_size
                self.v_head = ValueHead(hidden).to(next(self.model.parameters()).device)
        elif self.value_model is None:
            self.value_model = self._prepare_score_model(
                load_score_model(self._value_source(), load_kwargs=self.model_load_kwargs))
        self.shard(self.reward_model)
        self.shard(self.value_model)

    def _prepare_score_model(self, model: nn.Module) -> nn.Module:
        from lightning_llm.models.value import check_one_label
        from lightning_llm.utils.model import disable_dropout_in_model

        check_one_label(model, type(model).__name__)
        model.config.pad_token_id = self.pad_token_id
        if self.disable_dropout:
            disable_dropout_in_model(model)
        return model

    def train(self, mode: bool = True) -> PPOModule:
        super().train(mode)
        if self.reward_model is not None:
            self.reward_model.eval()
        return self

    def setup(self, stage: str) -> None:
        if stage == "fit" and strategy_kind(self.trainer) == "fsdp1":
            raise ValueError("PPOModule runs several forward and backward passes inside one training step (manual "
                             "optimization), which FSDP1 (FSDPStrategy) does not support: its root unit reshards "
                             "after the first backward. Use ModelParallelStrategy (FSDP2), DeepSpeed or DDP")
        super().setup(stage)
        if stage == "fit" and self.trainer.accumulate_grad_batches != 1:
            raise ValueError("PPOModule accumulates gradients itself: set gradient_accumulation_steps on the module "
                             "and leave Trainer(accumulate_grad_batches) at 1")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        max_steps = self.trainer.max_steps
        per_rollout = self.optimizer_steps_per_rollout
        if max_steps not in (None, -1) and max_steps % per_rollout:
            rank_zero_warn(f"max_steps={max_steps} is not a multiple of the {per_rollout} optimizer steps of a rollout "
                           "(num_ppo_epochs x num_mini_batches): the run stops after the rollout that passes it, at "
                           f"step {per_rollout * math.ceil(max_steps / per_rollout)}")

    @property
    def _fitting(self) -> bool:
        """Whether a ``Trainer.fit`` drives the module now (else :meth:`step` does)."""
        trainer = self._trainer
        return trainer is not None and trainer.state.fn == "fit" and trainer.state.status == "running"

    def total_optimizer_steps(self) -> int:
        """Rollouts of the run: the learning-rate schedule steps once per rollout (TRL 1.12)."""
        if not self._fitting or self._continuing_run:
            return self._step_rollouts  # step(): total_episodes over the prompts of a call
        if self.trainer.max_steps not in (None, -1):
            return math.ceil(self.trainer.max_steps / self.optimizer_steps_per_rollout)
        return super().total_optimizer_steps()  # loader batches = rollouts (accumulate_grad_batches is 1)

    # ------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(REWARD_PREFIX)]:
            del state[key]  # frozen, rebuilt from its source

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        if self.reward_model is not None and not any(k.startswith(REWARD_PREFIX) for k in state):
            for key, value in self.reward_model.state_dict().items():
                state[REWARD_PREFIX + key] = value

    # ------------------------------------------------------------------------------------------- forwards
    def _forward_inputs(self, query_responses: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """TRL's ``forward`` inputs: attention on the non-pad tokens, positions counted over them, pads as id 0."""
        attention_mask = query_responses != self.pad_token_id
        position_ids = attention_mask.cumsum(1) - attention_mask.long()
        return query_responses.masked_fill(~attention_mask, 0), attention_mask, position_ids

    def policy_outputs(self, model: nn.Module, query_responses: Tensor, context_length: int, *,
                       return_entropy: bool = False, return_values: bool = False
                       ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``[B, C]`` temperature-scaled log-probs of every response position under ``model`` (padding included,
        as TRL computes them; the losses mask), their entropies when asked, and with the value-head option the values
        from the same forward."""
        input_ids, attention_mask, position_ids = self._forward_inputs(query_responses)
        labels = query_responses.clone()
        labels[:, :context_length] = IGNORE_INDEX
        start = context_length - 1
        if not (return_values and self.uses_value_head):
            out = self.token_logprobs(model, input_ids, labels, attention_mask=attention_mask,
                                      position_ids=position_ids, temperature=self.temperature,
                                      return_entropy=return_entropy)
            entropy = out.entropy[:, start:] if return_entropy else None
            return out.logps[:, start:], entropy, None

        def score(model: nn.Module) -> tuple[Any, Tensor]:
            hidden, targets, weight, options = self._head_inputs(model, input_ids, labels, attention_mask,
                                                                 position_ids)
            out = linear_logprobs(hidden, weight, targets, temperature=self.temperature,
                                  return_entropy=return_entropy, **options)
            return out, self.v_head(hidden[:, start:])

        out, values = run_in_forward(model, score)
        entropy = out.entropy[:, start:] if return_entropy else None
        return out.logps[:, start:], entropy, values.float()

    def value_outputs(self, query_responses: Tensor, context_length: int) -> Tensor:
        """``[B, C]`` values of the separate value model: position ``t`` reads the hidden state before response token
        ``t``."""
        input_ids, attention_mask, position_ids = self._forward_inputs(query_responses)
        values = run_in_forward(self.value_model, token_scores, input_ids, attention_mask, position_ids)
        return values[:, context_length - 1: -1]

    def reward_model_scores(self, query_responses: Tensor, context_length: int, mask: Tensor) -> Tensor:
        """``[B]`` the reward model read at the last non-pad token of each (truncated) prompt + response."""
        input_ids, attention_mask, position_ids = self._forward_inputs(query_responses)
        scores = run_in_forward(self.reward_model, token_scores, input_ids, attention_mask, position_ids)
        last = context_length + mask.sum(dim=1) - 1  # an empty response reads the last prompt token
        return scores[torch.arange(scores.shape[0], device=scores.device), last]

    def reference_outputs(self, query_responses: Tensor, context_length: int) -> Tensor:
        if self.ref_model is not None:
            return self.policy_outputs(self.ref_model, query_responses, context_length)[0]
        if not is_peft_model(self.model):
            raise ValueError("PPOModule has no reference model")
        with disabled_adapters(self.model):
            return self.policy_outputs(self.model, query_responses, context_length)[0]

    # ------------------------------------------------------------------------------------------------ rollout
    @torch.no_grad()
    def rollout(self, batch: PromptBatch) -> PPORollout:
        """Complete, score and evaluate every prompt of ``batch``: TRL 1.12's rollout phase for this process."""
        if not isinstance(batch, PromptBatch) or batch.prompt_ids is None:
            raise ValueError(f"PPOModule trains on prompt batches of a PromptDataModule, got {type(batch).__name__}")
        self._resolve_rewards()
        device = self.device
        completions = self.sample_completions(batch).completion_ids
        queries, _ = pad_rows(batch.prompt_ids, self.pad_token_id, left=True, device=device)
        responses, _ = pad_rows(completions, self.pad_token_id, left=False, device=device)
        stops = set(self.eos_token_ids()) | {self.pad_token_id}
        truncated = torch.tensor([bool(ids) and ids[-1] not in stops for ids in completions], device=device)
        self.record_generation_metrics(batch.prompt_ids, completions, truncated)

        kept = responses
        if self.stop_token_id is not None:
            kept = truncate_response(responses, self.stop_token_id, self.pad_token_id)
        mask = ppo_response_mask(kept, self.pad_token_id)
        context_length = queries.shape[1]
        query_responses = torch.cat([queries, kept], dim=1)

        logprobs, ref_logprobs, values, model_scores = [], [], [], []
        for start in range(0, len(completions), self.local_rollout_forward_batch_size):
            rows = slice(start, start + self.local_rollout_forward_batch_size)
            chunk = query_responses[rows]
            logps, _, chunk_values = self.policy_outputs(self.model, chunk, context_length, return_values=True)
            logprobs.append(logps)
            ref_logprobs.append(self.reference_outputs(chunk, context_length))
            values.append(chunk_values if chunk_values is not None else self.value_outputs(chunk, context_length))
            if self.reward_model is not None:
                model_scores.append(self.reward_model_scores(chunk, context_length, mask[rows]))
        logprobs, ref_logprobs, values = torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)
        if self.reward_model is not None:
            scores = torch.cat(model_scores).float()
        else:
            scores = self._function_scores(batch, kept, mask)

        contains_eos = (kept == self.tokenizer.eos_token_id).any(dim=1)
        rewards = ppo_rewards(logprobs, ref_logprobs, scores, mask, kl_coef=self.kl_coef,
                              kl_estimator=self.kl_estimator, missing_eos_penalty=self.missing_eos_penalty,
                              contains_eos=contains_eos, whiten_rewards=self.whiten_rewards,
                              sum_across=self._sum_over_processes)
        gae = gae_advantages(rewards.rewards, values, mask, gamma=self.gamma, lam=self.lam,
                             sum_across=self._sum_over_processes)
        metrics = rewards.metrics()
        metrics["val/num_eos_tokens"] = (responses == self.tokenizer.eos_token_id).sum().float()
        self._remember(batch, kept, mask, rewards.scores)
        if self.training:
            # what LogCompletionsCallback keys on to log each rollout once (PPO keeps no generation buffer)
            self.rollout_generation = batch.generation
        return PPORollout(query_responses=query_responses, context_length=context_length, responses=responses,
                          mask=mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=gae.values,
                          scores=rewards.scores, advantages=gae.advantages, returns=gae.returns, metrics=metrics)

    def _function_scores(self, batch: PromptBatch, kept: Tensor, mask: Tensor) -> Tensor:
        """``[B]`` weighted reward-function scores of the decoded (truncated) completions; ``None`` counts as 0."""
        ids = [row[: int(n)].tolist() for row, n in zip(kept, mask.sum(dim=1))]
        rewards = self.score_completions(batch, self.decode_completions(batch.prompts, ids), ids)  # [B, F]
        gathered = self._gather_rows(rewards)
        for column, name in enumerate(self.reward_names):
            self._record_value(f"rewards/{name}/mean", torch.nanmean(gathered[:, column]))
            if gathered.shape[0] > 1:
                self._record_value(f"rewards/{name}/std", _nanstd(gathered[:, column]))
        return torch.nan_to_num(self.weighted_rewards(rewards), nan=0.0).float()

    def _remember(self, batch: PromptBatch, kept: Tensor, mask: Tensor, scores: Tensor) -> None:
        ids = [row[: int(n)].tolist() for row, n in zip(kept, mask.sum(dim=1))]
        texts = self.decode_completions(batch.prompts, ids)
        name = self.reward_names[0] if len(self.reward_names) == 1 else "score"
        self.last_rollouts = [{"prompt": prompt, "completion": text, f"rewards/{name}": float(score)}
                              for prompt, text, score in zip(batch.prompts, texts, scores)]

    # ------------------------------------------------------------------------------------------------ update
    def micro_batch_loss(self, rollout: PPORollout, rows: Tensor) -> Tensor:
        """The loss of the micro-batch ``rows`` of ``rollout`` (``policy_loss + vf_coef · value_loss``); records
        TRL's per-micro-batch statistics."""
        query_responses = rollout.query_responses[rows]
        logps, entropy, values = self.policy_outputs(self.model, query_responses, rollout.context_length,
                                                     return_entropy=True, return_values=True)
        if values is None:
            values = self.value_outputs(query_responses, rollout.context_length)
        out = ppo_loss(logps, rollout.logprobs[rows], rollout.advantages[rows], values, rollout.values[rows],
                       rollout.returns[rows], rollout.mask[rows], cliprange=self.cliprange,
                       cliprange_value=self.cliprange_value, vf_coef=self.vf_coef)
        self.record("loss", out.loss.detach())
        self.record("policy/approxkl_avg", out.approxkl)
        self.record("policy/clipfrac_avg", out.policy_clipfrac)
        self.record("loss/policy_avg", out.policy_loss)
        self.record("loss/value_avg", out.value_loss)
        self.record("val/clipfrac_avg", out.value_clipfrac)
        self.record("policy/entropy_avg", entropy.detach().float().mean())
        self.record("val/ratio", out.ratio_mean)
        self._ratio_means.append(out.ratio_mean.detach().float())
        return out.loss

    def update(self, rollout: PPORollout) -> None:
        """``num_ppo_epochs`` shuffled passes over ``rollout`` in ``num_mini_batches`` mini-batches, one optimizer step
        each."""
        size = rollout.size
        parts = self.num_mini_batches * self.gradient_accumulation_steps
        if size % parts:
            raise ValueError(f"a rollout of {size} prompts (the data module's batch_size) cannot be split into "
                             f"num_mini_batches={self.num_mini_batches} x gradient_accumulation_steps="
                             f"{self.gradient_accumulation_steps} equal micro-batches")
        mini, micro = size // self.num_mini_batches, size // parts
        optimizer = self._optimizer()
        for _ in range(self.num_ppo_epochs):
            order = torch.randperm(size).to(self.device)
            for start in range(0, size, mini):
                mini_rows = order[start: start + mini]
                for offset in range(0, mini, micro):
                    with self._forward_context():
                        loss = self.micro_batch_loss(rollout, mini_rows[offset: offset + micro])
                    self._backward(loss / self.gradient_accumulation_steps)
                self._clip_and_step(optimizer)

    def _forward_context(self) -> AbstractContextManager[Any]:
        """Autocast for the forwards of a by-hand :meth:`step` given an ``autocast_dtype``; nothing otherwise (in
        ``fit`` the precision plugin wraps the training step)."""
        if self._step_autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._step_autocast)

    def _optimizer(self) -> Any:
        if self._fitting:
            return self.optimizers()
        return self._step_optimizer

    def _backward(self, loss: Tensor) -> None:
        if self._fitting:
            self.manual_backward(loss)
        else:
            loss.backward()

    def _clip_and_step(self, optimizer: Any) -> None:
        if self._fitting:
            if self.max_grad_norm is not None:
                self._clip_in_fit(optimizer)
        elif self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()

    def _clip_in_fit(self, optimizer: Any) -> None:
        from lightning.pytorch.plugins.precision import MixedPrecision

        precision = self.trainer.precision_plugin
        if isinstance(precision, MixedPrecision) and precision.scaler is None:
            # bf16 autocast scales nothing, but Lightning's AMP plugin refuses to clip for a fused optimizer (the
            # default AdamW) all the same: the gradients are plain, clip them directly
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.max_grad_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass  # metrics are flushed once per rollout, not per optimizer step

    def record_rollout_metrics(self, rollout: PPORollout) -> None:
        """TRL's rollout metrics: each process's value, averaged over processes; and ``val/ratio_var`` over every
        micro-batch of every process."""
        for name, value in rollout.metrics.items():
            self.record(name, value.detach().float())
        if self._ratio_means:
            ratios = self._gather_rows(torch.stack(self._ratio_means))
            if ratios.numel() > 1:
                self._record_value("val/ratio_var", ratios.var())
            self._ratio_means = []

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        if self._continuing_run:  # each step() call's batch is generation 0 of its own data module
            batch = dataclasses.replace(batch, generation=self._next_generation())
        rollout = self.rollout(batch)
        self.update(rollout)
        self.record_rollout_metrics(rollout)
        self.flush_metrics("train")
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        rollout = self.rollout(batch)
        for name, value in rollout.metrics.items():
            if name.startswith("objective/"):
                self.record(name, value.float())

    def compute_advantages(self, rewards_per_func: Tensor, rollout: RolloutBatch, num_generations: int) -> Tensor:
        raise NotImplementedError("PPOModule computes per-token advantages with GAE in rollout(), not group advantages")

    def compute_loss(self, rollout: RolloutBatch) -> Tensor:
        raise NotImplementedError("PPOModule trains rollouts with update(), not through the generation buffer")

    # ---------------------------------------------------------------------------------------- by-hand driving
    def step(self, prompts: Sequence[Any], rows: Sequence[dict] | None = None, *, trainer: Any = None,
             autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
        """One rollout and PPO update on ``prompts`` (strings or conversations); returns the rollout's metrics (TRL's
        names). The optimizer and learning-rate schedule are built at the first call and kept for the next ones (the
        schedule spans ``total_episodes`` prompts, else the learning rate is constant). ``rows`` are the prompts'
        other columns, for reward functions that read them.

        With ``trainer`` (a ``lightning.Trainer``, e.g. the one of an earlier ``fit``), the call is one more training
        step of that trainer's run: ``trainer.fit`` on a one-batch data module of ``prompts`` with ``max_steps``
        raised by one rollout's optimizer steps, so ``global_step`` goes on and the trainer's callbacks, loggers,
        precision and strategy take part as in ``fit`` (nothing is exported at the end of these fits; the optimizer
        is still this method's, not the earlier ``fit``'s). Pass the same trainer to every call.

        Without it the step runs by hand, without callbacks, on the module's device; ``autocast_dtype`` (e.g.
        ``torch.bfloat16``) then runs the forwards of the rollout and of the update under autocast to that dtype (the
        backward outside it), as ``Trainer(precision="bf16-mixed")`` does in ``fit``.
        """
        if self._fitting:
            raise ValueError("PPOModule.step drives PPO by hand; inside Trainer.fit the trainer does it")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("step needs at least one prompt")
        if rows is not None and len(rows) != len(prompts):
            raise ValueError(f"step got {len(prompts)} prompts and {len(rows)} rows of other columns")
        if trainer is not None:
            if autocast_dtype is not None:
                raise ValueError("step(trainer=...) runs under the trainer's precision; autocast_dtype is for steps "
                                 "without a trainer")
            return self._step_in_run(trainer, prompts, rows)
        self.ensure_model()
        self.to(self.device)
        if self._step_optimizer is None:
            self._step_optimizer, self._step_scheduler = self._step_optimization(len(prompts))
        prompt_ids = sequence_ids(self.tokenizer, [(p, True, None) for p in prompts])
        batch = PromptBatch(prompts=prompts, indices=list(range(len(prompts))), rows=list(rows) if rows else None,
                            prompt_ids=prompt_ids, generation=self._next_generation())
        self.train()
        self._step_autocast = autocast_dtype
        try:
            with self._forward_context():
                rollout = self.rollout(batch)
            self.update(rollout)
        finally:
            self._step_autocast = None
        self.record_rollout_metrics(rollout)
        metrics = self.reduce_metrics("train")
        self.num_tokens_seen += metrics.pop("num_tokens", 0.0)
        metrics["num_tokens"] = self.num_tokens_seen
        metrics["learning_rate"] = self._step_optimizer.param_groups[0]["lr"]
        self._step_scheduler.step()
        self.last_metrics["train"] = dict(metrics)
        return metrics

    def _next_generation(self) -> int:
        """The generation number of a :meth:`step`'s rollout: the one after the last rollout trained on (its
        sampling seed and what LogCompletionsCallback keys on)."""
        return 0 if self.rollout_generation is None else self.rollout_generation + 1

    def _step_in_run(self, trainer: Any, prompts: list[Any], rows: Sequence[dict] | None) -> dict[str, float]:
        from lightning_llm.data.prompts import PromptDataModule

        columns = list(rows) if rows is not None else [{} for _ in prompts]
        data = PromptDataModule([{**row, "prompt": prompt} for prompt, row in zip(prompts, columns)],
                                tokenizer=self.tokenizer, batch_size=len(prompts), shuffle=False, val_split=0.0)
        self._step_prompts = len(prompts)
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step + self.optimizer_steps_per_rollout
        export_dir, self.export_dir = self.export_dir, None
        self._continuing_run = True
        try:
            trainer.fit(self, datamodule=data)
        finally:
            self._continuing_run = False
            self.export_dir = export_dir
        return dict(self.last_metrics["train"])

    def configure_optimizers(self) -> Any:
        """The house optimizer and schedule; in a :meth:`step` with a trainer, the step's own (built at the first
        such call, after the trainer placed the model, and kept)."""
        if not self._continuing_run:
            return super().configure_optimizers()
        if self._step_optimizer is None:
            self._step_optimizer, self._step_scheduler = self._step_optimization(self._step_prompts)
        return {"optimizer": self._step_optimizer,
                "lr_scheduler": {"scheduler": self._step_scheduler, "interval": "step"}}

    def _step_optimization(self, prompts_per_call: int) -> tuple[torch.optim.Optimizer, Any]:
        if self.total_episodes is None and self.scheduler_factory is None:
            saved, self.scheduler_factory = self.scheduler_factory, _constant_schedule
        else:
            saved = self.scheduler_factory
        self._step_rollouts = math.ceil((self.total_episodes or 1) / prompts_per_call)
        try:
            configured = super().configure_optimizers()
        finally:
            self.scheduler_factory = saved
        return configured["optimizer"], configured["lr_scheduler"]["scheduler"]

    # ------------------------------------------------------------------------------------------------- export
    def on_fit_end(self) -> None:
        super().on_fit_end()
        if self.export_dir:
            directory = Path(self.export_dir)
            if not directory.is_absolute():
                directory = Path(self.trainer.default_root_dir) / directory
            self.export_value(directory)

    def export_value(self, directory: str | Path) -> Path:
        """Write the value model beside the policy: ``directory/value_model`` (``save_pretrained`` with the
        tokenizer), or ``directory/value_head.safetensors`` for the value-head option (rank 0; gathered first under
        sharding). Returns the path written."""
        from lightning_llm.models.sharding import fsdp1_root, full_state_dict

        directory = Path(directory)
        module = self.v_head if self.uses_value_head else self.value_model
        distributed = self.gathers_for_export
        root = fsdp1_root(self.trainer) if distributed else None
        keep = not distributed or self.trainer.is_global_zero
        state = full_state_dict(module, root=root, keep=keep)
        target = directory / ("value_head.safetensors" if self.uses_value_head else "value_model")
        if keep:
            self._write_value(target, module, state)
        if distributed:
            self.trainer.strategy.barrier("export_value")
        return target

    @rank_zero_only
    def _write_value(self, target: Path, module: nn.Module, state: dict[str, Tensor]) -> None:
        from lightning_llm.models.export import build_replica

        if self.uses_value_head:
            from safetensors.torch import save_file

            target.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(target))
            return
        replica = build_replica(module, state)
        unwrap_model(replica).save_pretrained(target)
        self.tokenizer.save_pretrained(target)


def _source_name(source: Any) -> str:
    """The reward model's metric name: the last component of its id or path, or its class name."""
    if isinstance(source, nn.Module):
        from lightning_llm.rewards.sources import model_source_name

        return model_source_name(source)
    return str(source).rstrip("/").split("/")[-1] or "reward_model"


def _nanstd(values: Tensor) -> Tensor:
    from lightning_llm.losses.grpo import nanstd

    return nanstd(values)


def _constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
