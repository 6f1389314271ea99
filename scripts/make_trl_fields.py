"""Write ``lightning_llm/trainers/_trl_fields.py``: every field of TRL's ``*Config`` classes with its default.

The TRL-style configs of :mod:`lightning_llm.trainers` accept a TRL field that they do not map only at TRL's default
value (where it asks for nothing), and refuse it by name otherwise; this table is how they know the TRL fields and
defaults without importing TRL. Regenerate it with the pinned dev dependency (TRL 1.16.0, transformers 5.x)::

    python scripts/make_trl_fields.py

BCO and PRM left TRL before 1.16; their own fields are those of TRL 0.19's ``BCOConfig`` and ``PRMConfig`` (written
out below), on top of the same ``TrainingArguments``. XPO and Nash-MD left after 1.13: their configs were TRL 1.13's
``OnlineDPOConfig`` (whose fields and defaults are those of 1.16's, checked against a TRL 1.13.0 install) plus
``alpha`` and ``mixture_coef``. PPO left after 1.12: its fields are TRL 1.12.0's ``PPOConfig`` (written out below);
check them against a TRL 1.12.0 install with::

    python scripts/make_trl_fields.py --check-ppo    # in an environment with trl==1.12.0
"""

from __future__ import annotations

import dataclasses
import json
import os
import pprint
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

OUT = Path(__file__).resolve().parents[1] / "lightning_llm" / "trainers" / "_trl_fields.py"

#: TRL 0.19's own fields of the configs TRL has since removed (name -> default), and their learning rates
REMOVED = {
    "BCOConfig": {"learning_rate": 5e-7, "max_length": 1024, "max_prompt_length": 512, "max_completion_length": None,
                  "beta": 0.1, "label_pad_token_id": -100, "padding_value": None, "truncation_mode": "keep_end",
                  "disable_dropout": True, "generate_during_eval": False, "is_encoder_decoder": None,
                  "precompute_ref_log_probs": False, "model_init_kwargs": None, "ref_model_init_kwargs": None,
                  "dataset_num_proc": None, "prompt_sample_size": 1024, "min_density_ratio": 0.5,
                  "max_density_ratio": 10.0, "bf16": None, "gradient_checkpointing": True, "logging_steps": 10},
    "PRMConfig": {"learning_rate": 1e-5, "max_length": 1024, "max_prompt_length": 512, "max_completion_length": None,
                  "disable_dropout": True, "step_separator": "\n", "train_on_last_step_only": False,
                  "dataset_num_proc": None, "bf16": None, "gradient_checkpointing": True, "logging_steps": 10},
}

#: TRL 1.12.0's ``trl.experimental.ppo.PPOConfig``: its own fields and the ``TrainingArguments`` defaults it overrides
#: (``--check-ppo`` compares this with an installed TRL 1.12.0)
PPO_CONFIG_1_12 = {
    "learning_rate": 3e-06, "bf16": None, "gradient_checkpointing": True, "logging_steps": 10, "dataset_num_proc": None,
    "num_mini_batches": 1, "total_episodes": None, "local_rollout_forward_batch_size": 64, "num_sample_generations": 10,
    "response_length": 53, "stop_token": None, "stop_token_id": None, "temperature": 0.7, "missing_eos_penalty": None,
    "sft_model_path": "EleutherAI/pythia-160m", "world_size": None, "num_total_batches": None,
    "micro_batch_size": None, "local_batch_size": None, "batch_size": None, "local_mini_batch_size": None,
    "mini_batch_size": None, "reward_model_path": "EleutherAI/pythia-160m", "model_adapter_name": None,
    "ref_adapter_name": None, "num_ppo_epochs": 4, "whiten_rewards": False, "kl_coef": 0.05, "kl_estimator": "k1",
    "cliprange": 0.2, "vf_coef": 0.1, "cliprange_value": 0.2, "gamma": 1.0, "lam": 0.95,
    "ds3_gather_for_generation": True,
}

#: TRL 1.13's configs that subclassed ``OnlineDPOConfig``, with their own fields
ONLINE_DPO_SUBCLASSES = {"XPOConfig": {"alpha": [1e-5]}, "NashMDConfig": {"mixture_coef": [0.5]}}


def default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return None
    value = getattr(value, "value", value)  # enums as their values
    json.dumps(value)  # plain data only
    return value


def own_fields(config_cls: type) -> dict:
    """A config's fields that ``TrainingArguments`` lacks or defaults otherwise, with their defaults."""
    from transformers import TrainingArguments

    base = {f.name: default(f) for f in dataclasses.fields(TrainingArguments)}
    return {f.name: default(f) for f in dataclasses.fields(config_cls)
            if f.name not in base or base[f.name] != default(f)}


def check_ppo() -> None:
    """Compare :data:`PPO_CONFIG_1_12` with the installed TRL's ``PPOConfig`` (run with trl==1.12.0)."""
    import trl
    from trl.experimental.ppo import PPOConfig

    installed = own_fields(PPOConfig)
    if installed != PPO_CONFIG_1_12:
        keys = sorted(set(installed) | set(PPO_CONFIG_1_12))
        diff = {k: (PPO_CONFIG_1_12.get(k, "<absent>"), installed.get(k, "<absent>")) for k in keys
                if PPO_CONFIG_1_12.get(k, "<absent>") != installed.get(k, "<absent>")}
        raise SystemExit(f"PPO_CONFIG_1_12 differs from TRL {trl.__version__}'s PPOConfig (ours, theirs): {diff}")
    print(f"PPO_CONFIG_1_12 matches TRL {trl.__version__}'s PPOConfig ({len(installed)} fields)")


def main() -> None:
    import transformers
    import trl
    from transformers import TrainingArguments
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.online_dpo import OnlineDPOConfig
    from trl.experimental.orpo import ORPOConfig

    base = {f.name: default(f) for f in dataclasses.fields(TrainingArguments)}
    configs = {cls.__name__: {f.name: default(f) for f in dataclasses.fields(cls)}
               for cls in (trl.SFTConfig, trl.RewardConfig, trl.DPOConfig, trl.KTOConfig, trl.GRPOConfig,
                           trl.RLOOConfig, ORPOConfig, CPOConfig, OnlineDPOConfig)}
    # each config as its differences from TrainingArguments (its own fields and the defaults it overrides)
    configs = {name: {k: v for k, v in fields.items() if k not in base or base[k] != v}
               for name, fields in configs.items()}
    configs.update(REMOVED)
    configs["PPOConfig"] = dict(PPO_CONFIG_1_12)
    for name, extra in ONLINE_DPO_SUBCLASSES.items():
        configs[name] = {**configs["OnlineDPOConfig"], **extra}
    text = (f'"""Generated by ``scripts/make_trl_fields.py`` from TRL {trl.__version__} and transformers '
            f'{transformers.__version__}.\n\n'
            "A config's TRL fields and defaults are ``{**TRAINING_ARGUMENTS, **TRL_CONFIGS[name]}``. Do not edit."
            '"""\n\n'
            f"TRAINING_ARGUMENTS: dict = {pprint.pformat(base, width=118, sort_dicts=True)}\n\n"
            f"TRL_CONFIGS: dict[str, dict] = {pprint.pformat(configs, width=118, sort_dicts=True)}\n")
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(configs)} configs)")


if __name__ == "__main__":
    import sys

    check_ppo() if "--check-ppo" in sys.argv[1:] else main()
