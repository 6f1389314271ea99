"""Everything in the box, the Lightning way: every algorithm, every callback, the judges that run offline, and every
utility of ``lightning_llm.utils``, each in a small ``lightning.Trainer`` run on the shipped data.

    python examples/complete_trainer_ecosystem_example.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

=========================  ===============================================================================
stage (``<output-dir>/``)  what it shows
=========================  ===============================================================================
``sft``                    ``SFTModule`` with ``RichProgressCallback``, ``BEMACallback`` (a BEMA export in
                           ``sft/bema``), ``LogCompletionsCallback`` and ``RunCheckpoint`` (every stage)
``reward``                 ``RewardModule``; ``compute_accuracy`` and ``RunningMoments`` over its scores
``prm``                    ``PRMModule`` on stepwise rows
``dpo``                    ``DPOModule`` with ``SyncRefModelCallback`` (TR-DPO) and ``WinRateCallback`` judged by
                           ``HfPairwiseJudge`` (a causal LM read as a judge); then ``trainer.predict`` with
                           ``JsonlPredictionWriter``
``orpo``                   ``ORPOModule`` on a model object prepared with ``disable_dropout_in_model``,
                           ``freeze_model_layers`` and ``get_model_param_count``
``cpo``                    ``CPOModule`` (SimPO) with ``MergeModelCallback`` (weights merged with the SFT model)
``kto``, ``bco``           ``KTOModule``, ``BCOModule`` on unpaired feedback
``grpo``                   ``GRPOModule`` rewarded by a function, the reward model and ``AllTrueJudge`` over two
                           binary judges
``rloo``                   ``RLOOModule``, its rollouts logged by ``LogCompletionsCallback``
``online_dpo``             ``OnlineDPOModule`` with ``PairRMJudge`` (the reward model) choosing in each pair
``xpo``                    ``XPOModule``: the policy's answer against the reference's, an exact-answer reward
``ppo``                    ``PPOModule`` against the reward model (the value model starts from it); the value
                           model is exported to ``ppo/hf/value_model``
``nash_md``                ``NashMDModule``: the policy's answer against the policy/reference mixture's, the
                           exact-answer reward
(best of n)                a ``BaseRankJudge`` over the reward model picks the best of four sampled answers;
                           ``peft_module_casting_to_bf16`` on a LoRA copy; ``empty_cache`` between stages
=========================  ===============================================================================

Skipped: ``OpenAIPairwiseJudge`` needs an OpenAI-compatible server and an API key, so nothing here can call it
offline. ``HfPairwiseJudge`` and ``PairRMJudge`` are built on tiny local models (the starting model and this run's
reward model), so their verdicts show the plumbing, not good judgement.
"""

from __future__ import annotations

from pathlib import Path

import torch
from _common import parse_args
from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_llm import (
    BCOModule,
    CPOModule,
    DPOModule,
    GRPOModule,
    KTOModule,
    NashMDModule,
    OnlineDPOModule,
    ORPOModule,
    PPOModule,
    PreferenceDataModule,
    PRMModule,
    PromptDataModule,
    RewardModule,
    RLOOModule,
    SFTDataModule,
    SFTModule,
    StepwiseDataModule,
    UnpairedPreferenceDataModule,
    XPOModule,
)
from lightning_llm.callbacks import (
    BEMACallback,
    JsonlPredictionWriter,
    LogCompletionsCallback,
    MergeModelCallback,
    RichProgressCallback,
    RunCheckpoint,
    SyncRefModelCallback,
    WinRateCallback,
)
from lightning_llm.judges import AllTrueJudge, BaseBinaryJudge, BaseRankJudge, HfPairwiseJudge, PairRMJudge
from lightning_llm.rewards import accuracy_reward
from lightning_llm.utils import (
    RunningMoments,
    compute_accuracy,
    disable_dropout_in_model,
    empty_cache,
    freeze_model_layers,
    get_model_param_count,
    peft_module_casting_to_bf16,
)

QUESTIONS = [[{"role": "user", "content": text}] for text in
             ("What is 2 plus 3?", "What is the capital of France?", "What sound does a cow make?")]


class ShortAnswerJudge(BaseBinaryJudge):
    """1 for an answer of at most ``max_words`` words."""

    def __init__(self, max_words: int = 12) -> None:
        self.max_words = max_words

    def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        return [int(len(completion.split()) <= self.max_words) for completion in completions]


class EndsWithFullStopJudge(BaseBinaryJudge):
    """1 for an answer that ends a sentence, as the shipped answers do."""

    def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        return [int(completion.strip().endswith(".")) for completion in completions]


class RewardRankJudge(BaseRankJudge):
    """Ranks each prompt's completions by a reward model's score, best first."""

    def __init__(self, reward: RewardModule) -> None:
        self.reward = reward

    def judge(self, prompts, completions, shuffle_order=True):
        ranks = []
        for prompt, candidates in zip(prompts, completions):
            scores = self.reward.score([prompt] * len(candidates), candidates)
            ranks.append(sorted(range(len(candidates)), key=lambda index: -scores[index]))
        return ranks


def main() -> None:
    args = parse_args(__doc__, "outputs/ecosystem")
    out = args.output_dir
    length = args.max_length()
    completion = 8 if args.fast else 16

    def fit(stage: str, module, data, steps: int, callbacks=(), **options) -> Trainer:
        """One stage: a CPU-or-GPU ``lightning.Trainer`` writing ``<stage>/metrics.csv`` and ``last.ckpt``."""
        trainer = Trainer(max_steps=args.steps(steps), log_every_n_steps=1, default_root_dir=str(out / stage),
                          logger=CSVLogger(str(out / stage), name="", version=""), enable_model_summary=False,
                          callbacks=[RunCheckpoint(dirpath=str(out / stage / "checkpoints")), *callbacks], **options)
        trainer.fit(module, data)
        empty_cache()  # hand cached accelerator memory back before the next stage (nothing to do on a CPU)
        print(f"[{stage}] " + ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(trainer.callback_metrics.items())
                                          if k in ("loss", "val/loss", "reward", "rewards/margins", "accuracy",
                                                   "val/win_rate", "objective/scores")))
        return trainer

    # SFT --------------------------------------------------------------------------------------------------------
    sft = SFTModule(args.model, learning_rate=3e-3, warmup_ratio=0.05, export_dir="hf")
    fit("sft", sft, SFTDataModule("sample:messages", batch_size=16, max_length=length, assistant_only_loss=True),
        150, callbacks=[RichProgressCallback(), BEMACallback(update_freq=1 if args.fast else 10),
                        LogCompletionsCallback(prompts=QUESTIONS, every_n_steps=args.steps(50), max_new_tokens=12,
                                               console=False)],
        enable_progress_bar=True)
    sft_dir = str(out / "sft" / "hf")
    pairs = lambda **kw: PreferenceDataModule("sample:preference", batch_size=8, max_length=length, **kw)  # noqa: E731

    # Reward model, and its accuracy the transformers way -------------------------------------------------------
    reward = RewardModule(sft_dir, learning_rate=3e-4, export_dir="hf")
    fit("reward", reward, pairs(on_overflow="drop"), 200)
    data = pairs(tokenizer=reward.tokenizer)  # set up by hand here, outside a Trainer
    data.setup("fit")
    rows = data.rows("train", 32)
    prompts = [row["prompt"] for row in rows]
    chosen = reward.score(prompts, [row["chosen"] for row in rows])
    rejected = reward.score(prompts, [row["rejected"] for row in rows])
    accuracy = compute_accuracy((torch.tensor([chosen, rejected]).T, torch.zeros(len(rows), dtype=torch.long)))
    moments = RunningMoments()
    moments.update(torch.tensor(chosen + rejected))
    print(f"[reward] ranks {accuracy['accuracy']:.0%} of 32 training pairs right; its scores have mean "
          f"{moments.mean:+.3f} and std {moments.std:.3f}")

    # Process reward model ---------------------------------------------------------------------------------------
    fit("prm", PRMModule(args.model, learning_rate=3e-3, export_dir="hf"),
        StepwiseDataModule("sample:stepwise", batch_size=8, max_length=args.max_length(256)), 60)

    # DPO with TR-DPO reference syncing and a judged win rate; then predictions -------------------------------
    dpo = DPOModule(sft_dir, beta=0.1, learning_rate=3e-4, export_dir="hf",
                    generation_kwargs={"max_new_tokens": completion})
    judge = HfPairwiseJudge(args.model)  # any causal LM reads as a judge: P("0") vs P("1") after the question
    fit("dpo", dpo, pairs(val_data="sample:preference_standard"), 100,
        callbacks=[SyncRefModelCallback(sync_steps=args.steps(50), alpha=0.6),
                   WinRateCallback(judge, num_prompts=4, max_new_tokens=completion)],
        val_check_interval=args.steps(50), check_val_every_n_epoch=None, limit_val_batches=1)
    predictor = Trainer(logger=False, enable_progress_bar=False, callbacks=[JsonlPredictionWriter(
        str(out / "dpo" / "predictions.jsonl"))])
    predictor.predict(dpo, PromptDataModule(predict_data="sample:prompt_only", batch_size=16,
                                            tokenizer=dpo.tokenizer), return_predictions=False)
    print(f"[dpo] answers written to {out / 'dpo' / 'predictions.jsonl'}")

    # ORPO on a model object: dropout off, the bottom block and the embeddings frozen -----------------------------
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(sft_dir)
    disable_dropout_in_model(policy)
    frozen = freeze_model_layers(policy, layer_range=(0, 1), freeze_embeddings=True)
    print(f"[orpo] {len(frozen)} tensors frozen: {get_model_param_count(policy, trainable_only=True):,} of "
          f"{get_model_param_count(policy):,} parameters train")
    fit("orpo", ORPOModule(policy, tokenizer=sft_dir, beta=0.1, learning_rate=1e-3, export_dir="hf"), pairs(), 60)

    # SimPO, its weights merged half-and-half with the SFT model's at the end -------------------------------------
    fit("cpo", CPOModule(sft_dir, loss_type="simpo", cpo_alpha=0.0, learning_rate=1e-3, export_dir="hf"), pairs(), 60,
        callbacks=[MergeModelCallback(str(out / "cpo" / "merged"), target_model=sft_dir, method="slerp")])

    # KTO and BCO on unpaired feedback -------------------------------------------------------------------------
    unpaired = lambda **kw: UnpairedPreferenceDataModule("sample:unpaired_preference", batch_size=8,  # noqa: E731
                                                         max_length=length, **kw)
    fit("kto", KTOModule(sft_dir, beta=0.1, learning_rate=5e-4, export_dir="hf"), unpaired(), 60)
    fit("bco", BCOModule(sft_dir, beta=0.1, learning_rate=5e-4, export_dir="hf"), unpaired(kl_pairs=False), 60)

    # Online: GRPO (a function, a reward model and a mixture of binary judges), RLOO, online DPO ----------------
    reward_dir = str(out / "reward" / "hf")
    online = dict(max_completion_length=completion, learning_rate=1e-3, export_dir="hf")
    prompts_data = lambda batch_size: PromptDataModule("sample:prompt_only", batch_size=batch_size)  # noqa: E731
    grpo = GRPOModule(sft_dir, reward_funcs=[accuracy_reward, reward_dir,
                                             AllTrueJudge([ShortAnswerJudge(), EndsWithFullStopJudge()])],
                      reward_weights=[1.0, 0.1, 0.5], num_generations=4, **online)
    fit("grpo", grpo, prompts_data(8), 40)
    fit("rloo", RLOOModule(sft_dir, reward_funcs=[accuracy_reward], num_generations=4, **online), prompts_data(8), 40,
        callbacks=[LogCompletionsCallback(num_prompts=2, console=False)])
    fit("online_dpo", OnlineDPOModule(sft_dir, judge=PairRMJudge(reward_dir), max_length=length, **online),
        prompts_data(8), 40)
    fit("xpo", XPOModule(sft_dir, reward_funcs=[accuracy_reward], alpha=1e-3, max_length=length, **online),
        prompts_data(8), 40)

    # PPO against the reward model: a rollout of 8 prompts, one PPO pass in two micro-batches per step -------------
    fit("ppo", PPOModule(sft_dir, reward_model=reward_dir, num_ppo_epochs=1, gradient_accumulation_steps=2,
                         stop_token="eos", **online), prompts_data(8), 30)
    # Nash-MD: the policy's answer against one sampled from the geometric mixture of policy and reference ---------
    fit("nash_md", NashMDModule(sft_dir, reward_funcs=[accuracy_reward], mixture_coef=0.5, max_length=length,
                                rollout="fast", **online), prompts_data(8), 40)

    # Best of four sampled answers, ranked by the reward model ----------------------------------------------------
    samples = [grpo.generate([question] * 4, max_new_tokens=completion, do_sample=True) for question in QUESTIONS]
    ranks = RewardRankJudge(reward).judge(QUESTIONS, samples)
    for question, candidates, rank in zip(QUESTIONS, samples, ranks):
        print(f"[best of 4] {question[0]['content']!r} -> {candidates[rank[0]]!r}")

    # A LoRA copy of the SFT model cast for bf16 adapter training (norms float32, embeddings and head bf16) -----
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(sft_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    cast = peft_module_casting_to_bf16(lora)
    print(f"[lora] {sum(dtype == torch.bfloat16 for dtype in cast.values())} modules cast to bf16, "
          f"{sum(dtype == torch.float32 for dtype in cast.values())} to float32")
    print(f"Everything is under {Path(out)}: one directory per stage (metrics.csv, checkpoints/, hf/).")


if __name__ == "__main__":
    main()
