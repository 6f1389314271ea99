"""TRL 1.16's documented quick-start snippets run with only their ``trl`` import lines changed.

Each snippet is TRL's text (the trainer docs' and README's examples) with two substitutions that a person without the
hub would make anyway: model ids point at a local ``save_pretrained`` directory of a tiny model, and
``load_dataset("trl-lib/...")`` at the shipped sample of the same format, cut to a few rows so that the snippet's
default epochs stay short. Then ``from trl import`` becomes ``from lightning_llm.trainers import`` (and
``trl.rewards`` ``lightning_llm.rewards``), and nothing else changes.
"""

from __future__ import annotations

import pytest

from lightning_llm.assets import sample_path

pytestmark = pytest.mark.slow

SFT = '''
from trl import SFTTrainer
from datasets import load_dataset

dataset = load_dataset("trl-lib/Capybara", split="train")

trainer = SFTTrainer(
    model="Qwen/Qwen2.5-0.5B",
    train_dataset=dataset,
)
trainer.train()
'''

DPO = '''
from datasets import load_dataset
from trl import DPOConfig, DPOTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
train_dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")

training_args = DPOConfig(output_dir="Qwen2.5-0.5B-DPO")
trainer = DPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
trainer.train()
'''

REWARD = '''
from trl import RewardConfig, RewardTrainer
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
model = AutoModelForSequenceClassification.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct", num_labels=1)
model.config.pad_token_id = tokenizer.pad_token_id

dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")

training_args = RewardConfig(output_dir="Qwen2.5-0.5B-Reward", per_device_train_batch_size=2)
trainer = RewardTrainer(
    args=training_args,
    model=model,
    processing_class=tokenizer,
    train_dataset=dataset,
)
trainer.train()
'''

GRPO = '''
from datasets import load_dataset
from trl import GRPOTrainer
from trl.rewards import accuracy_reward

dataset = load_dataset("trl-lib/DeepMath-103K", split="train")

trainer = GRPOTrainer(
    model="Qwen/Qwen2-0.5B-Instruct",
    reward_funcs=accuracy_reward,
    train_dataset=dataset,
)
trainer.train()
'''

#: snippet -> (its dataset id, the shipped sample of that format, rows kept)
DATA = {"sft": (SFT, "trl-lib/Capybara", "messages", 8),
        "dpo": (DPO, "trl-lib/ultrafeedback_binarized", "preference", 8),
        "reward": (REWARD, "trl-lib/ultrafeedback_binarized", "preference", 4),
        "grpo": (GRPO, "trl-lib/DeepMath-103K", "prompt_only", 1)}
MODELS = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2-0.5B-Instruct")


def offline(snippet: str, dataset_id: str, sample: str, rows: int, model_dir: str) -> str:
    """The snippet with local models and data (the substitutions a person without the hub makes)."""
    local = f'load_dataset("json", data_files={str(sample_path(sample))!r}, split="train").select(range({rows}))'
    snippet = snippet.replace(f'load_dataset("{dataset_id}", split="train")', local)
    for model_id in MODELS:
        snippet = snippet.replace(f'"{model_id}"', repr(model_dir))
    return snippet


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lightning_llm.models import tiny_model, tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("tiny-llama").save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("name", sorted(DATA))
def test_trls_snippet_runs_with_the_import_line_changed(name, model_dir, tmp_path, monkeypatch):
    snippet, dataset_id, sample, rows = DATA[name]
    local = offline(snippet, dataset_id, sample, rows, model_dir)
    assert local.count("from trl") == snippet.count("from trl") >= 1  # the substitutions touched no import
    ours = local.replace("from trl.rewards import", "from lightning_llm.rewards import").replace(
        "from trl import", "from lightning_llm.trainers import")
    assert "trl" not in ours.replace("trl-lib", "")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(ours, f"<TRL's {name} snippet>", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step > 0
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(loss == loss for loss in losses)  # logged and finite
    assert list(tmp_path.rglob("final/config.json")), "no final model was written"
