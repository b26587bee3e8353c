"""The ecosystem's files in and out (issue 19, item 2): each test fails on the code before it.

- a LoRA SFT run's ``OUTPUT/model`` (an adapter folder) given as the model of a DPO recipe, with
  and without ``lora:``, starts from the SFT model (base + adapter), not from the base;
- the reward model is saved as ``...ForSequenceClassification``, which
  ``AutoModelForSequenceClassification`` loads with its trained head (same scores); the older
  format (causal LM + ``reward_head.safetensors``, with its bias) still loads;
- a reward model used as a reward reads TEXT with its own tokenizer (two vocabularies);
- ``truncation`` is honoured by the reward model; pairs identical after the cut are dropped with
  a count and the file's name;
- a tokenizer without a chat template: prompt and completion as given (TRL), the book's
  tokenizer keeps its markup;
- TRL's ``messages`` (SFT) and implicit-prompt (preferences) rows are read;
- ``--help`` lists the methods and the reference; ``rlcourse-train``; recipes by method name
  from any directory;
- a Hub id ``org/name`` is refused at once, offline, for model, reward model and reference.

Oracles are independent computations: logits of the adapter merged by ``peft`` itself, scores of
``transformers``' own classifier, token ids written out by hand, rows written out by hand.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlcourse import recipes
from rlcourse.config import REPO_ROOT
from rlcourse.data import (
    DataError,
    load_preferences,
    load_sft,
    tokenize_preferences,
    tokenize_sft,
    write_jsonl,
)
from rlcourse.models import (
    RewardModel,
    build_model,
    build_tokenizer,
    encode_prompt_completion,
    generate,
    load_model,
    load_tokenizer,
    save_model,
)

torch.set_num_threads(1)

PAIRS = [
    {"prompt": "what is rain ?", "chosen": "rain is wet .", "rejected": "rain is dry ."},
    {"prompt": "what is snow ?", "chosen": "snow is cold .", "rejected": "snow is hot ."},
    {"prompt": "tell me about dogs", "chosen": "a dog can bark .", "rejected": "you are dumb ."},
    {"prompt": "what is fire ?", "chosen": "fire is hot .", "rejected": "fire is cold ."},
]
WORDS = [" ".join(p.values()) for p in PAIRS]
TINY = ["train.batch_size=2", "train.grad_accum_steps=1", "train.warmup_steps=0",
        "train.log_every=1", "train.progress=false", "max_length=32", "train.device=cpu"]
IDS = torch.tensor([[2, 4, 6, 7, 8, 5, 9, 10, 3]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, run_folder):
    return run_folder(tmp_path_factory.mktemp("ecosystem"), WORDS, PAIRS, model_name="base")


@pytest.fixture(scope="module")
def sft_adapter(workdir):
    """A LoRA SFT run's OUTPUT/model: an adapter folder on ``base``."""
    out = workdir / "sft_run"
    assert recipes.main([str(REPO_ROOT / "recipes" / "sft.yaml"), "--model",
                         str(workdir / "base"), "--data", str(workdir / "sft.jsonl"),
                         "--output", str(out), *TINY, "train.max_steps=3", "train.lr=5e-2",
                         "lora.r=4", "lora.alpha=8"]) == 0
    assert (out / "model" / "adapter_config.json").is_file()
    return out / "model"


def _peft_merged(adapter: Path, base: Path):
    """The oracle: peft's own adapter on the base, merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                     adapter).merge_and_unload()


# ------------------------------------------------------------------------ adapter as the model
def test_an_adapter_folder_loads_as_its_base_with_the_adapter_merged(workdir, sft_adapter,
                                                                     capsys):
    want = _logits(_peft_merged(sft_adapter, workdir / "base"))
    base_logits = _logits(load_model(workdir / "base", device="cpu")[0])
    assert not torch.allclose(want, base_logits, atol=1e-4)  # the SFT adapter changed it
    model, tokenizer = load_model(sft_adapter, device="cpu")
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in model.parameters())  # a plain model to train
    assert not any("lora" in n for n, _ in model.named_parameters())
    err = capsys.readouterr().err
    assert "a LoRA adapter" in err and "merged into the base" in err and str(sft_adapter) in err
    assert tokenizer("what is rain ?")["input_ids"][0] != tokenizer.unk_token_id


@pytest.mark.parametrize("lora", [True, False], ids=["with_lora", "without_lora"])
def test_dpo_from_an_sft_adapter_folder_starts_from_the_sft_model(workdir, sft_adapter,
                                                                  tmp_path, capsys, lora):
    """Before: with ``lora:`` DPO started from the base (the SFT adapter replaced), exit 0;
    without, "element 0 of tensors does not require grad". A learning rate of 1e-12 keeps the
    trained model equal to its start, so the result must be the SFT model, not the base."""
    out = tmp_path / "dpo"
    extra = ["lora.r=4"] if lora else []
    code = recipes.main([str(REPO_ROOT / "recipes" / "dpo.yaml"), "--model", str(sft_adapter),
                         "--data", str(workdir / "pairs.jsonl"), "--output", str(out), *TINY,
                         "train.max_steps=1", "train.lr=1e-12", *extra])
    assert code == 0
    history = json.loads((out / "history.json").read_text())
    assert history[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == ref
    want = _logits(_peft_merged(sft_adapter, workdir / "base"))
    if lora:  # a new adapter whose base is the SFT adapter folder: the chain loads back
        from rlcourse.adapters import load_lora

        torch.testing.assert_close(_logits(load_lora(out / "model", device="cpu")[0]), want,
                                   atol=1e-4, rtol=0)
        config = json.loads((out / "model" / "adapter_config.json").read_text())
        assert Path(config["base_model_name_or_path"]) == sft_adapter.resolve()
    trained, _ = load_model(out / "model", device="cpu")
    torch.testing.assert_close(_logits(trained), want, atol=1e-4, rtol=0)
    assert "merged into the base" in capsys.readouterr().err


# ------------------------------------------------------------------------ reward model format
def _old_format(rm: RewardModel, tokenizer, path: Path) -> None:
    """The format written before (causal LM + reward_head.safetensors), written out here."""
    from safetensors.torch import save_file

    path.mkdir()
    rm.model.save_pretrained(path)
    save_file({k: v.detach().contiguous() for k, v in rm.head.state_dict().items()},
              str(path / "reward_head.safetensors"))
    (path / "rlcourse_head.json").write_text(json.dumps({"kind": "reward"}))
    tokenizer.save_pretrained(path)


def test_reward_model_is_saved_as_a_sequence_classifier_with_its_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = build_tokenizer(WORDS)
    rm = RewardModel.build(tok, n_layers=1, hidden_size=32, n_heads=2, seed=3).eval()
    enc = encode_prompt_completion(tok, [p["prompt"] for p in PAIRS],
                                   [p["rejected"] for p in PAIRS], 32)  # right-padded
    with torch.no_grad():
        want = rm(enc["input_ids"], enc["attention_mask"])
    save_model(rm, tok, tmp_path / "rm")
    assert not (tmp_path / "rm" / "reward_head.safetensors").exists()
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert classifier.config.num_labels == 1 and classifier.config.pad_token_id == 0
    assert type(classifier).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        theirs = classifier(input_ids=enc["input_ids"],
                            attention_mask=enc["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(theirs, want, atol=1e-5, rtol=0)
    again = RewardModel.from_pretrained(tmp_path / "rm", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again(enc["input_ids"], enc["attention_mask"]), want,
                                   atol=1e-6, rtol=0)
    assert load_tokenizer(tmp_path / "rm")("rain is wet")["input_ids"] == \
        tok("rain is wet")["input_ids"]


def test_reward_model_in_the_older_format_still_loads_with_its_bias(tmp_path):
    tok = build_tokenizer(WORDS)
    rm = RewardModel.build(tok, n_layers=1, hidden_size=32, n_heads=2, seed=4).eval()
    with torch.no_grad():
        rm.head.bias.fill_(0.75)
    _old_format(rm, tok, tmp_path / "old")
    enc = encode_prompt_completion(tok, ["what is rain ?"], ["rain is wet ."], 32)
    with torch.no_grad():
        want = rm(enc["input_ids"], enc["attention_mask"])
        got = RewardModel.from_pretrained(tmp_path / "old", device="cpu")(
            enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="bias"):  # the new format cannot carry it
        save_model(rm, tok, tmp_path / "new")


def test_a_trained_reward_model_loads_in_transformers_with_the_same_scores(workdir, tmp_path):
    """Before: the bias, whose true gradient is 0, random-walked under Adam (round-off of
    +g - g amplified to steps of lr), so no bias-free classifier could give the same scores."""
    from transformers import AutoModelForSequenceClassification

    from rlcourse.engine import TrainConfig
    from rlcourse.reward_model import train_reward_model

    model, tok = load_model(workdir / "base", device="cpu")
    config = TrainConfig(max_steps=4, batch_size=2, lr=1e-2, warmup_steps=0, progress=False,
                         device="cpu")
    rm, _ = train_reward_model(model, tok, PAIRS, config, max_length=32)
    assert float(rm.head.bias.abs().max()) == 0.0
    save_model(rm, tok, tmp_path / "rm")
    enc = encode_prompt_completion(tok, [p["prompt"] for p in PAIRS],
                                   [p["chosen"] for p in PAIRS], 32)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        theirs = classifier(input_ids=enc["input_ids"],
                            attention_mask=enc["attention_mask"]).logits.squeeze(-1)
        ours = rm.eval()(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


# ------------------------------------------------------------- a reward model reads its own text
def _two_vocabularies(tmp_path):
    """A policy tokenizer and a reward model whose tokenizer numbers the same words otherwise
    (extra words sort first, shifting every id)."""
    policy_tok = build_tokenizer(WORDS)
    rm_tok = build_tokenizer(WORDS + ["aardvark abacus abbey able about above"])
    assert rm_tok("rain is wet")["input_ids"] != policy_tok("rain is wet")["input_ids"]
    rm = RewardModel.build(rm_tok, n_layers=1, hidden_size=32, n_heads=2, seed=5).eval()
    save_model(rm, rm_tok, tmp_path / "rm")
    recipe = SimpleNamespace(reward_fn=None, reward_model=str(tmp_path / "rm"), dtype=None,
                             trust_remote_code=False)
    return policy_tok, rm_tok, rm, recipe


def test_reward_model_as_a_reward_reads_text_with_its_own_tokenizer(tmp_path):
    from rlcourse.recipes.rewards import reward_function
    from rlcourse.reward_model import score_texts

    policy_tok, rm_tok, rm, recipe = _two_vocabularies(tmp_path)
    prompts = [p["prompt"] for p in PAIRS]
    answers = [p["chosen"] for p in PAIRS]
    want = score_texts(rm, rm_tok, prompts, answers).double().numpy()
    wrong = score_texts(rm, policy_tok, prompts, answers).double().numpy()
    assert abs(want - wrong).max() > 1e-3  # the vocabularies really differ
    got = reward_function(recipe, policy_tok, "cpu")(prompts, answers)
    assert abs(got - want).max() < 1e-5


def test_ppo_reward_model_scores_the_sampled_text_not_the_policys_ids(workdir, tmp_path,
                                                                       monkeypatch):
    from rlcourse import ppo
    from rlcourse.reward_model import score_texts

    policy_tok = load_tokenizer(workdir / "base")
    _, rm_tok, rm, _ = _two_vocabularies(tmp_path)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p["prompt"]} for p in PAIRS])
    seen = {}

    def one_sample(policy, reference, reward_fn, sample_fn, *args, **kwargs):
        batch = sample_fn(ppo.language_model(policy), torch.Generator().manual_seed(0))
        seen["scores"] = reward_fn(batch["input_ids"], batch["attention_mask"],
                                   batch["completion_mask"])
        seen["batch"] = batch
        return []

    monkeypatch.setattr(ppo, "train_ppo", one_sample)
    assert recipes.main([str(REPO_ROOT / "recipes" / "ppo.yaml"), "--model",
                         str(workdir / "base"), "--reward-model", str(tmp_path / "rm"),
                         "--data", str(tmp_path / "prompts.jsonl"), "--output",
                         str(tmp_path / "o"), "rollout.steps=1", "rollout.batch_size=2",
                         "rollout.max_new_tokens=4", "rollout.device=cpu"]) == 0
    batch = seen["batch"]
    want = score_texts(rm, rm_tok, batch["prompts"], batch["texts"])
    torch.testing.assert_close(seen["scores"].float(), want, atol=1e-5, rtol=0)
    assert policy_tok is not None


# ------------------------------------------------------------------------------- truncation
def test_pairs_identical_after_truncation_are_dropped_with_a_count(tmp_path):
    tok = build_tokenizer(WORDS + ["x y"])
    rows = [{"prompt": "what is rain ?", "chosen": "rain is wet . x",
             "rejected": "rain is wet . y"},
            {"prompt": "what is snow ?", "chosen": "snow is cold .", "rejected": "snow is hot ."}]
    write_jsonl(tmp_path / "p.jsonl", rows)
    pairs = load_preferences(tmp_path / "p.jsonl")
    # "<bos> <user> what is rain ? <assistant>" = 7 tokens, + "rain is wet ." = 11: the cut at
    # 11 removes x / y and EOS, so the first pair's two sides are the same 11 tokens.
    with pytest.warns(UserWarning, match=rf"{re.escape(str(tmp_path / 'p.jsonl'))}: 1 of 2 "
                      r"pairs have chosen == rejected after truncation to max_length=11 "
                      rf"\({re.escape(str(tmp_path / 'p.jsonl'))}:1\).*dropped"):
        items = tokenize_preferences(tok, pairs, 11, truncation="right")
    assert len(items) == 1
    assert tok.decode(items[0]["chosen_input_ids"][7:]).startswith("snow is cold")
    with pytest.raises(DataError, match="2 of 2 pairs .* every pair"):
        tokenize_preferences(tok, [pairs[0], pairs[0]], 11, truncation="right")


def test_reward_model_honours_truncation(workdir, tmp_path):
    from rlcourse.engine import TrainConfig
    from rlcourse.reward_model import train_reward_model

    model, tok = load_model(workdir / "base", device="cpu")
    config = TrainConfig(max_steps=1, batch_size=2, progress=False, device="cpu")
    with pytest.raises(DataError, match="exceeds max_length=8"):
        train_reward_model(model, tok, PAIRS, config, max_length=8, truncation="error")
    out = tmp_path / "rm"
    code = recipes.main([str(REPO_ROOT / "recipes" / "reward_model.yaml"), "--model",
                         str(workdir / "base"), "--data", str(workdir / "pairs.jsonl"),
                         "--output", str(out), *TINY, "train.max_steps=1", "max_length=8",
                         "truncation=error"])
    assert code == 2  # before: the recipe's truncation was ignored and the pairs cut silently


# ------------------------------------------------------------------------ no chat template
def test_without_a_chat_template_prompt_and_completion_are_concatenated_as_given():
    base_tok = build_tokenizer(WORDS, chat_template=False)
    enc = encode_prompt_completion(base_tok, ["what is rain ?"], ["rain is wet ."], 32)
    ids = enc["input_ids"][0, :int(enc["attention_mask"][0].sum())].tolist()
    words = base_tok("what is rain ? rain is wet .", add_special_tokens=False)["input_ids"]
    assert ids == words + [base_tok.eos_token_id]  # no <bos> <user> ... <assistant> markup
    assert enc["completion_mask"][0].tolist()[:len(ids)] == [0] * 4 + [1] * 5
    book_tok = build_tokenizer(WORDS)  # the book's tokenizer keeps its format
    enc = encode_prompt_completion(book_tok, ["what is rain ?"], ["rain is wet ."], 32)
    assert enc["input_ids"][0, :3].tolist() == [2, 4] + words[:1]
    assert int(enc["input_ids"][0, 6]) == 5  # <assistant>


def test_without_a_chat_template_the_tokenizers_own_bos_leads_and_sampling_agrees():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    word_tok = build_tokenizer(WORDS, chat_template=False)
    backend = word_tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(  # as Llama's tokenizer: BOS first
        single="<bos> $A", special_tokens=[("<bos>", 2)])
    llama_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                         eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    assert llama_like("rain")["input_ids"][0] == 2
    enc = encode_prompt_completion(llama_like, ["what is rain ?"], ["rain is wet ."], 32)
    words = word_tok("what is rain ?", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][0, :5].tolist() == [2] + words  # one BOS, then the text as given
    model = build_model(word_tok, n_layers=1, hidden_size=16, n_heads=2, seed=0)
    gen = generate(model, llama_like, ["what is rain ?"], max_new_tokens=1, seed=0)
    assert gen.prompt_ids[0].tolist() == [2] + words  # sampling sees what training sees


# ---------------------------------------------------------------------- TRL's other row forms
def test_trl_messages_rows_train_as_prompt_and_last_answer(tmp_path):
    conversation = [{"role": "user", "content": "what is rain ?"},
                    {"role": "assistant", "content": "rain is wet ."}]
    write_jsonl(tmp_path / "m.jsonl", [{"messages": conversation}])
    rows = load_sft(tmp_path / "m.jsonl")
    assert rows[0]["prompt"] == conversation[:1] and rows[0]["completion"] == conversation[1:]
    tok = build_tokenizer(WORDS)
    explicit = tokenize_sft(tok, [{"prompt": conversation[:1], "completion": conversation[1:]}], 32)
    for key in ("input_ids", "completion_mask"):
        assert torch.equal(tokenize_sft(tok, rows, 32)[0][key], explicit[0][key])
        assert torch.equal(tokenize_sft(tok, [{"messages": conversation}], 32)[0][key],
                           explicit[0][key])
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": conversation[:1]}])
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'bad.jsonl'))}:1: field "
                       "'messages' must end with the assistant's answer"):
        load_sft(tmp_path / "bad.jsonl")


def test_trl_implicit_prompt_preferences_are_read(tmp_path):
    user = {"role": "user", "content": "what is rain ?"}
    write_jsonl(tmp_path / "c.jsonl", [
        {"chosen": [user, {"role": "assistant", "content": "rain is wet ."}],
         "rejected": [user, {"role": "assistant", "content": "rain is dry ."}]}])
    row = load_preferences(tmp_path / "c.jsonl")[0]
    assert row["prompt"] == [user]
    assert row["chosen"] == [{"role": "assistant", "content": "rain is wet ."}]
    assert row["rejected"] == [{"role": "assistant", "content": "rain is dry ."}]
    write_jsonl(tmp_path / "t.jsonl", [{"chosen": "what is rain ? rain is wet .",
                                        "rejected": "what is rain ? rain is dry ."}])
    row = load_preferences(tmp_path / "t.jsonl")[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == (
        "what is rain ? rain is", " wet .", " dry .")
    write_jsonl(tmp_path / "n.jsonl", [{"chosen": "rain is wet .", "rejected": "snow ."}])
    with pytest.raises(DataError, match=r"n\.jsonl:1: no 'prompt'"):
        load_preferences(tmp_path / "n.jsonl")


# ------------------------------------------------------------------------------ command line
def test_help_lists_every_method_and_points_to_the_reference(capsys):
    with pytest.raises(SystemExit):
        recipes.main(["--help"])
    text = capsys.readouterr().out
    for name, row in recipes.methods().items():
        assert re.search(rf"^  {name} +{re.escape(row.summary[:30])}", text, re.M), name
    assert "REFERENCE.md" in text and "rlcourse-train" in text


def test_rlcourse_train_is_a_console_command_with_the_recipes_as_package_data():
    import tomllib

    from rlcourse.recipes.cli import RECIPES_DIR

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["rlcourse-train"] == "rlcourse.recipes.cli:main"
    data = project["tool"]["setuptools"]["package-data"]["rlcourse.recipes"]
    assert "recipe_files/*.yaml" in data and "recipe_files/REFERENCE.md" in data
    packaged = REPO_ROOT / "rlcourse" / "recipes" / "recipe_files"
    shipped = sorted(p.name for p in (REPO_ROOT / "recipes").glob("*.yaml"))
    assert sorted(p.name for p in packaged.glob("*.yaml")) == shipped
    assert sorted(p.name for p in RECIPES_DIR.glob("*.yaml")) == shipped


def test_a_method_name_finds_its_shipped_recipe_from_any_directory(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["dpo", "--dry-run"], ["--recipe", "dpo", "train.lr=1e-3", "--dry-run"]):
        assert recipes.main(argv) == 0
        resolved = json.loads(capsys.readouterr().out)
        assert resolved["method"] == "dpo"
        assert Path(resolved["source"]).resolve() == (REPO_ROOT / "recipes" / "dpo.yaml").resolve()
    assert resolved["train"]["lr"] == 1e-3
    assert recipes.main(["no_such_method"]) == 2
    assert "not the name of a method" in capsys.readouterr().err


# ------------------------------------------------------------------------------ Hub ids
def test_hub_ids_are_refused_at_once_offline_everywhere(monkeypatch, tmp_path):
    import transformers

    from rlcourse.models import ValueHeadModel
    from rlcourse.recipes.rewards import reward_function

    def no_network(*args, **kwargs):
        raise AssertionError("from_pretrained was called with a Hub id")

    for cls in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoTokenizer",
                "AutoModel"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", no_network)
    start = time.monotonic()
    for load in (lambda: load_model("someorg/some-model"),
                 lambda: load_tokenizer("someorg/some-model"),
                 lambda: RewardModel.from_pretrained("someorg/some-rm"),
                 lambda: ValueHeadModel.from_pretrained("someorg/some-model"),
                 lambda: reward_function(SimpleNamespace(
                     reward_fn=None, reward_model="someorg/some-rm", dtype=None,
                     trust_remote_code=False), None, "cpu")):
        with pytest.raises(FileNotFoundError, match="never contacts the Hugging Face Hub"):
            load()
    assert time.monotonic() - start < 5.0
    for key in ("model", "reward_model", "reference_model"):
        method = "grpo" if key == "reward_model" else "dpo"
        text = f"method: {method}\nmodel: m\ndata: d\nprompts: p\noutput: o\n" \
               f"{key}: someorg/some-model\n".replace("model: m\n", "", key == "model")
        text = "\n".join(line for line in text.splitlines()
                         if not (method == "dpo" and line.startswith("prompts"))
                         and not (method == "grpo" and line.startswith("data")))
        with pytest.raises(recipes.RecipeError, match=rf"^<recipe>:\d+: {key}: .*Hub"):
            recipes.load_recipe(text=text)
