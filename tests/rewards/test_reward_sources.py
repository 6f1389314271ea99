"""resolve_reward_source and the three kinds of source: functions (names, import paths), reward models (scored as
TRL scores them, checked against hand-computed logits), and binary judges (1/0/-1 -> 1.0/0.0/NaN)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_llm.judges import AllTrueJudge, BaseBinaryJudge, BasePairwiseJudge
from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.rewards import (
    FunctionReward,
    JudgeReward,
    RewardModelReward,
    accuracy_reward,
    compute_rewards,
    get_soft_overlong_punishment,
    resolve_reward_source,
    think_format_reward,
)

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name the capital of France, please."}],
    [{"role": "user", "content": "Say hi"}],
]
TEXT_PROMPTS = ["2 + 2 =", "The capital of France is", "Hi"]
TEXTS = ["4", "Paris, a city on the Seine.", "hello there"]
IDS = [[1], [2, 3], [4]]


def score(sources, prompts, completions=TEXTS, **kwargs):
    return compute_rewards(sources, prompts=prompts, completions=completions, completion_ids=IDS, **kwargs)


# -- functions ------------------------------------------------------------------------------------------------------


def module_level_reward(completions, **kwargs):
    return [1.0] * len(completions)


class CallableReward:
    def __call__(self, completions, **kwargs):
        return [2.0] * len(completions)


def test_function_names_follow_trl():
    from trl.trainer.utils import get_callable_name

    for func in (module_level_reward, CallableReward(), functools.partial(module_level_reward),
                 get_soft_overlong_punishment(10, 2), lambda completions, **kwargs: []):
        assert resolve_reward_source(func).name == get_callable_name(func)
    assert resolve_reward_source(CallableReward()).name == "CallableReward"
    assert FunctionReward(module_level_reward, name="mine").name == "mine"


def test_import_paths_in_both_spellings():
    dotted = resolve_reward_source("lightning_llm.rewards.accuracy_reward")
    colon = resolve_reward_source("lightning_llm.rewards:accuracy_reward")
    assert isinstance(dotted, FunctionReward) and dotted.func is accuracy_reward and colon.func is accuracy_reward
    assert dotted.name == "accuracy_reward"
    here = resolve_reward_source(f"{__name__}:CallableReward.__call__")  # an attribute path after the colon
    assert here.name == "__call__"
    assert resolve_reward_source("trl.rewards.think_format_reward").name == "think_format_reward"  # TRL's own


def test_import_path_errors_name_the_path():
    with pytest.raises(ValueError, match=r"'no_such_package\.reward': cannot import module 'no_such_package'"):
        resolve_reward_source("no_such_package.reward")
    with pytest.raises(ValueError, match=r"'lightning_llm\.rewards:nothing': module 'lightning_llm\.rewards' has no "
                                         r"attribute 'nothing'"):
        resolve_reward_source("lightning_llm.rewards:nothing")
    with pytest.raises(ValueError, match=r"reward source 'math:pi' names 3\.14.* \(float\), which is not a reward"):
        resolve_reward_source("math:pi")
    with pytest.raises(ValueError, match=r"'get_soft_overlong_punishment' cannot be a reward function.*call it"):
        resolve_reward_source("lightning_llm.rewards.get_soft_overlong_punishment")


def test_class_path_and_init_args_build_a_configured_reward():
    """YAML's way of naming an object with arguments: a class or a factory called with ``init_args``."""
    contains = resolve_reward_source({"class_path": "lightning_llm.rewards.ContainsReward",
                                      "init_args": {"target": "2"}})
    assert contains.name == "contains_2" and contains.func(completions=["a 2", "none"]) == [1.0, 0.0]
    overlong = resolve_reward_source({"class_path": "lightning_llm.rewards:get_soft_overlong_punishment",
                                      "init_args": {"max_completion_len": 10, "soft_punish_cache": 4}})
    assert overlong.func(completion_ids=[[1] * 5, [1] * 8, [1] * 11]) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match=r"cannot be built with init_args \{'tgt': '2'\}"):
        resolve_reward_source({"class_path": "lightning_llm.rewards.ContainsReward", "init_args": {"tgt": "2"}})
    with pytest.raises(ValueError, match=r"a mapping needs 'class_path'"):
        resolve_reward_source({"path": "lightning_llm.rewards.ContainsReward"})


def test_what_cannot_be_a_source_is_refused_by_name():
    with pytest.raises(ValueError, match=r"cannot make a reward source of 42 \(int\)"):
        resolve_reward_source(42)
    with pytest.raises(ValueError, match=r"test_reward_sources\.CallableReward is a class"):
        resolve_reward_source(CallableReward)

    class Pairwise(BasePairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
            return [0] * len(prompts)

    with pytest.raises(ValueError, match=r"Pairwise compares several completions"):
        resolve_reward_source(Pairwise())
    with pytest.raises(ValueError, match=r"no such directory"):
        resolve_reward_source("./no/such/reward-model")


def test_a_source_is_returned_as_it_is():
    source = FunctionReward(think_format_reward)
    assert resolve_reward_source(source) is source


# -- reward models --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def reward_export(request, tmp_path_factory):
    """A RewardModule export (model + tokenizer) in a directory named ``rm``; GPT-2's absolute positions make its
    rewards depend on which side the padding is."""
    from lightning_llm.modules.reward import RewardModule

    directory = tmp_path_factory.mktemp("export") / "rm"
    RewardModule(request.param, tokenizer=tiny_tokenizer()).export_hf(directory)
    return directory


def hand_rewards(model, tokenizer, prompts, completions):
    """Each prompt + completion alone (no padding), rendered as TRL renders it for reward models, ``logits[0, 0]``."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        if isinstance(prompt, str):
            text = prompt + completion
        else:
            text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                                 tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            rewards.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return rewards


@pytest.mark.parametrize("prompts", [CHAT_PROMPTS, TEXT_PROMPTS], ids=["conversational", "text"])
def test_a_reward_model_by_path_scores_the_hand_computed_logits(reward_export, prompts):
    model = AutoModelForSequenceClassification.from_pretrained(reward_export).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_export)
    expected = hand_rewards(model, tokenizer, prompts, TEXTS)
    source = resolve_reward_source(str(reward_export))
    assert isinstance(source, RewardModelReward) and source.name == "rm"  # TRL: the path's last component
    source.batch_size = 2  # two forward passes, the first padded
    rewards = score([source], prompts)
    assert rewards[:, 0].tolist() == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) == 3  # the rows do differ, so a mix-up of rows would show


def test_a_reward_model_object_with_its_tokenizer(reward_export):
    model = AutoModelForSequenceClassification.from_pretrained(reward_export)
    expected = hand_rewards(model.eval(), tiny_tokenizer(), CHAT_PROMPTS, TEXTS)
    source = resolve_reward_source(model, tokenizer=tiny_tokenizer(), dtype=torch.float64)
    assert next(source.model.parameters()).dtype == torch.float64 and not source.model.training
    assert not any(p.requires_grad for p in source.model.parameters())
    assert score([source], CHAT_PROMPTS)[:, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_model_names_dtype_and_the_tokenizer_from_the_model():
    preset = resolve_reward_source("tiny-llama", dtype="bfloat16", device="cpu")
    assert preset.name == "tiny-llama" and next(preset.model.parameters()).dtype == torch.bfloat16
    model = tiny_model("tiny-llama", task="sequence_classification", num_labels=1)
    source = resolve_reward_source(model)  # the tokenizer found from the model's name
    assert source.tokenizer.vocab_size == tiny_tokenizer().vocab_size
    model.config._name_or_path = "org/some-reward-model/"
    assert RewardModelReward(model, tiny_tokenizer()).name == "some-reward-model"
    with pytest.raises(ValueError, match=r"num_labels=1\), got num_labels=2"):
        RewardModelReward(tiny_model("tiny-llama", task="sequence_classification", num_labels=2), tiny_tokenizer())


def test_conversations_need_the_reward_tokenizers_chat_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    source = RewardModelReward(tiny_model("tiny-llama", task="sequence_classification", num_labels=1), tokenizer)
    with pytest.raises(ValueError, match=r"reward model 'tiny-llama': its tokenizer has no chat template"):
        score([source], CHAT_PROMPTS)
    assert score([source], TEXT_PROMPTS).shape == (3, 1)  # plain strings need none


def test_a_causal_lm_is_not_taken_for_a_reward_model():
    with pytest.raises(ValueError, match=r"reward model 'tiny-llama' is a LlamaForCausalLM, a language model"):
        RewardModelReward(tiny_model("tiny-llama"), tiny_tokenizer())

    class Wrapped(torch.nn.Module):  # a module whose class says nothing: its logits give it away when scoring
        def __init__(self):
            super().__init__()
            self.inner = tiny_model("tiny-llama")

        def forward(self, **inputs):
            return self.inner(**inputs)

    with pytest.raises(ValueError, match=r"reward model 'Wrapped' must be a sequence classifier: its logits have "
                                         r"shape \(3, \d+, \d+\)"):
        score([RewardModelReward(Wrapped(), tiny_tokenizer())], TEXT_PROMPTS)


# -- judges ---------------------------------------------------------------------------------------------------------


class ScriptedJudge(BaseBinaryJudge):
    """Answers a fixed list and records what it was asked."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        self.calls.append((prompts, completions, gold_completions))
        return list(self.answers)


def test_a_binary_judge_gives_one_zero_and_nan():
    judge = ScriptedJudge([1, 0, -1])
    source = resolve_reward_source(judge)
    assert isinstance(source, JudgeReward) and source.name == "ScriptedJudge"
    rewards = score([source], CHAT_PROMPTS)[:, 0].tolist()
    assert rewards[:2] == [1.0, 0.0] and math.isnan(rewards[2])
    prompts, completions, gold = judge.calls[0]
    assert prompts[1] == "System: Be brief.\n\nUser: Name the capital of France, please.\n\nAssistant:"
    assert completions == TEXTS and gold is None


def test_a_judge_mixture_and_gold_completions():
    both = AllTrueJudge([ScriptedJudge([1, 1, -1]), ScriptedJudge([1, 0, 1])])
    rewards = score([resolve_reward_source(both)], TEXT_PROMPTS)[:, 0].tolist()
    assert rewards[:2] == [1.0, 0.0] and math.isnan(rewards[2])
    judge = ScriptedJudge([1, 1, 1])
    score([JudgeReward(judge, gold_completions_column="reference")], TEXT_PROMPTS,
          columns={"reference": ["4", "Paris", "hi"]})
    assert judge.calls[0][0] == TEXT_PROMPTS and judge.calls[0][2] == ["4", "Paris", "hi"]
    with pytest.raises(ValueError, match=r"judge 'ScriptedJudge' reads gold completions from the column 'reference'"):
        score([JudgeReward(judge, gold_completions_column="reference")], TEXT_PROMPTS)


def test_a_judge_answer_that_is_not_binary_is_named_by_row():
    with pytest.raises(ValueError, match=r"judge 'ScriptedJudge' answered 2 for row 1"):
        score([resolve_reward_source(ScriptedJudge([1, 2, 0]))], TEXT_PROMPTS)
    with pytest.raises(ValueError, match=r"judge 'ScriptedJudge' returned 2 rewards for 3 completions"):
        score([resolve_reward_source(ScriptedJudge([1, 0]))], TEXT_PROMPTS)
