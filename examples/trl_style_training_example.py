"""SFT, then a reward model, then DPO and PPO, written as a TRL script with ``lightning_llm.trainers``.

    python examples/trl_style_training_example.py [--model HUB_ID_OR_DIR] [--fast] [--output-dir DIR]

Each stage is what a TRL user writes (a config, a trainer, ``train()``) and starts from the model the stage before
it left in ``<output_dir>/final`` (the facade writes the trained model there in Hugging Face format):

1. SFT on the shipped chat data (``messages`` rows);
2. a reward model, from the SFT model, on correct-vs-wrong answer pairs (``prompt``/``chosen``/``rejected`` rows);
3. DPO, from the SFT model, on the same pairs;
4. PPO, from the SFT model, against the reward model of stage 2 (``reward_model="<output_dir>/final"``; the value
   model starts from it too, the reference is a frozen copy of the SFT model), on the shipped questions, then one
   ``step(queries)`` by hand, TRL's old ``ppo_trainer.step``;
5. the reward model, as a pairwise judge (``PairRMJudge``), compares the SFT model's answers with the DPO and the PPO
   model's.

Offline by default: a tiny random-init Llama and the datasets shipped in ``lightning_llm/assets``; a minute or two on
two CPU cores (``--fast``: a few seconds per stage).
"""

from __future__ import annotations

from _common import parse_args
from datasets import load_dataset

from lightning_llm.assets import sample_path
from lightning_llm.trainers import (
    DPOConfig,
    DPOTrainer,
    PairRMJudge,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)


def main() -> None:
    args = parse_args(__doc__, "outputs/trl-style")
    out = args.output_dir
    # local JSON files, loaded as any TRL script loads its data
    chats = load_dataset("json", data_files=str(sample_path("messages")), split="train")
    pairs = load_dataset("json", data_files=str(sample_path("preference")), split="train")
    prompts = load_dataset("json", data_files=str(sample_path("prompt_only")), split="train")
    # every run logs each window of logging_steps steps (a run's step count a multiple of it); a tiny model needs no
    # activation recomputation
    common = dict(max_length=args.max_length(), logging_steps=1 if args.fast else 10, gradient_checkpointing=False)

    # 1. SFT ----------------------------------------------------------------------------------------------------
    sft = SFTTrainer(
        model=args.model,
        args=SFTConfig(output_dir=str(out / "sft"), max_steps=args.steps(150), per_device_train_batch_size=16,
                       learning_rate=3e-3, warmup_steps=0.05, assistant_only_loss=True, **common),
        train_dataset=chats,
    )
    print("SFT:", sft.train())
    sft_model = str(out / "sft" / "final")

    # 2. Reward model, from the SFT model ------------------------------------------------------------------------
    reward = RewardTrainer(
        model=sft_model,
        args=RewardConfig(output_dir=str(out / "reward"), max_steps=args.steps(200), per_device_train_batch_size=8,
                          learning_rate=3e-4, **common),
        train_dataset=pairs,
    )
    print("Reward model:", reward.train())

    # 3. DPO, from the SFT model (its frozen copy is the reference) ----------------------------------------------
    dpo = DPOTrainer(
        model=sft_model,
        args=DPOConfig(output_dir=str(out / "dpo"), max_steps=args.steps(150), per_device_train_batch_size=8,
                       learning_rate=3e-4, beta=0.1, **common),
        train_dataset=pairs,
    )
    print("DPO:", dpo.train())
    last = next(entry for entry in reversed(dpo.state.log_history) if "rewards/margins" in entry)
    print(f"DPO at step {last['step']}: reward margin {last['rewards/margins']:+.3f}, "
          f"pair accuracy {last['rewards/accuracies']:.2f}")

    # 4. PPO, from the SFT model, against the reward model (TRL 1.12's argument order: args first) --------------
    reward_model = str(out / "reward" / "final")
    ppo = PPOTrainer(
        args=PPOConfig(output_dir=str(out / "ppo"), max_steps=args.steps(30), per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, num_ppo_epochs=1, learning_rate=1e-4, kl_coef=0.05,
                       clip_range=0.2, response_length=16, stop_token="eos", temperature=1.0, **common),
        model=sft_model,
        reward_model=reward_model,
        train_dataset=prompts,
    )
    print("PPO:", ppo.train())
    questions = [row["prompt"] for row in pairs.select(range(8))]
    stats = ppo.step(questions)  # one more rollout and update, on prompts of our own
    print(f"PPO step(): reward-model score {stats['objective/scores']:+.3f}, KL {stats['objective/kl']:+.3f}")

    # 5. The reward model judges the SFT answers against the DPO and PPO ones ------------------------------------
    sft_answers = sft.module.generate(questions, max_new_tokens=24)
    judge = PairRMJudge(reward_model)
    texts = [question[-1]["content"] for question in questions]
    for name, trained in (("DPO", dpo), ("PPO", ppo)):
        answers = trained.module.generate(questions, max_new_tokens=24)
        choices = judge.judge(texts, [[s, a] for s, a in zip(sft_answers, answers)])
        for text, s, a, choice in zip(texts, sft_answers, answers, choices):
            print(f"  {text!r:34} SFT {s!r:34} {name} {a!r:34} -> {name if choice == 1 else 'SFT'}")
        print(f"The reward model prefers the {name} answer {sum(c == 1 for c in choices)} times of {len(choices)}.")
    print(f"Models: {out}/sft/final, {out}/reward/final, {out}/dpo/final, {out}/ppo/final (value model in "
          "ppo/final/value_model); metrics in each stage's metrics.csv.")


if __name__ == "__main__":
    main()
