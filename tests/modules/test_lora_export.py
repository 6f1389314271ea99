"""Unmerged LoRA exports of a policy read from a local directory: the adapters name that directory (absolute, not
copied beside them) as their base, and ``AutoPeftModelForCausalLM`` loads them offline, from any working directory,
into the trained policy. (The preset case, whose base is written beside the adapters, is in ``test_base.py``.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_llm.models import tiny_model, tiny_tokenizer
from lightning_llm.models.peft import is_peft_model
from lightning_llm.modules.sft import SFTModule

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def write_base(directory) -> None:
    tiny_model("tiny-llama", seed=7).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)


def inputs():
    tok = tiny_tokenizer()
    enc = tok(["Blood is red.", "A frog says ribbit and jumps."], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("given", ["absolute path", "relative path", "model object from the directory"])
def test_adapters_of_a_directory_policy_load_offline(given, tmp_path, monkeypatch):
    base = tmp_path / "base model"
    write_base(base)
    monkeypatch.chdir(tmp_path)
    if given == "absolute path":
        module = SFTModule(str(base), peft_config=LORA)
    elif given == "relative path":
        module = SFTModule("base model", peft_config=LORA)
    else:
        module = SFTModule(AutoModelForCausalLM.from_pretrained("base model"), tokenizer=tiny_tokenizer(),
                           peft_config=LORA)
    module.configure_model()
    assert is_peft_model(module.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters that change the outputs (lora_B starts at zero)
        for name, param in module.model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    ids, mask = inputs()
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids, attention_mask=mask).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base)(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4)

    live_config = {k: c.base_model_name_or_path for k, c in module.model.peft_config.items()}
    export = tmp_path / "export" / "adapters"
    module.export_hf(export, merge_adapters=False)
    assert (export / "adapter_config.json").is_file() and not (export / "config.json").is_file()
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert not (export / "base").exists()  # the directory is named, not copied
    # the live policy's adapter config is left as it was
    assert {k: c.base_model_name_or_path for k, c in module.model.peft_config.items()} == live_config

    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(tmp_path / "export")  # elsewhere: a relative base would no longer resolve
    reloaded = AutoPeftModelForCausalLM.from_pretrained("adapters").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-5,
                                   atol=1e-5)
