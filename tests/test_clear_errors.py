"""Bad settings stop with one clear message naming what to change, before any work is lost:
LoRA target modules that match nothing (listing the model's linear layers), a device the machine
does not have, a prompt longer than the model's positions, a tokenizer without EOS."""

from __future__ import annotations

import pytest
import torch

from rlcourse.adapters import apply_lora, linear_layer_names
from rlcourse.engine import TrainConfig, check_device_available, make_accelerator
from rlcourse.models import build_model, build_tokenizer, generate, max_positions

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(["what is rain ? rain is wet ."])


def test_lora_target_modules_that_match_nothing_list_the_linear_layers(tok):
    model = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
            "down_proj"} == linear_layer_names(model)  # a Llama block; lm_head excluded
    with pytest.raises(ValueError, match=r"lora.target_modules: 'c_attn' match no linear layer "
                                         r"of LlamaForCausalLM; its linear layers are down_proj, "
                                         r"gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        apply_lora(model, {"target_modules": ["q_proj", "c_attn"]})


def test_gpt2_conv1d_layers_are_named_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                       n_positions=16))
    assert {"c_attn", "c_proj", "c_fc"} <= linear_layer_names(model)
    assert "lm_head" not in linear_layer_names(model)
    assert max_positions(model) == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_device_the_machine_lacks_is_named():
    with pytest.raises(ValueError, match="train.device=cuda but no CUDA GPU is visible"):
        check_device_available("cuda")
    with pytest.raises(ValueError, match="rollout.device=cuda"):
        check_device_available("cuda", "rollout.device")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        make_accelerator(TrainConfig(device="cuda"))
    check_device_available("cpu")
    check_device_available("auto")


def test_a_prompt_longer_than_the_positions_is_refused(tok):
    model = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0,
                        max_position_embeddings=16)
    assert max_positions(model) == 16
    generate(model, tok, ["what is rain ?"], max_new_tokens=4, seed=0)  # fits
    with pytest.raises(ValueError, match=r"plus max_new_tokens=12 is longer than the model's 16 "
                                         "positions"):
        generate(model, tok, ["what is rain ?"], max_new_tokens=12, seed=0)


def test_a_tokenizer_without_eos_is_refused(tok):
    import copy

    model = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no EOS token"):
        generate(model, no_eos, ["what is rain ?"], max_new_tokens=4, seed=0)


def test_a_model_folder_with_only_pickled_weights_says_how_to_convert(tok, tmp_path):
    import os

    from rlcourse.models import load_model, save_model

    model = build_model(tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    save_model(model, tok, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"holds pytorch_model.bin but no .safetensors weights.*"
                                         r"save_pretrained"):
        load_model(tmp_path, device="cpu")
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"no model weights .* it holds .*config.json"):
        load_model(tmp_path, device="cpu")
