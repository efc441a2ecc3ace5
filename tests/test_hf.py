"""Hugging Face GPT-2 folders (`distpg.hf`): a random GPT-2 saved by transformers loads into distpg with the
same logits and greedy continuation, its tokenizer.json encodes and decodes as the `tokenizers` reference does,
a distpg policy exported as a folder opens in transformers with the same logits, and a training run that starts
from such a folder works end to end through `distpg train`.

The tokenizer is a GPT-2-style byte-level BPE trained in the test on a few strings (no download; a small
vocabulary keeps the output layer light), with <|endoftext|> as eos. Weights are drawn larger than GPT-2's
init (`randomize_parameters`) so logits spread over several units and the 1e-4 tolerance is tight.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from distpg.config import ConfigError, ModelConfig, config_from_dict, load_config
from distpg.examples.make_tiny_gpt2 import EOT, byte_level_bpe
from distpg.generate import SamplingParams, generate
from distpg.hf import export_gpt2, load_gpt2, load_tokenizer, read_shape
from distpg.learner import Learner
from distpg.model import ModelShape, build_model
from distpg.rollout import RolloutWorker
from distpg.tokenizer import CharTokenizer, HFTokenizer
from tests.conftest import randomize_parameters

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [
    "Repeat the word: river\nAnswer: river",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, 東京 and 🚀 rockets; tabs\tand  double  spaces\n\nnew lines",
    "def f(x):\n    return x ** 2  # squares",
] * 4
SAMPLES = ["", " ", "river", " river", "Hello, world!", "Unseen wörds ✓ 🚀\n\n  trailing  ", "a\tb\r\nc", EOT + "x"]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    return byte_level_bpe(TEXTS, vocab_size=400)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, bpe) -> tuple[Path, GPT2LMHeadModel]:
    """A random GPT2LMHeadModel and its tokenizer, saved by transformers."""
    folder = tmp_path_factory.mktemp("hf-gpt2")
    config = GPT2Config(vocab_size=bpe.vocab_size, n_layer=2, n_head=4, n_embd=64, n_positions=48,
                        bos_token_id=bpe.eos_id, eos_token_id=bpe.eos_id, attn_implementation="eager")
    hf = GPT2LMHeadModel(config)
    randomize_parameters(hf, seed=0, scale=0.2)
    hf.eval()
    hf.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=bpe.tokenizer, eos_token=EOT).save_pretrained(folder)
    return folder, hf


# ---------------------------------------------------------------- loading a transformers GPT-2


def test_logits_match_transformers(hf_folder):
    folder, hf = hf_folder
    ours = load_gpt2(folder)
    assert ours.shape == ModelShape(vocab_size=hf.config.vocab_size, n_layer=2, n_head=4, n_embd=64, n_positions=48)
    idx = torch.randint(hf.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = hf(idx).logits, ours(idx)
    assert got.dtype == torch.float32 and expected.std() > 1.0
    assert (got - expected).abs().max().item() < 1e-4


def test_greedy_continuation_matches_transformers(hf_folder):
    folder, hf = hf_folder
    ours, tok = load_gpt2(folder), load_tokenizer(folder)
    prompts = [tok.encode(t) for t in ("Repeat the word:", "The quick brown fox", "naïve 🚀")]
    n_new = 10
    # distpg decodes the three prompts as one left-padded batch on the KV cache; HF decodes each alone
    got = generate(ours, prompts, SamplingParams(max_new_tokens=n_new, temperature=0.0),
                   torch.Generator().manual_seed(0)).rows()
    assert len({tuple(r) for r in got}) == 3  # the prompts lead to different continuations
    for prompt, row in zip(prompts, got):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new,
                              eos_token_id=None, pad_token_id=tok.pad_id)
        assert row == out[0, len(prompt):].tolist()


def test_tokenizer_matches_the_tokenizers_reference(hf_folder):
    folder, _ = hf_folder
    ours = load_tokenizer(folder)
    reference = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = reference.token_to_id(EOT)
    assert ours.eos_id == ours.pad_id == eos  # GPT-2 has no pad token: padding reuses eos (always masked)
    assert ours.vocab_size == reference.get_vocab_size()
    for text in SAMPLES + TEXTS[:4]:
        ids = ours.encode(text)
        assert ids == reference.encode(text).ids, text
        if EOT not in text:
            assert ours.decode(ids) == reference.decode(ids) == text  # byte-level BPE: an exact round trip
    ids = ours.encode("river") + [eos] + ours.encode(" lake")
    assert ours.decode(ids) == "river"  # a completion ends at eos
    # a config whose pad_token_id is an ordinary token: the completion's text keeps that token
    e = reference.token_to_id("e")
    padded = HFTokenizer(reference, eos, pad_id=e)
    assert padded.decode(padded.encode("green tree")) == "green tree"


def test_hub_style_names_load_too(hf_folder, tmp_path):
    """The Hub's `gpt2` stores GPT2Model names (no `transformer.` prefix), each layer's causal-mask buffer
    `h.N.attn.bias`, and sometimes an explicit (tied) `lm_head.weight`."""
    folder, hf = hf_folder
    state = load_file(str(folder / "model.safetensors"))
    hub = {k.removeprefix("transformer."): v for k, v in state.items()}
    P = hf.config.n_positions
    for i in range(hf.config.n_layer):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
    hub["lm_head.weight"] = hub["wte.weight"].clone()
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    save_file(hub, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    a, b = load_gpt2(folder), load_gpt2(tmp_path)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name

    hub["lm_head.weight"] = hub["lm_head.weight"] + 1  # an untied output layer: not GPT-2 as distpg has it
    save_file(hub, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        load_gpt2(tmp_path)


def test_a_sharded_checkpoint_loads_with_the_logits_of_transformers(hf_folder, tmp_path):
    """save_pretrained(max_shard_size=...) (a large model's default) writes model.safetensors.index.json and
    the shards it names: distpg loads them as transformers does, with the same logits."""
    folder, hf = hf_folder
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    (sharded / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    assert not (sharded / "model.safetensors").exists() and len(list(sharded.glob("model-*.safetensors"))) > 2
    assert read_shape(sharded) == read_shape(folder)
    ours = load_gpt2(sharded)
    idx = torch.randint(hf.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = _transformers_logits(sharded, idx), ours(idx)
    assert expected.std() > 1.0 and (got - expected).abs().max().item() < 1e-4
    for (name, p), q in zip(load_gpt2(folder).state_dict().items(), ours.state_dict().values()):
        assert torch.equal(p, q), name
    assert ModelConfig(init_from=str(sharded)).n_layer == 2


def test_an_untied_output_layer_in_another_shard_is_refused(hf_folder, tmp_path):
    folder, _ = hf_folder
    state = load_file(str(folder / "model.safetensors"))
    head = {"lm_head.weight": state["transformer.wte.weight"] + 1}
    save_file(state, str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(head, str(tmp_path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {**{n: "model-00001-of-00002.safetensors" for n in state},
                  "lm_head.weight": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        read_shape(tmp_path)
    head["lm_head.weight"] = state["transformer.wte.weight"]
    save_file(head, str(tmp_path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    assert read_shape(tmp_path).n_layer == 2


# ---------------------------------------------------------------- exporting a distpg policy


def _policy(vocab_size: int, seed: int = 3):
    model = build_model(ModelShape(vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=64, n_positions=40), seed)
    randomize_parameters(model, seed=seed, scale=0.2)
    return model.eval()


def _transformers_logits(folder: Path, idx: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert isinstance(hf, GPT2LMHeadModel)
    with torch.no_grad():
        return hf(idx).logits


def test_export_opens_in_transformers_with_the_same_logits(bpe, tmp_path):
    model = _policy(bpe.vocab_size)
    export_gpt2(model, bpe, tmp_path / "out")
    idx = torch.randint(bpe.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
    assert ours.std() > 1.0
    assert (_transformers_logits(tmp_path / "out", idx) - ours).abs().max().item() < 1e-4
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in SAMPLES[:-1]:
        assert hf_tok(text)["input_ids"] == bpe.encode(text)
    assert hf_tok.eos_token_id == bpe.eos_id
    # and back into distpg: the very same parameters and tokenizer
    again = load_gpt2(tmp_path / "out")
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert load_tokenizer(tmp_path / "out").encode(SAMPLES[5]) == bpe.encode(SAMPLES[5])


def test_an_export_interrupted_midway_leaves_no_half_written_folder(bpe, tmp_path, monkeypatch):
    """Ctrl-C while a large policy is being written: OUT is not left holding some of the files (which a later
    `distpg export` to it would refuse as not empty, and transformers would half-load)."""
    import distpg.hf

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(distpg.hf, "same_mode_as", interrupt)  # after model.safetensors and config.json
    with pytest.raises(KeyboardInterrupt):
        export_gpt2(_policy(bpe.vocab_size), bpe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # an empty folder given as OUT is filled
    monkeypatch.undo()
    export_gpt2(_policy(bpe.vocab_size), bpe, tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert {p.name for p in (tmp_path / "empty").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_export_of_a_char_tokenizer_policy(tmp_path):
    chars = CharTokenizer("abcdef= \n")
    model = _policy(chars.vocab_size)
    export_gpt2(model, chars, tmp_path)
    idx = torch.randint(chars.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (_transformers_logits(tmp_path, idx) - model(idx)).abs().max().item() < 1e-4
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.pad_id, loaded.eos_id) == (chars.pad_id, chars.eos_id) == (hf_tok.pad_token_id, hf_tok.eos_token_id)
    for text in ("abc=", "f e d\n", ""):
        ids = chars.encode(text)
        assert reference.encode(text).ids == hf_tok(text)["input_ids"] == loaded.encode(text) == ids
        assert loaded.decode(ids + [chars.eos_id, 2]) == hf_tok.decode(ids) == text
    # trained on from there: a task over the same characters starts; one with others is refused before Ray
    from distpg.orchestrator import validate_with_task
    from distpg.policy import task_for

    cfg = config_from_dict({"model": {"init_from": str(tmp_path)}, "task": {"name": "reverse", "length": 4}})
    validate_with_task(cfg, task_for(cfg))
    cfg = config_from_dict({"model": {"init_from": str(tmp_path)}, "task": {"name": "addition"}})
    with pytest.raises(ConfigError, match=r"model.init_from=.*: its tokenizer cannot encode task 'addition'"):
        validate_with_task(cfg, task_for(cfg))
    # too long for the checkpoint's positions: the error names the checkpoint's n_positions, which the user cannot
    # raise (it said "model.n_positions=64", a field that init_from fixes), and what can be lowered instead
    cfg = config_from_dict({"model": {"init_from": str(tmp_path)}, "task": {"name": "reverse", "length": 40}})
    with pytest.raises(ConfigError, match=r"model.init_from=.* has n_positions=40 \(its config.json's; a "
                                          r"checkpoint's positions cannot grow\) is too short for task 'reverse': "
                                          r".*; or lower rollout.max_new_tokens \(now 40\)$"):
        validate_with_task(cfg, task_for(cfg))


class _Greek:
    """A user's CharTask over letters a byte-level BPE writes in two tokens each (as the README's Palindrome)."""

    @staticmethod
    def make(cfg):
        from distpg.tasks import CharTask

        class Palindrome(CharTask):
            name, charset, max_prompt_len, max_new_tokens, num_prompts = "greek", "αβγ=", 5, 4, 81

            def random_prompt(self, rng):
                return "".join("αβγ"[i] for i in rng.integers(0, 3, 4)) + "="

            def target(self, prompt):
                return prompt[:-1][::-1]

        return Palindrome(cfg)


def test_a_character_tasks_budgets_are_counted_in_the_checkpoints_tokens(bpe, monkeypatch, capsys):
    """A task over an alphabet counts its prompt length and answer budget in characters; with a checkpoint's
    tokenizer that writes a character in two tokens, the answer must still fit the completion budget (it got
    4 tokens for 4 two-token letters: a perfect answer could not be sampled) and the n_positions check must
    count the prompt's tokens. An ASCII task keeps its budgets; a tokenizer that adds a BOS adds one."""
    from distpg.config import TaskConfig
    from distpg.orchestrator import validate_with_task
    from distpg.tasks import make_task

    monkeypatch.setitem(sys.modules, "greek_task", _Greek)
    task = make_task(TaskConfig(name="greek_task:make", num_eval=8), bpe)
    assert (task.max_prompt_len, task.max_new_tokens) == (10, 8)
    for prompt in task.eval_prompts():
        assert len(bpe.encode(prompt)) <= task.max_prompt_len
        assert len(bpe.encode(task.target(prompt))) <= task.max_new_tokens
    assert make_task(TaskConfig(name="greek_task:make", num_eval=8)).max_new_tokens == 4  # its own characters
    reverse = make_task(TaskConfig(name="reverse", length=5), bpe)
    assert (reverse.max_prompt_len, reverse.max_new_tokens) == (6, 5) and not hasattr(reverse, "token_budget")

    bos = tokenizers.Tokenizer.from_str(bpe.tokenizer.to_str())  # as GPT2Tokenizer(add_bos_token=True) saves it
    bos.post_processor = tokenizers.processors.TemplateProcessing(single=f"{EOT} $A",
                                                                  special_tokens=[(EOT, bpe.eos_id)])
    with_bos = HFTokenizer(bos, bpe.eos_id)
    reverse = make_task(TaskConfig(name="reverse", length=5), with_bos)
    assert (reverse.max_prompt_len, reverse.max_new_tokens) == (7, 5)
    assert max(len(with_bos.encode(p)) for p in reverse.eval_prompts()) <= 7

    cfg = config_from_dict({"task": {"name": "greek_task:make", "num_eval": 8}, "model": {"n_positions": 64}})
    capsys.readouterr()
    validate_with_task(cfg, task)
    assert "task 'greek' counts characters, and model.init_from's tokenizer writes one of its characters in up " \
           "to 2 token(s): prompts of up to 5 characters are taken as up to 10 tokens, and completions get 8 " \
           "tokens for 4 characters" in capsys.readouterr().out
    cfg = config_from_dict({"task": {"name": "greek_task:make", "num_eval": 8}, "model": {"n_positions": 16}})
    with pytest.raises(ConfigError, match=r"model.n_positions=16 is too short .* prompts of up to 10 tokens plus 8 "
                                          r"new tokens need 18"):
        validate_with_task(cfg, task)


@pytest.mark.parametrize("key", ["eos_token_id", "pad_token_id"])
def test_an_end_token_id_outside_the_vocabulary_names_config_json(hf_folder, tmp_path, key):
    # a small GPT2Config(vocab_size=400) keeps GPT-2's eos_token_id=50256 unless told otherwise: the error
    # names config.json's field and the tokenizer's <|endoftext|> id, not only "tokenizer: eos id 50256"
    from distpg.policy import task_for

    folder, _ = hf_folder
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, key: 50256}))
    eot = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(EOT)
    message = (rf"config.json': {key}=50256 is outside the vocabulary of tokenizer.json \(\d+ tokens\); set it to "
               rf"your tokenizer's end-of-text id \(<\|endoftext\|> is {eot}\)")
    with pytest.raises(ValueError, match=message) as e:
        load_tokenizer(tmp_path)
    assert (f"GPT2Config(..., {key}=ID" if key == "pad_token_id" else "eos_token_id=ID") in str(e.value)
    run = config_from_dict({"model": {"init_from": str(tmp_path)}, "task": {"name": "reverse", "length": 4}})
    with pytest.raises(ConfigError, match=r"model.init_from=.*" + message):
        task_for(run)


def _copy_folder(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_the_eos_of_a_tokenizer_config_is_named_when_config_json_has_gpt2s(bpe, tmp_path):
    """A tokenizer whose end of text is not <|endoftext|> ('</s>'), saved beside GPT2Config()'s default
    eos_token_id=50256: the error says which id to set, from tokenizer_config.json's eos_token."""
    tok = tokenizers.Tokenizer.from_str(bpe.tokenizer.to_str())
    tok.add_special_tokens(["</s>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_head=2, n_embd=16,
                               n_positions=16)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"eos_token_id=50256 is outside the vocabulary of tokenizer.json "
                                         rf"\(\d+ tokens\); set it to your tokenizer's end-of-text id "
                                         rf"\(tokenizer_config.json's eos_token '</s>' is {tokenizer.eos_token_id}\)"):
        load_tokenizer(tmp_path)


def test_a_pad_token_added_without_resizing_the_model_says_how_to_resize(hf_folder, tmp_path):
    folder = _copy_folder(hf_folder[0], tmp_path / "padded")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model only \d+ \(config.json vocab_size\): "
                                         r"tokens added .* model.resize_token_embeddings\(len\(tokenizer\)\)"):
        load_tokenizer(folder)
    # resized as it says (config.json without a pad_token_id, as transformers leaves it): the pad is the added
    # token, as `tokenizer.pad_token_id` says, and an export names it in config.json too (it named eos there
    # while its tokenizer_config.json said <pad>)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text()).get("pad_token_id") is None
    loaded = load_tokenizer(folder)
    assert loaded.pad_id == tokenizer.pad_token_id != loaded.eos_id
    out = export_gpt2(load_gpt2(folder), loaded, tmp_path / "out", [folder / "tokenizer_config.json"])
    again = AutoTokenizer.from_pretrained(out)
    assert again.pad_token == "<pad>" and json.loads((out / "config.json").read_text())["pad_token_id"] == \
        again.pad_token_id == tokenizer.pad_token_id


def test_every_end_of_text_token_a_folder_names_ends_a_completion(hf_folder, tmp_path, capsys):
    """transformers' generate stops at each id that generation_config.json's (or config.json's) eos_token_id
    lists, TRL at tokenizer_config.json's eos_token: distpg's sampler stops at all of them (it sampled on through
    all but config.json's first, with a warning), decoding cuts the text there, `distpg train` names them, and
    an export lists them in its config.json."""
    from distpg.hf import end_tokens_note
    from distpg.orchestrator import validate_with_task
    from distpg.policy import task_for
    from distpg.rollout import sampling_params

    folder, _ = hf_folder
    assert end_tokens_note(folder) is None  # as transformers saves a GPT-2: all agree
    eot = load_tokenizer(folder).eos_id
    listed = _copy_folder(folder, tmp_path / "listed")
    twice = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("Ġriver")
    gen = json.loads((listed / "generation_config.json").read_text())
    (listed / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eot, twice]}))
    tok = load_tokenizer(listed)
    assert (tok.eos_id, tok.stop_ids) == (eot, (eot, twice))
    ids = tok.encode(" the river flows")
    assert twice in ids and tok.decode(ids) == " the"
    note = end_tokens_note(listed)
    assert note == (f"model.init_from={str(listed)!r}: a completion ends at any of {eot} ('<|endoftext|>', "
                    "config.json's eos_token_id and generation_config.json's eos_token_id and tokenizer_config.json's "
                    f"eos_token); {twice} ('Ġriver', generation_config.json's eos_token_id)")
    cfg = config_from_dict({"model": {"init_from": str(listed)}, "task": {"name": "reverse", "length": 4}})
    capsys.readouterr()
    task = task_for(cfg)
    validate_with_task(cfg, task)
    assert capsys.readouterr().out == f"distpg: {note}\n"
    assert sampling_params(cfg, task).stop_token == (eot, twice)
    out = export_gpt2(load_gpt2(listed), tok, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [eot, twice]
    assert load_tokenizer(out).stop_ids == (eot, twice)  # and read back the same

    other = _copy_folder(folder, tmp_path / "other")  # config.json's eos_token_id lists two: the first is eos
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**conf, "eos_token_id": [twice, eot]}))
    assert (load_tokenizer(other).eos_id, load_tokenizer(other).stop_ids) == (twice, (twice, eot))
    (other / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eot, 10**6]}))
    with pytest.raises(ValueError, match=r"generation_config.json's eos_token_id lists 1000000, outside the "
                                         r"vocabulary of tokenizer.json \(\d+ tokens\)"):
        load_tokenizer(other)


# ---------------------------------------------------------------- model.init_from


def test_config_takes_the_shape_from_the_folder(hf_folder):
    folder, _ = hf_folder
    m = ModelConfig(init_from=str(folder))
    assert (m.n_layer, m.n_head, m.n_embd, m.n_positions) == (2, 4, 64, 48)
    assert ModelConfig(init_from=str(folder), n_layer=2, n_positions=48) == m  # the resolved config reloads
    assert ModelConfig().n_positions == 64  # without init_from, as before


@pytest.mark.parametrize(
    "setup,kw,message",
    [
        (None, {}, r"model.init_from='.*nowhere': '.*nowhere' is not a folder"),
        ("rm tokenizer.json", {}, r"lacks tokenizer.json"),
        ("activation", {}, r"activation_function='relu' is not GPT-2 as distpg implements it"),
        ("truncate", {}, r"does not match its config.json \(missing: h.1.attn.c_attn.bias"),
        ("copy", {"n_layer": 3}, r"model.n_layer=3 but model.init_from=.* has n_layer=2; leave model.n_layer null"),
        ("copy", {"n_positions": 64}, r"model.n_positions=64 but .* has n_positions=48"),
        ("untied", {}, r"model.init_from=.*lm_head.weight differs from wte.weight"),
        ("classifier", {}, r"architectures=\['GPT2ForSequenceClassification'\] is not a GPT-2 language model "
                           r"\(allowed: GPT2LMHeadModel, GPT2Model\); a reward model or classifier cannot be the "
                           r"policy"),
        ("bin shards", {}, r"lacks model.safetensors .*; it holds pytorch_model.bin.index.json and distpg reads "
                           r"only safetensors: write model.safetensors with AutoModelForCausalLM.from_pretrained\("),
        ("bad index", {}, r"model.safetensors.index.json' is not a sharded checkpoint's index"),
        ("shard gone", {}, r"model.safetensors.index.json' names 1 file\(s\) the folder lacks: "
                           r"model-00002-of-00002.safetensors"),
        ("bin", {}, r"lacks model.safetensors .*; it holds pytorch_model.bin and distpg reads only safetensors"),
        ("slow tokenizer", {}, r"lacks tokenizer.json .*; it holds vocab.json and merges.txt .*: write tokenizer.json "
                               r"with AutoTokenizer.from_pretrained\('.*copy'\).save_pretrained\('.*copy'\)"),
        ("run folder", {}, r"'.*copy' is a distpg run folder, not a GPT-2 folder: write its policy as one with "
                           r"distpg export .*copy OUT_DIR, then start from OUT_DIR"),
    ],
)
def test_config_errors_name_init_from(hf_folder, tmp_path, setup, kw, message):
    folder, _ = hf_folder
    target = tmp_path / "nowhere"
    if setup is not None:
        target = tmp_path / "copy"
        target.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (target / name).write_bytes((folder / name).read_bytes())
        if setup == "rm tokenizer.json":
            (target / "tokenizer.json").unlink()
        elif setup == "activation":
            cfg = json.loads((target / "config.json").read_text())
            (target / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
        elif setup == "truncate":
            state = load_file(str(target / "model.safetensors"))
            state = {k: v for k, v in state.items() if not k.startswith("transformer.h.1.")}
            save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        elif setup == "untied":  # GPT2LMHeadModel's explicit output layer, not the token embedding
            state = load_file(str(target / "model.safetensors"))
            state["lm_head.weight"] = state["transformer.wte.weight"] + 1
            save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        elif setup == "classifier":  # GPT2ForSequenceClassification (a TRL reward model) saved beside the policy
            cfg = json.loads((target / "config.json").read_text())
            (target / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2ForSequenceClassification"]}))
            state = load_file(str(target / "model.safetensors"))
            state["score.weight"] = state["transformer.wte.weight"][:1].clone()
            save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        elif setup == "bin shards":  # an older transformers' save_pretrained(max_shard_size=...)
            (target / "model.safetensors").rename(target / "pytorch_model-00001-of-00001.bin")
            (target / "pytorch_model.bin.index.json").write_text("{}")
        elif setup == "bad index":
            (target / "model.safetensors").rename(target / "model-00001-of-00001.safetensors")
            (target / "model.safetensors.index.json").write_text("{}")
        elif setup == "shard gone":
            (target / "model.safetensors").rename(target / "model-00001-of-00002.safetensors")
            names = load_file(str(target / "model-00001-of-00002.safetensors"))
            (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
                n: f"model-0000{1 + (n == 'transformer.wte.weight')}-of-00002.safetensors" for n in names}}))
        elif setup == "bin":
            (target / "model.safetensors").rename(target / "pytorch_model.bin")
        elif setup == "run folder":  # a run's folder given as the policy to start from
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                (target / name).unlink()
            (target / "config.yaml").write_text("run: {}\n")
            (target / "checkpoints").mkdir()
        elif setup == "slow tokenizer":
            (target / "tokenizer.json").unlink()
            (target / "vocab.json").write_text("{}")
            (target / "merges.txt").write_text("")
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": {"init_from": str(target), **kw}})
    with pytest.raises(ConfigError, match="model.init_from=''"):
        ModelConfig(init_from="")


def test_learner_and_workers_start_from_the_folder(hf_folder, tmp_path):
    """No Ray: the learner and a rollout worker built from one config hold the folder's weights and
    tokenizer, sample prompts from a file and take an update."""
    folder, _ = hf_folder
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Repeat the word: {w}\nAnswer:", "reference": w}) + "\n"
                               for w in ("river", "fox", "dog", "lazy", "quick", "brown")))
    cfg = config_from_dict({
        "task": {"name": "prompts", "prompts_path": str(prompts), "num_eval": 2,
                 "reward": "distpg.examples.rewards:match_reference"},
        "model": {"init_from": str(folder)},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "num_workers": 1, "max_new_tokens": 6},
    })
    learner, worker = Learner(cfg), RolloutWorker(cfg, worker_id=0)
    reference = load_gpt2(folder).state_dict()
    for model in (learner.model, worker.model):
        for name, p in model.state_dict().items():
            assert torch.equal(p, reference[name]), name
    assert isinstance(worker.tokenizer, HFTokenizer) and worker.tokenizer.eos_id == load_tokenizer(folder).eos_id
    worker.set_weights(learner.get_weights())
    batch = worker.sample(["Repeat the word: river\nAnswer:", "Repeat the word: fox\nAnswer:"], [0, 1], seed=0)
    assert batch.num_rows == 4 and all(batch.column("reward_ok").to_pylist())
    metrics, weights = learner.update(batch)
    assert weights.version == 1 and all(v == v for v in metrics.values() if isinstance(v, float))


def test_export_of_a_run_keeps_the_tokenizer_files_of_its_init_from_folder(hf_folder, tmp_path, capsys,
                                                                          monkeypatch):
    """A chat template, special tokens and the tokenizer's class, as the folder the run started from holds them
    (what TRL's save_pretrained of the tokenizer would keep), come out of `distpg export` unchanged; the
    sampling settings of its generation_config.json do not (the run's own apply). Its line names every file
    written (it named config.json, model.safetensors and tokenizer.json whatever else it wrote)."""
    from distpg import checkpoint
    from distpg.config import dump_run_config
    from distpg.hf import snapshot_base

    folder = tmp_path / "chat-gpt2"
    folder.mkdir()
    for f in hf_folder[0].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    # left behind when a sharded checkpoint is saved again whole (transformers 5 keeps the old index): the
    # export's single model.safetensors must not come with an index naming shards it lacks
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001.safetensors"}}))
    # the openai-community/gpt2 download's other forms of the initial weights: the trained policy's export must
    # not come with them (nor every run's RUN_DIR/base with a copy)
    for name in ("rust_model.ot", "64-8bits.tflite", "tf_model.h5", "flax_model.msgpack", "model.onnx"):
        (folder / name).write_bytes(b"\0" * 64)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(folder)
    cfg = config_from_dict({"model": {"init_from": str(folder)}, "task": {"name": "reverse", "length": 4}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_run_config(cfg))
    snapshot_base(folder, run)
    checkpoint.save(run, 1, Learner(cfg).state(), keep=1)
    out = tmp_path / "out"
    p = _in_process(capsys, monkeypatch, "export", str(run), str(out))
    assert p.returncode == 0, p.stderr
    assert f"wrote {out}: {', '.join(sorted(f.name for f in out.iterdir()))} (transformers" in p.stdout, p.stdout
    assert "tokenizer_config.json" in p.stdout
    again = AutoTokenizer.from_pretrained(out)
    assert again.chat_template == tok.chat_template and type(again) is type(tok)
    assert tok.pad_token is None and again.pad_token == EOT  # as before: the padding config.json names
    assert again.pad_token_id == json.loads((out / "config.json").read_text())["pad_token_id"]
    assert again(SAMPLES[5])["input_ids"] == tok(SAMPLES[5])["input_ids"]
    assert not (out / "generation_config.json").exists() and not (out / "fingerprint.json").exists()
    assert not (out / "model.safetensors.index.json").exists()
    kept = {f.name for f in (run / "base").iterdir()}
    for name in ("rust_model.ot", "64-8bits.tflite", "tf_model.h5", "flax_model.msgpack", "model.onnx",
                 "model.safetensors.index.json"):
        assert not (out / name).exists() and name not in kept, name
    # a run from before: its RUN_DIR/base kept copies of such files; they are not exported
    (run / "base" / "rust_model.ot").write_bytes(b"\0" * 64)
    again_out = tmp_path / "again"
    assert _in_process(capsys, monkeypatch, "export", str(run), str(again_out)).returncode == 0
    assert not (again_out / "rust_model.ot").exists()
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2  # distpg's, not a copy


# ---------------------------------------------------------------- end to end


def _in_process(capsys, monkeypatch, *args, cwd=ROOT) -> subprocess.CompletedProcess:
    """`distpg ARGS` as a finished process (exit status, stdout, stderr), run by `cli.main` in this process (no
    interpreter and torch start-up): for the commands that start no Ray runtime (eval, export, refused trains),
    and trains on the tests' runtime."""
    from distpg.cli import main

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.chdir(cwd)
        code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.ray
def test_train_from_a_gpt2_folder_with_your_own_prompts(ray_session, tmp_path, capsys, monkeypatch):
    """The shipped worked example: make a small GPT-2 folder, `distpg train configs/gpt2-prompts.yaml` from it
    with the bundled prompts and reward function, then `distpg eval` and `distpg export` the result (by cli.main
    in this process, the training on the tests' runtime; test_cli runs `distpg train` and `distpg eval` as
    processes of their own)."""
    from distpg.examples import make_tiny_gpt2

    folder, run, out = tmp_path / "tiny-gpt2", tmp_path / "run", tmp_path / "exported"
    make_tiny_gpt2.main([str(folder)])  # `python -m distpg.examples.make_tiny_gpt2 FOLDER`, in this process
    shape = read_shape(folder)
    assert shape.n_layer == 2 and 256 < shape.vocab_size <= 512

    cli = functools.partial(_in_process, capsys, monkeypatch)
    p = cli("train", "configs/gpt2-prompts.yaml", "--run-dir", str(run),
            "--set", f"model.init_from={folder}", "--set", "run.steps=4", "--set", "run.checkpoint_every=2",
            "--set", "rollout.prompts_per_step=4", "--set", "rollout.group_size=4", "--set", "log.print_every=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "task prompts; model 2x64" in p.stdout
    cfg = load_config(run / "config.yaml")
    assert cfg.model.init_from == str(folder) and cfg.model.n_positions == shape.n_positions
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["rollout/failed_rewards"] == 0 for r in records)  # the reward function ran on every sample
    import pyarrow.parquet as pq

    table = pq.read_table(run / "rollouts")
    assert table.num_rows == 4 * 4 * 4
    bundled = {json.loads(line)["prompt"] for line in (ROOT / "configs/data/repeat_words.jsonl").open()}
    assert set(table.column("prompt_text").to_pylist()) <= bundled
    tok = load_tokenizer(folder)
    assert table.column("prompt_tokens")[0].as_py() == tok.encode(table.column("prompt_text")[0].as_py())
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"

    # from another folder: the run's relative task.prompts_path is found where the run started
    assert cfg.task.prompts_path == "configs/data/repeat_words.jsonl"
    p = cli("eval", str(run), "--samples", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "held-out prompts: 32 | reward_mean" in p.stdout

    p = cli("export", str(run), str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    from distpg.evaluate import load_policy

    _, trained = load_policy(run)
    idx = torch.tensor([tok.encode("Repeat the word: river\nAnswer:")])
    with torch.no_grad():
        assert (_transformers_logits(out, idx) - trained(idx)).abs().max().item() < 1e-4
    for target in (out, folder):  # another export, or the folder the run started from, is not overwritten
        p = cli("export", str(run), str(target))
        assert p.returncode == 2 and f"OUT={str(target)!r} is not empty (it holds config.json" in p.stderr

    # the run keeps what it needs of init_from besides the weights (run/base): eval and export work
    # without the folder, and a changed folder is named, not used
    assert sorted(x.name for x in (run / "base").iterdir()) == sorted(
        [x.name for x in folder.iterdir() if x.suffix != ".safetensors"] + ["fingerprint.json"])
    moved = tmp_path / "moved"
    folder.rename(moved)
    p = cli("eval", str(run), "--samples", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    p = cli("export", str(run), str(tmp_path / "again"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    p = cli("train", "--resume", str(run))
    assert p.returncode == 2 and f"model.init_from={str(folder)!r}: no such folder any more; resuming " in p.stderr
    from distpg.cli import main

    assert main(["train", "--set", f"model.init_from={run / 'base'}", "--run-dir", str(tmp_path / "r2")]) == 2
    assert "is a run's copy of the folder it started from, without the weights" in capsys.readouterr().err
    moved.rename(folder)
    weights = load_file(str(folder / "model.safetensors"))  # the same folder with other weights
    save_file({k: v + 0.01 if k.endswith("ln_f.bias") else v for k, v in weights.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    p = cli("train", "--resume", str(run))
    assert p.returncode == 2
    assert f"model.init_from={str(folder)!r} has changed since the run started: model.safetensors (changed), " \
           "against what" in p.stderr
    p = cli("eval", str(run), "--samples", "2", cwd=tmp_path)  # the weights come from the run
    assert p.returncode == 0, p.stderr[-3000:]
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text() + "\n")  # any edit counts
    (folder / "tokenizer_config.json").rename(tmp_path / "tokenizer_config.json")  # and so does a file gone
    (folder / "notes.txt").write_text("or added")
    p = cli("eval", str(run), cwd=tmp_path)
    assert p.returncode == 2 and "has changed since the run started: notes.txt (added), tokenizer.json (changed), " \
        "tokenizer_config.json (removed), against what" in p.stderr, p.stderr


def test_a_hub_id_or_a_relative_path_that_is_no_folder_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """model.init_from=gpt2 (a Hub id, as a TRL user writes it) said only "'gpt2' is not a folder"; a relative
    path did not say from which folder it was taken (a helper ran a config from another folder)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        ModelConfig(init_from="openai-community/gpt2")
    assert str(e.value) == (
        f"model.init_from='openai-community/gpt2': 'openai-community/gpt2' is not a folder (looked for from the "
        f"current folder, {tmp_path}); distpg reads a local folder and downloads nothing: save the model there "
        "first (transformers' save_pretrained, where the Hub is reachable), or make a tiny one with python -m "
        "distpg.examples.make_tiny_gpt2 DIR")
    (tmp_path / "weights.safetensors").write_text("")
    with pytest.raises(ConfigError, match=r"^model.init_from='weights.safetensors': 'weights.safetensors' is a "
                                          r"file, not a folder \(looked for from the current folder, .*\)$"):
        ModelConfig(init_from="weights.safetensors")
    with pytest.raises(ConfigError, match=r"^model.init_from='/nowhere/gpt2': '/nowhere/gpt2' is not a folder$"):
        ModelConfig(init_from="/nowhere/gpt2")
